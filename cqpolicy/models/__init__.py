"""Model adapters: load DiT-style diffusers models (the embedded ``fmnist-dit`` or any DiT checkpoint)."""
from cqpolicy.models.loading import EMBEDDED, LoadedModel, ModelLoadError, load_model

__all__ = ["EMBEDDED", "LoadedModel", "ModelLoadError", "load_model"]
