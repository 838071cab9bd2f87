"""The run plan: data-aware defaults over a table of dataset sizes, user values winning, warnings,
the learning check, the schedule, and `train --plan` exiting before any model is loaded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.train.helpers import chat_rows, tiny_config, tiny_overrides, write_chat
from tunesmith.config import load_config
from tunesmith.data.tokenize import IGNORE, Encoded
from tunesmith.train.loop import Data, finetune, lr_factor, plan_run
from tunesmith.train.plan import MIN_STEPS, DataStats, ModelFacts, default_lr, examples_per_step, lr_steps

SMOLLM = ModelFacts(params=135_000_000, hidden_size=576, model_type="llama")


def _data(n: int, length: int, answer: int = 12) -> Data:
    """n examples of ``length`` tokens (lengths vary by +-20%), the last ``answer`` tokens supervised."""
    examples = []
    for i in range(n):
        size = max(answer + 2, round(length * (0.8 + 0.4 * ((i * 7919) % 101) / 100)))
        examples.append(Encoded(input_ids=[5] * size, labels=[IGNORE] * (size - answer) + [5] * answer))
    return Data(train=examples, val=[], fingerprint="x", n_train_conversations=n)


def _plan(n: int, length: int = 60, processes: int = 1, **values):
    overrides = ["data.path=x.jsonl", *(f"{k.replace('__', '.')}={v}" for k, v in values.items())]
    return plan_run(load_config(None, overrides), _data(n, length), SMOLLM, processes)


@pytest.mark.parametrize("n, length", [(20, 60), (32, 70), (60, 40), (150, 55), (400, 120), (1000, 250),
                                       (1000, 40), (3000, 300)])
def test_small_and_medium_data_get_enough_steps_and_passes(n, length):
    config, plan = _plan(n, length)
    assert 3 <= plan.epochs <= 10
    assert plan.total_steps >= min(MIN_STEPS, 10 * plan.steps_per_epoch)
    assert not plan.warnings, plan.warnings
    # about sqrt(n)/2 examples per optimizer step, however they are packed
    per_step = n / plan.steps_per_epoch
    assert 0.5 * examples_per_step(n) <= per_step <= 2 * examples_per_step(n), (per_step, plan.lines())
    assert config.train.lr == plan.lr == pytest.approx(1.3e-3)
    assert 0 < plan.warmup_steps <= 0.1 * plan.total_steps


@pytest.mark.parametrize("n, epochs", [(12_000, 2), (60_000, 1)])
def test_large_data_fills_whole_rows_and_takes_fewer_passes(n, epochs):
    config, plan = _plan(n, 300)
    assert plan.epochs == epochs
    assert config.data.pack_length == config.data.max_length  # efficient full rows
    assert plan.tokens_per_step >= 32 * 300 * 0.8
    assert plan.warmup_steps == min(100, round(0.05 * plan.total_steps))  # capped at 100


def test_the_issue_case_plans_four_steps_and_says_it_cannot_teach():
    """60 short examples with today's old defaults set by hand: 1 step per epoch, and a warning."""
    _, plan = _plan(60, 40, train__batch_size=4, train__grad_accum=4, train__lr=2e-4, train__epochs=4,
                    data__pack_length=1024, train__warmup_ratio=0.03)
    assert plan.total_steps == 4 and plan.micro_batch == 4 and plan.grad_accum == 4
    assert any("only 4 optimizer steps" in w for w in plan.warnings)
    assert any("learning rate x steps" in w for w in plan.warnings)
    assert any(line.startswith("WARNING: only 4 optimizer steps") for line in plan.lines())


def test_lr_times_steps_counts_a_run_shorter_than_its_warmup():
    """50 steps into a 100-step warmup at 2e-4: the rate climbs to 1e-4, summing to 2e-4 * 50^2 / 200."""
    assert lr_steps(2e-4, 50, 100) == pytest.approx(2e-4 * 12.5)
    assert lr_steps(2e-4, 100, 100) == pytest.approx(2e-4 * 50)  # the warmup's half, as for a longer run
    assert lr_steps(2e-4, 300, 100) == pytest.approx(2e-4 * 250)
    assert lr_steps(2e-4, 40, 0) == pytest.approx(2e-4 * 40)
    _, plan = _plan(60, 40, train__lr=2e-4, train__max_steps=50, train__warmup_steps=100)
    assert any("learning rate x steps = 0.0025," in w for w in plan.warnings), plan.warnings


def test_supervised_data_has_no_pairs_sharing_a_prefix():
    data = _data(30, 60)
    assert DataStats.of(data.train, data.val).long_prefix_pairs == 0
    _, plan = _plan(30)
    assert plan.long_prefix_pairs == 0 and "sharing a long prefix" not in " ".join(plan.lines())


def test_user_values_win_and_only_the_rest_is_chosen():
    config, plan = _plan(150, 55, train__lr=5e-4, train__batch_size=3)
    assert config.train.lr == 5e-4 and config.train.batch_size == 3
    chosen = {c.key for c in plan.choices if c.auto}
    assert "train.lr" not in chosen and "train.batch_size" not in chosen
    assert {"train.grad_accum", "train.epochs", "train.warmup_steps"} <= chosen
    assert all(c.reason for c in plan.choices)


