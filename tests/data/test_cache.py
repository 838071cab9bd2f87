"""The tokenized-data cache: a hit tokenizes nothing; any change in data, template, tokenizer or options misses."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.conftest import write_jsonl
from tunesmith.data import cache
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.tokenize import EncodeOptions

ROWS = [{"instruction": f"Question number {i}?", "input": "", "output": f"Answer number {i}."} for i in range(12)]


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts real encode_all runs (the real function still does the work)."""
    calls = []
    real = cache.encode_all

    def counting(convs, *args, **kwargs):
        calls.append(len(convs))
        return real(convs, *args, **kwargs)

    monkeypatch.setattr(cache, "encode_all", counting)
    return calls


def run(data, tokenizer, template="chatml", **options):
    return cache.encode_cached(data, tokenizer, EncodeOptions(**options), template, progress=False)


def test_second_identical_run_uses_the_cache(tmp_path, tokenizer, encode_calls, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    first = run(data, tokenizer)
    second = run(str(data), tokenizer)
    assert encode_calls == [12] and not first.from_cache and second.from_cache
    assert "using cached tokenized data: 12 examples" in capsys.readouterr().err
    assert [(e.input_ids, e.labels, e.source, e.line, e.truncated) for e in second.examples] == \
        [(e.input_ids, e.labels, e.source, e.line, e.truncated) for e in first.examples]
    entries = list(cache.cache_dir().iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".npz"  # no partial files left behind


def test_any_change_misses(tmp_path, tokenizer, encode_calls):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run(data, tokenizer)
    run(data, tokenizer, template="alpaca")
    run(data, tokenizer, max_length=8)
    run(data, tokenizer, train_on_prompt=True)
    tokenizer.add_tokens(["<tool>"], special_tokens=True)
    run(data, tokenizer)
    write_jsonl(data, ROWS[:-1] + [{**ROWS[-1], "output": "Changed."}])
    run(data, tokenizer)
    assert len(encode_calls) == 6
    run(data, tokenizer)
    assert len(encode_calls) == 6


def test_drop_counts_survive_the_cache(tmp_path, tokenizer, encode_calls):
    rows = ROWS + [{"instruction": "long " * 80, "input": "", "output": "x"}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    first = run(data, tokenizer, max_length=60, truncation="drop")
    second = run(data, tokenizer, max_length=60, truncation="drop")
    assert second.from_cache and (second.dropped, second.dropped_at) == (first.dropped, first.dropped_at) == \
        (1, [f"{data}:13"])


def test_in_memory_conversations(tokenizer, encode_calls):
    convs = [Conversation([Message("user", "Hi"), Message("assistant", f"Hello {i}.")]) for i in range(3)]
    assert not run(convs, tokenizer).from_cache
    assert run(convs, tokenizer).from_cache
    convs[1].messages[1].train = False
    assert not run(convs, tokenizer).from_cache
    assert encode_calls == [3, 3]
