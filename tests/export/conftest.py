"""A tiny LoRA run directory, laid out as training writes one: adapter at the root, tokenizer, tunesmith.json."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def lora_run_dir(tiny_model_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("lora-run")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # init_lora_weights=False: B starts random, not zero, so the adapter changes the logits and a
    # merge that dropped it would fail the comparison.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(run)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run)
    (run / "tunesmith.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    return run
