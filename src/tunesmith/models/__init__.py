"""Model resolution (aliases, cache, hub, PyPI-packaged GGUF) and loading."""

from tunesmith.config import DEFAULT_MODEL
from tunesmith.models.resolve import ALIASES, DEFAULT_ENCODER, ModelNotFoundError, pull, resolve

__all__ = ["ALIASES", "DEFAULT_ENCODER", "DEFAULT_MODEL", "ModelNotFoundError", "pull", "resolve"]
