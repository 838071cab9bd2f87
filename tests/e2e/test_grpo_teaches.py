"""Learning from rewards: GRPO with tunesmith's defaults, the README's two commands and nothing else, on a
verifiable task with the real default model (slow).

Not yet a test that it teaches: measured on 2026-12-07 with the defaults (45 steps, 3 prompts x 8 completions,
lr 1.3e-4), the held-out greedy reward went from 0.126 (base) to 0.136 (tuned), far from the +0.4 this task
should allow, and the sampled reward plateaued near 0.15-0.20. What is checked: both commands run as the
README gives them, the run keeps its samples, and eval reports the reward and pass rate of base and tuned.

The task (examples/grpo): "What is the capital of X? Answer in as few words as possible." The reward
(examples/grpo/rewards.py) is 0 for a reply without the capital and words-of-the-answer / words-of-the-reply for
one with it, so the base model's "The capital of France is Paris." scores 1/6: low, but not zero, and every
sampled group has some spread (longer or shorter, right or wrong) for GRPO's advantages to work with. The
held-out prompts are 20 countries the training prompts never name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo"


def test_the_example_task_holds_out_its_countries_and_scores_by_hand():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from rewards import short_answer
    finally:
        sys.path.remove(str(EXAMPLE))
    train = [json.loads(line) for line in (EXAMPLE / "prompts.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (EXAMPLE / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 44 and len(held) == 20
    assert not {r["answer"] for r in train} & {r["answer"] for r in held}
    completions = ["Paris.", "The capital of France is Paris.", "Lyon", "", "New Delhi", "It is new delhi, India"]
    answers = ["Paris", "Paris", "Paris", "Paris", "New Delhi", "New Delhi"]
    assert short_answer(["q"] * 6, completions, answers) == [1.0, 1 / 6, 0.0, 0.0, 1.0, 0.4]


def _cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_the_readme_grpo_commands_train_and_report_base_against_tuned(use_default_model, tmp_path):
    env = {**os.environ, "TUNESMITH_HOME": str(use_default_model), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # the real model uses both cores, as a user's run does
    work = tmp_path / "grpo"
    shutil.copytree(EXAMPLE, work)
    started = time.perf_counter()
    _cli("train", "--objective", "grpo", "--data", "prompts.jsonl", "--reward", "rewards.py:short_answer",
         "--output-dir", "RUN", env=env, cwd=work)
    trained_s = time.perf_counter() - started
    plan = json.loads((work / "RUN" / "plan.json").read_text())
    assert plan["objective"] == "grpo" and (work / "RUN" / "samples.jsonl").is_file()

    done = _cli("eval", "RUN", "--data", "heldout.jsonl", "--reward", "rewards.py:short_answer", "--compare", "base",
                "--json", env=env, cwd=work)
    result = json.loads(done.stdout)
    tuned, base = result["metrics"]["reward/short_answer"], result["compare_metrics"]["reward/short_answer"]
    elapsed = time.perf_counter() - started
    print(f"held-out reward: base {base:.3f} -> tuned {tuned:.3f} (pass rate {result['compare_metrics']['pass_rate/short_answer']:.2f}"
          f" -> {result['metrics']['pass_rate/short_answer']:.2f}); {plan['total_steps']} steps, training "
          f"{trained_s / 60:.1f} min, with the evaluation {elapsed / 60:.1f} min")
    assert 0 < base < 0.4  # low, but not zero: the task is learnable from the base's own samples
    assert 0 <= tuned <= 1 and 0 <= result["metrics"]["pass_rate/short_answer"] <= 1
    rows = [json.loads(line) for line in (work / "RUN" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = {r["step"] for r in rows if "reward/short_answer" in r}
    assert logged >= set(range(1, plan["total_steps"] + 1))  # every step logs its reward
    assert elapsed < 20 * 60
