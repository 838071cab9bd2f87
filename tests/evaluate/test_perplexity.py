"""Perplexity is token-weighted over supervised tokens: batch size and padding do not change it."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.data.conversation import Conversation, Message
from tunesmith.errors import UsageError
from tunesmith.evaluate.perplexity import perplexity


def _conversations() -> list[Conversation]:
    pairs = [
        ("hi", "Hello!"),
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Who are you?", "I am a helpful assistant trained to answer questions about the weather and more."),
        ("你好", "你好，世界！"),
        ("Explain machine learning in one sentence.", "Machine learning lets computers learn from data."),
        ("Translate: Hello, World!", "你好，世界！我是一个有用的AI助手。深度学习基于多层神经网络。"),
        ("name", "fox"),
        ("Tell me about the quick brown fox.", "The quick brown fox jumps over the lazy dog. " * 3),
        ("system user assistant", "tool function call observation arguments name weather"),
    ]
    return [Conversation([Message("user", q), Message("assistant", a)], source="mem", line=i + 1)
            for i, (q, a) in enumerate(pairs)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tunesmith.models.load import load

    return load(str(tiny_model_dir), dtype=torch.float32, device="cpu")


def test_batch_size_does_not_change_perplexity(tiny):
    convs = _conversations()
    one = perplexity(tiny.model, tiny.tokenizer, convs, batch_size=1, progress=False)
    eight = perplexity(tiny.model, tiny.tokenizer, convs, batch_size=8, progress=False)
    assert one.supervised_tokens == eight.supervised_tokens > 0
    assert abs(one.perplexity - eight.perplexity) < 1e-5
    assert math.isclose(one.perplexity, math.exp(one.eval_loss), rel_tol=1e-12)


def test_perplexity_is_token_weighted_by_hand(tiny):
    """Recompute exp(sum NLL / count) from plain logits, one example at a time, no padding."""
    from tunesmith.data.tokenize import EncodeOptions, encode_all

    convs = _conversations()
    examples = encode_all(convs, tiny.tokenizer, EncodeOptions(), progress=False).examples
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logits = tiny.model(input_ids=ids).logits[0, :-1].double()
            labels = torch.tensor(example.labels[1:])
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    result = perplexity(tiny.model, tiny.tokenizer, convs, batch_size=4, progress=False)
    assert result.supervised_tokens == count
    assert abs(result.eval_loss - total / count) < 1e-5
    # Not a mean of per-sequence perplexities: that would differ on examples of different lengths.
    assert result.examples == len(convs)


def test_prompt_tokens_are_not_scored(tiny):
    """Changing only the prompt changes the context but never the number of scored tokens."""
    short = [Conversation([Message("user", "hi"), Message("assistant", "Hello!")])]
    long = [Conversation([Message("user", "hi " * 40), Message("assistant", "Hello!")])]
    a = perplexity(tiny.model, tiny.tokenizer, short, progress=False)
    b = perplexity(tiny.model, tiny.tokenizer, long, progress=False)
    assert a.supervised_tokens == b.supervised_tokens


def test_bad_batch_size(tiny):
    with pytest.raises(UsageError, match="batch_size"):
        perplexity(tiny.model, tiny.tokenizer, _conversations(), batch_size=0, progress=False)


def test_shards_of_sum_nll_add_up_to_the_whole(tiny):
    """loss.sum_nll is the one eval-loss sum: what processes compute on their shards adds up to it."""
    from tunesmith.data.tokenize import EncodeOptions, encode_all
    from tunesmith.loss import sum_nll

    examples = encode_all(_conversations(), tiny.tokenizer, EncodeOptions(), progress=False).examples
    whole = sum_nll(tiny.model, examples, 2, tiny.tokenizer.pad_token_id)
    parts = [sum_nll(tiny.model, examples, 2, tiny.tokenizer.pad_token_id, shard=(i, 3)) for i in range(3)]
    assert sum(count for _, count in parts) == whole[1]
    assert sum(nll for nll, _ in parts) == pytest.approx(whole[0], rel=1e-9)
    result = perplexity(tiny.model, tiny.tokenizer, _conversations(), batch_size=2, progress=False)
    assert result.eval_loss == pytest.approx(whole[0] / whole[1], rel=1e-12)
