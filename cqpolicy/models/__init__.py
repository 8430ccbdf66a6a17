"""Models: loading (the embedded ``fmnist-dit``, local diffusers folders, cached hub ids) and one adapter per
model family (``adapters``), the only place that knows a family's modules."""
from cqpolicy.models.loading import EMBEDDED, LoadedModel, ModelLoadError, load_model

__all__ = ["EMBEDDED", "LoadedModel", "ModelLoadError", "load_model"]
