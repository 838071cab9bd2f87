"""`tunesmith ui`: a local web app over the same library functions and CLI commands as the terminal.

FastAPI (already a dependency, for `tunesmith serve`) with one plain HTML/JS page served from the
package (ui/static): no npm build, no extra install, and nothing here that the CLI does not do.
Gradio, which LlamaBoard users know, was the alternative; it is a large dependency with its own
release churn, and its components would not let the Train form be generated from config.py as
directly as a few lines of JS over ``/api/settings`` do.

The server holds no logic of its own:

- Train: the form is ``config.fields_info()`` grouped by section (help, default, choices), so a
  new option appears without UI code. Plan runs ``tunesmith train ... --plan --json``; Start runs
  ``tunesmith train ...`` as a child process (ui/jobs.py); the page shows that exact command.
  Resume builds its command the same way, from the values in the run's recorded config.
- Runs: ``runs.list_runs`` and the run's metrics.jsonl (``run.read_metrics``).
- Data: ``check_data`` (the data doctor), its report as ``DataReport.to_dict``.
- Chat: ``models.load`` once per model, prompts rendered by serve/chat.py's ``Session`` (the run's
  template and system prompt), answers streamed by ``inference.stream``; the run's base model
  answers beside it on request.
- Evaluate and Export: ``tunesmith eval ... --compare base --out DIR`` and ``tunesmith export ...``
  as child processes, like training; the page shows report.md, its charts and the output path.

It binds 127.0.0.1 unless told otherwise: it starts processes and reads files on this machine.
So every API call carries a token made at launch and printed in the page's address, nothing
changes on a request from another origin (ui/guard.py), and the page reads and writes only
inside its workspace, the runs folder (ui/workspace.py). Off this machine it will not start
without a token of the user's own, or an explicit --insecure-no-auth.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

from fastapi import Request  # in a route's signature, so FastAPI must find it at module level

from tunesmith.config import (
    FLAG_ALIASES,
    REPEATABLE_FLAGS,
    UIConfig,
    fields_info,
    load_config,
    parse_value,
    unknown_key_error,
)
from tunesmith.data.convert import TARGETS
from tunesmith.data.doctor import check_data
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.inference import GenerationOptions, stream
from tunesmith.models.load import load
from tunesmith.models.resolve import resolve
from tunesmith.run import CONFIG, METRICS, base_model, read_metrics, read_run_info, run_system_prompt
from tunesmith.runs import is_run_dir, list_runs, read_run
from tunesmith.serve.chat import Session
from tunesmith.train.plan import Choice, RunPlan
from tunesmith.ui.guard import Guard, is_loopback
from tunesmith.ui.jobs import Jobs, cli_argv, log_file, shown_command
from tunesmith.ui.strings import FIELD_HELP_ZH, STRINGS
from tunesmith.ui.workspace import Exists, TooLarge, Workspace

STATIC = Path(__file__).parent / "static"
PLAN_TIMEOUT_S = 600
LOG_CHARS = 4000  # the end of a child's log that the page shows
ERROR_STATUS = {TooLarge: 413, Exists: 409}  # other user errors are a 400


# ---------------------------------------------------------------- the Train form


# Fields a repeatable flag sets (--reward): one item per line in the form and one flag per item in the command,
# since an item may hold a comma (a reward's regex: regex:^\d{1,3}$).
LINE_FIELDS = {FLAG_ALIASES[flag]: flag for flag in REPEATABLE_FLAGS}


def form_schema() -> list[dict]:
    """Every config field, grouped by section, as the page draws it."""
    sections: dict[str, list] = {}
    for info in fields_info():
        sections.setdefault(info.key.split(".")[0], []).append({
            "key": info.key, "help": info.help, "help_zh": FIELD_HELP_ZH.get(info.key, info.help),
            "default": _shown(info.default, info.key), "choices": info.choices,
            "kind": _kind(info.key, info.type), "nullable": "None" in str(info.type)})
    return [{"name": name, "fields": fields} for name, fields in sections.items()]


def _kind(key: str, tp) -> str:
    if key in LINE_FIELDS:
        return "lines"
    text = str(tp)
    return next((k for k in ("list", "bool", "int", "float") if k in text), "text")


def _shown(value, key: str = "") -> str:
    """A value as the form spells it: lists comma separated (a line each for LINE_FIELDS), None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ("\n" if key in LINE_FIELDS else ",").join(map(str, value))
    return str(value)


