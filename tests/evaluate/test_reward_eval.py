"""`tunesmith eval RUN --data PROMPTS --reward FILE.py:fn [--compare base] [--samples K]` on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REWARDS = '''
def short(prompts, completions, **fields):
    return [1.0 if len(c) < 30 else 0.0 for c in completions]
'''


@pytest.fixture
def tiny_run(tiny_model_dir, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.train.loop import finetune

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(6)))
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    config = load_config(None, [f"model.name={tiny_model_dir}", f"data.path={data}", f"output.output_dir={tmp_path / 'run'}",
                                "method.objective=grpo", "train.precision=fp32", "train.max_steps=2",
                                "method.max_completion_length=8", "method.num_generations=2",
                                ("method.rewards", [f"{rewards}:short"])])
    finetune(config)
    return tmp_path / "run", data, rewards


def _eval(*args) -> dict:
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "eval", *args, "--json"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_reward_eval_against_the_base(tiny_run, tmp_path):
    run, data, rewards = tiny_run
    out = tmp_path / "report"
    doc = _eval(str(run), "--data", str(data), "--reward", f"{rewards}:short", "--reward", "contains",
                "--compare", "base", "--max-new-tokens", "12", "--precision", "fp32", "--out", str(out))
    for metrics in (doc["metrics"], doc["compare_metrics"]):
        assert {"reward/short", "pass_rate/short", "reward/contains", "pass_rate/contains"} <= set(metrics)
    assert doc["deltas"]["reward/short"] == pytest.approx(doc["metrics"]["reward/short"]
                                                          - doc["compare_metrics"]["reward/short"])
    records, base = ([json.loads(line) for line in Path(doc["paths"][name]).read_text(encoding="utf-8").splitlines()]
                     for name in ("predictions", "compare_predictions"))
    assert len(records) == len(base) == 6
    for metrics, rows in ((doc["metrics"], records), (doc["compare_metrics"], base)):  # the metrics are the records'
        assert metrics["reward/short"] == pytest.approx(sum(r["rewards"]["short"] for r in rows) / 6)
        assert metrics["pass_rate/contains"] == sum(r["rewards"]["contains"] > 0 for r in rows) / 6
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == doc["metrics"] and "reward/short" in (out / "report.md").read_text()


def test_pass_at_k_counts_prompts_with_any_passing_sample(tiny_run):
    from tunesmith.evaluate.rewards import evaluate_rewards

    run, data, rewards = tiny_run
    result = evaluate_rewards(str(run), str(data), [f"{rewards}:short"], samples=3, max_new_tokens=12,
                              precision="fp32", progress=False)
    assert len(result.predictions) == 18 and result.options["temperature"] == 1.0
    values = [r["rewards"]["short"] for r in result.predictions]
    assert result.metrics["reward/short"] == pytest.approx(sum(values) / 18)
    expected = sum(any(v > 0 for v in values[i:i + 3]) for i in range(0, 18, 3)) / 6
    assert result.metrics["pass@3/short"] == expected
