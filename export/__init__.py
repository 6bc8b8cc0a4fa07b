"""Exporters of egovlp-deploy, installed as `egovlp_deploy.export`: dual- and fusion-mode ONNX models,
TensorRT engines and AOTInductor packages, each validated against PyTorch (arrives with the exporters issue)."""
