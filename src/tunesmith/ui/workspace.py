"""The UI's workspace: the runs folder (and its uploads folder), the only place the page reads or writes.

Every path the page names for the UI to write (a run's output_dir, convert and export outputs, uploads)
or to show (logs, reports, metrics, a run's files) is resolved, symlinks followed, and refused unless it
lies inside the workspace, so neither a typed path nor a symlink planted in a run (``ui-train.log`` ->
``/etc/shadow``) leads out of it. The inputs a command reads (data files, a model) are named as on the
command line and are not confined: the page shows what the command reports, not their contents.

Uploads are streamed to a temporary file beside their target, counted as they arrive (past the
cap the upload stops there), and then linked into place, which fails if the name exists: an upload
replaces an existing file only when asked to.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tunesmith.errors import TunesmithError, UsageError

UPLOADS = "uploads"


class TooLarge(TunesmithError):
    """An upload past the cap (answered 413)."""


class Exists(TunesmithError):
    """An upload whose name is taken, without overwrite (answered 409)."""


class Workspace:
    def __init__(self, root: str | Path, max_upload_bytes: int):
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes

    def inside(self, path: str | Path, what: str = "path") -> Path:
        """``path`` resolved (relative to the current folder, as the shown command reads it), refused unless it
        lies in the workspace."""
        if not str(path).strip():
            raise UsageError(f"{what}: no path given")
        root = self.root.resolve()
        resolved = Path(path).expanduser().resolve()
        if resolved != root and root not in resolved.parents:
            raise UsageError(f"{what} {path} is not under the runs folder {root} (the UI reads and writes only "
                             "there; a symlink leaving it counts as outside)")
        return resolved

    def read_text(self, path: Path, what: str | None = None) -> str | None:
        """A file's text, None where it does not exist; refused where it (or a symlink) leads outside."""
        if not path.exists() and not path.is_symlink():
            return None
        file = self.inside(path, what or path.name)
        return file.read_text(encoding="utf-8", errors="replace") if file.is_file() else None

    async def save_upload(self, name: str, chunks, overwrite: bool) -> tuple[Path, int]:
        """Write the ``chunks`` (an async iterator of bytes) to uploads/NAME; (its path, its size)."""
        clean = Path(name.replace("\\", "/")).name
        if not clean or clean.startswith("."):
            raise UsageError(f"upload name {name!r}: give the file's own name")
        folder = self.inside(self.root / UPLOADS, "the uploads folder")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / clean
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise Exists(f"{target} already exists; rename the file, or upload it again with overwrite to "
                         "replace it")
        partial = folder / f".{clean}.{secrets.token_hex(6)}.partial"
        size = 0
        try:
            with partial.open("xb") as out:  # x: never through something already there
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise TooLarge(f"the upload is larger than this UI's limit of {self.max_upload_bytes} bytes "
                                       "(tunesmith ui --max-upload-mb)")
                    out.write(chunk)
            if overwrite:
                os.replace(partial, target)  # replaces a symlink itself, never the file it points to
            else:
                os.link(partial, target)  # fails if the name appeared meanwhile
        except FileExistsError:
            raise Exists(f"{target} already exists; rename the file, or upload it again with overwrite") from None
        finally:
            partial.unlink(missing_ok=True)
        return target, size
