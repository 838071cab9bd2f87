"""The web UI's API through FastAPI's TestClient: the generated form, the real plan of the tiny model,
a real child training started and stopped, and the data doctor's report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.train.helpers import chat_rows, tiny_overrides, write_chat


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from tunesmith.ui.app import create_app

    with TestClient(create_app(tmp_path / "runs")) as client:
        yield client


def tiny_form(model: Path, data: Path, out: Path, **extra) -> dict:
    """The form's values for a fast tiny-model run, as the page sends them (every value a string)."""
    return dict(item.split("=", 1) for item in tiny_overrides(model, data, out, **extra))


def test_the_form_has_every_config_field_with_its_help_default_and_choices(client):
    from tunesmith.config import fields_info

    settings = client.get("/api/settings").json()
    fields = {f["key"]: f for section in settings["sections"] for f in section["fields"]}
    infos = fields_info()
    assert list(fields) == [info.key for info in infos]  # every field, in declaration order
    assert [s["name"] for s in settings["sections"]] == ["model", "data", "method", "train", "eval", "output"]
    for info in infos:
        field = fields[info.key]
        assert field["help"] == info.help
        assert field["choices"] == (list(info.choices) if info.choices else None)
    assert fields["method.name"]["default"] == "lora" and fields["method.target_modules"]["default"] == "all-linear"
    assert fields["data.packing"]["kind"] == "bool" and fields["train.lr"]["default"] == ""
    assert settings["suggested"]["output.output_dir"].startswith(settings["runs_dir"])


def test_both_languages_have_every_string(client):
    strings = client.get("/api/settings").json()["strings"]
    assert set(strings) == {"en", "zh"} and set(strings["en"]) == set(strings["zh"])
    assert strings["zh"]["tab.train"] == "训练" and strings["en"]["tab.train"] == "Train"


def test_the_command_holds_only_what_differs_from_the_defaults_and_is_checked_like_the_cli(client):
    response = client.post("/api/train/command", json={"data.path": "a.jsonl, b.jsonl", "train.lr": "2e-4",
                                                       "method.name": "lora", "data.packing": "true"})
    assert response.json() == {"command": "tunesmith train --data.path a.jsonl,b.jsonl --train.lr 0.0002"}
    bad = client.post("/api/train/command", json={"method.name": "lorax"})
    assert bad.status_code == 400 and "method.name: 'lorax' is not one of" in bad.json()["error"]
    unknown = client.post("/api/train/command", json={"train.lrr": "1"})
    assert unknown.status_code == 400 and "did you mean 'train.lr'" in unknown.json()["error"]


def test_plan_is_the_real_plan_of_the_tiny_model(client, tiny_model_dir, tmp_path):
    from tests.train.helpers import tiny_config
    from tunesmith.train.loop import prepare_run

    data = write_chat(tmp_path / "train.jsonl", chat_rows())
    values = tiny_form(tiny_model_dir, data, tmp_path / "runs" / "a", train__max_steps=7)
    result = client.post("/api/train/plan", json=values).json()
    expected = prepare_run(tiny_config(tiny_model_dir, data, tmp_path / "runs" / "a", train__max_steps=7)).plan
    assert result["plan"] == json.loads(json.dumps(expected.to_dict()))
    assert result["lines"] == expected.lines()
    assert any(line.endswith("= 7 optimizer steps, 2 of warmup") for line in result["lines"])
    assert result["command"].startswith("tunesmith train --model.name ") and result["command"].endswith(
        "--plan --json")

    missing = client.post("/api/train/plan", json={**values, "data.path": str(tmp_path / "nope.jsonl")})
    assert missing.status_code == 400 and "nope.jsonl" in missing.json()["error"]
    assert "Traceback" not in missing.json()["error"]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_start_and_stop_a_real_child_training(client, tiny_model_dir, tmp_path):
    from tunesmith.runs import PROCESS_FILE
    from tunesmith.train.checkpoint import damage, list_checkpoints

    data = write_chat(tmp_path / "train.jsonl", chat_rows())
    out = tmp_path / "runs" / "live"
    started = client.post("/api/train/start", json=tiny_form(tiny_model_dir, data, out, train__max_steps=500)).json()
    assert started["run_dir"] == str(out.resolve()) and started["command"].startswith("tunesmith train ")
    record = json.loads((out / PROCESS_FILE).read_text())
    assert record["pid"] == started["pid"] and record["command"] == started["command"]

    def logged():
        run = client.get("/api/run", params={"path": str(out)}).json()
        return run if len([r for r in run["metrics"] if "loss" in r]) >= 2 else None

    run = _wait(logged, 120, "two logged steps")
    assert (run["status"], run["stoppable"], run["pid"], run["total_steps"]) == ("running", True, started["pid"], 500)
    listed = client.get("/api/runs").json()["runs"]
    assert [(r["name"], r["status"], r["stoppable"]) for r in listed] == [("live", "running", True)]
    again = client.post("/api/train/start", json=tiny_form(tiny_model_dir, data, out, train__max_steps=500))
    assert again.status_code == 400 and "still running" in again.json()["error"]

    assert client.post("/api/train/stop", json={"path": str(out)}).json() == {"pid": started["pid"],
                                                                              "signal": "SIGINT"}
    record = _wait(lambda: (r := json.loads((out / PROCESS_FILE).read_text()))["returncode"] is not None and r,
                   120, "the child to exit")
    assert record["returncode"] == 130
    run = client.get("/api/run", params={"path": str(out)}).json()
    assert (run["status"], run["stoppable"]) == ("stopped", False)
    complete = [path for _, path, ok in list_checkpoints(out) if ok]
    assert complete and damage(complete[-1]) is None and run["checkpoint"] == str(complete[-1])
    assert "interrupted: stopped after step" in run["log"] and "--resume auto" in run["log"]
    assert not (out / "tunesmith.json").exists()


def test_stop_and_reads_are_refused_outside_what_this_server_owns(client, tmp_path):
    (tmp_path / "runs" / "other").mkdir(parents=True)
    refused = client.post("/api/train/stop", json={"path": str(tmp_path / "runs" / "other")})
    assert refused.status_code == 400 and "no training started by this UI" in refused.json()["error"]
    outside = client.get("/api/run", params={"path": str(tmp_path)})
    assert outside.status_code == 400 and "not under the runs folder" in outside.json()["error"]
    escape = client.get("/api/run/file", params={"path": str(tmp_path / "runs" / "other"), "name": "../../x"})
    assert escape.status_code == 400


def test_data_check_reports_errors_with_file_and_line(client, tiny_model_dir, tmp_path):
    rows = chat_rows(4)
    bad = tmp_path / "bad.jsonl"
    write_chat(bad, rows)
    bad.write_text(bad.read_text() + '{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    report = client.post("/api/data/check", json={"files": [str(bad)], "model": str(tiny_model_dir)}).json()
    assert report["ok"] is False and report["num_examples"] >= 5
    assert {(e["file"], e["line"]) for e in report["errors"]} >= {(str(bad), 6)}
    assert report["token_lengths"]["max"] > 0
    assert any(s["supervised"] for s in report["preview"]["segments"])
    missing = client.post("/api/data/check", json={"files": []})
    assert missing.status_code == 400
