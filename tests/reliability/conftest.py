"""Helpers for the hostile-input suite: run the real CLI and check what a user would see."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.corpus import Case


@dataclass
class Outcome:
    code: int
    out: str  # stdout and stderr together: what the user sees

    def check(self, case: Case, root: Path) -> None:
        """The case's exit code, the places and phrase its message must name, and never a traceback."""
        assert "Traceback" not in self.out, self.out[-3000:]
        assert self.code == case.code, f"{case.name}: exit {self.code}, expected {case.code}\n{self.out[-3000:]}"
        for where in case.where:
            assert str(root / case.name / where) in self.out, f"{case.name}: {where} not named\n{self.out[-3000:]}"
        assert case.says in self.out, f"{case.name}: {case.says!r} not said\n{self.out[-3000:]}"


def cli(*argv, cwd: Path | None = None, **popen) -> Outcome:
    """``python -m tunesmith.cli ARGV`` in a fresh interpreter, as a user runs it."""
    # Wide lines: the report is not wrapped in the middle of a file name.
    env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300, **popen)
    return Outcome(done.returncode, done.stdout + done.stderr)


def files_under(path: Path) -> list[Path]:
    """Every file in ``path`` (hidden temporaries included): 'no partial output' means this is empty."""
    if not path.exists():
        return []
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
