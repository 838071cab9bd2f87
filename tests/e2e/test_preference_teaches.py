"""Preference tuning that teaches: DPO with tunesmith's defaults makes the default model prefer, and produce on
prompts it never saw, a property its base never shows (real default model: slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.preference_pairs import GREETING, pairs, shows_property, write_pairs


def test_the_pairs_differ_only_in_the_property(tmp_path):
    paths = write_pairs(tmp_path)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    held = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert len(train) == 60 and len(held) == 20
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held}
    for row in train + held:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert shows_property(chosen) and not shows_property(rejected)
        assert chosen == f"{GREETING} {rejected}"
    assert len(pairs()) > 500 and not shows_property(" a hoy") and shows_property(" ahoy! Yes")


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_dpo_with_defaults_learns_the_preferred_property(use_default_model, tmp_path):
    env = {**os.environ, "TUNESMITH_HOME": str(use_default_model), "HF_HUB_OFFLINE": "1"}
    paths = write_pairs(tmp_path / "data")
    run, out = tmp_path / "run", tmp_path / "eval"
    _cli("train", "--data", str(paths["train"]), "--method.objective", "dpo", "--output-dir", str(run), env=env)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["objective"] == "dpo" and not plan["warnings"]

    _cli("eval", str(run), "--data", str(paths["heldout"]), "--compare", "base", "--out", str(out),
         "--metrics", "exact_match", "--max-new-tokens", "12", env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    tuned, base = metrics["metrics"], metrics["compare_metrics"]
    shown = {}
    for name, file in (("tuned", "predictions.jsonl"), ("base", "predictions.base.jsonl")):
        rows = [json.loads(line) for line in (out / file).read_text().splitlines()]
        shown[name] = sum(shows_property(r["prediction"]) for r in rows) / len(rows)
    print(f"held-out preference accuracy: tuned {tuned['preference_accuracy']:.2f}, base "
          f"{base['preference_accuracy']:.2f}; reward accuracy {tuned['reward_accuracy']:.2f}; answers opening "
          f"with {GREETING!r}: tuned {shown['tuned']:.0%}, base {shown['base']:.0%}")
    assert tuned["preference_accuracy"] >= 0.9
    assert shown["tuned"] >= 0.8
    assert shown["base"] <= 0.05 and base["preference_accuracy"] <= 0.5
