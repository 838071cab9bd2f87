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
- Runs: ``runs.list_runs`` and the run's metrics.jsonl (``run.read_metrics``).
- Data: ``check_data`` (the data doctor), its report as ``DataReport.to_dict``.
- Chat: ``models.load`` once per model, prompts rendered by serve/chat.py's ``Session`` (the run's
  template and system prompt), answers streamed by ``inference.stream``; the run's base model
  answers beside it on request.
- Evaluate and Export: ``tunesmith eval ... --compare base --out DIR`` and ``tunesmith export ...``
  as child processes, like training; the page shows report.md, its charts and the output path.

It binds 127.0.0.1 unless told otherwise: it starts processes and reads files on this machine.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from fastapi import Request  # in a route's signature, so FastAPI must find it at module level

from tunesmith.config import fields_info, parse_value, unknown_key_error
from tunesmith.data.convert import TARGETS
from tunesmith.data.doctor import check_data
from tunesmith.data.prompt import run_system_prompt
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.inference import GenerationOptions, stream
from tunesmith.models.load import base_model, load, read_run_info
from tunesmith.models.resolve import resolve
from tunesmith.run import METRICS, read_metrics
from tunesmith.runs import PROCESS_FILE, is_run_dir, list_runs, read_run
from tunesmith.serve.chat import Session
from tunesmith.train.plan import Choice, RunPlan
from tunesmith.ui.jobs import Jobs, cli_argv, log_tail, shown_command
from tunesmith.ui.strings import FIELD_HELP_ZH, STRINGS

STATIC = Path(__file__).parent / "static"
PLAN_TIMEOUT_S = 600


# ---------------------------------------------------------------- the Train form


def form_schema() -> list[dict]:
    """Every config field, grouped by section, as the page draws it."""
    sections: dict[str, list] = {}
    for info in fields_info():
        sections.setdefault(info.key.split(".")[0], []).append({
            "key": info.key, "help": info.help, "help_zh": FIELD_HELP_ZH.get(info.key, info.help),
            "default": _shown(info.default), "choices": info.choices,
            "kind": _kind(info.type), "nullable": "None" in str(info.type)})
    return [{"name": name, "fields": fields} for name, fields in sections.items()]


def _kind(tp) -> str:
    text = str(tp)
    return next((k for k in ("list", "bool", "int", "float") if k in text), "text")


def _shown(value) -> str:
    """A value as the form and the command line spell it: lists comma separated, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def train_args(values: dict[str, str]) -> list[str]:
    """``--section.key VALUE`` for every form value that differs from its default (checked as the CLI checks)."""
    fields = _fields()
    args = []
    for key, raw in values.items():
        if key not in fields:
            raise unknown_key_error(key, "form: ")
        value = parse_value(fields[key], raw)
        if value != fields[key].default:
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


def resume_args(run_dir: Path) -> list[str]:
    """The command the UI started the run with (its record), continued with ``--train.resume auto``."""
    import shlex

    record = _read_json(run_dir / PROCESS_FILE)
    if not record.get("command"):
        raise UsageError(f"{run_dir} was not started from this UI; continue it with its own "
                         "`tunesmith train ... --resume auto`")
    status = read_run(run_dir).status
    if status not in ("stopped", "failed"):
        raise UsageError(f"{run_dir} is {status}; only a stopped or failed run is resumed")
    argv = shlex.split(record["command"])[1:]
    if "--train.resume" in argv:
        i = argv.index("--train.resume")
        del argv[i:i + 2]
    return [*argv, "--train.resume", "auto"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _fields() -> dict:
    return {info.key: info for info in fields_info()}


def plan(values: dict[str, str]) -> dict:
    """``tunesmith train ... --plan --json`` run as the CLI runs it: the plan, its lines and the command."""
    args = [*train_args(values), "--plan", "--json"]
    done = subprocess.run(cli_argv(["train", *args]), capture_output=True, text=True, timeout=PLAN_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise UsageError(_error_lines(done.stderr) or f"tunesmith train --plan exited with {done.returncode}")
    document = json.loads(done.stdout)
    shaped = RunPlan(**{**document, "choices": [Choice(**c) for c in document["choices"]]})
    return {"command": shown_command(["train", *args]), "plan": document, "lines": shaped.lines()}


def _error_lines(stderr: str) -> str:
    """The CLI's own one-line errors (never a traceback: the CLI saves those to a file)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    return "\n".join(lines) or "\n".join(stderr.strip().splitlines()[-3:])


