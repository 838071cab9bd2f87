"""Outputs that appear whole or not at all: written under a temporary name beside the target, flushed
to disk, then renamed onto it. A crash, a full disk or Ctrl-C leaves the previous file (or nothing),
never a file cut mid-record; the temporary file is removed on any error.

Used for every file tunesmith writes outside training (converted data, predictions, reports,
exports); checkpoints have their own directory-level protocol in train/checkpoint.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import TunesmithError, UsageError


def temp_name(path: Path) -> Path:
    """A hidden, unique name in the same directory (a rename within one filesystem is atomic). The
    suffix is kept because some writers (matplotlib) choose the file type from it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:  # a full disk or a size limit: say so, and that the old file is untouched
        kept = "the existing file is unchanged" if path.exists() else "no file was created"
        raise TunesmithError(f"cannot write {path}: {exc.strerror or exc}; nothing was written ({kept})") from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def refuse_existing(path: str | os.PathLike, overwrite: bool, *, directory: bool = False,
                    flag: str = "--overwrite") -> None:
    """Existing outputs are replaced only when asked: a repeated command must not destroy a result.

    ``directory``: the output is a directory (an empty one may be reused), else a file.
    """
    path = Path(path)
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot create {path}: {blocking} is a file, not a directory")
    if directory and path.is_file():
        raise UsageError(f"{path} is a file; give a directory to write into")
    if not directory and path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name")
    exists = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if exists and not overwrite:
        raise UsageError(f"{path} already exists; pass {flag} to replace it, or choose another output path")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
