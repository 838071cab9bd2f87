"""Training on CUDA with the tiny Llama: QLoRA, bf16 against fp32, liger-kernel, checkpoint and resume.

The CPU tests (tests/train/) cover the same loop; these run the parts that exist only on a GPU:
bitsandbytes' 4-bit base, bf16 autocast on CUDA, liger-kernel's Triton layers, the CUDA RNG in
checkpoints.
"""

from __future__ import annotations

import importlib.util
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.cuda.helpers import DETERMINISTIC, DETERMINISTIC_ENV, LIGER, train_cli
from tests.train.helpers import read_losses, tiny_config, tiny_overrides
from tests.train.test_resume import _flags
from tunesmith.data.readers import load_conversations
from tunesmith.data.tokenize import EncodeOptions, encode_all
from tunesmith.models.load import load_tokenizer
from tunesmith.train.checkpoint import list_checkpoints
from tunesmith.train.loop import finetune

pytestmark = pytest.mark.cuda


def _supervised_loss(model, examples) -> float:
    """Mean of transformers' own loss (labels: the supervised tokens) over ``examples``."""
    losses = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids], device="cuda")
            losses.append(model(input_ids=ids, labels=torch.tensor([e.labels], device="cuda")).loss.item())
    return sum(losses) / len(losses)


def test_qlora_4bit_trains_and_its_adapter_loads_in_plain_peft(tiny_model_dir, chat_file, tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("method qlora needs bitsandbytes, which is not installed (pip install 'tunesmith[cuda]')")
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run = tmp_path / "qlora"
    result = finetune(tiny_config(tiny_model_dir, chat_file, run, method__name="qlora", train__precision="bf16",
                                  train__max_steps=30))
    losses = read_losses(run)
    assert result.steps == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses

    # Plain transformers + peft, as a user would load it: the same NF4 base, then the adapter.
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantized, dtype=torch.bfloat16,
                                                device_map={"": 0}).eval()
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    examples = encode_all(load_conversations([str(chat_file)]), load_tokenizer(tiny_model_dir),
                          EncodeOptions(max_length=64), progress=False).examples[:16]
    before = _supervised_loss(base, examples)
    tuned = PeftModel.from_pretrained(base, str(run)).eval()  # wraps ``base`` in place
    saved, loaded = load_file(run / "adapter_model.safetensors"), get_peft_model_state_dict(tuned)
    assert saved and saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], saved[k].to(loaded[k].device, loaded[k].dtype)) for k in saved)
    after = _supervised_loss(tuned, examples)
    assert after < before - 0.5, (before, after)  # what was learned comes back through plain peft


def test_bf16_training_loss_within_1_percent_of_fp32(tiny_model_dir, chat_file, tmp_path):
    for precision in ("fp32", "bf16"):
        finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / precision, train__precision=precision,
                             method__dropout=0))
    fp32, bf16 = read_losses(tmp_path / "fp32"), read_losses(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == 10
    assert bf16 == pytest.approx(fp32, rel=0.01)
    assert bf16 != fp32  # bf16 rounding really was in the loop


def test_liger_kernel_on_and_off_give_the_same_loss(tiny_model_dir, chat_file, tmp_path):
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed (pip install 'tunesmith[cuda]')")
    runs = {}
    for name, setup in (("off", ""), ("on", LIGER)):
        overrides = tiny_overrides(tiny_model_dir, chat_file, tmp_path / name, train__precision="bf16",
                                   method__dropout=0)
        runs[name] = train_cli(_flags(overrides), setup)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert "LlamaRMSNorm from liger_kernel" in runs["on"].stderr  # the kernels were really in place
    off, on = read_losses(tmp_path / "off"), read_losses(tmp_path / "on")
    assert len(off) == len(on) == 10
    assert on == pytest.approx(off, rel=0.01)


def test_sigkill_after_a_checkpoint_then_resume_on_cuda_matches_a_straight_run(tiny_model_dir, chat_file, tmp_path):
    """The CPU test's run (tests/train/test_resume.py) on CUDA: dropout and NEFTune draw from the CUDA RNG,
    which the checkpoint must restore. Both runs use PyTorch's deterministic kernels, so they can be equal."""
    extra = {"train__max_steps": 20, "output__save_every": 5, "method__dropout": 0.1, "train__neftune_alpha": 5}
    straight = train_cli(_flags(tiny_overrides(tiny_model_dir, chat_file, tmp_path / "straight", **extra)),
                         DETERMINISTIC, **DETERMINISTIC_ENV)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "killed"
    flags = _flags(tiny_overrides(tiny_model_dir, chat_file, run, **extra))
    killed = train_cli(flags, DETERMINISTIC, TUNESMITH_TEST_KILL="after-checkpoint:10", **DETERMINISTIC_ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [(s, ok) for s, _, ok in list_checkpoints(run)] == [(5, True), (10, True)]
    resumed = train_cli([*flags, "--resume", "auto"], DETERMINISTIC, **DETERMINISTIC_ENV)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]

    assert len(read_losses(run)) == 20
    assert read_losses(run) == read_losses(tmp_path / "straight")  # every one of the 20 steps, bit for bit
    ours, theirs = load_file(run / "adapter_model.safetensors"), load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
