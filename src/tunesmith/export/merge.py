"""Merge a LoRA run into its base and write a plain Hugging Face model directory.

The result needs neither peft nor tunesmith: ``AutoModelForCausalLM.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)`` load it, with the chat template used in training. A run trained
with a system prompt (data.system_prompt) has it written into the exported template as the default for
conversations without one, since no other server knows the run: vLLM, llama.cpp or Ollama then render
what training rendered. Merging
happens in float32 so the merged weights equal base + scale * B @ A without a rounding step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tunesmith import atomic
from tunesmith.models.load import load


def merge_to_dir(run_or_model, out, *, overwrite: bool = False) -> Path:
    """Write ``run_or_model`` (a run dir, model dir or alias) with any adapter merged into ``out``;
    a non-empty ``out`` is replaced only with ``overwrite``."""
    out = Path(out)
    atomic.refuse_existing(out, overwrite, directory=True)  # before the model is loaded
    loaded = load(run_or_model, dtype=torch.float32, device="cpu", merge=True)
    tokenizer = _original_tokenizer(loaded)
    if tokenizer.chat_template:
        tokenizer.chat_template = template_with_system(tokenizer.chat_template, loaded.system_prompt)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target, then renamed: an interrupted export leaves no half model behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        loaded.model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for file in staging.iterdir():
            atomic.fsync_file(file)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` onto ``out``. An old ``out`` is renamed aside first and deleted only once the new one
    is in place, so an interruption leaves one complete model under the name, never a mix."""
    old = atomic.temp_name(out) if out.exists() else None
    if old:
        os.replace(out, old)
    os.replace(new, out)
    atomic.fsync_dir(out.parent)
    if old:
        shutil.rmtree(old)


def _original_tokenizer(loaded):
    """The tokenizer as saved with the run: load() may borrow EOS as pad, which must not be exported."""
    from transformers import AutoTokenizer

    source = loaded.path if (Path(loaded.path) / "tokenizer_config.json").is_file() else loaded.base_path
    return AutoTokenizer.from_pretrained(str(source))


def template_with_system(template: str, system_prompt: str | None) -> str:
    """``template`` giving ``system_prompt`` to every conversation that starts without a system message, as
    training did; unchanged without one. The prompt is a Jinja string literal (JSON escapes are Jinja's)."""
    if not system_prompt:
        return template
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return ("{%- if not (messages and messages[0]['role'] == 'system') %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif %}" + template)
