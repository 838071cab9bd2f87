"""Output scripts and pipes can use, from the real CLI in a subprocess with stdout a pipe.

Every listing or reporting command prints exactly one JSON document with --json (anything else
on stdout would break json.loads), and its keys are named in its --help. Without --json, in a
pipe, no table cuts a name or a path: each stays whole on one line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.evaluate.test_pipeline import make_lora_run
from tests.train.helpers import chat_rows, tiny_overrides, write_chat
from tunesmith.models.resolve import ALIASES

# Long enough that an 80-column table would have to cut the paths beneath it.
LONG_DIR = "a-directory-name-long-enough-to-push-every-table-past-eighty-columns-" * 3


def cli(*argv, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, env=env)  # stdout is a pipe, as in `tunesmith ... | grep`


def json_of(*argv, code: int = 0, env: dict | None = None) -> dict:
    done = cli(*argv, "--json", env=env)
    assert done.returncode == code, done.stderr[-3000:]
    return json.loads(done.stdout)


def assert_documented(command: list[str], *keys) -> None:
    """Every key of the document (top level, and of the listed rows) is named in the command's --help."""
    help_text = cli(*command, "--help").stdout
    assert [key for key in keys if not re.search(rf"\b{re.escape(key)}\b", help_text)] == []


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("script-run") / LONG_DIR, tiny_model_dir, seed=3)


