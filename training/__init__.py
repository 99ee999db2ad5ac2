"""Training for cxr-triage: NIH ChestX-ray14 data, model zoo, trainer, evaluation, ONNX export.

The only thing that leaves this package is a model folder (``model.onnx`` + ``model_card.json``);
the service never imports it. Heavy dependencies (torch, timm) are imported where they are used so
that ``training.cli`` stays cheap to import.
"""
