"""Model resolution (aliases, cache, hub, PyPI-packaged GGUF) and loading."""

from tunesmith.models.resolve import (
    ALIASES,
    DEFAULT_ENCODER,
    DEFAULT_MODEL,
    ModelNotFoundError,
    pull,
    resolve,
)

__all__ = ["ALIASES", "DEFAULT_ENCODER", "DEFAULT_MODEL", "ModelNotFoundError", "pull", "resolve"]
