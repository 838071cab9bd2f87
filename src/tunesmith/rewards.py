"""Reward functions: what GRPO training maximises and ``tunesmith eval --reward`` reports.

A reward is a plain Python function with TRL's calling convention, so reward code written for
TRL's GRPOTrainer carries over::

    def reward(prompts, completions, **fields) -> list[float]:
        ...  # prompts, completions: lists of strings; fields: each other column of the data, as a list

``prompts`` holds each row's prompt text (for messages, the last user turn), ``completions`` the
model's answers (the prompt is not in them), and ``fields`` every other column of the rows (see
data/prompts.py), one list per column, aligned with the completions. A spec names a function as
``FILE.py:FUNCTION``, or one of the built-ins:

    exact             1 if the completion's final answer equals the row's ``answer``: the last ``\\boxed{}``, else
                      what follows the last "answer:" or "####", else the whole completion; compared after
                      normalising case and whitespace, and as numbers when ``answer`` is one ("1,000" = "1000.0")
    contains          1 if the completion contains the row's ``answer`` (normalised as for exact)
    regex:PATTERN     1 if the completion matches PATTERN (Python ``re.search``)
    max_words:N       1 if the completion has at most N words (a CJK character counts as a word)
    json_schema:FILE  1 if the completion (or its first ```json block or {...} object) is JSON valid against
                      the schema in FILE (needs ``pip install tunesmith[rewards]``)

A function that raises, returns the wrong number of values, a NaN, an infinity or anything that is not a
number ends the run with a ``RewardError`` naming the function, the row and the value: nothing is
silently zeroed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError, UsageError


class RewardError(TunesmithError):
    """A reward function failed or returned something that is not one number per completion."""


@dataclass
class Reward:
    name: str  # the spec as given ("exact", "rewards.py:fn")
    fn: Callable
    weight: float = 1.0
    key: str = ""  # its name in metrics: the function's name for FILE.py:FUNCTION, the spec for a built-in

    def __post_init__(self):
        self.key = self.key or (self.name.rpartition(":")[2] if _is_file_spec(self.name) else self.name)


def _is_file_spec(spec: str) -> bool:
    return spec.rpartition(":")[0].endswith(".py") and spec.partition(":")[0] not in WITH_ARGUMENT


# ---------------------------------------------------------------- the built-ins

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\s\u3040-\u30ff\u3400-\u4dbf"
                    r"\u4e00-\u9fff\uac00-\ud7af]+")


def normalise(text: str) -> str:
    """Lower case, single spaces, no thousands separators, no trailing punctuation or full stop."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", str(text).strip().lower())
    return re.sub(r"\s+", " ", text).strip(" .!。！")


def as_number(text: str) -> float | None:
    try:
        return float(normalise(text).replace(",", ""))
    except ValueError:
        return None


def final_answer(completion: str) -> str:
    """The part of a completion that states its answer (see the module docstring)."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        return boxed[-1]
    marker = max((m.end() for m in re.finditer(r"answer\s*(?:is)?\s*[:：]|####", completion, re.IGNORECASE)),
                 default=None)
    return completion[marker:] if marker is not None else completion


def _answers(fields: dict, name: str, n: int) -> list:
    if "answer" not in fields:
        raise RewardError(f"reward {name}: needs an `answer` column in the data; the rows have "
                          f"{sorted(fields) or 'no other columns'} (rename one with --columns answer=COLUMN)")
    return fields["answer"]


def exact(prompts, completions, **fields) -> list[float]:
    out = []
    for completion, answer in zip(completions, _answers(fields, "exact", len(completions)), strict=True):
        stated, expected = final_answer(completion), str(answer)
        number = as_number(expected)
        if number is not None:
            found = _NUMBER.findall(stated)
            value = as_number(found[-1]) if found else None
            out.append(float(value is not None and math.isclose(value, number, rel_tol=1e-9, abs_tol=1e-9)))
        else:
            out.append(float(normalise(stated) == normalise(expected)))
    return out


def contains(prompts, completions, **fields) -> list[float]:
    answers = _answers(fields, "contains", len(completions))
    return [float(normalise(str(a)) in normalise(c)) for c, a in zip(completions, answers, strict=True)]


def _regex(pattern: str) -> Callable:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"reward regex:{pattern}: not a valid regular expression: {exc}") from None
    return lambda prompts, completions, **fields: [float(compiled.search(c) is not None) for c in completions]


def count_words(text: str) -> int:
    return len(_WORDS.findall(text))


def _max_words(limit: str) -> Callable:
    if not limit.isdigit():
        raise UsageError(f"reward max_words:{limit}: expected a whole number of words, e.g. max_words:20")
    n = int(limit)
    return lambda prompts, completions, **fields: [float(count_words(c) <= n) for c in completions]


def _json_text(completion: str) -> str:
    fenced = re.search(r"```(?:json)?\s*(.*?)```", completion, re.DOTALL)
    if fenced:
        return fenced.group(1)
    start = min((i for i in (completion.find("{"), completion.find("[")) if i >= 0), default=-1)
    return completion[start:] if start >= 0 else completion


def _json_schema(path: str) -> Callable:
    try:
        import jsonschema  # an optional dependency: only this built-in needs it
    except ImportError:
        raise UsageError("reward json_schema: needs the jsonschema package: pip install 'tunesmith[rewards]'") from None
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
        validator = jsonschema.Draft202012Validator(schema)
        validator.check_schema(schema)
    except (OSError, json.JSONDecodeError, jsonschema.SchemaError) as exc:
        raise UsageError(f"reward json_schema:{path}: cannot use the schema: {exc}") from None

    def valid(completion: str) -> float:
        try:
            value, _ = json.JSONDecoder().raw_decode(_json_text(completion).strip())
        except json.JSONDecodeError:
            return 0.0
        return float(validator.is_valid(value))

    return lambda prompts, completions, **fields: [valid(c) for c in completions]


BUILT_IN = {"exact": lambda: exact, "contains": lambda: contains}
WITH_ARGUMENT = {"regex": _regex, "max_words": _max_words, "json_schema": _json_schema}


# ---------------------------------------------------------------- loading


def load_function(spec: str) -> Callable:
    """The function a spec names: a built-in, or FILE.py:FUNCTION loaded from its file."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]()
    kind, sep, argument = spec.partition(":")
    if sep and kind in WITH_ARGUMENT:
        return WITH_ARGUMENT[kind](argument)
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise UsageError(f"reward {spec!r}: expected FILE.py:FUNCTION or a built-in ({', '.join(BUILT_IN)}, "
                         f"{', '.join(k + ':...' for k in WITH_ARGUMENT)})")
    return _from_file(Path(path), name, spec)


