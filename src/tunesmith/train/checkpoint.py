"""Atomic checkpoints and resume.

A checkpoint is ``output_dir/checkpoints/step-N/`` holding the trainable weights, the optimizer
and scheduler states, every process's RNG states (python, numpy, torch, cuda), the data position
(``state.json``: epoch, micro-batch index within the epoch, the epoch's order seed) and the
resolved config with the config and data fingerprints. It is written into a temporary folder,
every file fsynced, renamed into place, and only then marked with ``COMPLETE``: a folder without
the marker is an interrupted save and is never resumed from. The marker lists every file with
its size, so a checkpoint truncated or damaged afterwards is recognised, reported, and skipped
by ``--resume auto`` in favour of the previous complete one.

Nothing in a checkpoint is unpickled: a run directory may come from someone else, and a pickle
can run code. Weights are safetensors, RNG states JSON, and the optimizer and scheduler states
(nested dicts of tensors and numbers) are read with ``torch.load(weights_only=True)``, whose
unpickler builds only tensors and plain containers and refuses anything else.

Only the trainable tensors are saved (an adapter is megabytes where the full model is gigabytes);
the frozen base is reloaded from the base model. Under FSDP, where parameters and optimizer state
are sharded across processes, ``sharded/`` holds them as a torch distributed checkpoint, each
process writing its own part, and again only the trainable ones: accelerate's save_state would
also write every frozen base shard (gigabytes per checkpoint for a LoRA of a large model). Under
DeepSpeed, accelerate's save_state/load_state write and read its engine's files and RNG states.
The scheduler (which accelerate is not given) and the data position are ours in every checkpoint,
so a resumed run continues its learning-rate schedule.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.atomic import fsync_dir, fsync_file
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.run import (
    CHECKPOINTS,
    COMPLETE,
    CONFIG,
    LOSS_PLOT,
    METRICS,
    MODEL_CARD,
    RUN_INFO,
    TENSORBOARD,
    checkpoints_dir,
    list_checkpoints,
)
from tunesmith.train.methods import trainable_state_dict


class ResumeRefused(UsageError):
    pass


WEIGHTS = "weights.safetensors"  # the trainable tensors of a checkpoint
SHARDED = "sharded"  # FSDP: the trainable parameters' and the optimizer's shards (torch distributed checkpoint)


def step_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (complete or not)."""
    return checkpoints_dir(output_dir) / f"step-{step}"


def _is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def _is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type.value == "FSDP"


def _trainable_only():
    """get_state_dict/set_state_dict options: the trainable tensors, each process's shards of them (the frozen
    base is reloaded from the base model, as without sharding); loading leaves the frozen ones as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _save_fsdp(model, optimizer, folder: Path) -> None:
    """Every process writes its shards of the trainable parameters and of their optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, moments = get_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=_trainable_only())
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=str(folder))


