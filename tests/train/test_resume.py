"""Checkpoints and resume: a killed run continues exactly; interrupted saves and changed inputs are handled."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import chat_rows, read_losses, tiny_config, tiny_overrides, write_chat
from tunesmith.run import read_metrics
from tunesmith.train.checkpoint import COMPLETE, ResumeRefused, find_resume, list_checkpoints, rotate
from tunesmith.train.loop import finetune


def _train_cli(args: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *args], env=full_env,
                          capture_output=True, text=True, timeout=300)


def _flags(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])]


def test_sigkill_after_a_checkpoint_then_resume_matches_a_straight_run(tiny_model_dir, chat_file, tmp_path):
    extra = {"train__max_steps": 20, "output__save_every": 5, "method__dropout": 0.1, "train__neftune_alpha": 5}
    straight = tmp_path / "straight"
    finetune(tiny_config(tiny_model_dir, chat_file, straight, **extra))

    run = tmp_path / "killed"
    flags = _flags(tiny_overrides(tiny_model_dir, chat_file, run, **extra))
    killed = _train_cli(flags, TUNESMITH_TEST_KILL="after-checkpoint:10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [(s, ok) for s, _, ok in list_checkpoints(run)] == [(5, True), (10, True)]
    assert not (run / "adapter_model.safetensors").exists()

    # An interrupted save of a later checkpoint: renamed into place but never marked complete.
    partial = run / "checkpoints" / "step-15"
    shutil.copytree(run / "checkpoints" / "step-10", partial)
    (partial / COMPLETE).unlink()
    (partial / "weights.safetensors").write_bytes(b"truncated")
    (partial / "state.json").write_text('{"step": 15}')

    resumed = _train_cli([*flags, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "ignoring incomplete checkpoint" in resumed.stderr and "resumed from" in resumed.stderr

    assert read_losses(run) == read_losses(straight)  # bit-for-bit, every one of the 20 steps
    assert len(read_losses(run)) == 20
    ours, theirs = load_file(run / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_previous_one(tiny_model_dir, chat_file, tmp_path):
    extra = {"train__max_steps": 12, "output__save_every": 4}
    straight = tmp_path / "straight"
    finetune(tiny_config(tiny_model_dir, chat_file, straight, **extra))

    run = tmp_path / "killed"
    flags = _flags(tiny_overrides(tiny_model_dir, chat_file, run, **extra))
    killed = _train_cli(flags, TUNESMITH_TEST_KILL="during-checkpoint:8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [(s, ok) for s, _, ok in list_checkpoints(run)] == [(4, True)]  # step 8 never became visible
    assert find_resume(run, "auto").name == "step-4"

    resumed = _train_cli([*flags, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert read_losses(run) == read_losses(straight)


def test_resume_refuses_a_changed_config_or_data_unless_forced(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "run"
    finetune(tiny_config(tiny_model_dir, chat_file, run, train__max_steps=4, output__save_every=2))

    with pytest.raises(ResumeRefused, match=r"the training config changed.*train\.lr: 0\.005 -> 0\.001"):
        finetune(tiny_config(tiny_model_dir, chat_file, run, train__max_steps=4, train__lr=1e-3, train__resume="auto"))
    other = write_chat(tmp_path / "other.jsonl", chat_rows(offset=100))
    with pytest.raises(ResumeRefused, match="the training data changed"):
        finetune(tiny_config(tiny_model_dir, other, run, train__max_steps=4, train__resume="auto"))

    # Output-only settings may change freely; --resume-force overrides the refusal.
    finetune(tiny_config(tiny_model_dir, chat_file, run, train__max_steps=4, train__resume="auto",
                         output__save_total_limit=5, train__log_every=3))
    with pytest.warns(UserWarning, match="changed"):
        result = finetune(tiny_config(tiny_model_dir, chat_file, run, train__max_steps=6, train__resume="auto",
                                      train__resume_force=True))
    assert result.steps == 6


def test_resume_auto_without_checkpoints_is_a_clear_error(tmp_path):
    from tunesmith.errors import UsageError

    with pytest.raises(UsageError, match="no complete checkpoint"):
        find_resume(tmp_path, "auto")
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        find_resume(tmp_path, str(tmp_path))


def _fake_checkpoints(root, steps, incomplete=()):
    for step in steps:
        path = root / "checkpoints" / f"step-{step}"
        path.mkdir(parents=True)
        if step not in incomplete:
            (path / COMPLETE).write_text("ok\n")


def test_rotation_keeps_the_best_and_the_newest(tmp_path):
    _fake_checkpoints(tmp_path, [10, 20, 30, 40, 50], incomplete=[50])
    best = tmp_path / "checkpoints" / "step-10"
    removed = rotate(tmp_path, 2, keep={best})
    assert sorted(p.name for p in removed) == ["step-20", "step-30"]
    assert [(s, ok) for s, _, ok in list_checkpoints(tmp_path)] == [(10, True), (40, True), (50, False)]
    with pytest.warns(UserWarning, match="incomplete"):
        assert find_resume(tmp_path, "auto").name == "step-40"
    assert rotate(tmp_path, 1, keep={best}) == []  # the best and the newest both stay, even over the limit


@pytest.mark.slow  # five CLI processes
def test_generate_and_eval_on_a_stopped_run_name_its_step_and_the_resume_command(tiny_model_dir, chat_file,
                                                                                   tmp_path):
    run = tmp_path / "stopped"
    flags = _flags(tiny_overrides(tiny_model_dir, chat_file, run, output__save_every=5))
    assert _train_cli(flags, TUNESMITH_TEST_KILL="after-checkpoint:5").returncode == -signal.SIGKILL
    step5 = run / "checkpoints" / "step-5"
    for command in (["generate", str(run), "--prompt", "hi"], ["eval", str(run), "--data", str(chat_file)]):
        out = subprocess.run([sys.executable, "-m", "tunesmith.cli", *command], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode != 0
        assert f"{run} is a run that stopped at step 5 before saving its model" in out.stderr, out.stderr
        assert f"resume it with `tunesmith train {step5 / 'config.yaml'} --resume auto`" in out.stderr
        assert "not a model directory" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "tunesmith.cli", "generate", str(step5), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert f"{step5} is a training checkpoint, not a model" in out.stderr, out.stderr
    # The command it names continues the run to the end.
    resumed = _train_cli([str(step5 / "config.yaml"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and (run / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("held_out", ["val_size", "eval_path"])
def test_resume_at_the_last_step_keeps_the_held_out_check(tiny_model_dir, tmp_path, monkeypatch, held_out):
    """Ctrl-C during the last step, then --resume auto with the same config (held out by val_size, or an
    --eval-data file): the resumed run reports the held-out loss before and after training, the last step's."""
    from tunesmith.train.commands import summary_lines
    from tunesmith.train.loop import TrainingInterrupted

    data = write_chat(tmp_path / "train.jsonl", chat_rows())
    extra = ({"data__val_size": 8} if held_out == "val_size"
             else {"data__eval_path": write_chat(tmp_path / "eval.jsonl", chat_rows(6, offset=100))})
    out = tmp_path / "run"
    monkeypatch.setenv("TUNESMITH_TEST_KILL", "during-step:4:INT")
    with pytest.raises(TrainingInterrupted, match="stopped after step 4 of 4"):
        finetune(tiny_config(tiny_model_dir, data, out, train__max_steps=4, **extra))
    monkeypatch.delenv("TUNESMITH_TEST_KILL")
    result = finetune(tiny_config(tiny_model_dir, data, out, train__max_steps=4, train__resume="auto", **extra))
    logged = [row for row in read_metrics(out / "metrics.jsonl") if row.get("eval_loss") is not None]
    assert result.steps == 4 and logged[-1]["step"] == 4
    assert result.initial_eval_loss is not None and result.final_eval_loss == logged[-1]["eval_loss"]
    assert summary_lines(result)[1].startswith(f"held-out loss {result.initial_eval_loss:.4f} -> ")
