"""Custom kernels of egovlp-deploy, installed as `egovlp_deploy.kernels`.

Triton kernels (fused divided space-time attention, fused gated cross-attention) land here, each beside its
plain-PyTorch reference; the C++ sources of the host-side extension live in `csrc/` and build into
`egovlp_deploy._C` during `pip install`.
"""
