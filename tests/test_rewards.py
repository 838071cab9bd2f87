"""Reward functions: the built-ins by hand, loading FILE.py:FUNCTION, and every bad return named."""

from __future__ import annotations

import json
import math

import pytest

from tunesmith.errors import UsageError
from tunesmith.rewards import RewardError, final_answer, load_rewards, score


def _scores(spec: str, completions: list[str], **fields) -> list[float]:
    (reward,) = load_rewards([spec])
    return [row[0] for row in score([reward], ["q"] * len(completions), completions, fields,
                                    [f"data.jsonl:{i + 1}" for i in range(len(completions))])]


def test_exact_compares_the_final_answer_as_a_number_or_normalised_text():
    completions = ["2 + 2 = 4", "The answer is 1,000.", "so \\boxed{12} is it, not 13", "#### 7.0", "about 5",
                   "Answer: Paris.", "answer: paris  ", "Lyon"]
    answers = ["4", "1000", "12", "7", "6", "Paris", "PARIS", "Paris"]
    assert _scores("exact", completions, answer=answers) == [1, 1, 1, 1, 0, 1, 1, 0]
    assert final_answer("x \\boxed{a} y \\boxed{b}") == "b"


def test_contains_regex_and_max_words():
    assert _scores("contains", ["It is Paris.", "Rome"], answer=["paris", "Paris"]) == [1, 0]
    assert _scores("regex:^\\d{1,3}$", ["42", "1234", "x 1"]) == [1, 0, 0]
    assert _scores("max_words:3", ["one two three", "one two three four", "你好世界", "你好"]) == [1, 0, 0, 1]
    with pytest.raises(UsageError, match="max_words:many"):
        load_rewards(["max_words:many"])
    with pytest.raises(UsageError, match="not a valid regular expression"):
        load_rewards(["regex:("])


def test_json_schema(tmp_path):
    pytest.importorskip("jsonschema")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}))
    completions = ['{"name": "x"}', 'Sure: ```json\n{"name": "y"}\n```', '{"name": 3}', "no json", 'here {"name": "z"} ok']
    assert _scores(f"json_schema:{schema}", completions) == [1, 1, 0, 0, 1]
    with pytest.raises(UsageError, match="cannot use the schema"):
        load_rewards([f"json_schema:{tmp_path / 'missing.json'}"])


def test_a_reward_file_is_loaded_with_its_fields_and_weights(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def length(prompts, completions, answer, **fields):\n"
                    "    return [len(c) / 10 + (c == a) for c, a in zip(completions, answer)]\n", encoding="utf-8")
    rewards = load_rewards([f"{path}:length", "contains"], [0.5, 2.0])
    assert [(r.key, r.weight) for r in rewards] == [("length", 0.5), ("contains", 2.0)]
    assert score(rewards, ["q", "q"], ["ab", "abcd"], {"answer": ["ab", "x"]}, ["f:1", "f:2"]) == \
        [[1.2, 1.0], [0.4, 0.0]]


def test_bad_specs_fail_before_any_work(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def good(prompts, completions, **fields):\n    return [0.0] * len(completions)\n")
    with pytest.raises(UsageError, match="has no function 'bad'; its functions: good"):
        load_rewards([f"{path}:bad"])
    with pytest.raises(UsageError, match="no such file"):
        load_rewards([f"{tmp_path / 'nope.py'}:good"])
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with pytest.raises(UsageError, match="importing .*syntax.py failed: SyntaxError"):
        load_rewards([f"{tmp_path / 'syntax.py'}:f"])
    with pytest.raises(UsageError, match="expected FILE.py:FUNCTION or a built-in"):
        load_rewards(["exactly"])
    with pytest.raises(UsageError, match="2 reward weight"):
        load_rewards(["exact"], [1.0, 2.0])


@pytest.mark.parametrize(("body", "message"), [
    ("raise ValueError('no tests column')", "reward {spec} raised ValueError: no tests column (on a batch of rows "
                                            "data.jsonl:1, data.jsonl:2)"),
    ("return [1.0]", "reward {spec} returned 1 value(s) for 2 completions"),
    ("return [1.0, float('nan')]", "reward {spec} returned nan for row data.jsonl:2: expected a finite number"),
    ("return [1.0, None]", "reward {spec} returned None (NoneType) for row data.jsonl:2: expected a number"),
    ("return [1.0, '0.5']", "reward {spec} returned '0.5' (str) for row data.jsonl:2: expected a number"),
    ("return 1.0", "reward {spec} returned float, not a list of numbers"),
])
def test_a_bad_reward_names_the_function_the_row_and_the_value(tmp_path, body, message):
    path = tmp_path / "r.py"
    path.write_text(f"def fn(prompts, completions, **fields):\n    {body}\n")
    spec = f"{path}:fn"
    with pytest.raises(RewardError) as caught:
        _scores(spec, ["a", "b"])
    assert message.format(spec=spec) in str(caught.value)


def test_numpy_and_int_values_are_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "r.py"
    path.write_text("import numpy as np\ndef fn(prompts, completions, **fields):\n"
                    "    return np.array([1, 0], dtype=np.float32)\n")
    assert _scores(f"{path}:fn", ["a", "b"]) == [1.0, 0.0]
    assert not math.isnan(np.float32(1.0))
