"""The README's shell commands, read from its bash blocks, for the tests that check them and the e2e tests that run
them as written.

A training command in the README ends with one of three comments:
- ``# N min on a 2-core CPU``: measured here; an e2e test runs it as written and checks the time (with
  TIME_MARGIN) and that its run plan has no warning;
- ``# GPU-sized``: too long for a CPU; the text around it gives the plan's CPU estimate;
- ``# with your own model and data``: names files the repository does not hold.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

TIMED = re.compile(r"#\s*(\d+(?:\.\d+)?) min on a 2-core CPU\s*$")
GPU_SIZED = "# GPU-sized"
USERS_OWN = "# with your own model and data"
# A README time is measured on a quiet machine; the test allows this much more (CI shares the machine with its
# own bookkeeping, and a minute's figure is rounded).
TIME_MARGIN = 1.5


@dataclass(frozen=True)
class ReadmeCommand:
    section: str  # the "## " heading it is under
    line: str  # the command as written, its comment removed
    comment: str

    @property
    def minutes(self) -> float | None:
        found = TIMED.search(self.comment)
        return float(found.group(1)) if found else None

    @property
    def gpu_sized(self) -> bool:
        return self.comment.startswith(GPU_SIZED)

    @property
    def users_own(self) -> bool:
        return self.comment.startswith(USERS_OWN)

    @property
    def tunesmith_argv(self) -> list[str]:
        """The arguments after ``tunesmith`` (a leading ``cd DIR &&`` left out)."""
        return shlex.split(self.line.split("&& ", 1)[-1])[1:]

    @property
    def is_training(self) -> bool:
        if " tunesmith train " not in f" {self.line} ":
            return False
        return "--plan" not in self.tunesmith_argv


def commands(section: str | None = None) -> list[ReadmeCommand]:
    """Every non-comment line of every bash block, in order; only those under ``## {section}`` when given."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for part in re.split(r"\n(?=## )", text):
        heading = part.splitlines()[0].removeprefix("## ").strip()
        if section is not None and heading != section:
            continue
        for block in re.findall(r"```bash\n(.*?)```", part, flags=re.S):
            for raw in block.splitlines():
                line, _, comment = raw.partition("   # ")
                if line.strip() and not line.lstrip().startswith("#"):
                    out.append(ReadmeCommand(heading, line.strip(), ("# " + comment.strip()) if comment else ""))
    return out


def training_commands() -> list[ReadmeCommand]:
    return [c for c in commands() if c.is_training]


def readme_training_command(containing: str) -> ReadmeCommand:
    """The one README training command whose text contains ``containing``."""
    (found,) = [c for c in training_commands() if containing in c.line]
    return found


def run_timed(command: ReadmeCommand, cwd: Path, env: dict, timeout: float = 3600) -> float:
    """Run a README training command as written (``tunesmith`` as this Python's module, in ``cwd`` or the folder its
    ``cd`` names); assert it succeeded, within the README's time and with no plan warning. Returns the seconds."""
    if " && " in command.line:
        cwd = cwd / command.line.split(" && ", 1)[0].removeprefix("cd ").strip()
    argv = command.tunesmith_argv
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, f"{command.line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    print(f"{seconds / 60:5.1f} min (README: {command.minutes} min)  {command.line}")
    run = cwd / argv[argv.index("--output-dir") + 1]
    plan = json.loads((run / "plan.json").read_text())
    assert not plan["warnings"], f"{command.line}: {plan['warnings']}"
    assert command.minutes is not None, f"{command.line}: the README gives no time for it"
    assert seconds <= TIME_MARGIN * 60 * command.minutes, (
        f"{command.line} took {seconds / 60:.1f} min; the README says {command.minutes} min")
    return seconds
