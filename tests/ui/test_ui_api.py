"""The web UI's API over real HTTP (uvicorn on 127.0.0.1, tests/ui/conftest.py): the generated form, the real
plan of the tiny model, a real child training started, stopped and resumed, and the data doctor's report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.train.helpers import chat_rows, tiny_overrides, write_chat
from tests.ui.conftest import ui_server


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
    from tunesmith.config import fields_info
    from tunesmith.ui.strings import FIELD_HELP_ZH

    settings = client.get("/api/settings").json()
    strings = settings["strings"]
    assert set(strings) == {"en", "zh"} and set(strings["en"]) == set(strings["zh"])
    assert strings["zh"]["tab.train"] == "训练" and strings["en"]["tab.train"] == "Train"
    # every field's help in Chinese, falling back to config.py's English for an option added since
    assert set(FIELD_HELP_ZH) <= {info.key for info in fields_info()}  # no translation of a removed field
    fields = {f["key"]: f for section in settings["sections"] for f in section["fields"]}
    assert all(f["help_zh"] == FIELD_HELP_ZH.get(key, f["help"]) for key, f in fields.items())
    assert fields["train.lr"]["help_zh"].startswith("峰值学习率")


def test_the_command_holds_only_what_differs_from_the_defaults_and_is_checked_like_the_cli(client):
    response = client.post("/api/train/command", json={"data.path": "a.jsonl, b.jsonl", "train.lr": "2e-4",
                                                       "method.name": "lora", "data.packing": "true"})
    assert response.json() == {"command": "tunesmith train --data.path a.jsonl,b.jsonl --train.lr 0.0002"}
    bad = client.post("/api/train/command", json={"method.name": "lorax"})
    assert bad.status_code == 400 and "method.name: 'lorax' is not one of" in bad.json()["error"]
    unknown = client.post("/api/train/command", json={"train.lrr": "1"})
    assert unknown.status_code == 400 and "did you mean 'train.lr'" in unknown.json()["error"]


def test_rewards_are_one_a_line_and_a_regex_keeps_its_comma(client, tmp_path):
    """The form's reward box takes one function a line; the command gives each its own --reward, which the CLI
    reads back whole (a comma inside a regex is not a separator), and resuming refills the box the same way."""
    import shlex

    from tunesmith.config import load_config
    from tunesmith.train.commands import parse_train_args
    from tunesmith.ui.app import resume_values, train_args
    from tunesmith.ui.workspace import Workspace

    fields = {f["key"]: f for s in client.get("/api/settings").json()["sections"] for f in s["fields"]}
    assert fields["method.rewards"]["kind"] == "lines"
    rewards = ["regex:^\\d{1,3}$", "exact"]
    command = client.post("/api/train/command", json={"method.rewards": f" {rewards[0]}\n\n{rewards[1]}\n"}).json()["command"]
    assert command == f"tunesmith train --reward '{rewards[0]}' --reward exact"
    _, overrides, _ = parse_train_args(shlex.split(command)[2:])
    assert load_config(None, overrides).method.rewards == rewards
    run = tmp_path / "runs" / "stopped"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(load_config(None, overrides).to_yaml(), encoding="utf-8")
    values = resume_values(run, Workspace(tmp_path / "runs", 1 << 20))
    assert values["method.rewards"] == "\n".join(rewards)
    assert train_args(values)[:4] == ["--reward", rewards[0], "--reward", "exact"]


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
    # the command shown after Plan is the one that trains (what Start runs), not the planning one
    assert result["command"] == client.post("/api/train/command", json=values).json()["command"]
    assert result["command"].startswith("tunesmith train --model.name ") and "--plan" not in result["command"]

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

    for _ in range(2):  # a second click must not turn the clean stop into an immediate one
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

    again = client.post("/api/train/start", json=tiny_form(tiny_model_dir, data, out, train__max_steps=500))
    assert again.status_code == 400 and "already holds a run; set train.resume to auto" in again.json()["error"]
    assert json.loads((out / PROCESS_FILE).read_text())["returncode"] == 130  # the stopped run's record is kept

    assert run["resumable"] is True
    # process.json is a record anyone can write: Resume must not run the command it names
    hostile = str(tmp_path / "pwned")
    (out / PROCESS_FILE).write_text(json.dumps({**json.loads((out / PROCESS_FILE).read_text()),
                                                "command": f"tunesmith train --output.output_dir {hostile}"}))
    resumed = client.post("/api/train/resume", json={"path": str(out)}).json()
    assert hostile not in resumed["command"] and " --train.resume auto" in resumed["command"]
    for flag in started["command"].removeprefix("tunesmith train ").split(" --"):
        assert f"--{flag.removeprefix('--')}" in resumed["command"]  # every option of Start, from the config
    record = _wait(lambda: (r := json.loads((out / PROCESS_FILE).read_text()))["returncode"] is not None and r,
                   300, "the resumed run to finish")
    run = client.get("/api/run", params={"path": str(out)}).json()
    assert record["returncode"] == 0 and (run["status"], run["steps"]) == ("finished", 500), run["log"][-2000:]
    assert f"resumed from {complete[-1]}" in (out / "ui-train.log").read_text()
    assert not (tmp_path / "pwned").exists()
    again = client.post("/api/train/resume", json={"path": str(out)})
    assert again.status_code == 400 and "is finished" in again.json()["error"]


def test_a_child_that_fails_shows_as_failed_with_its_error(client, tiny_model_dir, tmp_path):
    from tunesmith.runs import PROCESS_FILE

    out = tmp_path / "runs" / "broken"
    client.post("/api/train/start", json=tiny_form(tiny_model_dir, tmp_path / "missing.jsonl", out))
    _wait(lambda: json.loads((out / PROCESS_FILE).read_text())["returncode"] is not None, 120, "the child to fail")
    run = client.get("/api/run", params={"path": str(out)}).json()
    assert run["status"] == "failed" and "missing.jsonl" in run["log"] and "Traceback" not in run["log"]
    assert [r["status"] for r in client.get("/api/runs").json()["runs"]] == ["failed"]


def test_stop_and_reads_are_refused_outside_what_this_server_owns(client, tmp_path):
    outside_start = client.post("/api/train/start", json={"output.output_dir": str(tmp_path / "elsewhere")})
    assert outside_start.status_code == 400 and "not under the runs folder" in outside_start.json()["error"]
    assert not (tmp_path / "elsewhere").exists()
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


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 3-step LoRA run of the tiny model, inside a runs folder, with a system prompt."""
    from tests.train.helpers import tiny_config
    from tunesmith.train.loop import finetune

    tmp = tmp_path_factory.mktemp("ui-run")
    data = write_chat(tmp / "train.jsonl", chat_rows())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(tmp / "home"))
        finetune(tiny_config(tiny_model_dir, data, tmp / "runs" / "done", train__max_steps=3,
                             data__system_prompt="You are Lumen."))
    return tmp / "runs" / "done"


