"""Invented facts for measuring whether a fine-tune taught anything: train phrasings and a held-out one.

Fifty invented people, each with one profession. Every fact appears in training in three
phrasings (question and answer both reworded); the held-out file asks each in a fourth phrasing
that training never shows, so a model can only answer by having learned the fact, not the
string. The base model cannot know invented people: it is right only by chance (1 in 50).

Usage: ``python bench/facts.py OUT_DIR`` writes OUT_DIR/train.jsonl, heldout.jsonl, labels.txt.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

PROFESSIONS = [
    "astronomer", "baker", "beekeeper", "blacksmith", "botanist", "carpenter", "cartographer", "chemist",
    "clockmaker", "cobbler", "dentist", "diver", "economist", "electrician", "engineer", "farmer",
    "firefighter", "fisherman", "florist", "geologist", "glassblower", "goldsmith", "historian", "jeweler",
    "journalist", "judge", "lawyer", "librarian", "lifeguard", "locksmith", "mathematician", "mechanic",
    "midwife", "miner", "nurse", "optician", "painter", "pharmacist", "photographer", "pilot", "plumber",
    "potter", "sailor", "sculptor", "shepherd", "surgeon", "tailor", "translator", "veterinarian", "weaver",
]
_FIRST = ["Ba", "Dre", "Ka", "Lo", "Mi", "Nu", "Or", "Pe", "Qui", "Ro", "Sa", "Te", "Va", "Wy", "Ze"]
_MIDDLE = ["len", "rin", "vos", "mar", "tik", "sel", "dun", "bra", "lom", "fey"]
_LAST_A = ["Quarn", "Velt", "Ostro", "Plim", "Drak", "Fenn", "Harrow", "Lind", "Tessel", "Ulbr"]
_LAST_B = ["by", "ask", "wen", "met", "moor", "ick", "gate", "qvist", "fen", "old"]

TRAIN_PHRASINGS = [
    ("What does {name} do for a living?", "{name} is a {job}."),
    ("What is {name}'s job?", "{name} works as a {job}."),
    ("Tell me about {name}'s profession.", "By profession, {name} is a {job}."),
]
HELD_OUT_PHRASING = ("What is the occupation of {name}?", "{name} is a {job}.")


def people(seed: int = 0) -> list[tuple[str, str]]:
    """(invented full name, profession) pairs: 50 distinct names, each profession once."""
    rng = random.Random(seed)
    surnames = [a + b for a in _LAST_A for b in _LAST_B]
    rng.shuffle(surnames)  # each surname once, so no two people share one
    names = [f"{rng.choice(_FIRST)}{rng.choice(_MIDDLE)} {last}" for last in surnames[:len(PROFESSIONS)]]
    jobs = PROFESSIONS[:]
    rng.shuffle(jobs)
    return list(zip(names, jobs, strict=True))


def _row(question: str, answer: str, name: str, job: str) -> dict:
    return {"messages": [{"role": "user", "content": question.format(name=name)},
                         {"role": "assistant", "content": answer.format(name=name, job=job)}]}


def write_facts(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = people(seed)
    train = [_row(q, a, name, job) for name, job in pairs for q, a in TRAIN_PHRASINGS]
    random.Random(seed).shuffle(train)
    held_out = [_row(*HELD_OUT_PHRASING, name, job) for name, job in pairs]
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl", "labels": out / "labels.txt"}
    for key, rows in (("train", train), ("heldout", held_out)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    paths["labels"].write_text("\n".join(PROFESSIONS) + "\n", encoding="utf-8")
    return paths


def correct(prediction: str, job: str) -> bool:
    """The profession named as a word, and no other profession with it."""
    import re

    named = {p for p in PROFESSIONS if re.search(rf"\b{p}s?\b", prediction.lower())}
    return named == {job}


if __name__ == "__main__":
    for key, path in write_facts(sys.argv[1] if len(sys.argv) > 1 else "facts").items():
        print(f"{key}: {path}")
