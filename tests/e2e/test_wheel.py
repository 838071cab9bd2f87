"""The wheel: `python -m build` packs the quickstart's assets, and the installed wheel runs quickstart
from a fresh virtualenv outside the repository.

The virtualenv gets the wheel with --no-deps and sees the current environment's packages through a
.pth line (so torch and transformers are not installed a second time); tunesmith itself must come
from the wheel, which the test checks before anything runs. Marked slow: it builds the wheel in an
isolated build environment (setuptools from PyPI) and trains one step of the real default model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.clone import fresh_clone

ASSETS = sorted(p.name for p in (REPO / "src" / "tunesmith" / "assets").iterdir() if p.is_file())


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def build_wheel(tmp_path: Path) -> Path:
    source = fresh_clone(tmp_path / "src")  # build from a copy: the checkout gets no build/ or egg-info
    run([sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", source], timeout=600)
    (wheel,) = (tmp_path / "dist").glob("tunesmith-*.whl")
    return wheel


def wheel_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=300)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel], timeout=300)
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # Only the directory is added, not its .pth files: an editable install of the checkout stays invisible.
    Path(site, "current-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_wheel_carries_the_assets_and_runs_quickstart_outside_the_repo(default_model_home, tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert ASSETS and all(f"tunesmith/assets/{name}" in names for name in ASSETS)
    assert "tunesmith/cli.py" in names and not any(n.startswith(("tests/", "examples/")) for n in names)

    venv = wheel_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TUNESMITH_HOME=str(default_model_home), HF_HUB_OFFLINE="1", VIRTUAL_ENV=str(venv))
    where = run([venv / "bin" / "python", "-c", "import tunesmith, sys; print(tunesmith.__file__)"],
                cwd=elsewhere, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), f"tunesmith imported from {where}, not from the wheel"

    done = run([venv / "bin" / "tunesmith", "quickstart", "--name", "Wheelie", "--max-steps", "1",
                "--out", elsewhere / "run"], cwd=elsewhere, env=env, timeout=1200)
    assert "data doctor" in done.stdout and "Wheelie" in done.stdout
    run_dir = elsewhere / "run"
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "eval" / "report.md").is_file()
