"""Defaults that teach: `tunesmith train` with no hyperparameter learns invented facts well enough to
answer them in a phrasing it never saw, and the base model cannot (real default model: slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.facts import PROFESSIONS, TRAIN_PHRASINGS, correct, people, write_facts
from tests.conftest import real_model_env


def test_the_facts_data_holds_its_phrasing_out(tmp_path):
    paths = write_facts(tmp_path)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    held = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert len(people()) >= 50 and len(train) == len(people()) * len(TRAIN_PHRASINGS) and len(held) == len(people())
    train_questions = {r["messages"][0]["content"] for r in train}
    assert not train_questions & {r["messages"][0]["content"] for r in held}
    assert len({name.split()[1] for name, _ in people()}) == len(people())  # no two people share a surname
    assert correct("Kara Velt is a baker.", "baker") and not correct("a baker and a potter", "baker")
    assert not correct("She bakes.", "baker") and len(set(PROFESSIONS)) == len(PROFESSIONS)


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _accuracy(path, held: list[dict]) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    jobs = [r["messages"][-1]["content"].rstrip(".").split()[-1] for r in held]
    return sum(correct(r["prediction"], job) for r, job in zip(rows, jobs, strict=True)) / len(held)


@pytest.mark.slow
@pytest.mark.long  # 4.5 minutes; the quickstart's e2e test covers the defaults in the default run
def test_default_training_answers_held_out_phrasings(use_default_model, tmp_path):
    env = real_model_env(use_default_model)
    paths = write_facts(tmp_path / "data")
    run, out = tmp_path / "run", tmp_path / "eval"
    trained = _cli("train", "--data", str(paths["train"]), "--output-dir", str(run), env=env)
    assert "run saved" in trained.stdout and "WARNING" not in trained.stdout + trained.stderr
    plan = json.loads((run / "plan.json").read_text())
    assert plan["total_steps"] >= 60 and not plan["warnings"]

    labels = ",".join(PROFESSIONS)
    _cli("eval", str(run), "--data", str(paths["heldout"]), "--compare", "base", "--out", str(out),
         "--metrics", "classification", "--labels", labels, "--max-new-tokens", "24", env=env)
    held = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    tuned, base = _accuracy(out / "predictions.jsonl", held), _accuracy(out / "predictions.base.jsonl", held)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"held-out accuracy: tuned {tuned:.0%}, base {base:.0%}; tunesmith's classification metrics: {metrics}")
    assert tuned >= 0.9, tuned
    assert base <= 0.1, base
