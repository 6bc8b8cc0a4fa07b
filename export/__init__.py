"""Exporters of egovlp-deploy, installed as `egovlp_deploy.export`: dual-mode and fusion-mode ONNX graphs (fp32,
fp16 with fp32 norms, int8), TensorRT engines, AOTInductor packages, each validated against PyTorch and listed in
a `manifest.json` (see export/specs.py for the roles)."""