def train_args(values: dict[str, str]) -> list[str]:
    """``--section.key VALUE`` for every form value that differs from its default (checked as the CLI checks);
    ``--reward ITEM`` for each line of a LINE_FIELDS value."""
    fields = _fields()
    args = []
    for key, raw in values.items():
        if key not in fields:
            raise unknown_key_error(key, "form: ")
        if key in LINE_FIELDS and isinstance(raw, str):
            raw = [line.strip() for line in raw.splitlines() if line.strip()]
        value = parse_value(fields[key], raw)
        if value == fields[key].default:
            continue
        if key in LINE_FIELDS:
            args += [part for item in value for part in (f"--{LINE_FIELDS[key]}", item)]
        else:
            args += [f"--{key}", _shown(value)]
    return args


def output_dir(values: dict[str, str]) -> Path:
    key = "output.output_dir"
    return Path(parse_value(_fields()[key], values.get(key, _fields()[key].default)))


def refuse_existing_run(out: Path, args: list[str]) -> None:
    """Training refuses a folder holding a run unless resumed or overwritten; say so before starting a child,
    whose record would otherwise replace the earlier run's."""
    if is_run_dir(out) and not {"--train.resume", "--output.overwrite"} & set(args):
        raise UsageError(f"{out} already holds a run; set train.resume to auto to continue it, "
                         "output.overwrite to true to replace it, or choose another output.output_dir")


def start_training(values: dict[str, str], workspace: Workspace, jobs: Jobs) -> dict:
    """A child ``tunesmith train`` for the form's ``values``: Start's values, or Resume's (``resume_values``)."""
    args = train_args(values)
    out = workspace.inside(output_dir(values), "output.output_dir")  # the page lists and reads runs there only
    if jobs.owns(out):
        raise UsageError(f"{out}: a training started here is still running")
    refuse_existing_run(out, args)
    child = jobs.start(["train", *args], out)
    return {"run_dir": str(out), "pid": child.pid, "command": shown_command(["train", *args])}


def resume_values(run_dir: Path, workspace: Workspace) -> dict[str, str]:
    """The form's values for continuing a stopped or failed run: its recorded config (the final one, else its
    newest checkpoint's), read and checked as a config file is, with ``train.resume`` auto. Never the command
    line in process.json, which is only a record and may have been written by anyone."""
    summary = read_run(run_dir)
    if summary.status not in ("stopped", "failed"):
        raise UsageError(f"{run_dir} is {summary.status}; only a stopped or failed run is resumed")
    config_file = recorded_config(run_dir, summary.checkpoint)
    if config_file is None:
        raise UsageError(f"{run_dir} has no recorded config (no checkpoint was written): start it again instead")
    workspace.inside(config_file, CONFIG)  # a symlink to a config elsewhere is not this run's
    config = load_config(config_file).to_dict()
    values = {info.key: _shown(config[info.key.split(".")[0]][info.key.split(".")[1]], info.key)
              for info in fields_info()}
    return {**values, "output.output_dir": str(run_dir), "train.resume": "auto", "output.overwrite": "false"}


def recorded_config(run_dir: Path, checkpoint: str | None) -> Path | None:
    for file in (run_dir / CONFIG, *([Path(checkpoint) / CONFIG] if checkpoint else [])):
        if file.is_file():
            return file
    return None


def _fields() -> dict:
    return {info.key: info for info in fields_info()}


