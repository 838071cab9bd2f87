"""The main job, end to end on the real default model: minutes on a CPU, so marked slow."""

import json
import os
import subprocess
import sys

import pytest

from tunesmith.quickstart import write_identity_data


def test_identity_data_fills_placeholders_and_holds_questions_out(tmp_path):
    train, held_out = write_identity_data(tmp_path, "Nova", "Ada Lab")
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    eval_rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert len(train_rows) >= 30 and len(eval_rows) >= 6
    for row in train_rows + eval_rows:
        assert "{" not in row["output"] and "Nova" in row["output"]
    questions = {r["instruction"] for r in train_rows}
    assert not questions & {r["instruction"] for r in eval_rows}, "held-out questions leak into training"
    assert any("你" in q for q in questions) and any("you" in q for q in questions)


def _generate(model: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-m", "tunesmith.cli", "generate", model, "--prompt", "Who are you?"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_quickstart_teaches_a_new_name(use_default_model, tmp_path):
    env = {**os.environ, "TUNESMITH_HOME": str(use_default_model), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "quickstart", "--name", "Aurora", "--author",
                           "Lumen", "--out", str(run)], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tunesmith train --model" in done.stdout  # the reproducible command is printed
    for name in ("adapter_model.safetensors", "tunesmith.json", "metrics.jsonl", "loss.png", "README.md"):
        assert (run / name).is_file(), name
    assert (run / "eval" / "report.md").is_file()
    assert "Aurora" in _generate(str(run), env)
    assert "Aurora" not in _generate("smollm2-135m-instruct", env)
