"""tunesmith: from your own instruction or chat data to a fine-tuned, evaluated, servable model.

Every command is a library function one import away::

    from tunesmith import resolve, load, generate, check_data, finetune, evaluate, score
"""

import warnings
from importlib import import_module

# peft 0.21 still reads the renamed `is_gradient_checkpointing` of transformers 5 on every load;
# the warning is not actionable for a tunesmith user.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"

# Public names, imported on first use so `import tunesmith` stays cheap (no torch at import).
_EXPORTS = {
    "resolve": "tunesmith.models.resolve",
    "pull": "tunesmith.models.resolve",
    "load": "tunesmith.models.load",
    "generate": "tunesmith.inference",
    "GenerationOptions": "tunesmith.inference",
    "check_data": "tunesmith.data.doctor",
    "read_dataset": "tunesmith.data.readers",
    "Conversation": "tunesmith.data.conversation",
    "Message": "tunesmith.data.conversation",
    "Config": "tunesmith.config",
    "finetune": "tunesmith.train.loop",
    "evaluate": "tunesmith.evaluate.pipeline",
    "score": "tunesmith.evaluate.metrics",
    "quickstart": "tunesmith.quickstart",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
