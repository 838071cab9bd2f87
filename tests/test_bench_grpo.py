"""bench/grpo_throughput.py says what it measures: its tunesmith command sets the shape it compares, and its
table's ratios come from the runs it is given."""

from pathlib import Path

import pytest

from bench.grpo_throughput import (
    PROMPTS,
    load_reward,
    parse_args,
    summarize,
    table_lines,
    text_reward,
    tunesmith_command,
)
from tunesmith.config import load_config
from tunesmith.train.commands import parse_train_args


def test_the_tunesmith_command_sets_the_compared_shape():
    shape = parse_args(["--steps", "5", "--prompts-per-step", "3", "--generations", "4", "--max-completion", "32"])
    command = tunesmith_command(Path("out"), shape)
    assert command[3] == "train"
    path, overrides, _ = parse_train_args(command[4:])
    config = load_config(path, overrides)
    assert (config.train.max_steps, config.train.batch_size, config.train.grad_accum) == (5, 3, 1)
    assert (config.method.num_generations, config.method.max_completion_length) == (4, 32)
    assert (config.method.objective, config.method.beta, config.method.dropout) == ("grpo", 0.0, 0.0)
    assert config.train.scheduler == "constant" and config.train.warmup_steps == 0
    assert (config.method.r, config.method.alpha, config.method.target_modules) == (16, 32, ["all-linear"])
    assert config.data.path == [str(PROMPTS)] and PROMPTS.is_file()
    reward_file = Path(config.method.rewards[0].rsplit(":", 1)[0])
    assert len(config.method.rewards) == 1 and reward_file.is_file()


def fake_run(elapsed: float, rss: float) -> dict:
    return {"elapsed_s": elapsed, "steps": 6, "rewards": [0.1, 0.3], "lengths": [10.0, 20.0], "rss_mb": rss,
            "sampling_s": elapsed / 2, "rollout_s": elapsed / 2, "backward_s": elapsed / 4}


def test_the_table_holds_the_medians_and_the_ratio():
    runs = {"tunesmith": [fake_run(30, 2000), fake_run(60, 2200), fake_run(40, 2100)],
            "trl": [fake_run(120, 5000), fake_run(90, 5200), fake_run(100, 5100)]}
    summary = summarize(runs, completions_per_step=16)
    ours, theirs = summary["rows"]["tunesmith"], summary["rows"]["trl"]
    assert ours["steps_per_min"] == 60 * 6 / 40 and theirs["steps_per_min"] == 60 * 6 / 100
    assert ours["completions_per_s"] == 6 * 16 / 40 and ours["peak_rss_mb"] == 2100
    assert ours["mean_reward"] == pytest.approx(0.2) and ours["sampling_share"] == 0.5
    assert summary["ratios"]["trl"]["steps_per_min"] == pytest.approx(100 / 40)
    lines = table_lines(summary)
    assert len(lines) == 4 and lines[3].startswith("| trl |") and lines[3].endswith("| 2.50x |")


def test_trl_gets_the_example_reward_on_the_completions_text():
    reward = text_reward(load_reward())
    completions = [[{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "It is Paris."}],
                   [{"role": "assistant", "content": "Lyon."}]]
    assert reward(["q"] * 3, completions, answer=["Paris"] * 3) == [1.0, 1 / 3, 0.0]
