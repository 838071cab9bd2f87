"""Sliding-window attention in packed training: every family trains with the attention it is served with.

Tiny random Gemma 2, Gemma 3, Mistral and Qwen2 configs with a window of 8 and examples of 20 to 60
tokens: tunesmith's packed loss (the per-example PACKED_SDPA path, and the dense-mask path for sdpa and
eager) equals the sum of each example's loss from the model's own forward, which builds transformers'
sliding masks itself. With the window switched off the same comparison fails, so the test sees it.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tunesmith.attention import PACKED_SDPA
from tunesmith.config import MethodConfig
from tunesmith.data.packing import block_causal_mask, collate_packed, layer_masks, pack_rows
from tunesmith.data.tokenize import IGNORE, Encoded
from tunesmith.loss import model_inputs, token_nll
from tunesmith.train.methods import load_base_model

WINDOW, VOCAB, ROW = 8, 96, 128
_SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "pad_token_id": 0,
          "eos_token_id": 1, "bos_token_id": 2}


def family_config(family: str):
    """A shrunk config of ``family`` with a window of WINDOW tokens on some (or all) of its layers."""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

    if family == "gemma2":  # alternating sliding / full layers; soft-capping is eager-only, as in the real model
        return Gemma2Config(**_SHAPE, num_hidden_layers=2, sliding_window=WINDOW, query_pre_attn_scalar=16)
    if family == "gemma3":  # five sliding layers, then a full one
        return Gemma3TextConfig(**_SHAPE, num_hidden_layers=6, sliding_window=WINDOW, query_pre_attn_scalar=16)
    if family == "mistral":  # every layer slides
        return MistralConfig(**_SHAPE, num_hidden_layers=2, sliding_window=WINDOW)
    if family == "qwen2":  # layers from max_window_layers on slide
        return Qwen2Config(**_SHAPE, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                           max_window_layers=1)
    raise ValueError(family)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> a saved tiny random model of that family."""
    from transformers import AutoModelForCausalLM

    out = {}
    for family in ("gemma2", "gemma3", "mistral", "qwen2"):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        AutoModelForCausalLM.from_config(family_config(family), dtype=torch.float32).save_pretrained(path)
        out[family] = path
    return out


def random_examples(lengths, seed: int = 0) -> list[Encoded]:
    """Random token ids; the second half of each example supervised (labels = ids), the first label ignored."""
    rng = random.Random(seed)
    examples = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        labels = [IGNORE if i < n // 2 else t for i, t in enumerate(ids)]
        labels[0] = IGNORE
        examples.append(Encoded(input_ids=ids, labels=labels))
    return examples


EXAMPLES = random_examples([23, 41, 9, 57, 30, 5, 48, 19])  # most longer than the window, two shorter


def own_forward_losses(model, examples) -> list[float]:
    """Each example's summed NLL from the model's own forward, one example at a time (its own masks)."""
    out = []
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0, :-1].float()
            out.append(F.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=IGNORE,
                                       reduction="sum").item())
    return out


def packed_losses(model, examples, row: int = ROW) -> list[float]:
    """Each example's summed NLL from tunesmith's packed path (rows of ``row`` tokens)."""
    rows = pack_rows([len(e.input_ids) for e in examples], row)
    assert any(len(r) > 1 for r in rows)  # examples really share rows
    batch = collate_packed([[examples[i] for i in r] for r in rows], 0)
    with torch.no_grad():
        nll, _ = token_nll(model, batch)
    found = {}
    for b, indices in enumerate(rows):
        for k, index in enumerate(indices, start=1):
            found[index] = nll[b][batch["segment_ids"][b] == k].sum().item()
    return [found[i] for i in range(len(examples))]


def load(path, attn: str):
    """"packed_sdpa": what training loads (sdpa models switch to PACKED_SDPA); otherwise the named kernel."""
    from transformers import AutoModelForCausalLM

    if attn == "packed_sdpa":
        model = load_base_model(path, MethodConfig())
    else:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def switch_window_off(model) -> None:
    """What ignoring the window means: every layer attends to its whole example (a window wider than any row;
    None would make transformers' own sliding-mask builder refuse the config)."""
    model.config.sliding_window = 10_000
    for module in model.modules():
        if getattr(module, "sliding_window", None):
            module.sliding_window = 10_000


