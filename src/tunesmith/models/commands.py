"""`tunesmith models list|pull`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tunesmith.models.resolve import clean_partials, list_models, pull


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def print_models() -> None:
    table = Table(title="tunesmith models")
    for column in ("name", "hub id", "cached", "size", "path"):
        table.add_column(column)
    for row in list_models():
        table.add_row(row["name"], row["hub_id"], "yes" if row["cached"] else "-",
                      _human(row["size"]) if row["cached"] else "", row["path"])
    Console().print(table)


def pull_with_progress(name: str) -> None:
    removed = clean_partials()
    if removed:
        Console(stderr=True).print(f"removed {removed} incomplete download(s) left by an interrupted pull")
    path = pull(name)
    Console().print(f"[green]{name}[/green] is ready at {path}")
