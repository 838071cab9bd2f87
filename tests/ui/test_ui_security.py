"""The web UI as an attacker meets it, over real HTTP to uvicorn on 127.0.0.1 (or ::1): no token, another
origin, another Host name, paths and symlinks leading out of the workspace, hostile run files, uploads that
collide or never end, and chat options that used to kill the generation. The same attacks from a real web page
on another port: test_ui_browser.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.train.helpers import chat_rows, write_chat
from tests.ui.conftest import TOKEN, ui_server
from tunesmith.ui.guard import TOKEN_HEADER

ROWS = "".join(json.dumps(r) + "\n" for r in chat_rows(3)).encode()


# ------------------------------------------------------------------------------------------ token


def test_every_api_call_needs_the_token_and_the_page_itself_does_not(ui):
    with ui.client(headers={}) as anonymous:
        for method, path in (("GET", "/api/settings"), ("GET", "/api/runs"), ("POST", "/api/train/command"),
                             ("POST", "/api/data/convert"), ("POST", "/api/data/upload?name=a.jsonl")):
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401 and "token" in response.json()["error"], path
        assert anonymous.get("/api/runs", headers={TOKEN_HEADER: "wrong"}).status_code == 401
        assert anonymous.get("/api/runs", params={"token": TOKEN}).status_code == 200  # links and images
        # a POST must carry it as a header, which no page on another origin can add without a preflight
        assert anonymous.post("/api/train/command", params={"token": TOKEN}, json={}).status_code == 401
        assert anonymous.get("/").status_code == 200 and anonymous.get("/static/app.js").status_code == 200
    with ui.client() as client:
        assert client.get("/api/runs").status_code == 200


# ------------------------------------------------------------------------------------- origin, host


def _convert(client, ui, out: Path, **headers) -> httpx.Response:
    (ui.runs / "uploads").mkdir(parents=True, exist_ok=True)
    (ui.runs / "uploads" / "in.jsonl").write_bytes(ROWS)
    return client.post("/api/data/convert", headers=headers, json={"file": str(ui.runs / "uploads" / "in.jsonl"),
                                                                   "to": "alpaca", "out": str(out)})


def test_a_request_from_another_origin_changes_nothing_even_with_the_token(ui):
    out = ui.runs / "converted.jsonl"
    with ui.client() as client:
        for origin in (f"http://localhost:{ui.port + 1}", f"http://127.0.0.1:{ui.port + 1}", "http://evil.example",
                       "null"):
            refused = _convert(client, ui, out, origin=origin)
            assert refused.status_code == 403 and "another web page's origin" in refused.json()["error"], origin
        assert _convert(client, ui, out, **{"sec-fetch-site": "same-site"}).status_code == 403
        # the body without a Content-Type that newer FastAPI releases read as JSON: refused before any route
        raw = client.post("/api/data/convert", headers={"origin": "http://evil.example", "content-type": ""},
                          content=json.dumps({"file": "x", "to": "alpaca", "out": str(out)}))
        assert raw.status_code == 403
        assert not out.exists()
        assert _convert(client, ui, out, origin=ui.url).status_code == 200 and out.is_file()  # the page's own


def test_hosts_other_than_loopback_and_the_bound_one_are_refused(tmp_path):
    with ui_server(tmp_path / "runs") as ui, ui.client() as client:
        for host in ("attacker.example", f"attacker.example:{ui.port}", "127.0.0.1.nip.io"):
            assert client.get("/api/runs", headers={"host": host}).status_code == 400, host
        for host in (f"127.0.0.1:{ui.port}", f"localhost:{ui.port}", f"[::1]:{ui.port}"):
            assert client.get("/api/runs", headers={"host": host}).status_code == 200, host
    with ui_server(tmp_path / "runs", host="::1") as ui, ui.client() as client:  # the check used to be skipped
        assert ui.url.startswith("http://[::1]:")
        assert client.get("/api/runs").status_code == 200
        assert client.get("/api/runs", headers={"host": f"attacker.example:{ui.port}"}).status_code == 400


# ------------------------------------------------------------------------------ paths and symlinks


def test_convert_and_export_outside_the_workspace_are_refused(client, ui, tmp_path):
    bashrc = tmp_path / "home" / ".bashrc"
    bashrc.parent.mkdir()
    bashrc.write_text("# mine\n")
    for out in (bashrc, ui.runs / ".." / "home" / ".bashrc", Path(os.path.relpath(bashrc))):
        refused = client.post("/api/data/convert", json={"file": str(bashrc), "to": "alpaca", "out": str(out),
                                                         "overwrite": True})
        assert refused.status_code == 400 and "is not under the runs folder" in refused.json()["error"], out
        export = client.post("/api/export/start", json={"model": "x", "format": "merge", "out": str(out)})
        assert export.status_code == 400 and "is not under the runs folder" in export.json()["error"]
    (ui.runs / "link").parent.mkdir(parents=True, exist_ok=True)
    (ui.runs / "link").symlink_to(bashrc.parent)  # a folder inside that leads outside
    refused = client.post("/api/data/convert", json={"file": str(bashrc), "to": "alpaca",
                                                     "out": str(ui.runs / "link" / ".bashrc"), "overwrite": True})
    assert refused.status_code == 400 and "symlink" in refused.json()["error"]
    assert bashrc.read_text() == "# mine\n"


def test_symlinked_logs_reports_and_run_files_are_refused(client, ui, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:SECRET-HASH\n")
    run = ui.runs / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "ui-train.log").symlink_to(secret)
    detail = client.get("/api/run", params={"path": str(run)})
    assert detail.status_code == 400 and "SECRET" not in detail.text and "ui-train.log" in detail.json()["error"]
    (run / "ui-train.log").unlink()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(secret)
    assert client.get("/api/run", params={"path": str(run)}).status_code == 400
    (run / "metrics.jsonl").unlink()
    assert client.get("/api/run", params={"path": str(run)}).status_code == 200  # the same run, no links out

    for name, command in (("report.md", "eval"), ("ui-export.log", "export"), ("ui-eval.log", "eval")):
        job = ui.runs / f"job-{command}-{name}"
        job.mkdir()
        (job / name).symlink_to(secret)
        refused = client.get("/api/job", params={"folder": str(job), "command": command})
        assert refused.status_code == 400 and "SECRET" not in refused.text, name
    (run / "notes.txt").symlink_to(secret)
    file = client.get("/api/run/file", params={"path": str(run), "name": "notes.txt"})
    assert file.status_code == 400 and "SECRET" not in file.text
    linked_run = ui.runs / "linked"
    linked_run.symlink_to(tmp_path)
    assert client.get("/api/run", params={"path": str(linked_run)}).status_code == 400


def test_a_training_never_writes_its_log_through_a_planted_symlink(client, ui, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = ui.runs / "planted"
    out.mkdir(parents=True)
    (out / "ui-train.log").symlink_to(victim)
    started = client.post("/api/train/start", json={"output.output_dir": str(out)})
    assert started.status_code == 400 and "a symlink is refused" in started.json()["error"]
    assert victim.read_text() == "keep me\n"


# -------------------------------------------------------------------------------------- uploads


def test_an_upload_never_silently_replaces_a_file(client, ui):
    first = client.post("/api/data/upload", params={"name": "data.jsonl"}, content=b"first\n")
    assert first.status_code == 200
    again = client.post("/api/data/upload", params={"name": "data.jsonl"}, content=b"second\n")
    assert again.status_code == 409 and "already exists" in again.json()["error"]
    assert Path(first.json()["path"]).read_bytes() == b"first\n"
    replaced = client.post("/api/data/upload", params={"name": "data.jsonl", "overwrite": "true"}, content=b"second\n")
    assert replaced.status_code == 200 and Path(first.json()["path"]).read_bytes() == b"second\n"
    for name in (".bashrc", "..", ""):
        assert client.post("/api/data/upload", params={"name": name}, content=b"x").status_code == 400, name
    assert sorted(p.name for p in (ui.runs / "uploads").iterdir()) == ["data.jsonl"]  # no partial file left


def test_the_upload_cap_is_enforced_while_the_body_streams(tmp_path):
    cap = 256 * 1024
    with ui_server(tmp_path / "runs", max_upload_mb=cap / 1024 / 1024) as ui, ui.client() as client:
        declared = client.post("/api/data/upload", params={"name": "big.jsonl"}, content=b"x" * (cap + 1))
        assert declared.status_code == 413 and "--max-upload-mb" in declared.json()["error"]
        sent = [0]

        def endless():  # chunked, no Content-Length: only counting on arrival can stop it
            while sent[0] < 64 * 1024 * 1024:
                sent[0] += 64 * 1024
                yield b"x" * (64 * 1024)

        streamed = client.post("/api/data/upload", params={"name": "big.jsonl"}, content=endless())
        assert streamed.status_code == 413 and streamed.headers["connection"] == "close"
        assert sent[0] < 32 * 1024 * 1024, f"the client got to send {sent[0]} bytes past a {cap}-byte cap"
        assert not (ui.runs / "uploads" / "big.jsonl").exists()
        assert list((ui.runs / "uploads").iterdir()) == []
        assert client.post("/api/data/upload", params={"name": "ok.jsonl"}, content=b"x" * cap).status_code == 200
        assert client.get("/api/settings").json()["max_upload_bytes"] == cap


# --------------------------------------------------------------------------- run files and headers


def test_run_files_download_and_every_response_carries_the_policy(client, ui):
    run = ui.runs / "sent-to-me"
    run.mkdir(parents=True)
    (run / "README.html").write_text("<script>fetch('/api/data/convert', {method: 'POST'})</script>")
    (run / "chart.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    (run / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for name, media in (("README.html", "application/octet-stream"), ("chart.svg", "application/octet-stream"),
                        ("loss.png", "image/png")):
        response = client.get("/api/run/file", params={"path": str(run), "name": name})
        assert response.status_code == 200 and response.headers["content-type"] == media, name
        assert response.headers["content-disposition"].startswith("attachment;")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"].startswith("sandbox")
    for path in ("/", "/static/app.js", "/api/settings", "/api/run?path=/etc"):
        policy = client.get(path).headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy, path
    refused = httpx.get(ui.url + "/api/runs")
    assert refused.headers["content-security-policy"] and refused.headers["x-content-type-options"] == "nosniff"


# ---------------------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A 2-step LoRA run of the tiny model inside a runs folder."""
    from tests.train.helpers import tiny_config
    from tunesmith.train.loop import finetune

    tmp = tmp_path_factory.mktemp("ui-chat")
    data = write_chat(tmp / "train.jsonl", chat_rows())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(tmp / "home"))
        finetune(tiny_config(tiny_model_dir, data, tmp / "runs" / "done", train__max_steps=2))
    return tmp / "runs" / "done"