@pytest.fixture
def run_client(finished_run):
    with ui_server(finished_run.parent) as ui, ui.client() as client:
        yield client


def _greedy(model: str, messages: list[dict], system: str | None, max_new_tokens: int) -> str:
    from tunesmith.data.prompt import render_prompt
    from tunesmith.inference import GenerationOptions, generate
    from tunesmith.models.load import load

    loaded = load(model)
    head = [{"role": "system", "content": system}] if system else []
    prompt = render_prompt(loaded.tokenizer, head + messages)
    return generate(loaded.model, loaded.tokenizer, [prompt], GenerationOptions(max_new_tokens=max_new_tokens))[0].text


def test_chat_streams_what_generate_answers_for_the_run_and_its_base(run_client, finished_run, tiny_model_dir):
    messages = [{"role": "user", "content": "Who are you?"}]
    for base, model in ((False, finished_run), (True, tiny_model_dir)):
        with run_client.stream("POST", "/api/chat", json={"model": str(finished_run), "base": base,
                                                          "messages": messages, "max_new_tokens": 12}) as response:
            assert response.status_code == 200
            pieces = list(response.iter_text())
        answer = "".join(pieces).strip()
        # the run's system prompt is used on both sides, as training rendered it
        assert answer == _greedy(str(model), messages, "You are Lumen.", 12)
        assert answer
    not_a_run = run_client.post("/api/chat", json={"model": str(tiny_model_dir), "base": True, "messages": messages})
    assert not_a_run.status_code == 400 and "no base model" in not_a_run.json()["error"]


def _job(client, folder: str, command: str) -> dict:
    return _wait(lambda: (j := client.get("/api/job", params={"folder": folder, "command": command}).json())[
        "returncode"] is not None and j, 300, f"the {command} child")


def test_evaluate_runs_the_eval_command_with_compare_base(run_client, finished_run, tmp_path):
    data = write_chat(tmp_path / "held_out.jsonl", chat_rows(4, offset=100))
    started = run_client.post("/api/eval/start", json={"model": str(finished_run), "data": str(data),
                                                       "compare": "base", "metrics": "rouge,chrf",
                                                       "max_new_tokens": 8}).json()
    assert started["command"] == (f"tunesmith eval {finished_run} --data {data} --out {started['folder']} "
                                  "--compare base --metrics rouge,chrf --max-new-tokens 8")
    job = _job(run_client, started["folder"], "eval")
    assert job["returncode"] == 0, job["log"]
    metrics = json.loads((Path(started["folder"]) / "metrics.json").read_text())
    assert "rougeL" in json.dumps(metrics) and job["report"] and "## Worst examples by ROUGE-L" in job["report"]
    for image in job["images"]:
        assert run_client.get("/api/run/file", params={"path": started["folder"], "name": image}).status_code == 200


