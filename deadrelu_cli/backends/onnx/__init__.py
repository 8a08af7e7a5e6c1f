"""The ONNX backend: onnxruntime sessions over an instrumented graph (no torch)."""
