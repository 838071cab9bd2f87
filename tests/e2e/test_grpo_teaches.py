"""Learning from rewards: GRPO with tunesmith's defaults, the README's two commands and nothing else, on a
verifiable task with the real default model (slow).

The task (examples/grpo): "What is the capital of X? Answer in as few words as possible." The reward
(examples/grpo/rewards.py) is 0 for a reply without the capital and words-of-the-answer / words-of-the-reply for
one with it, so the base model's "The capital of France is Paris." scores 1/6: low, but not zero, and every
sampled group has some spread (longer or shorter, right or wrong) for GRPO's advantages to work with. What is
learned is the form of the answer, not geography: every country in the data is one whose capital the base
model names in its greedy reply (53 of 104 countries tried), so the reward's ceiling is 1, not the model's
knowledge. The 18 held-out countries are never named in the training prompts.

Measured on 2026-12-07 with the defaults (48 steps, 3 prompts x 8 completions, lr 1.3e-3), on a 2-core CPU
shared with other jobs: held-out greedy reward 0.189 (base) -> 0.889 (tuned), the sampled reward 0.07 at step
1 and 1.0 from step 27 on, 20 minutes for both commands under that load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import real_model_env
from tests.e2e import readme
from tests.e2e.clone import fresh_clone

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo"


def test_the_example_task_holds_out_its_countries_and_scores_by_hand():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from rewards import short_answer
    finally:
        sys.path.remove(str(EXAMPLE))
    train = [json.loads(line) for line in (EXAMPLE / "prompts.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (EXAMPLE / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 35 and len(held) == 18
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
def test_grpo_with_defaults_teaches_the_short_answer_to_held_out_prompts(use_default_model, tmp_path):
    """The README's two commands as written, in a clone: training within the README's time, then evaluation."""
    clone = fresh_clone(tmp_path)
    env = real_model_env(use_default_model, PYTHONPATH=str(clone / "src"))
    work = clone / "examples" / "grpo"
    started = time.perf_counter()
    trained_s = readme.run_timed(readme.readme_training_command("--objective grpo --data prompts.jsonl"), clone, env)
    plan = json.loads((work / "RUN" / "plan.json").read_text())
    assert plan["objective"] == "grpo" and (work / "RUN" / "samples.jsonl").is_file()

    (evaluate,) = [c for c in readme.commands(SECTION) if c.line.startswith("cd examples/grpo && tunesmith eval RUN")]
    done = _cli(*evaluate.tunesmith_argv, "--json", env=env, cwd=work)
    result = json.loads(done.stdout)
    tuned, base = result["metrics"]["reward/short_answer"], result["compare_metrics"]["reward/short_answer"]
    elapsed = time.perf_counter() - started
    print(f"held-out reward: base {base:.3f} -> tuned {tuned:.3f} (pass rate {result['compare_metrics']['pass_rate/short_answer']:.2f}"
          f" -> {result['metrics']['pass_rate/short_answer']:.2f}); {plan['total_steps']} steps, training "
          f"{trained_s / 60:.1f} min, with the evaluation {elapsed / 60:.1f} min")
    assert 0 < base < 0.4  # low, but not zero: the task is learnable from the base's own samples
    assert tuned >= base + 0.4
    rows = [json.loads(line) for line in (work / "RUN" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = {r["step"] for r in rows if "reward/short_answer" in r}
    assert logged >= set(range(1, plan["total_steps"] + 1))  # every step logs its reward


SECTION = "Learning from rewards: GRPO"


def _cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
