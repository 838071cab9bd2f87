"""`tunesmith models list|pull`."""

from __future__ import annotations

from rich.console import Console

from tunesmith.models.resolve import clean_partials, list_models, models_dir, pull
from tunesmith.output import print_json, print_table, stdout_console


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):  # powers of 1024, named as such
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def print_models(as_json: bool = False) -> None:
    rows = list_models()
    if as_json:
        print_json({"cache": str(models_dir()), "models": rows})
        return
    print_table(f"tunesmith models (cache: {models_dir()})", ["name", "hub id", "cached", "size", "path"],
                [[r["name"], r["hub_id"], "yes" if r["cached"] else "-", _human(r["size"]) if r["cached"] else "",
                  r["path"]] for r in rows], right=("size",))


def pull_with_progress(name: str) -> None:
    removed = clean_partials()
    if removed:
        Console(stderr=True).print(f"removed {removed} incomplete download(s) left by an interrupted pull")
    path = pull(name)
    stdout_console().print(f"[green]{name}[/green] is ready at {path}")
