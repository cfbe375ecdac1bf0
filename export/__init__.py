"""Exporters: ONNX, AOTInductor packages and TensorRT plans of a classifier for one sigma."""
