"""Packing, padded batches and the supervised loss on the tiny Llama: no cross-contamination."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith import loss as loss_module
from tunesmith.attention import PACKED_SDPA
from tunesmith.config import MethodConfig
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.packing import (
    collate_packed,
    collate_padded,
    forward_pieces,
    length_grouped_batches,
    pack_rows,
)
from tunesmith.data.tokenize import IGNORE, Encoded, EncodeOptions, encode_all
from tunesmith.errors import UsageError
from tunesmith.loss import model_inputs, supervised_loss, token_nll
from tunesmith.train.methods import load_base_model

PAD = 3


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "你好", "世界", "machine", "learning"]
    convs = [Conversation([Message("user", " ".join(rng.choices(words, k=rng.randint(2, 30)))),
                           Message("assistant", " ".join(rng.choices(words, k=rng.randint(1, 25)))),
                           Message("user", "more"), Message("assistant", " ".join(rng.choices(words, k=3)))])
             for _ in range(9)]
    # The last three supervise their first token too: in a row it must not be predicted from the previous example.
    return encode_all(convs[:6], tokenizer, EncodeOptions(), progress=False).examples + \
        encode_all(convs[6:], tokenizer, EncodeOptions(train_on_prompt=True), progress=False).examples


def tiny_model(path, attn="sdpa"):
    """attn "packed_sdpa": what training loads (attention.PACKED_SDPA, per example without a dense mask)."""
    torch.manual_seed(0)
    if attn == "packed_sdpa":
        model = load_base_model(path, MethodConfig())
        assert model.config._attn_implementation == PACKED_SDPA
        return model.eval()
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


def lora_model(path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # init_lora_weights=False: random B, so the adapter really changes the outputs
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    return get_peft_model(tiny_model(path), config).eval()


def unpacked_losses(model, examples) -> list[float]:
    with torch.no_grad():
        return [token_nll(model, collate_padded([e], PAD))[0].sum().item() for e in examples]


def packed_losses(model, examples, batch) -> list[float]:
    with torch.no_grad():
        nll, mask = token_nll(model, batch)
    rows = pack_rows([len(e.input_ids) for e in examples], 160)
    out = {}
    for b, row in enumerate(rows):
        for k, index in enumerate(row, start=1):
            out[index] = nll[b][batch["segment_ids"][b] == k].sum().item()
    return [out[i] for i in range(len(examples))]


def packed_batch(examples):
    rows = pack_rows([len(e.input_ids) for e in examples], 160)
    assert 1 < len(rows) < len(examples)
    return collate_packed([[examples[i] for i in row] for row in rows], PAD)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed_sdpa"])
def test_packed_losses_equal_unpacked(tiny_model_dir, examples, attn):
    model = tiny_model(tiny_model_dir, attn)
    expected = unpacked_losses(model, examples)
    assert packed_losses(model, examples, packed_batch(examples)) == pytest.approx(expected, abs=1e-4)


def test_packed_sdpa_gets_no_dense_mask_and_matches_sdpa_on_padded_batches(tiny_model_dir, examples):
    import transformers.integrations.sdpa_attention as sdpa_module

    packed = tiny_model(tiny_model_dir, "packed_sdpa")
    assert model_inputs(packed, packed_batch(examples))["attention_mask"] is None
    masks = []
    original = sdpa_module.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tunesmith.attention.sdpa_attention_forward", spy)
        with torch.no_grad():
            token_nll(packed, packed_batch(examples))
        assert masks == []  # every packed row went per example, none through a mask
        padded = collate_padded(examples[:5], PAD)  # padding: transformers' sdpa with its mask, unchanged
        with torch.no_grad():
            ours = supervised_loss(packed, padded)
        assert masks and all(m is not None for m in masks)
    with torch.no_grad():
        reference = supervised_loss(tiny_model(tiny_model_dir), padded)
    assert ours[0].item() == pytest.approx(reference[0].item(), abs=1e-4) and ours[1] == reference[1]


def test_packed_losses_equal_unpacked_with_lora(tiny_model_dir, examples):
    model = lora_model(tiny_model_dir)
    expected = unpacked_losses(model, examples)
    assert expected != pytest.approx(unpacked_losses(tiny_model(tiny_model_dir), examples), abs=1e-3)
    assert packed_losses(model, examples, packed_batch(examples)) == pytest.approx(expected, abs=1e-4)


def test_without_the_block_mask_examples_contaminate_each_other(tiny_model_dir, examples):
    model = tiny_model(tiny_model_dir)
    batch = packed_batch(examples)
    batch["attention_mask"] = (batch["segment_ids"] > 0).long()  # what a plain padding collator would pass
    packed = packed_losses(model, examples, batch)
    assert packed != pytest.approx(unpacked_losses(model, examples), abs=1e-4)


def test_packed_labels_never_cross_examples(examples):
    # Fully supervised rows, first token included: the collator itself must cut every boundary.
    examples = [Encoded(e.input_ids, list(e.input_ids)) for e in examples]
    batch = packed_batch(examples)
    starts = torch.zeros_like(batch["segment_ids"], dtype=torch.bool)
    starts[:, 1:] = batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]
    starts[:, 0] = True
    assert (batch["labels"][starts] == IGNORE).all()
    assert (batch["position_ids"][starts & (batch["segment_ids"] > 0)] == 0).all()
    assert (batch["labels"][batch["segment_ids"] == 0] == IGNORE).all()
    assert int((batch["labels"] != IGNORE).sum()) == sum(sum(x != IGNORE for x in e.labels[1:]) for e in examples)


def test_supervised_loss_equals_the_dense_hf_loss(tiny_model_dir, examples):
    model = tiny_model(tiny_model_dir)
    batch = collate_padded(examples[:5], PAD)
    with torch.no_grad():
        total, count = supervised_loss(model, batch)
        dense = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert (total / count).item() == pytest.approx(dense.item(), abs=1e-5)


def test_chunked_loss_and_gradients_match_unchunked(tiny_model_dir, examples, monkeypatch):
    batch = collate_padded(examples[:5], PAD)
    grads = []
    for chunk in (10_000, 7):  # 7 tokens a chunk: many chunks, recomputed in backward
        monkeypatch.setattr(loss_module, "CHUNK_TOKENS", chunk)
        model = lora_model(tiny_model_dir).train()
        total, count = supervised_loss(model, batch)
        (total / count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("lm_head" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def lora_on_attention(path):
    """LoRA on q/v only: the output head stays a frozen nn.Linear (the fused frozen-head path)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(tiny_model(path), config).train()


