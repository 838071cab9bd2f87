"""What commands print on stdout: tables that never cut what a user copies, or one JSON document.

On a terminal, tables are drawn by rich and long cells wrap (fold) instead of ending in an
ellipsis. In a pipe (stdout not a terminal), a table becomes plain tab-separated lines, one per
row, under a header line (and the title as a `# ` comment line), so `grep`, `cut` and `awk`
see every name and path whole. With `--json` the work runs with stdout pointed at stderr, so
progress and logs from anywhere (ours, transformers, pip) cannot land inside the document; the
command then prints the document alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time


def stdout_console():
    """A rich console for stdout; in a pipe it never wraps a line (a path stays on one line)."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, soft_wrap=True)


def print_table(title: str | None, columns: list[str], rows: list[list[str]], console=None,
                right: tuple[str, ...] = ()) -> None:
    """A rich table on a terminal (cells fold, never cut); `# title`, a header and TSV lines in a pipe."""
    from rich.markup import escape
    from rich.table import Table

    console = console or stdout_console()
    if not console.is_terminal:
        lines = ([f"# {title}"] if title else []) + ["\t".join(columns)] + ["\t".join(map(str, row)) for row in rows]
        console.file.write("\n".join(lines) + "\n")  # rich would expand the tabs into spaces
        return
    table = Table(title=escape(title) if title else None)
    for column in columns:
        table.add_column(escape(column), overflow="fold", justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    console.print(table)


@contextlib.contextmanager
def json_stdout(enabled: bool):
    """While the work runs under --json, whatever it prints goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_json(document) -> None:
    """The one JSON document a --json command prints on stdout."""
    print(json.dumps(document, indent=2, ensure_ascii=False))


def finish_report(report, as_json: bool, print_human) -> int:
    """A checking command's ending: ``report.to_dict()`` as one JSON document, or ``print_human(report)``;
    exit code 0 only when ``report.ok``."""
    if as_json:
        print_json(report.to_dict())
    else:
        print_human(report)
    return 0 if report.ok else 1


def fmt_number(value, digits: int = 4, missing: str = "") -> str:
    """A metric or loss for a table or a line: whole numbers as they are, others to ``digits`` places."""
    if value is None:
        return missing
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def fmt_delta(delta, digits: int = 4) -> str:
    """A difference (tuned minus base) with its sign; empty when there is none."""
    if delta is None:
        return ""
    return f"{delta:+d}" if isinstance(delta, int) else f"{delta:+.{digits}f}"


# --verbose: the libraries' own progress bars (transformers' "Loading weights", bert_score's) are shown.
_verbose = True  # a library user keeps every bar; the command line turns them off (quiet_libraries)


def quiet_libraries(verbose: bool) -> None:
    """Unless ``verbose``, transformers' and bert_score's progress bars stay off: a command shows its own bars
    alone. Hub downloads keep theirs (a pull's progress is the user's), and HF_HUB_DISABLE_PROGRESS_BARS, when
    set, decides instead. Called before transformers is imported (it reads the hub's setting then), and tells
    it too when it already is (in process)."""
    global _verbose
    _verbose = verbose
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        return
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if "transformers" in sys.modules:
        from transformers.utils import logging

        (logging.enable_progress_bar if verbose else logging.disable_progress_bar)()
    if verbose:
        enable_progress_bars()
    else:
        disable_progress_bars()
        enable_progress_bars("huggingface_hub")  # downloads


def verbose() -> bool:
    """Whether the libraries' own progress output is wanted (``quiet_libraries``)."""
    return _verbose


# A pipe or a log file gets a plain progress line at most this often (a terminal gets the live bar).
PIPE_REPORT_S = 30.0


def progress_bar(description: str, total: int, *, enabled: bool = True, done: int = 0, unit: str = "it",
                 keep: bool = False):
    """A progress bar for any long step, on stderr: tqdm's live bar (elapsed, ETA) on a terminal; in a pipe or
    a log file, a plain line at most every ``PIPE_REPORT_S`` seconds (a short step prints nothing); nothing
    unless ``enabled``. Use it as a context manager and call ``update(n)``; ``n`` may be a fraction (an answer
    half generated), the count shown stays whole.

    ``done``: work already finished (a resumed run); ``keep``: leave the finished bar on screen."""
    if enabled and not _stderr_is_terminal():
        return LineProgress(description, total, done=done, unit=unit)
    return _wholebar(total=total, initial=done, desc=description, unit=unit, leave=keep, dynamic_ncols=True,
                     disable=not enabled, bar_format=BAR_FORMAT)


BAR_FORMAT = "{l_bar}{bar}| {whole}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _wholebar(**kwargs):
    from tqdm.auto import tqdm

    class WholeCountBar(tqdm):
        """tqdm that moves by fractions (percentage, ETA) but shows whole units done."""

        @property
        def format_dict(self):
            shown = super().format_dict
            return {**shown, "whole": int(shown["n"] + 1e-6)}

    return WholeCountBar(**kwargs)


class LineProgress:
    """progress_bar's form in a pipe: `description: 12/50 unit (24%), 3:10 elapsed, about 10:02 left` lines."""

    def __init__(self, description: str, total: int, *, done: int = 0, unit: str = "it"):
        self.desc, self.total, self.n, self.unit = description, total, done, unit
        self.started = self.last = time.monotonic()
        self.start_n = done
        self.printed_at = None  # the count of the last line printed
        self.postfix = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= PIPE_REPORT_S:
            self.last = now
            self._print(now)

    def set_description(self, description: str, refresh: bool = True) -> None:
        self.desc = description

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in {**(ordered_dict or {}), **kwargs}.items())

    def close(self) -> None:
        if self.printed_at is not None and self.printed_at < self.n >= self.total:
            self._print(time.monotonic())  # a log that showed progress also shows the end

    def _print(self, now: float) -> None:
        elapsed = now - self.started
        done_here = self.n - self.start_n
        left = (self.total - self.n) * elapsed / done_here if done_here > 0 else None
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", about {_clock(left)} left" if left is not None and self.n < self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {int(self.n + 1e-6)}/{self.total} {self.unit}{share}, {_clock(elapsed)} elapsed{eta}"
              f"{postfix}", file=sys.stderr, flush=True)
        self.printed_at = self.n


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
