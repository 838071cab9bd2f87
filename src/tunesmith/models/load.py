"""Load a model for inference from an alias, a model directory or a tunesmith run directory.

A run directory is itself loadable by plain transformers/peft: it holds either a peft adapter
(adapter_config.json) or full weights (config.json), the tokenizer with the chat template used
in training, and ``tunesmith.json`` naming the base model.

Loading runs no code from the model directory: weights come from safetensors (a directory with
only pickled weights, ``pytorch_model.bin`` and the like, is refused unless ``allow_pickle``,
since unpickling can run arbitrary code), and ``trust_remote_code`` is always False: a model whose
config asks for its own Python modeling code is refused by transformers with a message.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError, UsageError
from tunesmith.models.resolve import resolve
from tunesmith.train.rundir import RUN_INFO

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    path: Path  # what was asked for, resolved
    base_path: Path  # the base model directory (== path for a plain model)
    run_info: dict = field(default_factory=dict)

    @property
    def is_run(self) -> bool:
        return bool(self.run_info)

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the run was trained with (None: whatever the template inserts)."""
        from tunesmith.data.prompt import run_system_prompt

        return run_system_prompt(self.run_info)


def read_run_info(path: Path) -> dict:
    info = Path(path) / RUN_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def base_model(path: Path) -> str | None:
    """The base model a run or a peft adapter directory was trained from (tunesmith.json's base_model, else
    the adapter config's); None for a plain model."""
    path = Path(path)
    base = read_run_info(path).get("base_model")
    if not base and (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    return base or None


def default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    with refusing_remote_code(path):
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token is None:
        # Only the pad id is borrowed; padding is always masked by the attention mask and
        # labels, so EOS itself is still supervised.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(name_or_run: str | Path, *, dtype: torch.dtype | None = None, device: str | None = None,
         merge: bool = False, allow_pickle: bool = False) -> Loaded:
    """Load ``name_or_run`` (alias, model dir, .gguf, or run dir) in eval mode.

    ``allow_pickle`` permits pickled weights where no safetensors exist (they can run code)."""

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = resolve(name_or_run)
    info, base = read_run_info(path), base_model(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = resolve(base)
        require_safetensors(path, allow_pickle)
        base = _from_pretrained(base_path, dtype, allow_pickle)
        with refusing_remote_code(path):
            model = PeftModel.from_pretrained(base, str(path))
        if merge:
            model = model.merge_and_unload()
    else:
        base_path = resolve(base) if base else path  # a full fine-tune names its base; a plain model is its own
        model = _from_pretrained(path, dtype, allow_pickle)
    tokenizer = load_tokenizer(path if (path / "tokenizer_config.json").is_file() else base_path)
    model.to(device).eval()
    return Loaded(model=model, tokenizer=tokenizer, path=path, base_path=base_path, run_info=info)


def _from_pretrained(path: Path, dtype: torch.dtype, allow_pickle: bool):
    from transformers import AutoModelForCausalLM

    require_safetensors(path, allow_pickle)
    with refusing_remote_code(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False,
                                                    use_safetensors=None if allow_pickle else True)
