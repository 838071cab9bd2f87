"""`tunesmith ui`: a local web app over the same library functions and CLI commands as the terminal.

FastAPI (already a dependency, for `tunesmith serve`) with one plain HTML/JS page served from the
package (ui/static): no npm build, no extra install, and nothing here that the CLI does not do.
Gradio, which LlamaBoard users know, was the alternative; it is a large dependency with its own
release churn, and its components would not let the Train form be generated from config.py as
directly as a few lines of JS over ``/api/config`` do.

The server holds no logic of its own:

- Train: the form is ``config.fields_info()`` grouped by section (help, default, choices), so a
  new option appears without UI code. Plan runs ``tunesmith train ... --plan --json``; Start runs
  ``tunesmith train ...`` as a child process (ui/jobs.py); the page shows that exact command.
- Runs: ``runs.list_runs`` and the run's metrics.jsonl (``rundir.read_metrics``).
- Data: ``check_data`` (the data doctor), its report as ``DataReport.to_dict``.

It binds 127.0.0.1 unless told otherwise: it starts processes and reads files on this machine.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tunesmith.errors import TunesmithError, UsageError
from tunesmith.ui.jobs import Jobs, cli_argv, log_tail, shown_command
from tunesmith.ui.strings import STRINGS

STATIC = Path(__file__).parent / "static"
PLAN_TIMEOUT_S = 600


# ---------------------------------------------------------------- the Train form


def form_schema() -> list[dict]:
    """Every config field, grouped by section, as the page draws it."""
    from tunesmith.config import fields_info

    sections: dict[str, list] = {}
    for info in fields_info():
        sections.setdefault(info.key.split(".")[0], []).append({
            "key": info.key, "help": info.help, "default": _shown(info.default), "choices": info.choices,
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
    from tunesmith.config import parse_value, unknown_key_error

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
    from tunesmith.config import parse_value

    key = "output.output_dir"
    return Path(parse_value(_fields()[key], values.get(key, _fields()[key].default)))


def _fields() -> dict:
    from tunesmith.config import fields_info

    return {info.key: info for info in fields_info()}


def plan(values: dict[str, str]) -> dict:
    """``tunesmith train ... --plan --json`` run as the CLI runs it: the plan, its lines and the command."""
    from tunesmith.train.plan import Choice, RunPlan

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
    from tunesmith.runs import read_run
    from tunesmith.train.rundir import METRICS, read_metrics

    summary = read_run(path).to_dict()
    rows = read_metrics(path / METRICS) if (path / METRICS).is_file() else []
    return {**summary, "metrics": rows, "log": log_tail(path), "stoppable": jobs.owns(path),
            "files": sorted(p.name for p in path.iterdir()) if path.is_dir() else []}


def _inside(root: Path, path: str) -> Path:
    """``path`` resolved, refused unless it lies under ``root``: the page reads only the runs folder."""
    resolved = Path(path).resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise UsageError(f"{path} is not under the runs folder {root}")
    return resolved


# ---------------------------------------------------------------- the app


def create_app(runs_dir: str | Path = "runs", lang: str = "en"):
    from fastapi import Body, FastAPI, Query
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    root = Path(runs_dir)
    jobs = Jobs()
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)
    app.state.jobs = jobs

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
                "suggested": {"output.output_dir": str(suggested)}}

    @app.post("/api/train/command")
    def command(values: dict = Body(...)):
        return {"command": shown_command(["train", *train_args(values)])}

    @app.post("/api/train/plan")
    def train_plan(values: dict = Body(...)):
        return plan(values)

    @app.post("/api/train/start")
    def train_start(values: dict = Body(...)):
        args = train_args(values)
        out = output_dir(values)
        child = jobs.start(args, out)
        return {"run_dir": str(out.resolve()), "pid": child.pid, "command": shown_command(["train", *args])}

    @app.post("/api/train/stop")
    def train_stop(path: str = Body(..., embed=True)):
        return {"pid": jobs.stop(_inside(root, path)), "signal": "SIGINT"}

    @app.get("/api/runs")
    def runs():
        from tunesmith.runs import list_runs

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

    @app.post("/api/data/check")
    def data_check(request: dict = Body(...)):
        from tunesmith.data.doctor import check_data

        files = [f for f in request.get("files", []) if f]
        if not files:
            raise UsageError("no data file given")
        max_length = int(request["max_length"]) if request.get("max_length") else None
        report = check_data(files, model=request.get("model") or None, max_length=max_length,
                            template=request.get("template") or None, tokens=bool(request.get("tokens", True)))
        return report.to_dict()

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def run_ui(host: str = "127.0.0.1", port: int = 7860, lang: str = "en", runs_dir: str | Path = "runs") -> None:
    import uvicorn

    print(f"tunesmith ui on http://{host}:{port} (runs under {runs_dir}; Ctrl-C to quit, trainings keep running)")
    uvicorn.run(create_app(runs_dir, lang), host=host, port=port, log_level="warning")
