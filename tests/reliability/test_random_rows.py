"""Random JSON rows built from the readers' own vocabulary (format keys, roles, JSON-looking strings, nesting):
reading, checking and converting them may report problems, but may never raise anything but a
TunesmithError. Seeded, so a failure reproduces; it found that a content part whose `type` was a list
crashed the OpenAI reader."""

from __future__ import annotations

import contextlib
import json
import random

from tunesmith.data.convert import TARGETS, convert
from tunesmith.data.doctor import check_data
from tunesmith.data.readers import read_dataset
from tunesmith.errors import TunesmithError

KEYS = ["instruction", "input", "output", "system", "history", "messages", "conversations", "role", "content", "from",
        "value", "prompt", "completion", "text", "tools", "metadata", "tool_calls", "weight", "name", "function",
        "arguments", "chosen", "type", "tool_call_id"]
SCALARS = [None, 0, 1, 2.5, True, "", " ", "x", "user", "assistant", "gpt", "human", "system", "tool", "function_call",
           "[1]", "{}", '{"name": "f"}']


def _value(rng: random.Random, depth: int = 0):
    draw = rng.random()
    if depth > 3 or draw < 0.3:
        return rng.choice(SCALARS)
    if draw < 0.6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _rows(rng: random.Random) -> list[dict]:
    rows = [{rng.choice(KEYS): _value(rng) for _ in range(rng.randrange(1, 5))} for _ in range(3)]
    # One nearly valid conversation, so the deeper checks (roles, tool calls, weights) run too.
    last = {"role": rng.choice(["assistant", "tool", "user", "function"]), "content": _value(rng)}
    for key in ("tool_calls", "weight"):
        if rng.random() < 0.4:
            last[key] = _value(rng)
    return [*rows, {"messages": [{"role": "user", "content": "hi"}, last]}]


def _read_check_convert(path) -> None:
    conversations = read_dataset(path).conversations
    check_data(str(path), tokens=False)
    for target in TARGETS:
        with contextlib.suppress(TunesmithError):
            convert(conversations, target)


def test_random_rows_raise_only_tunesmith_errors(tmp_path):
    rng = random.Random(1)
    for i in range(1500):
        path = tmp_path / f"rows{i}.jsonl"
        path.write_text("\n".join(json.dumps(row) for row in _rows(rng)) + "\n", encoding="utf-8")
        # A reported problem (TunesmithError) is the right outcome; anything else fails the test at its row.
        with contextlib.suppress(TunesmithError):
            _read_check_convert(path)