def _load_fsdp(path: Path, model, optimizer) -> None:
    """Read ``_save_fsdp``'s shards into this process's parts of the model and optimizer; a checkpoint of another
    model (a tensor it lacks, or one this model trains that it lacks) is refused, naming one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    weights, moments = get_state_dict(model, inner, options=_trainable_only())
    saved = dcp.FileSystemReader(str(path / SHARDED)).read_metadata().state_dict_metadata
    names = {key.removeprefix("model.") for key in saved if key.startswith("model.")}
    if names != set(weights):
        odd = sorted(names ^ set(weights))[0]
        raise UsageError(f"{path}: checkpoint weights do not match this model's trainable ones (e.g. {odd})")
    state = {"model": weights, "optimizer": moments}
    dcp.load(state, checkpoint_id=str(path / SHARDED))
    set_state_dict(model, inner, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_trainable_only())


def rng_state() -> dict:
    """Every generator's state as plain JSON values (lists of ints), so reading it back runs no code."""
    version, internal, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    numpy["state"] = {"key": numpy["state"]["key"].tolist(), "pos": int(numpy["state"]["pos"])}
    state = {"python": [version, list(internal), gauss], "numpy": numpy, "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = dict(state["numpy"])
    numpy["state"] = {"key": np.asarray(numpy["state"]["key"], dtype=np.uint32), "pos": numpy["state"]["pos"]}
    np.random.set_state(numpy)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def assert_finite(model, step: int) -> None:
    """Refuse to save weights holding NaN or inf."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            raise TunesmithError(f"step {step}: parameter {name} holds non-finite values; no checkpoint written")


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict, config_yaml: str,
                    fingerprint: dict, output_dir: str | Path) -> Path:
    """Write ``checkpoints/step-N`` atomically from every process; returns the final path.

    A failed write (a full disk, a vanished mount) removes what it started and raises a
    CheckpointWriteError: the checkpoints already there are untouched and resumable."""
    root = checkpoints_dir(output_dir)
    final = step_dir(output_dir, state["step"])
    tmp = root / f".tmp-step-{state['step']}"
    assert_finite(accelerator.unwrap_model(model), state["step"])
    try:
        _write_checkpoint(accelerator, model, optimizer, scheduler, state, config_yaml, fingerprint, tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir() and not (final / COMPLETE).is_file():
            shutil.rmtree(final, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(exc, state["step"], final, output_dir)) from None
    return final


def _write_checkpoint(accelerator, model, optimizer, scheduler, state, config_yaml, fingerprint,
                      tmp: Path, final: Path) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save of this same step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    deepspeed = _is_sharded(accelerator) and not _is_fsdp(accelerator)
    if _is_fsdp(accelerator):
        _save_fsdp(model, optimizer, tmp / SHARDED)
    elif deepspeed:
        accelerator.save_state(str(tmp))  # DeepSpeed's engine files, every process's RNG
    elif accelerator.is_main_process:
        save_file(trainable_state_dict(accelerator.unwrap_model(model)), tmp / WEIGHTS)
        kill_point("during-checkpoint", state["step"])
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if not deepspeed:
        _write_json(tmp / f"rng-{accelerator.process_index}.json", rng_state())
    if accelerator.is_main_process:  # ours in every checkpoint: accelerate never saw it (it is not prepared)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / "state.json", state)
        _write_json(tmp / "fingerprint.json", fingerprint)
        (tmp / CONFIG).write_text(config_yaml, encoding="utf-8")
        _publish(tmp, final)
    accelerator.wait_for_everyone()


class CheckpointWriteError(TunesmithError):
    pass


def _write_failure(exc: OSError, step: int, final: Path, output_dir) -> str:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    previous = [path for s, path, ok in list_checkpoints(output_dir) if ok and s != step]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return (f"step {step}: could not write checkpoint {final}: {reason}. Nothing was half-written; {kept}. "
            "Free some space (or lower output.save_total_limit) and continue with --resume auto.")


def kill_point(stage: str, step: int) -> None:
    """TUNESMITH_TEST_KILL=STAGE:N SIGKILLs this process at STAGE of step N, so tests can prove
    that a run killed mid-save or right after a save resumes exactly (never set in normal use).
    TUNESMITH_TEST_KILL=STAGE:N:INT sends SIGINT instead, a Ctrl-C at a known point of a step."""
    wanted = os.environ.get("TUNESMITH_TEST_KILL", "")
    if wanted == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"{stage}:{step}:INT":
        os.kill(os.getpid(), signal.SIGINT)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _publish(tmp: Path, final: Path) -> None:
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:
        fsync_file(path)
    fsync_dir(tmp)
    # The marker lists every file and its size: a checkpoint cut short later is recognised.
    manifest = {"files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in files}}
    shutil.rmtree(final, ignore_errors=True)  # an older save of this same step, replaced only now
    os.rename(tmp, final)
    fsync_dir(final.parent)
    marker = final / COMPLETE
    marker.write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_file(marker)
    fsync_dir(final)


REQUIRED = {WEIGHTS: "the trained weights", "optimizer.pt": "the optimizer state",
            "scheduler.pt": "the learning-rate scheduler state", "state.json": "the data position"}


def saved_processes(path: Path) -> int:
    """How many processes wrote the checkpoint: one RNG state file each (ours, or accelerate's when sharded)."""
    return len(list(path.glob("rng-*.json"))) or len(list(path.glob("random_states_*.pkl")))


def check_processes(path: Path, processes: int, batch_size: int, grad_accum: int) -> None:
    """Refuse to resume with another process count: each process's data position and RNG are in the checkpoint,
    and another count would silently change the global batch (fewer) or find no state to read (more)."""
    saved = saved_processes(path)
    if saved in (0, processes):
        return
    rows = batch_size * grad_accum
    raise ResumeRefused(
        f"{path} was written by {saved} process(es), a global batch of {saved} x {rows} = {saved * rows} micro-batch "
        f"rows per optimizer step; this run has {processes}, which would make it {processes * rows}. Resume with "
        f"{saved} process(es) (accelerate launch --num_processes {saved} ...), or start a new run")


def check_sharding(path: Path, sharded: bool) -> None:
    """Refuse to resume a checkpoint of sharded parameters (FSDP, DeepSpeed: accelerate's files) without sharding, or
    the other way round: neither launch can read the other's files."""
    written_sharded = (path / SHARDED).is_dir() or bool(list(path.glob("random_states_*.pkl")))
    if written_sharded == sharded:
        return
    how = {True: "with sharded parameters (FSDP or DeepSpeed)", False: "without sharding (one process or DDP)"}
    raise ResumeRefused(f"{path} was written {how[written_sharded]}, and this launch runs {how[sharded]}; resume "
                        "with the accelerate config it was written with, or start a new run")


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; return the saved training state."""
    rng_file = f"rng-{accelerator.process_index}.json"
    rng = {rng_file: "the random number generator state"}
    if _is_sharded(accelerator):
        _require(path, {name: REQUIRED[name] for name in ("scheduler.pt", "state.json")})
        check_sharded_metadata(path)
        if (path / SHARDED).is_dir():
            _require(path, rng)
            _load_fsdp(path, model, optimizer)
        else:  # DeepSpeed's files, or an FSDP checkpoint of accelerate's save_state (earlier tunesmith)
            accelerator.load_state(str(path))  # its RNG files too; it reads .bin/.pkl with weights_only=True
            rng = {}
    else:
        _require(path, {**REQUIRED, **rng})
        _load_weights(path, accelerator.unwrap_model(model))
        optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt"))
    scheduler.load_state_dict(safe_torch_load(path / "scheduler.pt"))
    if rng:
        set_rng_state(_read_json(path / rng_file))
    return _read_json(path / "state.json")


def _load_weights(path: Path, model) -> None:
    """The trainable tensors of an unsharded checkpoint into ``model``; another model's are refused, naming one."""
    weights = load_file(path / WEIGHTS)
    unknown = set(weights) - set(model.state_dict())
    if unknown:
        raise UsageError(f"{path}: checkpoint weights do not match this model (e.g. {sorted(unknown)[0]})")
    model.load_state_dict(weights, strict=False)


def _require(path: Path, files: dict[str, str]) -> None:
    """Refuse a checkpoint missing any of ``files`` (name: what it holds), naming them all."""
    missing = [f"{name} ({what})" for name, what in files.items() if not (path / name).is_file()]
    if missing:
        hint = " (saved with fewer processes?)" if missing[-1].startswith("rng-") else ""
        raise UsageError(f"{path}: cannot resume: the checkpoint is missing {', '.join(missing)}{hint}; "
                         "resume from an earlier checkpoint or start again")


def safe_torch_load(path: Path):
    """torch.load that builds only tensors and plain containers: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1][:200]
        raise UsageError(f"{path}: refused to load: it holds Python objects other than tensors and numbers, "
                         f"which could run code when unpickled ({first}). Only resume from checkpoints you "
                         "made yourself.") from None
    except (RuntimeError, EOFError) as exc:
        raise UsageError(f"{path}: unreadable (truncated or corrupt): {str(exc).splitlines()[0]}") from None


# What torch.distributed.checkpoint's .metadata pickle (FSDP's sharded weights) legitimately holds.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
                 ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only the checkpoint metadata's own classes, torch dtypes and plain
    containers; the names are checked before anything is imported."""

    def find_class(self, module: str, name: str):
        torch_constant = module == "torch" and isinstance(getattr(torch, name, None),
                                                          torch.dtype | torch.layout | torch.memory_format)
        if not ((module, name) in _SAFE_GLOBALS or torch_constant or module == _DCP_METADATA):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        found = super().find_class(module, name)
        if module == _DCP_METADATA and not isinstance(found, type):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return found


def check_sharded_metadata(path: Path) -> None:
    """Refuse an FSDP checkpoint whose .metadata pickles (read by torch.distributed.checkpoint with a
    plain pickle.load) hold anything besides metadata: such a file could run code on resume."""
    for file in sorted(p for p in Path(path).rglob("*") if p.name == ".metadata" and p.is_file()):
        try:
            with open(file, "rb") as handle:
                _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as exc:
            raise UsageError(f"{file}: refused to load: not plain checkpoint metadata ({exc}); it could run "
                             "code when unpickled. Only resume from checkpoints you made yourself.") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable (truncated or corrupt): {exc}") from None


def damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it looks whole.

    Checks the file list and sizes recorded in the COMPLETE marker, then that each JSON,
    safetensors and torch file parses (zip CRCs included), without loading any tensor."""
    try:
        marker = (path / COMPLETE).read_text(encoding="utf-8")
    except OSError:
        return f"no {COMPLETE} marker (interrupted while saving)"
    try:
        sizes = json.loads(marker)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None if marker.strip() == "ok" else f"its {COMPLETE} marker is damaged"  # "ok": before manifests
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} when saved (truncated?)"
    return next((problem for name in sizes if (problem := _unreadable(path / name))), None)


def _unreadable(file: Path) -> str | None:
    import zipfile

    from safetensors import safe_open

    try:
        if file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            with safe_open(file, "pt") as handle:
                handle.keys()
        elif file.suffix == ".pt" and zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                if archive.testzip() is not None:
                    return f"{file.name} is corrupt (checksum mismatch)"
    except Exception as exc:  # any parse failure means the file is damaged; say which and how
        return f"{file.name} is unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def find_resume(output_dir: str | Path, spec: str) -> Path:
    """``auto``: the newest complete, undamaged checkpoint under output_dir (a damaged newer one is
    reported and skipped); otherwise ``spec`` is a checkpoint path, which must be whole."""
    if spec != "auto":
        path = Path(spec)
        if not (path / COMPLETE).is_file():
            raise UsageError(f"--resume {spec}: not a complete checkpoint (no {COMPLETE} marker)")
        if problem := damage(path):
            raise UsageError(f"--resume {spec}: the checkpoint is damaged: {problem}")
        return path
    for _, path, ok in reversed(list_checkpoints(output_dir)):
        problem = damage(path) if ok else "interrupted while saving"
        if problem is None:
            return path
        kind = "incomplete" if not ok else "damaged"
        warnings.warn(f"ignoring {kind} checkpoint {path} ({problem}); trying the one before it", stacklevel=2)
    raise UsageError(f"--resume auto: no complete checkpoint under {checkpoints_dir(output_dir)}")


def check_fingerprint(path: Path, fingerprint: dict, force: bool) -> None:
    """Refuse to resume when anything that shapes the result changed, unless forced."""
    saved = _read_json(path / "fingerprint.json")
    changed = [k for k in ("config", "data") if saved.get(k) != fingerprint.get(k)]
    if not changed:
        return
    what = " and ".join({"config": "the training config", "data": "the training data"}[k] for k in changed)
    if force:
        warnings.warn(f"resuming from {path} although {what} changed (--resume-force)", stacklevel=2)
        return
    diff = _config_diff(saved.get("config_values", {}), fingerprint.get("config_values", {}))
    raise ResumeRefused(f"cannot resume from {path}: {what} changed since it was saved{diff}. "
                        "Pass --resume-force to resume anyway, or use a new --output-dir.")


def _config_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return (" (" + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5]) + ")") if keys else ""


def rotate(output_dir: str | Path, limit: int, keep: set[Path]) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit``; never the newest, nor any in ``keep``."""
    if limit <= 0:
        return []
    complete = [path for _, path, ok in list_checkpoints(output_dir) if ok]
    protected = {p.resolve() for p in keep} | ({complete[-1].resolve()} if complete else set())
    removable = [p for p in complete if p.resolve() not in protected]
    excess = len(complete) - max(limit, len(protected & {p.resolve() for p in complete}))
    removed = removable[:max(excess, 0)]
    for path in removed:
        shutil.rmtree(path)
    return removed


# What a finished run writes at the top of its directory (run.py, the adapter or full weights and the
# tokenizer). clear_run removes exactly these, never the whole folder: an output_dir may be "." or hold
# the user's own files.
RUN_FILES = (RUN_INFO, CONFIG, METRICS, LOSS_PLOT, MODEL_CARD, "adapter_config.json",
             "adapter_model.safetensors", "config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")
RUN_PATTERNS = ("model-*-of-*.safetensors",)
RUN_DIRS = (CHECKPOINTS, TENSORBOARD)


def clear_run(output_dir: str | Path) -> list[Path]:
    """Remove an earlier run's checkpoints and run files from ``output_dir`` (for output.overwrite),
    so its checkpoints can neither be rotated in place of the new run's nor picked by --resume auto.
    Returns what was removed; other files are left alone."""
    out = Path(output_dir)
    found = [out / name for name in (*RUN_DIRS, *RUN_FILES)]
    found += [p for pattern in RUN_PATTERNS for p in out.glob(pattern)]
    removed = []
    for path in found:  # tolerant of a path gone meanwhile: every process of a launch may call this
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path)
    return removed