# Gemma 2 does not support sdpa (soft-capping), so training runs it eager, through the dense mask.
CASES = [("gemma2", "eager"), ("gemma3", "packed_sdpa"), ("gemma3", "sdpa"), ("gemma3", "eager"),
         ("mistral", "packed_sdpa"), ("mistral", "eager"), ("qwen2", "packed_sdpa"), ("qwen2", "sdpa")]


@pytest.mark.parametrize(("family", "attn"), CASES)
def test_packed_loss_equals_the_models_own_forward_beyond_the_window(family_dirs, family, attn):
    model = load(family_dirs[family], attn)
    if attn == "packed_sdpa":
        assert model.config._attn_implementation == PACKED_SDPA
    expected = own_forward_losses(model, EXAMPLES)
    assert packed_losses(model, EXAMPLES) == pytest.approx(expected, abs=1e-5, rel=1e-6)
    switch_window_off(model)  # the comparison sees a window that is not applied
    assert packed_losses(model, EXAMPLES) != pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "qwen2"])
def test_the_window_changes_the_loss_of_long_examples_only(family_dirs, family):
    model = load(family_dirs[family], "eager")
    windowed = own_forward_losses(model, EXAMPLES)
    switch_window_off(model)
    full = own_forward_losses(model, EXAMPLES)
    for e, with_window, without in zip(EXAMPLES, windowed, full, strict=True):
        if len(e.input_ids) <= WINDOW:
            assert with_window == pytest.approx(without, abs=1e-5)
        elif len(e.input_ids) > 2 * WINDOW:  # most supervised tokens see past the window
            assert with_window != pytest.approx(without, abs=1e-3)


def test_a_long_gemma3_example_trains_with_transformers_sliding_window(family_dirs):
    """Two 180-token examples (22 windows each) in one packed row, through the training model."""
    from transformers import AutoModelForCausalLM

    examples = random_examples([180, 170], seed=1)
    training = load(family_dirs["gemma3"], "packed_sdpa")
    reference = AutoModelForCausalLM.from_pretrained(family_dirs["gemma3"], dtype=torch.float32).eval()
    assert reference.config._attn_implementation == "sdpa"
    expected = own_forward_losses(reference, examples)
    assert packed_losses(training, examples, row=360) == pytest.approx(expected, abs=1e-5, rel=1e-6)
    switch_window_off(reference)
    assert own_forward_losses(reference, examples) != pytest.approx(expected, abs=1e-2)


def test_block_causal_mask_with_a_window():
    segments = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 0]])
    mask = block_causal_mask(segments, window=3)[0, 0]
    assert mask.shape == (9, 9)
    assert mask[4].tolist() == [False, False, True, True, True, False, False, False, False]  # the last 3, itself too
    assert mask[7].tolist() == [False] * 5 + [True, True, True, False]  # never into the previous example
    assert torch.equal(block_causal_mask(segments), block_causal_mask(segments, window=None))
    assert block_causal_mask(segments)[0, 0, 4, :5].all()


def test_layer_masks_per_layer_type(family_dirs):
    segments = torch.tensor([[1] * 12 + [2] * 4])
    mask = block_causal_mask(segments)
    windowed = block_causal_mask(segments, WINDOW)
    for family in ("gemma2", "gemma3", "qwen2"):
        masks = layer_masks(mask, family_config(family))
        assert set(masks) == {"sliding_attention", "full_attention"}
        assert torch.equal(masks["sliding_attention"], windowed) and torch.equal(masks["full_attention"], mask)
    assert torch.equal(layer_masks(mask, family_config("mistral")), windowed)
    assert layer_masks(mask, load(family_dirs["qwen2"], "sdpa").config)["sliding_attention"] is not None
    from transformers import LlamaConfig, Qwen2Config

    assert layer_masks(mask, LlamaConfig()) is mask
    assert layer_masks(mask, Qwen2Config(num_hidden_layers=2)) is mask  # use_sliding_window off


def test_model_inputs_give_eager_a_float_mask_per_layer_type(family_dirs):
    model = load(family_dirs["gemma2"], "eager")
    rows = pack_rows([len(e.input_ids) for e in EXAMPLES], ROW)
    batch = collate_packed([[EXAMPLES[i] for i in r] for r in rows], 0)
    masks = model_inputs(model, batch)["attention_mask"]
    assert set(masks) == {"sliding_attention", "full_attention"}
    assert all(m.dtype == torch.float32 for m in masks.values())
    assert (masks["sliding_attention"] < 0).sum() > (masks["full_attention"] < 0).sum()