def test_max_steps_wins_over_epochs():
    _, plan = _plan(150, 55, train__max_steps=7)
    assert plan.total_steps == 7 and plan.warmup_steps == 0  # no warmup in a short run
    assert not any(c.key == "train.epochs" and c.auto for c in plan.choices)


def test_processes_share_a_step_without_changing_its_size():
    _, one = _plan(1000, 250)
    _, two = _plan(1000, 250, processes=2)
    assert two.processes == 2 and abs(two.tokens_per_step - one.tokens_per_step) / one.tokens_per_step < 0.5


def test_unpacked_batches_count_examples():
    config, plan = _plan(60, 40, data__packing="false")
    assert config.train.batch_size * config.train.grad_accum == examples_per_step(60)
    assert plan.steps_per_epoch == math.ceil(60 / examples_per_step(60))


def test_learning_rate_follows_method_and_width():
    assert default_lr("lora", SMOLLM)[0] == pytest.approx(1.3e-3)
    assert default_lr("full", SMOLLM)[0] == pytest.approx(1.3e-4)
    llama7b = ModelFacts(params=7_000_000_000, hidden_size=4096, model_type="llama")
    assert 2e-4 <= default_lr("lora", llama7b)[0] <= 4e-4
    qwen = ModelFacts(params=500_000_000, hidden_size=896, model_type="qwen2")
    assert default_lr("lora", qwen)[0] == pytest.approx(5.3e-4)


def test_warmup_starts_above_zero_and_cosine_ends_near_zero():
    factors = [lr_factor(s, warmup=4, total=40, kind="cosine") for s in range(40)]
    assert factors[0] == pytest.approx(0.2) and factors[3] == pytest.approx(0.8) and factors[4] == 1.0
    assert 0 < factors[-1] < 0.01 and factors == sorted(factors[:5]) + factors[5:]
    assert lr_factor(0, warmup=0, total=10, kind="constant") == 1.0
    assert lr_factor(5, warmup=0, total=10, kind="linear") == pytest.approx(0.5)


# ---------------------------------------------------------------- on the tiny model


def test_plan_flag_prints_json_and_trains_nothing(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--data", str(chat_file), "--output-dir", str(run)]
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *argv, "--plan", "--json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["examples"] == 40 and plan["total_steps"] >= 20 and plan["lr"] > 0
    assert {c["key"] for c in plan["choices"]} >= {"train.lr", "train.epochs", "train.grad_accum"}
    assert not run.exists()  # nothing was trained or written


def test_max_samples_plans_on_the_first_examples_and_says_so(tiny_model_dir, chat_file, tmp_path):
    """The first N rows in file order, before the hold-out: the plan counts N - held out, and the run says so."""
    argv = ["--model", str(tiny_model_dir), "--data", str(chat_file), "--output-dir", str(tmp_path / "run"),
            "--data.max_samples", "12", "--data.val_size", "2", "--plan", "--json"]
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *argv],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["examples"] == 10 and plan["val_examples"] == 2
    assert "the first 12 of 40 examples (data.max_samples)" in done.stderr + done.stdout


def test_max_samples_keeps_the_rows_in_file_order():
    from tunesmith.train.loop import _first

    rows = list(range(40))
    assert _first(rows, 12) == rows[:12] and _first(rows, 0) == rows and _first(rows, 99) == rows


def test_run_saves_its_plan_and_reports_the_learning_check(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "run"
    result = finetune(tiny_config(tiny_model_dir, chat_file, run, train__max_steps=20, data__val_size=8))
    saved = json.loads((run / "plan.json").read_text())
    assert saved["total_steps"] == 20 and saved["elapsed_s"] > 0
    assert result.initial_eval_loss is not None and result.final_eval_loss < result.initial_eval_loss
    assert not result.warnings
    from tunesmith.train.commands import summary_lines

    assert any("held-out loss" in line and "improved" in line for line in summary_lines(result))


def test_a_run_that_learns_nothing_says_so(tiny_model_dir, tmp_path):
    data = write_chat(tmp_path / "d.jsonl", chat_rows())
    result = finetune(tiny_config(tiny_model_dir, data, tmp_path / "run", train__max_steps=3, train__lr=1e-9,
                                  data__val_size=8))
    assert any("did not improve" in w for w in result.warnings)
    assert any("only 3 optimizer steps" in w for w in result.warnings)
    from tunesmith.train.commands import summary_lines

    assert any("did NOT improve" in line for line in summary_lines(result))


def test_a_collapsing_run_exits_non_zero_with_a_message(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "run"
    argv = [f"--{kv}" for kv in tiny_overrides(tiny_model_dir, chat_file, run, train__max_steps=30)]
    argv = [part for item in argv for part in item.split("=", 1)] + ["--lr", "1e6"]
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *argv], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "run saved" not in done.stdout
    assert "collapsed" in done.stderr or "non-finite" in done.stderr
    assert not (run / "adapter_model.safetensors").exists()
