"""Merge a LoRA run into its base and write a plain Hugging Face model directory.

The result needs neither peft nor tunesmith: ``AutoModelForCausalLM.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)`` load it, with the chat template used in training. Merging
happens in float32 so the merged weights equal base + scale * B @ A without a rounding step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from tunesmith.errors import UsageError


def merge_to_dir(run_or_model, out) -> Path:
    """Write ``run_or_model`` (a run dir, model dir or alias) with any adapter merged into ``out``."""
    from tunesmith.models.load import load

    out = Path(out)
    _check_out(out)
    loaded = load(run_or_model, dtype=torch.float32, device="cpu", merge=True)
    tokenizer = _original_tokenizer(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target, then renamed: an interrupted export leaves no half model behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        loaded.model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # _check_out allowed only an empty directory
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_out(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; choose a new directory")


def _original_tokenizer(loaded):
    """The tokenizer as saved with the run: load() may borrow EOS as pad, which must not be exported."""
    from transformers import AutoTokenizer

    source = loaded.path if (Path(loaded.path) / "tokenizer_config.json").is_file() else loaded.base_path
    return AutoTokenizer.from_pretrained(str(source))
