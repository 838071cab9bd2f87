"""What loading a model directory may not do, and one-line errors for what it cannot do.

Weights come from safetensors only: a directory with only pickled weights is refused unless
allowed, since unpickling can run arbitrary code. A model that needs its own Python code
(trust_remote_code) is refused. Damaged or foreign files (a corrupt config.json, truncated
safetensors or GGUF) become one message naming the path. The resolver (GGUF dequantizing), the
loader and training all load through these guards.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

from tunesmith.errors import TunesmithError, UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a model or adapter directory whose weights exist only as pickles, unless allowed."""
    path = Path(path)
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UsageError(f"{path}: its weights are only in pickle format ({', '.join(pickles[:3])}), and loading a "
                         "pickle can run arbitrary code. Convert them to safetensors, or, if you trust where they "
                         "came from, allow it: --model.allow_pickle true (train) or --allow-pickle (serve)")


@contextlib.contextmanager
def refusing_remote_code(path: str | Path):
    """One-line errors for what loading a model directory raises: transformers' refusal of a model that ships
    its own Python code (a usage error), and damaged, incomplete or unsupported files (a corrupt config.json,
    an unknown model type, truncated safetensors or GGUF, a broken tokenizer.json)."""
    from safetensors import SafetensorError

    try:
        yield
    except ValueError as exc:  # json.JSONDecodeError is one too
        if "trust_remote_code" not in str(exc):
            raise damaged_model(path, exc) from exc
        raise UsageError(f"{path}: this model needs its own Python code to load (trust_remote_code), which "
                         "tunesmith never runs; choose a model whose architecture transformers supports") from None
    except (OSError, SafetensorError, struct.error) as exc:
        raise damaged_model(path, exc) from exc


def damaged_model(path: str | Path, exc: Exception) -> TunesmithError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return TunesmithError(f"{path}: cannot load the model: {first.rstrip('.')}. Its files look damaged, incomplete "
                          "or of an unsupported kind; pull or export it again, or choose another model")
