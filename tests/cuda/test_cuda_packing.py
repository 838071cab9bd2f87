"""Packed rows on CUDA: every example's loss in a packed row equals its loss alone (tests/data/test_packing.py
on the GPU kernels): training's PACKED_SDPA (sdpa per example), sdpa with the block mask, and flash-attention's
variable-length path (from the restarting position_ids) where flash_attn is installed."""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext

import pytest
import torch

from tests.data import test_packing
from tests.data.test_packing import PAD, packed_batch, packed_losses
from tunesmith.attention import PACKED_SDPA
from tunesmith.config import MethodConfig
from tunesmith.data.packing import collate_padded
from tunesmith.loss import token_nll
from tunesmith.train.methods import load_base_model

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
examples = test_packing.examples  # the CPU tests' fixture: nine encoded conversations, some fully supervised


def _model(path, attn: str):
    """The model as training loads it (train.methods.load_base_model): PACKED_SDPA unless a kernel is named."""
    torch.manual_seed(0)
    model = load_base_model(path, MethodConfig(), None if attn == "packed_sdpa" else attn)
    assert model.config._attn_implementation == (PACKED_SDPA if attn == "packed_sdpa" else attn)
    return model.to(DEVICE).eval()


def _moved(batch: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _autocast(bf16: bool):
    """bf16 as training runs it: fp32 weights under autocast."""
    return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _unpacked_losses(model, examples, bf16: bool) -> list[float]:
    with torch.no_grad(), _autocast(bf16):
        return [token_nll(model, _moved(collate_padded([e], PAD)))[0].sum().item() for e in examples]


def _packed_losses(model, examples, batch, bf16: bool) -> list[float]:
    with _autocast(bf16):
        return packed_losses(model, examples, _moved(batch))


# Tolerances: fp32 as on CPU; bf16 wide enough for the rounding of different matmul shapes (rows of a packed
# batch against one example alone) and narrow enough to catch examples that see each other (the test below).
FP32, BF16 = 1e-4, 3e-3


@pytest.mark.parametrize(("attn", "bf16", "rel"), [("packed_sdpa", False, FP32), ("packed_sdpa", True, BF16),
                                                   ("sdpa", False, FP32), ("flash_attention_2", True, BF16)])
def test_packed_losses_equal_unpacked_on_cuda(tiny_model_dir, examples, attn, bf16, rel):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed: flash-attention's varlen path is not checked")
    model = _model(tiny_model_dir, attn)
    expected = _unpacked_losses(model, examples, bf16)
    assert _packed_losses(model, examples, packed_batch(examples), bf16) == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize(("bf16", "rel"), [(False, FP32), (True, BF16)])
def test_without_example_boundaries_packed_losses_differ_on_cuda(tiny_model_dir, examples, bf16, rel):
    """The check above can fail at its tolerances: with positions that do not restart (a plain concatenation)
    the examples of a row are no longer independent (on the tiny model, up to 0.8% of an example's loss)."""
    model = _model(tiny_model_dir, "packed_sdpa")
    batch = packed_batch(examples)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
    packed = _packed_losses(model, examples, batch, bf16)
    assert packed != pytest.approx(_unpacked_losses(model, examples, bf16), rel=rel)
