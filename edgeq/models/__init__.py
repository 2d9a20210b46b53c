"""Open a model by path or short name; see `open_model`."""

from edgeq.models.config import ModelConfig
from edgeq.models.registry import open_model, resolve_model
from edgeq.models.source import ModelSource, TensorInfo

__all__ = ["ModelConfig", "ModelSource", "TensorInfo", "open_model", "resolve_model"]
