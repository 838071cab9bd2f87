"""An eval killed mid-way (SIGKILL, no chance to clean up) and run again resumes: every example is predicted
exactly once, and what was already written is kept rather than generated again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.reliability.corpus import alpaca

N = 150


def _eval(model, data, out) -> list[str]:
    return [sys.executable, "-m", "tunesmith.cli", "eval", str(model), "--data", str(data), "--out", str(out),
            "--batch-size", "1", "--max-new-tokens", "24", "--metrics", "exact_match"]


def _complete_records(path) -> dict[int, dict]:
    records = {}
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the process died
            continue
        records[record["index"]] = record
    return records


def _kill_after(proc, path, lines: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and path.read_text(encoding="utf-8").count("\n") >= lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    raise AssertionError(f"eval ended (exit {proc.poll()}) before {lines} predictions were written: "
                         f"{proc.communicate()[1][-2000:]}")


def test_killed_eval_resumes_without_duplicates(tiny_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(alpaca(f"Question number {i}: what is {i} plus {i}?", f"{2 * i}") + "\n"
                            for i in range(N)), encoding="utf-8")
    out = tmp_path / "report"
    predictions = out / "predictions.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_eval(tiny_model_dir, data, out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _kill_after(proc, predictions, lines=5)
    before = _complete_records(predictions)
    assert 5 <= len(before) < N

    done = subprocess.run(_eval(tiny_model_dir, data, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming: {len(before)} predictions already in {predictions}" in done.stderr
    lines = predictions.read_text(encoding="utf-8").splitlines()
    indices = [json.loads(line)["index"] for line in lines]
    assert indices == list(range(N))  # each example once, in order
    after = {json.loads(line)["index"]: json.loads(line) for line in lines}
    for index, record in before.items():  # kept as written, not generated again (latency would differ)
        assert after[index] == record
    assert json.loads((out / "metrics.json").read_text())["metrics"]["n"] == N
    leftovers = [p.name for p in out.iterdir() if ".partial" in p.name]
    assert leftovers == []
