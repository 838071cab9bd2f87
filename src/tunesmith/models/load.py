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

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.models.resolve import resolve
from tunesmith.models.safety import refusing_remote_code, require_safetensors
from tunesmith.run import base_model, read_run_info, run_system_prompt


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
        return run_system_prompt(self.run_info)


def default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