def plan(values: dict[str, str]) -> dict:
    """``tunesmith train ... --plan --json`` run as the CLI runs it: the plan, its lines and the command that
    trains with it (the one Start runs, not the planning one)."""
    args = [*train_args(values), "--plan", "--json"]
    done = subprocess.run(cli_argv(["train", *args]), capture_output=True, text=True, timeout=PLAN_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise UsageError(_error_lines(done.stderr) or f"tunesmith train --plan exited with {done.returncode}")
    document = json.loads(done.stdout)
    shaped = RunPlan(**{**document, "choices": [Choice(**c) for c in document["choices"]]})
    return {"command": shown_command(["train", *train_args(values)]), "plan": document, "lines": shaped.lines()}


def _error_lines(stderr: str) -> str:
    """The CLI's own one-line errors (never a traceback: the CLI saves those to a file)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    return "\n".join(lines) or "\n".join(stderr.strip().splitlines()[-3:])


# ---------------------------------------------------------------- runs


def run_detail(path: Path, workspace: Workspace, jobs: Jobs) -> dict:
    refuse_links_out(path, workspace)
    summary = read_run(path).to_dict()
    rows = read_metrics(path / METRICS) if (path / METRICS).is_file() else []
    resumable = summary["status"] in ("stopped", "failed") and recorded_config(path, summary["checkpoint"]) is not None
    return {**summary, "metrics": rows, "log": log_tail(path, "train", workspace), "stoppable": jobs.owns(path),
            "resumable": resumable, "files": sorted(p.name for p in path.iterdir()) if path.is_dir() else []}


def refuse_links_out(folder: Path, workspace: Workspace) -> None:
    """Refuse a run whose files include a symlink that leads out of the workspace (its metrics, its record...)."""
    for entry in folder.iterdir() if folder.is_dir() else []:
        if entry.is_symlink():
            workspace.inside(entry, f"{entry.name} in {folder}")


def log_tail(folder: Path, command: str, workspace: Workspace) -> str:
    return (workspace.read_text(folder / log_file(command)) or "")[-LOG_CHARS:]


# ---------------------------------------------------------------- chat


class Models:
    """Models loaded for Chat, kept while the server runs; one generation at a time per model."""

    def __init__(self):
        self.loaded: dict[str, object] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    def get(self, name: str):
        with self.lock:
            if name not in self.loaded:
                self.loaded[name] = load(name)
                self.locks[name] = threading.Lock()
            return self.loaded[name], self.locks[name]


def chat_model(name: str, base: bool) -> tuple[str, str | None]:
    """(the model to answer, the system prompt to use): ``base`` answers with the run's base model and the
    run's system prompt, so both sides see the same conversation."""
    path = resolve(name)
    system = run_system_prompt(read_run_info(path))
    if not base:
        return str(path), system
    base_name = base_model(path)
    if base_name is None:
        raise UsageError(f"{name} is not a run or an adapter: it has no base model to compare with")
    return str(resolve(base_name)), system


def chat_stream(models: Models, request: dict):
    """The answer's text pieces as they are generated (the prompt rendered as chat/serve render it).

    Everything the request says is checked before the model's lock is taken; the lock is released however the
    generation ends (an error, or a client that left: ``stream`` stops its thread first)."""
    messages = chat_messages(request.get("messages"))
    options = chat_options(request)
    name, run_system = chat_model(str(request.get("model") or ""), bool(request.get("base")))
    loaded, lock = models.get(name)
    session = Session(request.get("system") or run_system)
    session.turns = messages[:-1]
    prompt = session.prompt(loaded.tokenizer, messages[-1]["content"])

    def pieces():
        with lock:
            yield from stream(loaded.model, loaded.tokenizer, prompt, options)
    return pieces()


CHAT_ROLES = ("system", "user", "assistant")


def chat_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UsageError("chat: messages: the conversation must end with a user message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES or not isinstance(
                message.get("content"), str):
            raise UsageError(f"chat: messages.{i}: a message is {{role: {', '.join(CHAT_ROLES)}, content: text}}")
    if messages[-1]["role"] != "user":
        raise UsageError("chat: messages: the conversation must end with a user message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_options(request: dict) -> GenerationOptions:
    """The page's sampling fields as GenerationOptions (which checks their ranges); empty fields: the defaults."""
    return GenerationOptions(max_new_tokens=_number(request, "max_new_tokens", int, 256),
                             temperature=_number(request, "temperature", float, 0.0),
                             top_p=_number(request, "top_p", float, 1.0))


def _number(request: dict, key: str, kind, default):
    raw = request.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw) if not isinstance(raw, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None or (kind is int and not value.is_integer()):
        raise UsageError(f"chat: {key}: expected {'an integer' if kind is int else 'a number'}, got {raw!r}")
    return kind(value)


# ---------------------------------------------------------------- evaluate and export


def eval_args(request: dict, out: Path) -> list[str]:
    """``tunesmith eval`` with the page's fields (empty ones left to the command's defaults)."""
    args = ["eval", str(request.get("model") or ""), "--data", str(request.get("data") or ""), "--out", str(out)]
    for key in ("compare", "metrics", "limit", "max_new_tokens"):
        if request.get(key):
            args += [f"--{key.replace('_', '-')}", str(request[key])]
    return args


def export_args(request: dict, workspace: Workspace) -> list[str]:
    kind = request.get("format") or "merge"
    if kind not in ("merge", "gguf"):
        raise UsageError(f"export format {kind!r}: merge or gguf")
    out = workspace.inside(str(request.get("out") or ""), "export: out")
    args = ["export", str(request.get("model") or ""), f"--{kind}", "--out", str(out)]
    return args + (["--dtype", str(request["dtype"])] if kind == "gguf" and request.get("dtype") else [])


def convert_args(request: dict, workspace: Workspace) -> list[str]:
    out = workspace.inside(str(request.get("out") or ""), "convert: out")
    return ["data", "convert", str(request.get("file") or ""), "--to", str(request.get("to") or ""),
            "--out", str(out)] + (["--overwrite"] if request.get("overwrite") is True else [])


def job_detail(folder: Path, command: str, workspace: Workspace, jobs: Jobs) -> dict:
    """A child's state for the page: running or its exit code, its log, and what it wrote (eval: report.md)."""
    return {"folder": str(folder), "running": jobs.owns(folder), "returncode": jobs.returncode(folder),
            "log": log_tail(folder, command, workspace), "report": workspace.read_text(folder / "report.md"),
            "images": sorted(p.name for p in folder.glob("*.png"))}


# Run files the page shows as images; any other file is offered as a download of bytes, never rendered.
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
FILE_POLICY = "sandbox; default-src 'none'"


# ---------------------------------------------------------------- the app


def create_app(runs_dir: str | Path = "runs", lang: str = "en", *, token: str | None, host: str = "127.0.0.1",
               max_upload_mb: float = UIConfig.max_upload_mb):
    """The app. ``token``: what every API call must carry (None: none, for --insecure-no-auth); ``host``: the
    address it is bound to, the one Host name besides the loopback names that a request may carry (ui/guard.py)."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    workspace = Workspace(runs_dir, int(max_upload_mb * 1024 * 1024))
    jobs = Jobs()
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jobs = jobs
    app.add_middleware(Guard, bound_host=host, token=token)

    @app.exception_handler(TunesmithError)
    async def user_error(request, exc: TunesmithError):
        # After a 413 the connection closes: the rest of an oversized body is not even read and dropped.
        close = {"connection": "close"} if isinstance(exc, TooLarge) else None
        return JSONResponse({"error": str(exc)}, status_code=ERROR_STATUS.get(type(exc), 400), headers=close)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/settings")
    def settings():
        suggested = workspace.root / time.strftime("run-%Y%m%d-%H%M%S")
        return {"lang": lang, "strings": STRINGS, "runs_dir": str(workspace.root),
                "workspace": str(workspace.root.resolve()), "sections": form_schema(),
                "convert_targets": list(TARGETS), "max_upload_bytes": workspace.max_upload_bytes,
                "suggested": {"output.output_dir": str(suggested)}}

    _train_routes(app, workspace, jobs)
    _run_routes(app, workspace, jobs)
    _job_routes(app, workspace, jobs)
    _data_routes(app, workspace)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _train_routes(app, workspace: Workspace, jobs) -> None:
    """Train: the command, the plan, start, resume and stop of a child `tunesmith train`."""
    from fastapi import Body

    @app.post("/api/train/command")
    def command(values: dict = Body(...)):
        return {"command": shown_command(["train", *train_args(values)])}

    @app.post("/api/train/plan")
    def train_plan(values: dict = Body(...)):
        return plan(values)

    @app.post("/api/train/start")
    def train_start(values: dict = Body(...)):
        return start_training(values, workspace, jobs)

    @app.post("/api/train/resume")
    def train_resume(path: str = Body(..., embed=True)):
        run_dir = workspace.inside(path, "path")
        if jobs.owns(run_dir):
            raise UsageError(f"{run_dir}: a training started here is still running")
        return start_training(resume_values(run_dir, workspace), workspace, jobs)

    @app.post("/api/train/stop")
    def train_stop(path: str = Body(..., embed=True)):
        return {"pid": jobs.stop(workspace.inside(path, "path")), "signal": "SIGINT"}


def _run_routes(app, workspace: Workspace, jobs) -> None:
    """Runs: the table, one run with its metrics, and its files."""
    from fastapi import Query
    from fastapi.responses import FileResponse

    @app.get("/api/runs")
    def runs():
        return {"root": str(workspace.root), "runs": [{**r.to_dict(), "stoppable": jobs.owns(Path(r.path))}
                                                      for r in list_runs(workspace.root)]}

    @app.get("/api/run")
    def run(path: str = Query(...)):
        return run_detail(workspace.inside(path, "path"), workspace, jobs)

    @app.get("/api/run/file")
    def run_file(path: str = Query(...), name: str = Query(...)):
        """A run's file as a download (an image also shows in an <img>): never rendered on the UI's origin,
        where an HTML or SVG file from someone else's run could drive the page."""
        run_dir = workspace.inside(path, "path")
        file = workspace.inside(run_dir / name, name)
        if run_dir not in file.parents or not file.is_file():
            raise UsageError(f"{name}: no such file in {run_dir}")
        return FileResponse(file, media_type=IMAGE_TYPES.get(file.suffix.lower(), "application/octet-stream"),
                            filename=file.name, content_disposition_type="attachment",
                            headers={"Content-Security-Policy": FILE_POLICY})


def _job_routes(app, workspace: Workspace, jobs) -> None:
    """Chat in this process; evaluation and export as child commands."""
    from fastapi import Body, Query
    from fastapi.responses import StreamingResponse

    models = Models()

    @app.post("/api/chat")
    def chat(request: dict = Body(...)):
        return StreamingResponse(chat_stream(models, request), media_type="text/plain; charset=utf-8")

    @app.post("/api/eval/start")
    def eval_start(request: dict = Body(...)):
        name = Path(str(request.get("model") or "model")).name or "model"
        folder = workspace.inside(workspace.root / time.strftime(f"eval-{name}-%Y%m%d-%H%M%S"), "eval: out")
        args = eval_args(request, folder)
        jobs.start(args, folder)
        return {"folder": str(folder), "command": shown_command(args)}

    @app.post("/api/export/start")
    def export_start(request: dict = Body(...)):
        args = export_args(request, workspace)
        folder = workspace.inside(workspace.root / time.strftime("export-%Y%m%d-%H%M%S"), "export: log folder")
        jobs.start(args, folder)
        return {"folder": str(folder), "command": shown_command(args), "out": args[args.index("--out") + 1]}

    @app.get("/api/job")
    def job(folder: str = Query(...), command: str = Query(...)):
        if command not in ("eval", "export"):
            raise UsageError(f"no such job kind: {command}")
        return job_detail(workspace.inside(folder, "folder"), command, workspace, jobs)


def _data_routes(app, workspace: Workspace) -> None:
    """Data: upload, convert (a child command) and the doctor's report."""
    from fastapi import Body, Query

    @app.post("/api/data/upload")
    async def data_upload(request: Request, name: str = Query(...), overwrite: bool = Query(False)):
        """The file's bytes as the body (no form encoding): saved as RUNS/uploads/NAME, its path returned.
        An existing file is kept unless ``overwrite``; past the size cap the upload stops where it is."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > workspace.max_upload_bytes:
            raise TooLarge(f"the upload ({length} bytes) is larger than this UI's limit of "
                           f"{workspace.max_upload_bytes} bytes (tunesmith ui --max-upload-mb)")
        target, size = await workspace.save_upload(name, request.stream(), overwrite)
        return {"path": str(target), "bytes": size}

    @app.post("/api/data/convert")
    def data_convert(request: dict = Body(...)):
        args = convert_args(request, workspace)
        done = subprocess.run(cli_argv(args), capture_output=True, text=True, timeout=PLAN_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise UsageError(_error_lines(done.stderr) or f"tunesmith data convert exited with {done.returncode}")
        return {"command": shown_command(args), "output": done.stdout.strip()}

    @app.post("/api/data/check")
    def data_check(request: dict = Body(...)):
        files = [f for f in request.get("files", []) if f]
        if not files:
            raise UsageError("no data file given")
        max_length = int(request["max_length"]) if request.get("max_length") else None
        evals = [f for f in request.get("eval_files", []) if f]
        report = check_data(files, model=request.get("model") or None, max_length=max_length,
                            template=request.get("template") or None, eval_files=evals,
                            tokens=bool(request.get("tokens", True)))
        return report.to_dict()


def launch_token(config: UIConfig, environ=os.environ) -> tuple[str | None, str | None]:
    """(the token the API will require, a warning to print): off this machine a token must be given (or
    --insecure-no-auth said out loud); on it, a new one is made for this launch unless one is given."""
    given = config.token or environ.get("TUNESMITH_UI_TOKEN") or None
    if config.insecure_no_auth:
        if given:
            raise UsageError("tunesmith ui: --insecure-no-auth and a token (--token or TUNESMITH_UI_TOKEN) "
                             "contradict each other; choose one")
        return None, (f"serving on {config.host} with no token (--insecure-no-auth): anyone who can reach this "
                      f"port can start trainings and read and write files under {config.runs_dir}")
    if given is None and not is_loopback(config.host):
        raise UsageError(f"tunesmith ui --host {config.host} serves beyond this machine, where anyone who can "
                         "reach the port could start trainings and write files: give a token with --token or "
                         "TUNESMITH_UI_TOKEN (or --insecure-no-auth to go without one)")
    return given or secrets.token_urlsafe(24), None


def page_url(config: UIConfig, token: str | None) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.port}/" + (f"?token={token}" if token else "")


def run_ui(config: UIConfig) -> None:
    import uvicorn

    token, warning = launch_token(config)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    app = create_app(config.runs_dir, config.lang, token=token, host=config.host,
                     max_upload_mb=config.max_upload_mb)
    print(f"tunesmith ui on {page_url(config, token)} (runs under {config.runs_dir}; Ctrl-C to quit, trainings "
          "keep running)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
