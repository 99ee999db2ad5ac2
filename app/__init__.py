"""cxr-triage: chest X-ray triage over ONNX Runtime. This package never imports torch."""

__version__ = "0.1.0"