# ---------------------------------------------------------------- runs


def run_detail(path: Path, jobs: Jobs) -> dict:
    summary = read_run(path).to_dict()
    rows = read_metrics(path / METRICS) if (path / METRICS).is_file() else []

    resumable = summary["status"] in ("stopped", "failed") and bool(_read_json(path / PROCESS_FILE).get("command"))
    return {**summary, "metrics": rows, "log": log_tail(path), "stoppable": jobs.owns(path), "resumable": resumable,
            "files": sorted(p.name for p in path.iterdir()) if path.is_dir() else []}


def _inside(root: Path, path: str) -> Path:
    """``path`` resolved, refused unless it lies under ``root``: the page reads only the runs folder."""
    resolved = Path(path).resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise UsageError(f"{path} is not under the runs folder {root}")
    return resolved


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
    """The answer's text pieces as they are generated (the prompt rendered as chat/serve render it)."""
    messages = request.get("messages") or []
    if not messages or messages[-1].get("role") != "user":
        raise UsageError("the conversation must end with a user message")
    name, run_system = chat_model(str(request.get("model") or ""), bool(request.get("base")))
    loaded, lock = models.get(name)
    session = Session(request.get("system") or run_system)
    session.turns = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    prompt = session.prompt(loaded.tokenizer, messages[-1]["content"])
    options = GenerationOptions(max_new_tokens=int(request.get("max_new_tokens") or 256),
                                temperature=float(request.get("temperature") or 0.0),
                                top_p=float(request.get("top_p") or 1.0))

    def pieces():
        with lock:
            yield from stream(loaded.model, loaded.tokenizer, prompt, options)
    return pieces()


# ---------------------------------------------------------------- evaluate and export


def eval_args(request: dict, out: Path) -> list[str]:
    """``tunesmith eval`` with the page's fields (empty ones left to the command's defaults)."""
    args = ["eval", str(request.get("model") or ""), "--data", str(request.get("data") or ""), "--out", str(out)]
    for key in ("compare", "metrics", "limit", "max_new_tokens"):
        if request.get(key):
            args += [f"--{key.replace('_', '-')}", str(request[key])]
    return args


def export_args(request: dict) -> list[str]:
    kind = request.get("format") or "merge"
    if kind not in ("merge", "gguf"):
        raise UsageError(f"export format {kind!r}: merge or gguf")
    args = ["export", str(request.get("model") or ""), f"--{kind}", "--out", str(request.get("out") or "")]
    return args + (["--dtype", str(request["dtype"])] if kind == "gguf" and request.get("dtype") else [])


def job_detail(folder: Path, command: str, jobs: Jobs) -> dict:
    """A child's state for the page: running or its exit code, its log, and what it wrote (eval: report.md)."""
    report = folder / "report.md"
    return {"folder": str(folder), "running": jobs.owns(folder), "returncode": jobs.returncode(folder),
            "log": log_tail(folder, command=command),
            "report": report.read_text(encoding="utf-8") if report.is_file() else None,
            "images": sorted(p.name for p in folder.glob("*.png"))}


# ---------------------------------------------------------------- the app


LOOPBACK = ("127.0.0.1", "localhost")