@pytest.mark.parametrize("autocast", [False, True])
def test_frozen_head_loss_and_gradients_match_the_recomputed_path(tiny_model_dir, examples, monkeypatch, autocast):
    batch = collate_padded(examples[:5], PAD)
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 7)  # many chunks on both paths
    monkeypatch.setattr(loss_module, "HEAD_CHUNK_TOKENS", 7)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(loss_module, "_plain_frozen", lambda head: False)
        model = lora_on_attention(tiny_model_dir)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, count = supervised_loss(model, batch)
        (total / count).backward()
        results.append((total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    tolerance = {"atol": 2e-3, "rtol": 2e-2} if autocast else {"atol": 1e-6, "rtol": 1e-5}
    assert fused_loss == pytest.approx(plain_loss, rel=1e-3 if autocast else 1e-6)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) == 8
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **tolerance)


def test_forward_pieces():
    assert forward_pieces([512] * 8, 1024) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert forward_pieces([300, 500, 200, 1500, 10], 1024) == [[0, 1], [2], [3], [4]]
    assert forward_pieces([100] * 5, 10_000) == [[0, 1, 2, 3, 4]]
    assert forward_pieces([], 1024) == []


def test_padding_does_not_change_the_loss(tiny_model_dir, examples):
    model = tiny_model(tiny_model_dir)
    with torch.no_grad():
        together = supervised_loss(model, collate_padded(examples[:4], PAD))
        alone = [supervised_loss(model, collate_padded([e], PAD)) for e in examples[:4]]
    assert together[1] == sum(n for _, n in alone)
    assert together[0].item() == pytest.approx(sum(t.item() for t, _ in alone), abs=1e-4)


