"""Export: one declarative spec per graph, ONNX / TensorRT / AOTInductor, manifests."""
