"""Errors a user can act on. The CLI prints their message (no traceback) and exits with exit_code.

Anything else reaching the CLI is a bug: ``report_unexpected`` saves its traceback to a file and
prints one line naming it, so the user has something to attach to a report instead of a dump.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tunesmith import __version__


class TunesmithError(Exception):
    exit_code = 1


class UsageError(TunesmithError):
    """Bad arguments or configuration."""

    exit_code = 2


def report_error(exc: Exception, argv: list[str], crash_dir: Path | None = None) -> int:
    """Print one message for ``exc`` on stderr and return the exit code; an unexpected error's traceback is
    saved under ``crash_dir`` (else the temp dir)."""
    if isinstance(exc, TunesmithError):
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, OSError) and exc.strerror:
        # The system said no (full disk, no permission, a directory where a file belongs): not a bug.
        print(f"error: {exc.filename + ': ' if exc.filename else ''}{exc.strerror}", file=sys.stderr)
        return 1
    path = save_traceback(exc, argv, crash_dir)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    print(f"error: unexpected {type(exc).__name__}: {first}\n"
          f"This is a bug in tunesmith, not in your input. The traceback is saved in {path}; please attach "
          "it to a report (TUNESMITH_DEBUG=1 shows it here instead).", file=sys.stderr)
    return 1


def save_traceback(exc: BaseException, argv: list[str], crash_dir: Path | None = None) -> Path:
    """Write the command, versions and traceback to a new file under ``crash_dir`` (else the temp dir)."""
    text = (f"tunesmith {__version__}, Python {platform.python_version()}, {platform.platform()}\n"
            f"command: tunesmith {' '.join(argv)}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    name = f"traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    fallback = Path(tempfile.gettempdir()) / "tunesmith-crash-reports"
    for folder in (*([crash_dir] if crash_dir else []), fallback):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return folder / name
        except OSError:
            continue
    raise exc  # nowhere to save it: showing the traceback beats losing it