def test_collate_padded_with_pad_equal_to_eos(examples):
    eos = 2
    batch = collate_padded(examples[:3], eos)
    for b, example in enumerate(examples[:3]):
        n = len(example.input_ids)
        assert batch["labels"][b, n - 1] == eos  # the end token stays supervised
        assert (batch["labels"][b, n:] == IGNORE).all() and (batch["attention_mask"][b, n:] == 0).all()


# ---------------------------------------------------------------------------- bin packing and grouping

def next_fit_rows(lengths, max_length) -> int:
    rows, room = 0, 0
    for n in lengths:
        if n > room:
            rows, room = rows + 1, max_length
        room -= n
    return rows


def test_pack_rows_best_fit_decreasing():
    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) < next_fit_rows(lengths, 512)
    assert len(rows) <= sum(lengths) // 512 + 3  # close to the lower bound
    assert pack_rows(lengths, 512) == rows


def test_pack_rows_refuses_overlong_examples():
    with pytest.raises(UsageError, match="index 1, 600 tokens"):
        pack_rows([10, 600], 512)


def test_length_grouped_batches():
    rng = random.Random(2)
    lengths = [rng.randint(1, 1000) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=3)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 8, seed=3) != length_grouped_batches(lengths, 8, seed=4)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    assert padding(batches) < padding([shuffled[i:i + 8] for i in range(0, 1000, 8)]) / 5


def test_supervised_loss_through_a_distributed_wrapper(tiny_model_dir, examples, tmp_path):
    """DDP's forward must run for gradient sync: the wrapper path goes through it and gives the same loss."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model(tiny_model_dir)
        batch = packed_batch(examples)
        with torch.no_grad():
            plain = supervised_loss(model, batch)
            wrapped = supervised_loss(DistributedDataParallel(model), batch)
    finally:
        dist.destroy_process_group()
    assert wrapped[1] == plain[1]
    assert wrapped[0].item() == pytest.approx(plain[0].item(), abs=1e-4)


def test_loss_of_an_fsdp2_sharded_model_goes_through_its_forward(tiny_model_dir, examples, tmp_path):
    """FSDP2 gathers sharded parameters (DTensors) only in the wrapped model's forward, so the loss goes through it
    (logits only where supervised) instead of the frozen-head shortcut; both give the same NLL and gradients."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    def adapter_model():
        torch.manual_seed(0)  # init_lora_weights=False: random B, so the adapter really changes the outputs
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return get_peft_model(tiny_model(tiny_model_dir), config)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain, sharded = adapter_model(), adapter_model()
        for layer in sharded.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        assert loss_module.is_sharded(sharded) and not loss_module.is_sharded(plain)
        batch = packed_batch(examples)
        results = []
        for model in (plain, sharded):
            held_out = loss_module.sum_nll(model, examples, 4, PAD)  # evaluation first, then training goes on
            nll, mask = token_nll(model, batch)
            nll.sum().backward()
            grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for n, p in model.named_parameters() if p.requires_grad}
            results.append((nll.detach(), mask, grads, held_out))
    finally:
        dist.destroy_process_group()
    (nll_plain, mask_plain, grads_plain, eval_plain), (nll_sharded, mask_sharded, grads_sharded, eval_sharded) = results
    assert eval_sharded[1] == eval_plain[1] and eval_sharded[0] == pytest.approx(eval_plain[0], rel=1e-6)
    assert torch.equal(mask_plain, mask_sharded) and mask_plain.sum() > 0
    assert (nll_sharded - nll_plain).abs().max().item() < 1e-5
    assert grads_plain.keys() == grads_sharded.keys() and len(grads_plain) == 8
    assert max((grads_plain[k] - grads_sharded[k]).abs().max().item() for k in grads_plain) < 1e-5
