"""`tunesmith runs [DIR]`: every run directory under DIR with its status, method, data, steps and losses.

Everything is read from the files a run writes (run.py, train/plan.py, train/checkpoint.py),
so a run started from a terminal, a script or the web UI is listed alike. The status:

- finished: the run wrote its ``tunesmith.json`` (the last thing training writes).
- running: a live training process owns the folder: the child the web UI started (its record,
  ``PROCESS_FILE``, names the pid), or a ``tunesmith train`` process whose command line names the
  folder as its output dir (read from /proc on Linux).
- stopped: the UI's child exited with 130 (a clean stop on SIGINT: its checkpoint is complete), or,
  with no exit code recorded, no final files but a complete checkpoint to ``--resume auto`` from.
- failed: the UI's child exited with an error, or, with no exit code recorded, the process ended
  (an error, a kill) before a checkpoint was kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from tunesmith.output import fmt_number, print_json, print_table
from tunesmith.run import (
    CONFIG,
    METRICS,
    RUN_INFO,
    checkpoints_dir,
    list_checkpoints,
    read_metrics,
    read_step,
)
from tunesmith.train.plan import PLAN_FILE

PROCESS_FILE = "process.json"  # the UI's record of the child it started here: pid, command, exit code
STATUSES = ("running", "finished", "stopped", "failed")
_MARKERS = (RUN_INFO, PLAN_FILE, METRICS, PROCESS_FILE)
_MAX_DEPTH = 3  # runs/NAME and runs/GROUP/NAME are found; a run's own folders are not searched


@dataclass
class RunSummary:
    path: str
    name: str
    status: str
    method: str | None
    data: list[str]
    steps: int  # optimizer steps done (the newest metrics line or the final count)
    total_steps: int | None  # what the plan aimed for
    train_loss: float | None  # the final train loss, or the newest logged one while unfinished
    eval_loss: float | None
    checkpoint: str | None  # the newest complete checkpoint
    pid: int | None = None  # the live training process, when running
    modified: float = 0.0  # newest change to the run's files (seconds since the epoch)

    def to_dict(self) -> dict:
        return asdict(self)


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """Every run directory under ``root`` (``root`` itself included), newest first."""
    root = Path(root)
    live = _live_train_dirs()
    runs = [read_run(path, live) for path in _run_dirs(root, 0)]
    return sorted(runs, key=lambda r: r.modified, reverse=True)


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in _MARKERS) or checkpoints_dir(path).is_dir()


def _run_dirs(folder: Path, depth: int) -> list[Path]:
    if not folder.is_dir():
        return []
    if is_run_dir(folder):
        return [folder]
    if depth >= _MAX_DEPTH:
        return []
    return [run for child in sorted(folder.iterdir()) if child.is_dir() and not child.name.startswith(".")
            for run in _run_dirs(child, depth + 1)]


def read_run(path: str | Path, live: dict[Path, int] | None = None) -> RunSummary:
    """The summary of one run directory."""
    path = Path(path)
    info = _read_json(path / RUN_INFO)
    plan = _read_json(path / PLAN_FILE)
    process = _read_json(path / PROCESS_FILE)
    rows = read_metrics(path / METRICS) if (path / METRICS).is_file() else []
    checkpoint = _newest_checkpoint(path)
    config = _config(path, checkpoint)
    pid = _live_pid(path, process, live if live is not None else _live_train_dirs())
    logged = [r for r in rows if "loss" in r]
    evals = [r.get("eval_loss") for r in rows if r.get("eval_loss") is not None]
    status = _status(info, process, pid, checkpoint)
    # A running run's step between metrics lines (log_every apart); a stopped one counts what metrics.jsonl kept.
    reached = read_step(path) if status == "running" else None
    return RunSummary(
        path=str(path), name=path.name, status=status,
        method=_method(info, plan, config),
        data=list(config.get("data", {}).get("path") or process.get("data") or []),
        steps=info.get("steps") or max(logged[-1]["step"] if logged else 0, reached or 0),
        total_steps=plan.get("total_steps"),
        train_loss=info["final_train_loss"] if info else (logged[-1]["loss"] if logged else None),
        eval_loss=info["final_eval_loss"] if info else (evals[-1] if evals else None),
        checkpoint=str(checkpoint) if checkpoint else None, pid=pid, modified=_modified(path))


def _method(info: dict, plan: dict, config: dict) -> str | None:
    """The method, with the objective when it is not plain SFT: lora, lora+dpo."""
    method = info.get("method") or plan.get("method") or config.get("method", {}).get("name")
    objective = info.get("objective") or plan.get("objective") or config.get("method", {}).get("objective")
    return f"{method}+{objective}" if method and objective and objective != "sft" else method


def _status(info: dict, process: dict, pid: int | None, checkpoint: Path | None) -> str:
    if info:
        return "finished"
    if pid is not None:
        return "running"
    code = process.get("returncode")
    if code == 130 or (code is None and checkpoint is not None):
        return "stopped"  # a clean stop, or a checkpoint left by a process whose end nobody recorded
    return "failed"


def _newest_checkpoint(path: Path) -> Path | None:
    complete = [p for _, p, ok in list_checkpoints(path) if ok]
    return complete[-1] if complete else None


def _config(path: Path, checkpoint: Path | None) -> dict:
    """The run's resolved config: the final one, else the newest checkpoint's (each is a copy of it)."""
    for file in (path / CONFIG, *([checkpoint / CONFIG] if checkpoint else [])):
        if file.is_file():
            try:
                data = yaml.safe_load(file.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                return data
    return {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _modified(path: Path) -> float:
    files = [path / name for name in (*_MARKERS, CONFIG)] + [checkpoints_dir(path)]
    return max((f.stat().st_mtime for f in files if f.exists()), default=path.stat().st_mtime)


# ---------------------------------------------------------------- live processes


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is not running
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _live_pid(path: Path, process: dict, live: dict[Path, int]) -> int | None:
    pid = process.get("pid")
    if isinstance(pid, int) and process.get("returncode") is None and pid_alive(pid):
        return pid
    return live.get(path.resolve())


def _live_train_dirs() -> dict[Path, int]:
    """{output dir: pid} of the `tunesmith train` processes of this machine that name their output dir
    on the command line (--output-dir, --output.output_dir); Linux only, else empty."""
    found = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        out = _output_dir_arg(argv)
        if out is not None and "train" in argv and pid_alive(int(entry.name)):
            found[(cwd / out).resolve()] = int(entry.name)
    return found


def _output_dir_arg(argv: list[str]) -> str | None:
    if not any("tunesmith" in part for part in argv):
        return None
    for i, part in enumerate(argv):
        for flag in ("--output-dir", "--output.output_dir"):
            if part == flag and i + 1 < len(argv):
                return argv[i + 1]
            if part.startswith(flag + "="):
                return part.split("=", 1)[1]
    return None


# ---------------------------------------------------------------- the command

COLUMNS = ["name", "status", "method", "data", "steps", "train loss", "eval loss", "path"]


def table_rows(runs: list[RunSummary]) -> list[list[str]]:
    return [[r.name, r.status, r.method or "", ",".join(r.data), f"{r.steps}/{r.total_steps or '?'}",
             fmt_number(r.train_loss), fmt_number(r.eval_loss), r.path] for r in runs]


def print_runs(root: str | Path = "runs", as_json: bool = False) -> int:
    runs = list_runs(root)
    if as_json:
        print_json({"root": str(root), "runs": [r.to_dict() for r in runs]})
        return 0
    print_table(f"runs under {root}", COLUMNS, table_rows(runs), right=("steps", "train loss", "eval loss"))
    return 0

