"""`tunesmith runs`: real run directories made by training the tiny model, one per status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.helpers import chat_rows, tiny_config, tiny_overrides, write_chat


def _train_argv(model: Path, data: Path, out: Path, **extra) -> list[str]:
    pairs = [item.split("=", 1) for item in tiny_overrides(model, data, out, **extra)]
    return [sys.executable, "-m", "tunesmith.cli", "train", *[p for k, v in pairs for p in (f"--{k}", str(v))]]


def _killed_run(model: Path, data: Path, out: Path, stage: str, env: dict) -> subprocess.Popen:
    """A CLI training SIGKILLed at ``stage`` of step 2 (checkpoint.kill_point): no final files."""
    return subprocess.Popen(_train_argv(model, data, out, output__save_every=2, train__max_steps=6),
                            env={**env, "TUNESMITH_TEST_KILL": f"{stage}:2"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """runs/finished (3 steps, held-out data), runs/stopped (killed after a checkpoint), runs/failed
    (killed while writing its first checkpoint)."""
    from tunesmith.train.loop import finetune

    tmp = tmp_path_factory.mktemp("runs-cli")
    data = write_chat(tmp / "train.jsonl", chat_rows())
    root = tmp / "runs"
    env = {**os.environ, "TUNESMITH_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(tmp / "home"))
        children = [_killed_run(tiny_model_dir, data, root / "stopped", "after-checkpoint", env),
                    _killed_run(tiny_model_dir, data, root / "failed", "during-checkpoint", env)]
        finetune(tiny_config(tiny_model_dir, data, root / "finished", train__max_steps=3, data__val_size=8))
        for child in children:
            _, err = child.communicate(timeout=300)
            assert child.returncode == -signal.SIGKILL, err[-2000:]
    return root


def test_list_runs_reads_each_status_from_the_files(runs_dir):
    from tunesmith.runs import list_runs

    runs = {r.name: r for r in list_runs(runs_dir)}
    assert set(runs) == {"finished", "stopped", "failed"}
    done = runs["finished"]
    info = json.loads((runs_dir / "finished" / "tunesmith.json").read_text())
    assert (done.status, done.method, done.steps, done.total_steps) == ("finished", "lora", 3, 3)
    assert done.train_loss == info["final_train_loss"] and done.train_loss > 0
    assert done.eval_loss == info["final_eval_loss"] and done.eval_loss > 0
    assert done.data == [str(runs_dir.parent / "train.jsonl")]

    stopped = runs["stopped"]
    assert (stopped.status, stopped.method, stopped.steps, stopped.total_steps) == ("stopped", "lora", 2, 6)
    assert stopped.checkpoint == str(runs_dir / "stopped" / "checkpoints" / "step-2")
    assert stopped.train_loss is not None and stopped.eval_loss is None  # no held-out data in that run
    assert stopped.data == done.data  # read from the checkpoint's config

    failed = runs["failed"]
    assert (failed.status, failed.checkpoint, failed.steps) == ("failed", None, 2)
    assert (runs_dir / "failed" / "checkpoints" / ".tmp-step-2").is_dir()  # the save really was cut short


def test_runs_cli_table_and_json(runs_dir):
    run = subprocess.run([sys.executable, "-m", "tunesmith.cli", "runs", str(runs_dir)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()  # a pipe: the title, a header, one tab-separated line per run
    assert lines[0] == f"# runs under {runs_dir}"
    assert lines[1].split("\t") == ["name", "status", "method", "data", "steps", "train loss", "eval loss", "path"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[2:]}
    assert rows["finished"][1:3] == ["finished", "lora"] and rows["finished"][4] == "3/3"
    assert rows["stopped"][1] == "stopped" and rows["stopped"][4] == "2/6"
    assert rows["failed"][1] == "failed" and rows["failed"][-1] == str(runs_dir / "failed")

    run = subprocess.run([sys.executable, "-m", "tunesmith.cli", "runs", str(runs_dir), "--json"],
                         capture_output=True, text=True, timeout=120)
    document = json.loads(run.stdout)
    assert document["root"] == str(runs_dir)
    assert {r["name"]: r["status"] for r in document["runs"]} == {"finished": "finished", "stopped": "stopped",
                                                                  "failed": "failed"}
    finished = next(r for r in document["runs"] if r["name"] == "finished")
    assert finished["train_loss"] == json.loads((runs_dir / "finished" / "tunesmith.json").read_text())[
        "final_train_loss"]


def test_a_training_started_from_a_terminal_shows_as_running(tiny_model_dir, tmp_path):
    from tunesmith.runs import list_runs

    chat_file = write_chat(tmp_path / "train.jsonl", chat_rows())
    out = tmp_path / "runs" / "live"
    # metrics.jsonl gets a line every 1000 steps only: the step count a running run shows comes from step.json
    child = subprocess.Popen(_train_argv(tiny_model_dir, chat_file, out, train__max_steps=400, train__log_every=1000),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "step.json").is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        runs = list_runs(tmp_path / "runs")
        assert [(r.name, r.status, r.pid) for r in runs] == [("live", "running", child.pid)]
        assert runs[0].steps >= 1 and runs[0].total_steps == 400
        metrics = out / "metrics.jsonl"
        assert not metrics.is_file() or '"loss"' not in metrics.read_text()
    finally:
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert [r.status for r in list_runs(tmp_path / "runs")] == ["stopped"]
