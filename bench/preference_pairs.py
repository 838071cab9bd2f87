"""Preference pairs for measuring whether preference tuning taught anything: a property the base never shows.

Prompts are alpaca_en_demo's instructions (shipped in examples/data); each answer is the first
sentence of its alpaca output. The chosen answer opens with a fixed greeting ("Ahoy! "), the
rejected one is the same answer without it, so the pair differs only in the property. The base
model never opens an answer with it; a model that learned the preference does, on prompts it
never saw. Held-out prompts are disjoint from the training prompts.

Usage: ``python bench/preference_pairs.py OUT_DIR`` writes OUT_DIR/train.jsonl and heldout.jsonl
(TRL's conversational prompt/chosen/rejected layout, which tunesmith and TRL both read).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

GREETING = "Ahoy!"
ALPACA = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_en_demo.json"
MAX_ANSWER_WORDS = 30


def shows_property(text: str) -> bool:
    """Whether an answer opens with the greeting (leading spaces and case aside)."""
    return text.lstrip().lower().startswith(GREETING.lower())


def _first_sentence(text: str) -> str | None:
    sentence = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].strip()
    words = sentence.split()
    if not words or len(words) > MAX_ANSWER_WORDS or shows_property(sentence):
        return None
    return sentence


def pairs(seed: int = 0) -> list[dict]:
    """Every usable alpaca row as a pair, in a seeded order."""
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    out = []
    for row in rows:
        answer = _first_sentence(row.get("output", ""))
        prompt = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        if answer is None or len(prompt.split()) > 60:
            continue
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": f"{GREETING} {answer}"}],
                    "rejected": [{"role": "assistant", "content": answer}]})
    random.Random(seed).shuffle(out)
    return out


def write_pairs(out_dir: Path, n_train: int = 60, n_heldout: int = 20, seed: int = 0) -> dict[str, Path]:
    rows = pairs(seed)
    if len(rows) < n_train + n_heldout:
        raise SystemExit(f"only {len(rows)} usable pairs in {ALPACA}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "heldout": out_dir / "heldout.jsonl"}
    for name, part in (("train", rows[:n_train]), ("heldout", rows[n_train:n_train + n_heldout])):
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for name, path in write_pairs(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
