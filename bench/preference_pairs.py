"""Preference pairs for measuring whether preference tuning taught anything: a property the base never shows,
at the start, in the middle or at the end of the answer.

Prompts are alpaca_en_demo's instructions (shipped in examples/data); each answer is the first
sentence of its alpaca output (the first two for the positional sets). The chosen answer is the
rejected one with a fixed phrase added, so the pair differs only in the property:

- start: the chosen answer opens with "Ahoy!" (the two sides differ from their first token on);
- middle: "Mark my words:" between the first and the second sentence;
- end: the sign-off "Fair winds!" after the answer (the sides share every token up to it, and the
  rejected side's end-of-turn token is the first that differs).

The base model never writes these; a model that learned the preference does, on prompts it never
saw. Held-out prompts are disjoint from the training prompts.

Usage: ``python bench/preference_pairs.py OUT_DIR`` writes the throughput bench's set (60 training pairs
and 20 held out, one-sentence answers opening with "Ahoy!"); ``python bench/preference_pairs.py OUT_DIR
start|middle|end [trl|sharegpt]`` the positional set of tests/e2e/test_preference_teaches.py (32 and 10,
two-sentence answers). Both write OUT_DIR/train.* and heldout.* (TRL's conversational prompt/chosen/rejected
layout as JSONL, or LLaMA-Factory's sharegpt pair layout as JSON; tunesmith reads both, TRL the first).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

POSITIONS = ("start", "middle", "end")
PHRASE = {"start": "Ahoy!", "middle": "Mark my words:", "end": "Fair winds!"}
GREETING = PHRASE["start"]
ALPACA = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_en_demo.json"
MAX_ANSWER_WORDS = 30
MIN_SENTENCE_WORDS = 3
MAX_TWO_SENTENCE_WORDS = 36  # short answers: a held-out greedy answer must reach its end within the eval's token cap


def shows_property(text: str, position: str = "start") -> bool:
    """Whether an answer carries the position's phrase once, where it belongs (case and spacing aside): opening
    it, between words before and after it, or closing it. A phrase repeated ("Fair winds! Fair winds! ...")
    is the degenerate answer, not the preferred one."""
    text, phrase = " ".join(text.split()).lower(), PHRASE[position].lower()
    if text.count(phrase) != 1:
        return False
    if position == "start":
        return text.startswith(phrase)
    if position == "end":
        return text.endswith(phrase)
    before, found, after = text.partition(phrase)
    return bool(found) and len(before.split()) >= MIN_SENTENCE_WORDS and len(after.split()) >= MIN_SENTENCE_WORDS


def _answer(text: str, sentences: int) -> str | None:
    """The first ``sentences`` sentences of an alpaca output, or None when too short, too long or already
    holding a phrase."""
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s", text.strip())][:sentences]
    if len(parts) < sentences or any(len(p.split()) < MIN_SENTENCE_WORDS for p in parts):
        return None
    answer = " ".join(parts)
    if sentences > 1 and ("\n" in answer or not all(p[-1] in ".!?" for p in parts)):
        return None  # lists and headings: "between the first and the second sentence" must mean just that
    if len(answer.split()) > (MAX_ANSWER_WORDS if sentences == 1 else MAX_TWO_SENTENCE_WORDS) or any(p.lower() in answer.lower() for p in PHRASE.values()):
        return None
    return answer


def with_phrase(answer: str, position: str) -> str:
    """The chosen answer: ``answer`` (the rejected one) with the position's phrase added."""
    phrase = PHRASE[position]
    if position == "start":
        return f"{phrase} {answer}"
    if position == "end":
        return f"{answer} {phrase}"
    first, second = re.split(r"(?<=[.!?])\s", answer, maxsplit=1)
    return f"{first} {phrase} {second}"


def pairs(seed: int = 0, position: str = "start", sentences: int | None = None) -> list[dict]:
    """Every usable alpaca row as a pair (TRL's conversational layout), in a seeded order. ``sentences``: of each
    answer; default 1 for start (the throughput bench's set), 2 otherwise (the middle needs two)."""
    sentences = sentences or (1 if position == "start" else 2)
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    out = []
    for row in rows:
        answer = _answer(row.get("output", ""), sentences)
        prompt = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        if answer is None or len(prompt.split()) > 60:
            continue
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": with_phrase(answer, position)}],
                    "rejected": [{"role": "assistant", "content": answer}]})
    random.Random(seed).shuffle(out)
    return out


def as_sharegpt(row: dict) -> dict:
    """A pair in LLaMA-Factory's sharegpt layout (``conversations``, then ``chosen``/``rejected`` turns)."""
    turn = {"user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": turn[m["role"]], "value": m["content"]} for m in row["prompt"]],
            "chosen": {"from": "gpt", "value": row["chosen"][0]["content"]},
            "rejected": {"from": "gpt", "value": row["rejected"][0]["content"]}}


def write_pairs(out_dir: Path, n_train: int = 60, n_heldout: int = 20, seed: int = 0, *, position: str = "start",
                sentences: int | None = None, layout: str = "trl") -> dict[str, Path]:
    rows = pairs(seed, position, sentences)
    if len(rows) < n_train + n_heldout:
        raise SystemExit(f"only {len(rows)} usable pairs in {ALPACA}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"train": rows[:n_train], "heldout": rows[n_train:n_train + n_heldout]}
    paths = {}
    for name, part in parts.items():
        if layout == "sharegpt":
            paths[name] = out_dir / f"{name}.json"
            paths[name].write_text(json.dumps([as_sharegpt(r) for r in part], ensure_ascii=False, indent=1),
                                   encoding="utf-8")
        else:
            paths[name] = out_dir / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return paths


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        raise SystemExit(__doc__)
    args = dict(zip(("position", "layout"), sys.argv[2:], strict=False))
    sizes = {"n_train": 32, "n_heldout": 10, "sentences": 2} if args else {}
    for name, path in write_pairs(Path(sys.argv[1]), **sizes, **args).items():
        print(f"{name}: {path}")
