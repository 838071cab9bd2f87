"""Damaged or foreign model files: one line naming the model, exit 1, no traceback and no crash report.

Each case is a copy of the tiny model with one thing broken the way downloads and disks break them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.reliability.conftest import Outcome, files_under
from tests.reliability.corpus import alpaca_lines
from tunesmith.cli import main


def _corrupt_config(model: Path) -> Path:
    (model / "config.json").write_text('{"model_type": "llama", "voc', encoding="utf-8")
    return model


def _unknown_type(model: Path) -> Path:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "martian"}))
    return model


def _truncated_weights(model: Path) -> Path:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def _broken_tokenizer(model: Path) -> Path:
    (model / "tokenizer.json").write_text('{"version": ', encoding="utf-8")
    return model


def _no_weights(model: Path) -> Path:
    (model / "model.safetensors").unlink()
    return model


def _truncated_gguf(model: Path) -> Path:
    path = model.parent / "cut.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    return path


DAMAGE = {"corrupt_config": (_corrupt_config, "config.json"), "unknown_model_type": (_unknown_type, "martian"),
          "truncated_safetensors": (_truncated_weights, "deserializing header"),
          "broken_tokenizer": (_broken_tokenizer, "Expecting value"),
          "no_weights": (_no_weights, "model.safetensors"), "truncated_gguf": (_truncated_gguf, "unpack")}


@pytest.fixture
def damaged(request, tiny_model_dir, tmp_path) -> tuple[Path, str]:
    damage, says = DAMAGE[request.param]
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    return damage(model), says


def _run(capfd, *argv) -> Outcome:
    code = main([str(a) for a in argv])
    captured = capfd.readouterr()
    return Outcome(code, captured.out + captured.err)


def _check(result: Outcome, model: Path, says: str, tmp_path: Path) -> None:
    assert result.code == 1 and "Traceback" not in result.out, result.out[-3000:]
    assert f"error: {model}: cannot load the model: " in result.out and says in result.out, result.out[-3000:]
    assert "bug in tunesmith" not in result.out
    assert files_under(tmp_path / "tunesmith-home" / "crash-reports") == []


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_generate_names_the_damaged_model(damaged, tmp_path, capfd):
    model, says = damaged
    _check(_run(capfd, "generate", model, "--prompt", "hi", "--max-new-tokens", 2), model, says, tmp_path)


def _qa(tmp_path: Path) -> Path:
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(alpaca_lines()) + "\n", encoding="utf-8")
    return data


@pytest.mark.parametrize("damaged", ["corrupt_config", "truncated_safetensors", "broken_tokenizer"], indirect=True)
def test_eval_names_the_damaged_model(damaged, tmp_path, capfd):
    model, says = damaged
    _check(_run(capfd, "eval", model, "--data", _qa(tmp_path), "--out", tmp_path / "report"), model, says, tmp_path)
    assert files_under(tmp_path / "report") == []


@pytest.mark.parametrize("damaged", [
    "corrupt_config", "broken_tokenizer",
    "truncated_safetensors"],
    indirect=True)
def test_train_names_the_damaged_model(damaged, tmp_path, capfd):
    model, says = damaged
    _check(_run(capfd, "train", "--model.name", model, "--data.path", _qa(tmp_path), "--output.output_dir",
                tmp_path / "run", "--train.max_steps", 1, "--data.max_length", 64), model, says, tmp_path)
