"""Atomic checkpoints and resume.

A checkpoint is ``output_dir/checkpoints/step-N/`` holding the trainable weights, the optimizer
and scheduler states, every process's RNG states (python, numpy, torch, cuda), the data position
(``state.json``: epoch, micro-batch index within the epoch, the epoch's order seed) and the
resolved config with the config and data fingerprints. It is written into a temporary folder,
every file fsynced, renamed into place, and only then marked with ``COMPLETE``: a folder without
the marker is an interrupted save and is never resumed from.

Only the trainable tensors are saved (an adapter is megabytes where the full model is gigabytes);
the frozen base is reloaded from the base model. Under FSDP or DeepSpeed, where parameters and
optimizer state are sharded across processes, accelerate's save_state/load_state write and read
the shards instead.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError, UsageError

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeRefused(UsageError):
    pass


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def assert_finite(model, step: int) -> None:
    """Refuse to save weights holding NaN or inf."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            raise TunesmithError(f"step {step}: parameter {name} holds non-finite values; no checkpoint written")


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict, config_yaml: str,
                    fingerprint: dict, output_dir: str | Path) -> Path:
    """Write ``checkpoints/step-N`` atomically from every process; returns the final path."""
    from tunesmith.train.methods import trainable_state_dict

    root = checkpoints_dir(output_dir)
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}"
    unwrapped = accelerator.unwrap_model(model)
    assert_finite(unwrapped, state["step"])
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save of this same step
        shutil.rmtree(final, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _is_sharded(accelerator):
        accelerator.save_state(str(tmp))
    else:
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_file(trainable_state_dict(unwrapped), tmp / "weights.safetensors")
            kill_point("during-checkpoint", state["step"])
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / "state.json", state)
        _write_json(tmp / "fingerprint.json", fingerprint)
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        _publish(tmp, final)
    accelerator.wait_for_everyone()
    return final


def kill_point(stage: str, step: int) -> None:
    """TUNESMITH_TEST_KILL=STAGE:N SIGKILLs this process at STAGE of step N, so tests can prove
    that a run killed mid-save or right after a save resumes exactly (never set in normal use)."""
    if os.environ.get("TUNESMITH_TEST_KILL") == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _publish(tmp: Path, final: Path) -> None:
    for path in tmp.iterdir():
        _fsync_file(path)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    marker = final / COMPLETE
    marker.write_text("ok\n")
    _fsync_file(marker)
    _fsync_dir(final)


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; return the saved training state."""
    if _is_sharded(accelerator):
        accelerator.load_state(str(path))
    else:
        weights = load_file(path / "weights.safetensors")
        missing = set(weights) - set(accelerator.unwrap_model(model).state_dict())
        if missing:
            raise UsageError(f"{path}: checkpoint weights do not match this model (e.g. {sorted(missing)[0]})")
        accelerator.unwrap_model(model).load_state_dict(weights, strict=False)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng-{accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise UsageError(f"{path}: no RNG state for process {accelerator.process_index} "
                             "(saved with fewer processes?); resume with the same number of processes")
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "state.json").read_text())


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every step-N folder, oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path, (path / COMPLETE).is_file()))
    return sorted(found)


def find_resume(output_dir: str | Path, spec: str) -> Path:
    """``auto``: the newest complete checkpoint under output_dir; otherwise ``spec`` is a checkpoint path."""
    if spec != "auto":
        path = Path(spec)
        if not (path / COMPLETE).is_file():
            raise UsageError(f"--resume {spec}: not a complete checkpoint (no {COMPLETE} marker)")
        return path
    complete = None
    for _, path, ok in list_checkpoints(output_dir):
        if ok:
            complete = path
        else:
            warnings.warn(f"ignoring incomplete checkpoint {path} (interrupted while saving)", stacklevel=2)
    if complete is None:
        raise UsageError(f"--resume auto: no complete checkpoint under {checkpoints_dir(output_dir)}")
    return complete


def check_fingerprint(path: Path, fingerprint: dict, force: bool) -> None:
    """Refuse to resume when anything that shapes the result changed, unless forced."""
    saved = json.loads((path / "fingerprint.json").read_text())
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