def train_flags(model: Path, data: Path, out: Path, **extra) -> list[str]:
    """The tiny model's fast training setup as command-line flags."""
    return [part for item in tiny_overrides(model, data, out, **extra) for part in (f"--{item.split('=', 1)[0]}",
                                                                                   item.split("=", 1)[1])]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> tuple[dict, Path]:
    """A real 4-step training on the tiny model with --json: (the summary document, the run directory)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_chat(root / "train.jsonl", chat_rows())
    run = root / LONG_DIR / "runs" / "tiny-run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNESMITH_HOME": str(root / "tunesmith-home")}
    document = json_of("train", *train_flags(tiny_model_dir, data, run, train__max_steps=4, data__val_size=8),
                       env=env)
    return document, run


def test_train_plan_json_trains_nothing(tiny_model_dir, tmp_path):
    data = write_chat(tmp_path / "train.jsonl", chat_rows())
    run = tmp_path / LONG_DIR / "run"
    plan = json_of("train", *train_flags(tiny_model_dir, data, run, train__max_steps=4), "--plan")
    assert plan["examples"] == 40 and plan["total_steps"] == 4 and plan["lr"] == 5e-3 and plan["method"] == "lora"
    assert plan["elapsed_s"] is None and plan["measured_tokens_per_s"] is None  # nothing trained
    assert plan["choices"] and all(set(c) == {"key", "value", "reason", "auto"} for c in plan["choices"])
    assert not run.exists()
    assert_documented(["train"], *plan, *plan["choices"][0])


def test_train_json_summary_after_a_real_training(trained):
    summary, run = trained
    assert summary["run_dir"] == str(run) and (run / "adapter_model.safetensors").is_file()
    assert summary["steps"] == 4 and summary["stopped_early"] is False
    assert summary["final_train_loss"] > 0 and summary["initial_eval_loss"] > 0 and summary["final_eval_loss"] > 0
    assert summary["tokens"] >= summary["supervised_tokens"] > 0 and summary["elapsed_s"] >= 0
    assert isinstance(summary["warnings"], list)
    plan = summary["plan"]
    assert plan["total_steps"] == 4 and plan["val_examples"] == 8 and plan["elapsed_s"] is not None
    assert plan == json.loads((run / "plan.json").read_text())
    assert_documented(["train"], *summary, *plan, *plan["choices"][0])


def test_runs_json_and_pipe_keep_the_whole_path(trained):
    summary, run = trained
    document = json_of("runs", run.parent)
    assert document["root"] == str(run.parent)
    (row,) = document["runs"]
    assert (row["name"], row["path"], row["status"], row["method"]) == ("tiny-run", str(run), "finished", "lora")
    assert (row["steps"], row["total_steps"]) == (4, 4) and row["train_loss"] == summary["final_train_loss"]
    assert_documented(["runs"], *document, *row)

    shown = cli("runs", run.parent)
    assert shown.returncode == 0, shown.stderr
    assert any(line.split("\t")[0] == "tiny-run" and line.split("\t")[-1] == str(run)
               for line in shown.stdout.splitlines()), shown.stdout


def test_models_list_json_and_pipe_keep_every_name(tiny_model_dir, tmp_path, monkeypatch):
    home = tmp_path / LONG_DIR / "tunesmith-home"
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    empty = cli("models", "list")
    assert empty.returncode == 0, empty.stderr
    assert sum("smollm2-135m-instruct" in line for line in empty.stdout.splitlines()) == 1
    shutil.copytree(tiny_model_dir, home / "models" / "smollm2-135m-instruct")
    shutil.copytree(tiny_model_dir, home / "models" / "someone--tiny-model")

    document = json_of("models", "list")
    assert document["cache"] == str(home / "models")
    rows = {row["name"]: row for row in document["models"]}
    assert set(rows) == set(ALIASES) | {"someone--tiny-model"}
    default = rows["smollm2-135m-instruct"]
    assert default["cached"] and default["path"] == str(home / "models" / "smollm2-135m-instruct")
    assert default["size"] > 0 and default["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert_documented(["models", "list"], *document, *default)

    # The issue's own check, through a shell pipe.
    grep = subprocess.run(f"{shlex.quote(sys.executable)} -m tunesmith.cli models list | grep -c smollm2-135m-instruct",
                          shell=True, capture_output=True, text=True, env=os.environ)
    assert grep.stdout.strip() == "1", grep.stderr
    lines = [line.split("\t") for line in cli("models", "list").stdout.splitlines()]
    for row in document["models"]:
        assert any(row["name"] in fields and (not row["path"] or row["path"] in fields) for fields in lines), row


def test_data_check_json_and_pipe_name_every_row(tiny_model_dir, tmp_path):
    folder = tmp_path / LONG_DIR
    folder.mkdir()
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(4)]
    path = write_jsonl(folder / "train.jsonl", [*rows, {"instruction": "No answer"}, rows[0]])

    document = json_of("data", "check", path, "--model", tiny_model_dir, code=1)
    assert document["ok"] is False and document["files"] == [str(path)]
    assert [(e["file"], e["line"], e["field"]) for e in document["errors"]] == [(str(path), 5, "output")]
    assert document["duplicates"] == [{"kind": "exact", "rows": [f"{path}:1", f"{path}:6"]}]
    assert document["token_lengths"]["max"] > 0 and document["preview"]["source"] == f"{path}:1"
    assert_documented(["data", "check"], *document, *document["errors"][0], *document["duplicates"][0],
                      *document["token_lengths"], *document["preview"])

    shown = cli("data", "check", path, "--model", tiny_model_dir)
    assert shown.returncode == 1
    lines = shown.stdout.splitlines()
    assert any(line.strip().startswith(f"{path}:5 output:") for line in lines), shown.stdout
    assert any(f"exact: {path}:1, {path}:6" in line for line in lines), shown.stdout
    assert lines[lines.index("# lengths") + 1] == "length\tp50\tp90\tp99\tmax\tmean"  # tab-separated, no box
    assert not set("┏┃│└━") & set(shown.stdout)


def test_eval_json_with_compare_base(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Who are you?", "output": "I am a helpful assistant."},
                                               {"instruction": "Capital of France?", "output": "Paris."}])
    out = tmp_path / LONG_DIR / "eval"
    document = json_of("eval", run_dir, "--data", data, "--compare", "base", "--out", out,
                       "--max-new-tokens", "4", "--metrics", "rouge,exact_match")
    assert document["model"] and document["data"] == str(data)
    assert document["metrics"]["n"] == document["compare_metrics"]["n"] == 2
    assert "rougeL" in document["deltas"]
    assert Path(document["paths"]["report"]) == out / "report.md" and (out / "report.md").is_file()
    assert_documented(["eval"], *document)


def test_eval_table_in_a_pipe_keeps_the_compared_model_and_report_path(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Who are you?", "output": "I am a helpful assistant."}])
    out = tmp_path / LONG_DIR / "eval"
    shown = cli("eval", run_dir, "--data", data, "--compare", "base", "--out", out, "--max-new-tokens", "4",
                "--metrics", "rouge")
    assert shown.returncode == 0, shown.stderr[-3000:]
    lines = shown.stdout.splitlines()
    compare = json.loads((out / "metrics.json").read_text())["compare"]
    header = next(line.split("\t") for line in lines if line.startswith("metric\t"))
    assert header == ["metric", "model", compare, "delta"]
    assert f"report: {out / 'report.md'}" in lines
    assert any(line.startswith("# ") and str(run_dir) in line for line in lines)
    assert "Loading weights" not in shown.stderr  # transformers' own bar, quiet without --verbose


def test_verbose_shows_the_libraries_bars(run_dir):
    shown = cli("generate", run_dir, "--prompt", "hi", "--max-new-tokens", "2", "--verbose")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "Loading weights" in shown.stderr


def test_eval_predictions_json(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prediction": "Paris", "reference": "Paris"},
                                              {"prediction": "Rome", "reference": "Paris"}])
    document = json_of("eval", "--predictions", path, "--metrics", "exact_match")
    assert document["metrics"]["exact_match"] == 0.5
    assert document["compare"] is None and document["deltas"] in (None, {})


@pytest.mark.parametrize("mode", ["merge", "gguf"])
def test_export_json(run_dir, tmp_path, mode):
    out = tmp_path / LONG_DIR / ("merged" if mode == "merge" else "model.gguf")
    document = json_of("export", run_dir, f"--{mode}", "--out", out)
    assert document["format"] == mode and document["path"] == str(out) and document["source"] == str(run_dir)
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert document["bytes"] == size > 0
    assert document["dtype"] == (None if mode == "merge" else "f16")
    assert_documented(["export"], *document)