def test_bad_chat_options_are_a_400_and_the_next_chat_answers(tiny_run):
    messages = [{"role": "user", "content": "Who are you?"}]
    with ui_server(tiny_run.parent) as ui, ui.client(timeout=60) as client:
        for options, message in (({"top_p": -1}, "top_p must be above 0 and at most 1, not -1.0"),
                                 ({"top_p": 1.5, "temperature": 0.7}, "top_p must be above 0"),
                                 ({"temperature": -0.5}, "temperature must be a number of at least 0"),
                                 ({"temperature": "hot"}, "chat: temperature: expected a number, got 'hot'"),
                                 ({"max_new_tokens": 0}, "max_new_tokens must be an integer of at least 1"),
                                 ({"max_new_tokens": 2.5}, "chat: max_new_tokens: expected an integer")):
            bad = client.post("/api/chat", json={"model": str(tiny_run), "messages": messages, **options})
            assert bad.status_code == 400 and message in bad.json()["error"], options
        bad = client.post("/api/chat", json={"model": str(tiny_run), "messages": [{"role": "user"}]})
        assert bad.status_code == 400 and "messages.0" in bad.json()["error"]
        answer = client.post("/api/chat", json={"model": str(tiny_run), "messages": messages, "max_new_tokens": 8,
                                                "temperature": "0.7", "top_p": "0.9"})
        assert answer.status_code == 200 and answer.text.strip()
