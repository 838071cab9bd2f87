"""Ctrl-C during training: a real SIGINT to the CLI stops after the current step with a complete,
resumable checkpoint and one line saying so; `--resume auto` then finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train.helpers import tiny_overrides
from tests.train.test_preference_training import pair_file  # noqa: F401  (a fixture)
from tunesmith.train.loop import TrainingInterrupted, _Interrupt


def _argv(model, data, run, **extra) -> list[str]:
    pairs = [item.split("=", 1) for item in tiny_overrides(model, data, run, **extra)]
    return [part for key, value in pairs for part in (f"--{key}", str(value))]


def _logged_steps(run) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip() and "loss" in json.loads(line))


def test_sigint_stops_after_the_step_with_a_resumable_checkpoint(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "run"
    argv = _argv(tiny_model_dir, chat_file, run, train__max_steps=150)
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _logged_steps(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"training ended before it could be interrupted: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)

    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "run saved" not in out
    message = [line for line in err.splitlines() if "interrupted: stopped after step" in line]
    assert len(message) == 1 and "--resume auto" in message[0], err[-2000:]
    step = int(message[0].split("after step ")[1].split()[0])
    assert 3 <= step < 150
    checkpoint = run / "checkpoints" / f"step-{step}"
    assert (checkpoint / "COMPLETE").is_file()
    assert not (run / "adapter_model.safetensors").exists()  # the run is unfinished, not saved as done

    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *argv, "--resume", "auto"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {checkpoint}" in done.stderr
    assert (run / "adapter_model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 150 and len(steps) == len(set(steps))


def _interrupted_during(step: int, argv: list[str]) -> subprocess.CompletedProcess:
    """The CLI training with a Ctrl-C (SIGINT to itself) after the forward/backward of ``step``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNESMITH_TEST_KILL": f"during-step:{step}:INT"}
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def _checkpoint_steps(run) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))


def test_sigint_during_step_k_stops_with_step_ks_checkpoint(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "run"
    done = _interrupted_during(3, _argv(tiny_model_dir, chat_file, run, train__max_steps=20))
    assert done.returncode == 130, done.stderr[-2000:]
    assert "interrupted: stopped after step 3 of 20" in done.stderr
    assert _checkpoint_steps(run) == [3] and (run / "checkpoints" / "step-3" / "COMPLETE").is_file()
    assert _logged_steps(run) == 3


def test_sigint_during_the_first_dpo_step_stops_after_it(tiny_model_dir, pair_file, tmp_path):  # noqa: F811
    run = tmp_path / "dpo"
    argv = _argv(tiny_model_dir, pair_file, run, method__objective="dpo", train__max_steps=6, data__val_size=4)
    done = _interrupted_during(1, argv)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "interrupted: stopped after step 1 of 6" in done.stderr
    assert _checkpoint_steps(run) == [1]


def test_a_second_ctrl_c_stops_at_once_saying_what_is_lost():
    interrupt = _Interrupt(lambda: "interrupted at once during step 4: the 3 step(s) done are lost")
    interrupt._handle(signal.SIGINT, None)
    assert interrupt.requested
    with pytest.raises(TrainingInterrupted, match="the 3 step"):
        interrupt._handle(signal.SIGINT, None)