def _from_file(path: Path, name: str, spec: str) -> Callable:
    if not path.is_file():
        raise UsageError(f"reward {spec}: no such file: {path}")
    module_name = f"tunesmith_reward_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.path.insert(0, str(path.resolve().parent))  # the file may import its neighbours
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: whatever it raises is reported, with where
        raise UsageError(f"reward {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.resolve().parent))
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and getattr(v, "__module__", "") == module_name)
        raise UsageError(f"reward {spec}: {path} has no function {name!r}"
                         + (f"; its functions: {', '.join(found)}" if found else ""))
    return fn


def load_rewards(specs: Sequence[str], weights: Sequence[float] = ()) -> list[Reward]:
    """The reward functions of ``specs`` with their weights (1 each by default); any bad spec fails here."""
    if weights and len(weights) != len(specs):
        raise UsageError(f"{len(weights)} reward weight(s) for {len(specs)} reward function(s)")
    weights = list(weights) or [1.0] * len(specs)
    rewards = [Reward(spec, load_function(spec), float(w)) for spec, w in zip(specs, weights, strict=True)]
    keys = [r.key for r in rewards]
    for reward in rewards:  # two files with a function of the same name: their metrics keep the whole spec
        if keys.count(reward.key) > 1:
            reward.key = reward.name
    return rewards


def reward_sources(specs: Sequence[str]) -> list[Path]:
    """The files the specs read (reward code, schemas): what a resumed run must find unchanged."""
    out = []
    for spec in specs:
        kind, _, argument = spec.partition(":")
        if kind == "json_schema":
            out.append(Path(argument))
        elif _is_file_spec(spec):
            out.append(Path(spec.rpartition(":")[0]))
    return out


# ---------------------------------------------------------------- scoring


def score(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str], fields: dict[str, list],
          where: Sequence[str]) -> list[list[float]]:
    """Each reward for each completion: [completion][reward]. ``where[i]`` names completion i's row."""
    columns = [call(reward, list(prompts), list(completions), fields, where) for reward in rewards]
    return [list(row) for row in zip(*columns, strict=True)] if columns else [[] for _ in completions]


def call(reward: Reward, prompts: list[str], completions: list[str], fields: dict[str, list],
         where: Sequence[str]) -> list[float]:
    """One reward function over a batch, its output checked: one finite number per completion."""
    try:
        values = reward.fn(prompts=prompts, completions=completions, **fields)
    except RewardError:
        raise
    except Exception as exc:  # the user's code: what it raised is the message, with the batch's rows
        rows = ", ".join(dict.fromkeys(where[:4])) + (", ..." if len(set(where)) > 4 else "")
        raise RewardError(f"reward {reward.name} raised {type(exc).__name__}: {exc} (on a batch of rows {rows})") \
            from exc
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {reward.name} returned {type(values).__name__}, not a list of numbers") from None
    if len(values) != len(completions):
        raise RewardError(f"reward {reward.name} returned {len(values)} value(s) for {len(completions)} completions "
                          f"(rows {where[0]} ...); it must return one number per completion")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(f"reward {reward.name} returned {value!r} ({type(value).__name__}) for row {where[i]}: "
                              "expected a number")
        if not math.isfinite(float(value)):
            raise RewardError(f"reward {reward.name} returned {value!r} for row {where[i]}: expected a finite number")
    return [float(v) for v in values]