def test_export_runs_the_export_command_and_names_the_output(run_client, finished_run, tmp_path):
    outside = run_client.post("/api/export/start", json={"model": str(finished_run), "format": "merge",
                                                         "out": str(tmp_path / "merged")})
    assert outside.status_code == 400 and "is not under the runs folder" in outside.json()["error"]
    assert not (tmp_path / "merged").exists()
    out = finished_run.parent / "exports" / "merged"
    started = run_client.post("/api/export/start", json={"model": str(finished_run), "format": "merge",
                                                         "out": str(out)}).json()
    assert started["command"] == f"tunesmith export {finished_run} --merge --out {out}"
    job = _job(run_client, started["folder"], "export")
    assert job["returncode"] == 0, job["log"]
    assert (out / "config.json").is_file() and str(out) in job["log"]
    bad = run_client.post("/api/export/start", json={"model": str(finished_run), "format": "zip", "out": "x"})
    assert bad.status_code == 400


def test_upload_check_with_overlap_and_convert(client, tiny_model_dir, tmp_path):
    rows = chat_rows(6)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    uploaded = client.post("/api/data/upload", params={"name": "../../chat.jsonl"}, content=body).json()
    assert uploaded == {"path": str((tmp_path / "runs" / "uploads" / "chat.jsonl").resolve()), "bytes": len(body)}
    assert Path(uploaded["path"]).read_bytes() == body

    held_out = write_chat(tmp_path / "eval.jsonl", rows[:1])
    report = client.post("/api/data/check", json={"files": [uploaded["path"]], "eval_files": [str(held_out)],
                                                  "tokens": False}).json()
    assert report["ok"] and report["overlap"] == [{"eval": f"{held_out}:1", "train": [f"{uploaded['path']}:1"]}]

    out = tmp_path / "runs" / "alpaca.jsonl"
    converted = client.post("/api/data/convert", json={"file": uploaded["path"], "to": "alpaca", "out": str(out)})
    assert converted.json()["command"] == f"tunesmith data convert {uploaded['path']} --to alpaca --out {out}"
    assert "wrote 6 alpaca rows" in converted.json()["output"]
    assert json.loads(out.read_text().splitlines()[0])["output"] == rows[0]["messages"][1]["content"]
    again = client.post("/api/data/convert", json={"file": uploaded["path"], "to": "alpaca", "out": str(out)})
    assert again.status_code == 400 and str(out) in again.json()["error"]
    assert "alpaca" in client.get("/api/settings").json()["convert_targets"]


def test_the_ui_command_serves_the_page_on_loopback_behind_its_token(tmp_path):
    import re
    import subprocess
    import sys

    import httpx

    from tests.ui.conftest import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "ui", "--port", str(port), "--lang", "zh",
                               "--runs-dir", str(tmp_path / "runs")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        printed = re.search(rf"tunesmith ui on (http://127\.0\.0\.1:{port}/\?token=(\S+)) ", line)
        assert printed, line
        url, token = printed.groups()

        def settings():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/settings", params={"token": token}, timeout=2).json()
            except httpx.HTTPError:
                return None

        document = _wait(settings, 60, "tunesmith ui to answer")
        assert document["lang"] == "zh" and document["runs_dir"] == str(tmp_path / "runs")
        page = httpx.get(url, timeout=5)
        assert page.status_code == 200 and 'src="/static/app.js"' in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/static/app.js", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=5).status_code == 401
        foreign = httpx.get(f"http://127.0.0.1:{port}/api/runs", params={"token": token},
                            headers={"host": "example.com"}, timeout=5)
        assert foreign.status_code == 400
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert len(token) >= 32  # a new one at each launch: nothing to guess


def test_off_this_machine_the_ui_will_not_start_without_a_token(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_UI_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "ui", "--host", "0.0.0.0", "--runs-dir",
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert "error: tunesmith ui --host 0.0.0.0 serves beyond this machine" in done.stderr
    assert "--token or TUNESMITH_UI_TOKEN" in done.stderr and "--insecure-no-auth" in done.stderr


def test_the_launch_token_rules():
    from tunesmith.config import UIConfig
    from tunesmith.errors import UsageError
    from tunesmith.ui.app import launch_token, page_url

    made, warning = launch_token(UIConfig(), environ={})
    assert warning is None and len(made) >= 32 and made != launch_token(UIConfig(), environ={})[0]
    assert launch_token(UIConfig(host="::1"), environ={})[0]  # IPv6 loopback is this machine too
    assert launch_token(UIConfig(host="0.0.0.0"), environ={"TUNESMITH_UI_TOKEN": "t0k"}) == ("t0k", None)
    assert launch_token(UIConfig(host="0.0.0.0", token="mine"), environ={}) == ("mine", None)
    token, warning = launch_token(UIConfig(host="0.0.0.0", insecure_no_auth=True), environ={})
    assert token is None and warning.startswith("serving on 0.0.0.0 with no token (--insecure-no-auth)")
    with pytest.raises(UsageError, match="serves beyond this machine"):
        launch_token(UIConfig(host="192.168.1.5"), environ={})
    with pytest.raises(UsageError, match="contradict"):
        launch_token(UIConfig(token="x", insecure_no_auth=True), environ={})
    assert page_url(UIConfig(host="::1", port=9), "abc") == "http://[::1]:9/?token=abc"
