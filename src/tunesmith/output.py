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
import sys


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


def progress_bar(description: str, total: int, *, enabled: bool = True, done: int = 0, unit: str = "it",
                 keep: bool = False):
    """A progress bar for any long step: tqdm (the library of the training loop's bar) on stderr, drawn only
    when ``enabled`` and stderr is a terminal (a pipe or a log file gets no bar lines). Use it as a context
    manager and call ``update(n)``.

    ``done``: work already finished (a resumed run); ``keep``: leave the finished bar on screen."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=description, unit=unit, leave=keep, dynamic_ncols=True,
                disable=None if enabled else True)  # None: tqdm's own check, off when stderr is not a terminal
