"""Batched greedy generation on CUDA in fp32 gives the one-at-a-time outputs (tests/evaluate/test_generation.py
on the GPU: left padding, length-sorted batches, rows that finish early)."""

from __future__ import annotations

import pytest
import torch

from tests.evaluate.test_generation import _assert_same, _boost_end_of_turn, _prompts
from tunesmith.inference import GenerationOptions, generate
from tunesmith.models.load import load

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


@pytest.fixture
def tiny(tiny_model_dir):
    loaded = load(str(tiny_model_dir), dtype=torch.float32, device=DEVICE)
    assert loaded.model.device.type == torch.device(DEVICE).type and loaded.model.dtype == torch.float32
    return loaded


def test_batched_greedy_equals_one_by_one_on_cuda(tiny):
    prompts = _prompts(tiny.tokenizer)
    options = GenerationOptions(max_new_tokens=32)
    batched = generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=8)
    single = generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=1)
    _assert_same(batched, single)
    assert sum(g.completion_tokens for g in batched) > 16 * len(prompts)  # long answers, not early stops
    assert len({g.text for g in batched}) > 1  # the prompts really steer the outputs


def test_batched_greedy_equals_one_by_one_when_rows_stop_at_different_steps_on_cuda(tiny):
    _boost_end_of_turn(tiny.model, 3.0)
    prompts = _prompts(tiny.tokenizer)
    options = GenerationOptions(max_new_tokens=30)
    single = generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=1)
    assert len({g.completion_tokens for g in single}) >= 3  # rows really stop at different steps
    assert {g.finish_reason for g in single} == {"stop", "length"}
    for batch_size in (3, 8):
        _assert_same(generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=batch_size), single)