def create_app(runs_dir: str | Path = "runs", lang: str = "en", trusted_hosts: list[str] | None = None):
    """The app. ``trusted_hosts``: the Host names a request may carry (``tunesmith ui`` bound to this machine
    allows only its loopback names, so a web page on another name that resolves here cannot drive it)."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    root = Path(runs_dir)
    jobs = Jobs()
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)
    app.state.jobs = jobs
    if trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(trusted_hosts))

    @app.exception_handler(TunesmithError)
    async def user_error(request, exc: TunesmithError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/settings")
    def settings():
        suggested = root / time.strftime("run-%Y%m%d-%H%M%S")

        return {"lang": lang, "strings": STRINGS, "runs_dir": str(root), "sections": form_schema(),
                "convert_targets": list(TARGETS),
                "suggested": {"output.output_dir": str(suggested)}}

    _train_routes(app, root, jobs)
    _run_routes(app, root, jobs)
    _job_routes(app, root, jobs)
    _data_routes(app, root)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _train_routes(app, root: Path, jobs) -> None:
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
        args = train_args(values)
        out = _inside(root, str(output_dir(values)))  # the page lists and reads runs under its folder only
        if jobs.owns(out):
            raise UsageError(f"{out}: a training started here is still running")
        refuse_existing_run(out, args)
        child = jobs.start(["train", *args], out)
        return {"run_dir": str(out.resolve()), "pid": child.pid, "command": shown_command(["train", *args])}

    @app.post("/api/train/resume")
    def train_resume(path: str = Body(..., embed=True)):
        run_dir = _inside(root, path)
        if jobs.owns(run_dir):
            raise UsageError(f"{run_dir}: a training started here is still running")
        argv = resume_args(run_dir)
        child = jobs.start(argv, run_dir)
        return {"run_dir": str(run_dir), "pid": child.pid, "command": shown_command(argv)}

    @app.post("/api/train/stop")
    def train_stop(path: str = Body(..., embed=True)):
        return {"pid": jobs.stop(_inside(root, path)), "signal": "SIGINT"}


def _run_routes(app, root: Path, jobs) -> None:
    """Runs: the table, one run with its metrics, and its files."""
    from fastapi import Query
    from fastapi.responses import FileResponse

    @app.get("/api/runs")
    def runs():
        return {"root": str(root), "runs": [{**r.to_dict(), "stoppable": jobs.owns(Path(r.path))}
                                            for r in list_runs(root)]}

    @app.get("/api/run")
    def run(path: str = Query(...)):
        return run_detail(_inside(root, path), jobs)

    @app.get("/api/run/file")
    def run_file(path: str = Query(...), name: str = Query(...)):
        run_dir = _inside(root, path)
        file = _inside(run_dir, str(run_dir / name))
        if not file.is_file():
            raise UsageError(f"{name}: no such file in {run_dir}")
        return FileResponse(file)


def _job_routes(app, root: Path, jobs) -> None:
    """Chat in this process; evaluation and export as child commands."""
    from fastapi import Body, Query

    models = Models()

    @app.post("/api/chat")
    def chat(request: dict = Body(...)):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(chat_stream(models, request), media_type="text/plain; charset=utf-8")

    @app.post("/api/eval/start")
    def eval_start(request: dict = Body(...)):
        name = Path(str(request.get("model") or "model")).name or "model"
        folder = root / time.strftime(f"eval-{name}-%Y%m%d-%H%M%S")
        args = eval_args(request, folder)
        jobs.start(args, folder)
        return {"folder": str(folder.resolve()), "command": shown_command(args)}

    @app.post("/api/export/start")
    def export_start(request: dict = Body(...)):
        args = export_args(request)
        folder = root / time.strftime("export-%Y%m%d-%H%M%S")
        jobs.start(args, folder)
        return {"folder": str(folder.resolve()), "command": shown_command(args), "out": str(request.get("out"))}

    @app.get("/api/job")
    def job(folder: str = Query(...), command: str = Query(...)):
        if command not in ("eval", "export"):
            raise UsageError(f"no such job kind: {command}")
        return job_detail(_inside(root, folder), command, jobs)


def _data_routes(app, root: Path) -> None:
    """Data: upload, convert (a child command) and the doctor's report."""
    from fastapi import Body, Query

    @app.post("/api/data/upload")
    async def data_upload(request: Request, name: str = Query(...)):
        """The file's bytes as the body (no form encoding): saved as RUNS/uploads/NAME, its path returned."""
        target = root / "uploads" / Path(name).name
        if not Path(name).name or Path(name).name.startswith("."):
            raise UsageError(f"upload name {name!r}: give the file's own name")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = await request.body()
        target.write_bytes(data)
        return {"path": str(target.resolve()), "bytes": len(data)}

    @app.post("/api/data/convert")
    def data_convert(request: dict = Body(...)):
        args = ["data", "convert", str(request.get("file") or ""), "--to", str(request.get("to") or ""),
                "--out", str(request.get("out") or "")] + (["--overwrite"] if request.get("overwrite") else [])
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


def run_ui(host: str = "127.0.0.1", port: int = 7860, lang: str = "en", runs_dir: str | Path = "runs") -> None:
    import uvicorn

    print(f"tunesmith ui on http://{host}:{port} (runs under {runs_dir}; Ctrl-C to quit, trainings keep running)")
    trusted = list(LOOPBACK) if host in LOOPBACK else None
    uvicorn.run(create_app(runs_dir, lang, trusted), host=host, port=port, log_level="warning")
