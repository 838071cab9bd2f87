"""Data-parallel training: 2 CPU processes (gloo, torchrun) follow the single-process loss curve.

Both runs take the same global batch per optimizer step (2 processes x 1 micro-batch against
1 process x 2 micro-batches, over the same data layout), and the loss is normalised by the
supervised tokens of the whole step, so the gradients agree up to the order of float sums.
Tolerance: 1e-5 relative on every step's loss and 1e-4 absolute on the final adapter weights (fp32).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import read_losses, tiny_config, tiny_overrides
from tunesmith.train.loop import finetune


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun is not installed")
def test_two_processes_match_one_and_refuse_another_world_size(tiny_model_dir, chat_file, tmp_path):
    extra = {"train__max_steps": 8, "method__dropout": 0.0, "output__save_every": 4}
    single = tmp_path / "single"
    finetune(tiny_config(tiny_model_dir, chat_file, single, train__grad_accum=2, **extra))

    double = tmp_path / "double"
    overrides = tiny_overrides(tiny_model_dir, chat_file, double, train__grad_accum=1, **extra)
    flags = [arg for item in overrides for arg in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])]
    done = _train(flags, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run saved to") == 1  # only the first process reports and writes

    ours, theirs = read_losses(double), read_losses(single)
    assert len(ours) == len(theirs) == 8
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert sorted(p.name for p in (double / "checkpoints" / "step-8").glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]
    a, b = load_file(double / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train

    # Resuming with another process count is refused, naming both counts and the global batch: 2 -> 1 would
    # silently halve the batch, 1 -> 2 would find no data position for the second process.
    halved = _train([*flags, "--resume", "auto"], processes=1)
    assert halved.returncode == 2, halved.stderr[-3000:]
    assert "written by 2 process(es), a global batch of 2 x 2 = 4 micro-batch rows" in halved.stderr
    assert "this run has 1, which would make it 2" in halved.stderr and "Traceback" not in halved.stderr
    single_flags = [arg for item in tiny_overrides(tiny_model_dir, chat_file, single, train__grad_accum=2, **extra)
                    for arg in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])]
    doubled = _train([*single_flags, "--resume", "auto"], processes=2)
    assert doubled.returncode != 0
    assert "written by 1 process(es)" in doubled.stderr and "bug in tunesmith" not in doubled.stderr


def _train(flags: list[str], processes: int) -> subprocess.CompletedProcess:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launch = [torchrun, "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "tunesmith.cli", "train", *flags], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
