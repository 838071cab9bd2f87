"""A stand-in for a fresh clone: the checkout's files as they are on disk, alone in a folder."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO


def fresh_clone(dest: Path) -> Path:
    """Copy what a clone of this checkout holds (tracked and new files, not ignored ones) to dest/tunesmith.

    Nothing sits beside it (no ../shared), and build outputs, caches and virtualenvs stay behind.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files a clone has")
    clone = Path(dest) / "tunesmith"
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    assert not (clone.parent / "shared").exists()
    return clone
