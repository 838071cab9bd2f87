"""Checkpoint safety: nothing in a run directory runs code on resume; damaged, incomplete or
unwritable checkpoints are reported and never cost the previous good one; overwrite starts clean."""

from __future__ import annotations

import errno
import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import read_losses, tiny_config
from tunesmith.errors import UsageError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.checkpoint import COMPLETE, CheckpointWriteError, clear_run, list_checkpoints
from tunesmith.train.loop import finetune


class WritesMarker:
    """Unpickling this calls open(marker, "w"): the file appearing means the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _run(model, data, out, **extra):
    return finetune(tiny_config(model, data, out, **extra))


def _rewrite_manifest(path):
    """What a forger would do: make the COMPLETE marker agree with the files now there."""
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*")
             if p.is_file() and p.name != COMPLETE}
    (path / COMPLETE).write_text(json.dumps({"files": files}))


@pytest.fixture
def saved_run(tiny_model_dir, chat_file, tmp_path):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path / "run"
    _run(tiny_model_dir, chat_file, out, train__max_steps=4, output__save_every=2)
    assert [(s, ok) for s, _, ok in list_checkpoints(out)] == [(2, True), (4, True)]
    return out


def test_a_pickled_payload_in_optimizer_pt_is_refused_without_running(saved_run, tiny_model_dir, chat_file, tmp_path):
    step = saved_run / "checkpoints" / "step-4"
    marker = tmp_path / "pwned"
    torch.save({"state": {0: WritesMarker(marker)}, "param_groups": []}, step / "optimizer.pt")
    _rewrite_manifest(step)
    assert ckpt.damage(step) is None  # a well-formed file: only the loader can refuse it

    with pytest.raises(UsageError, match=r"optimizer\.pt: refused to load.*could run code"):
        _run(tiny_model_dir, chat_file, saved_run, train__max_steps=4, output__save_every=2, train__resume=str(step))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_plain_pickle_is_refused_too(saved_run, tmp_path, name):
    path = saved_run / "checkpoints" / "step-4" / name
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps(WritesMarker(marker)))  # not torch's zip format: the legacy path
    with pytest.raises(UsageError, match=name):
        ckpt.safe_torch_load(path)
    assert not marker.exists()


def test_rng_state_is_json_and_restores_every_generator():
    import random

    import numpy as np

    state = json.loads(json.dumps(ckpt.rng_state()))  # survives a JSON round trip
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize(("name", "what"), [("optimizer.pt", "the optimizer state"),
                                            ("rng-0.json", "the random number generator state")])
def test_a_checkpoint_missing_its_optimizer_or_rng_state_fails_naming_it(saved_run, tiny_model_dir, chat_file,
                                                                         name, what):
    step = saved_run / "checkpoints" / "step-4"
    (step / name).unlink()
    # Named explicitly, the damaged checkpoint is an error, never a silent fallback.
    with pytest.raises(UsageError, match=rf"damaged: {name} is missing"):
        _run(tiny_model_dir, chat_file, saved_run, train__max_steps=4, train__resume=str(step))
    # Past the marker check (a checkpoint from before markers listed files), loading still names it.
    (step / COMPLETE).write_text("ok\n")
    with pytest.raises(UsageError, match=rf"missing {name} \({what}\)"):
        _run(tiny_model_dir, chat_file, saved_run, train__max_steps=4, train__resume=str(step))


def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_one_resumes(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    _run(tiny_model_dir, chat_file, out, train__max_steps=6, output__save_every=2, output__save_total_limit=0)
    finished = load_file(out / "adapter_model.safetensors")
    losses = read_losses(out)
    newest = out / "checkpoints" / "step-6" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    with pytest.warns(UserWarning, match=r"ignoring damaged checkpoint .*step-6 \(optimizer\.pt is \d+ bytes"):
        assert ckpt.find_resume(out, "auto").name == "step-4"
    with pytest.warns(UserWarning, match="damaged checkpoint"):
        result = _run(tiny_model_dir, chat_file, out, train__max_steps=6, output__save_every=2,
                      output__save_total_limit=0, train__resume="auto")
    assert result.steps == 6
    resumed = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], finished[k]) for k in finished)  # steps 5 and 6 redone exactly
    assert read_losses(out) == losses


def test_corruption_that_keeps_the_size_is_caught_by_the_checksums(saved_run):
    path = saved_run / "checkpoints" / "step-4" / "optimizer.pt"
    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    header = largest.header_offset
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + \
        int.from_bytes(data[header + 28:header + 30], "little")
    data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])  # same size, other bytes
    path.write_bytes(bytes(data))
    assert "optimizer.pt" in (ckpt.damage(path.parent) or "")


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_resumable(tiny_model_dir, chat_file, tmp_path,
                                                                                 monkeypatch):
    straight = tmp_path / "straight"
    _run(tiny_model_dir, chat_file, straight, train__max_steps=6, output__save_every=2)

    out = tmp_path / "run"
    real_save_file = ckpt.save_file

    def disk_full_at_step_4(tensors, path, *args, **kwargs):
        if "step-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", disk_full_at_step_4)
    with pytest.raises(CheckpointWriteError, match=r"step 4: .*the disk is full.*step-2 is intact.*--resume auto"):
        _run(tiny_model_dir, chat_file, out, train__max_steps=6, output__save_every=2)
    assert [(s, ok) for s, _, ok in list_checkpoints(out)] == [(2, True)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # no half-written temp folder
    assert ckpt.damage(out / "checkpoints" / "step-2") is None

    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # space freed
    _run(tiny_model_dir, chat_file, out, train__max_steps=6, output__save_every=2, train__resume="auto")
    assert read_losses(out) == read_losses(straight)


def test_overwrite_removes_the_old_runs_checkpoints(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    _run(tiny_model_dir, chat_file, out, train__max_steps=6, output__save_every=2, output__save_total_limit=0)
    (out / "notes.txt").write_text("mine")
    _run(tiny_model_dir, chat_file, out, train__max_steps=2, output__save_every=2, output__overwrite=True)
    # Only the new run's checkpoint: the old step-4 and step-6 can no longer be resumed as this run's.
    assert [(s, ok) for s, _, ok in list_checkpoints(out)] == [(2, True)]
    assert len(read_losses(out)) == 2
    assert (out / "notes.txt").read_text() == "mine"  # files tunesmith did not write are left alone


def test_clear_run_removes_only_run_files(tmp_path):
    for name in ("tunesmith.json", "metrics.jsonl", "adapter_model.safetensors", "model-00001-of-00002.safetensors",
                 "data.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    removed = clear_run(tmp_path)
    assert sorted(p.name for p in removed) == ["adapter_model.safetensors", "checkpoints", "metrics.jsonl",
                                               "model-00001-of-00002.safetensors", "tunesmith.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_fsdp_metadata_pickles_are_checked_before_torch_reads_them(tmp_path):
    """Sharded (FSDP) checkpoints keep their layout in a .metadata file that torch.distributed.checkpoint
    reads with plain pickle.load: a real one passes the check, a forged one is refused unread."""
    import warnings

    import torch.distributed.checkpoint as dcp

    step = tmp_path / "step-4"
    state = {"model": {"w": torch.randn(3, 4)},
             "optim": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-process save: torch warns that no process group exists
        dcp.save(state, checkpoint_id=step / ckpt.SHARDED)
    ckpt.check_sharded_metadata(step)

    marker = tmp_path / "pwned"
    (step / ckpt.SHARDED / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(UsageError, match=r"\.metadata: refused to load.*io\.open is not allowed"):
        ckpt.check_sharded_metadata(step)
    assert not marker.exists()
