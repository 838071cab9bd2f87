"""The work the web UI starts: `tunesmith train|eval|export ...` child processes, never threads of the server.

A child runs in its own session (a Ctrl-C on the server's terminal does not reach it) with its
output in ``ui-COMMAND.log`` inside its folder (the run directory for a training). A training's
pid and command also go to ``process.json`` (runs.PROCESS_FILE), which ``tunesmith runs`` reads to
call the run "running"; a waiter thread records the exit code there when the child ends. A browser reload, a closed tab or a second page
changes nothing: the state is in the run directory, and the page reads it again.

Stop sends SIGINT to a child this server started, and to nothing else, once: training then
finishes its step, writes a complete checkpoint and exits with 130 (train/loop.py, _Interrupt),
where a second SIGINT would stop it at once without one.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tunesmith.errors import UsageError
from tunesmith.runs import PROCESS_FILE


def log_file(command: str) -> str:
    return f"ui-{command}.log"


def cli_argv(argv: list[str]) -> list[str]:
    """The command line that runs ``tunesmith ARGV`` with this Python (whatever `tunesmith` is on PATH)."""
    return [sys.executable, "-m", "tunesmith.cli", *argv]


def shown_command(argv: list[str]) -> str:
    """What the page shows and a user copies: the same command, as typed in a shell."""
    return shlex.join(["tunesmith", *argv])


class Jobs:
    """The children started by this server, by run directory."""

    def __init__(self):
        self.children: dict[Path, subprocess.Popen] = {}
        self.stopping: set[Path] = set()  # asked to stop once: a second SIGINT would stop without a checkpoint
        self.lock = threading.Lock()

    def start(self, argv: list[str], folder: Path) -> subprocess.Popen:
        """Run ``tunesmith ARGV`` with its output in FOLDER/ui-COMMAND.log (a training: FOLDER is the run)."""
        folder = Path(folder).resolve()
        with self.lock:
            child = self.children.get(folder)
            if child is not None and child.poll() is None:
                raise UsageError(f"{folder}: a {argv[0]} started here is still running")
            folder.mkdir(parents=True, exist_ok=True)
            with _open_own(folder / log_file(argv[0])) as log:
                child = subprocess.Popen(cli_argv(argv), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            self.children[folder] = child
            self.stopping.discard(folder)
            if argv[0] == "train":
                _write_record(folder, {"pid": child.pid, "command": shown_command(argv), "started": time.time(),
                                       "returncode": None})
        if argv[0] == "train":
            threading.Thread(target=self._wait, args=(folder, child), daemon=True).start()
        return child

    def returncode(self, folder: Path) -> int | None:
        child = self.children.get(Path(folder).resolve())
        return child.poll() if child is not None else None

    def _wait(self, run_dir: Path, child: subprocess.Popen) -> None:
        code = child.wait()
        record = _read_record(run_dir)
        record.update(returncode=code, ended=time.time())
        _write_record(run_dir, record)

    def owns(self, run_dir: Path) -> bool:
        child = self.children.get(Path(run_dir).resolve())
        return child is not None and child.poll() is None

    def stop(self, run_dir: Path) -> int:
        """SIGINT to this server's own child training in ``run_dir``; returns its pid."""
        folder = Path(run_dir).resolve()
        child = self.children.get(folder)
        if child is None or child.poll() is not None:
            raise UsageError(f"{run_dir}: no training started by this UI is running there")
        if folder not in self.stopping:  # training takes a second Ctrl-C as "stop at once, no checkpoint"
            self.stopping.add(folder)
            child.send_signal(signal.SIGINT)
        return child.pid


def _read_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / PROCESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_record(run_dir: Path, record: dict) -> None:
    tmp = run_dir / f".{PROCESS_FILE}.tmp"
    with _open_own(tmp) as out:
        out.write(json.dumps(record, indent=2) + "\n")
    tmp.replace(run_dir / PROCESS_FILE)


def _open_own(path: Path):
    """``path`` for writing, refused if it is a symlink: one planted in a run folder would have the UI truncate
    and write the file it points to, wherever that is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write it ({exc.strerror}; a symlink is refused)") from None
    return os.fdopen(fd, "w", encoding="utf-8")
