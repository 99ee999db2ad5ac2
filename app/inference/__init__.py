"""The model at run time: the ONNX Runtime session and the micro-batcher in front of it."""
