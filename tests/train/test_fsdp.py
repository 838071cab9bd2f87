"""FSDP through accelerate on 2 CPU processes (gloo), against one process with the same global batch.

The run is launched the way the docs say, `accelerate launch --config_file examples/accelerate/fsdp.yaml`,
with the file set to 2 CPU processes. It must succeed and follow the single-process loss curve (as the DDP test
does). Whether the model was actually sharded shows in the checkpoint: under FSDP, accelerate's
save_state writes the weights and the optimizer as sharded folders (pytorch_model_fsdp_0, optimizer_0).

accelerate 1.15 does not shard on CPU (see FSDP_ON_CPU), so that last check ends in an explicit xfail
naming the reason; every other failure (launch, losses, weights) fails the test as usual.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.train.helpers import read_losses, tiny_config, tiny_overrides
from tunesmith.train.loop import finetune

FSDP_ON_CPU = (
    "FSDP on CPU is not possible through accelerate 1.15: AcceleratorState switches to DistributedType.FSDP "
    "(ACCELERATE_USE_FSDP / `distributed_type: FSDP`) only for GPU-like backends (MULTI_GPU, MULTI_NPU, "
    "MULTI_XPU, ...); on 2 CPU processes (use_cpu: true) it stays DistributedType.MULTI_CPU and wraps the model in "
    "DistributedDataParallel, with no error, so the run is plain DDP over gloo. torch 2.13 itself runs FSDP1 "
    "and FSDP2 (fully_shard) on CPU with gloo; there is no torch error.")

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_config(tmp_path) -> str:
    """examples/accelerate/fsdp.yaml for 2 CPU processes, fp32.

    `use_cpu: true` in the file, not `accelerate launch --cpu`: with the flag, accelerate 1.15 picks its
    simple launcher and starts one process, whatever --num_processes says.
    """
    config = yaml.safe_load((REPO / "examples" / "accelerate" / "fsdp.yaml").read_text())
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")
    path = tmp_path / "fsdp-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate's launcher is not installed")
def test_fsdp_two_cpu_processes_match_one(tiny_model_dir, chat_file, tmp_path):
    # pack_length pinned: left to the run plan, it shortens rows when there are more processes per step.
    extra = {"train__max_steps": 8, "method__dropout": 0.0, "output__save_every": 8, "data__pack_length": 64}
    single = tmp_path / "single"
    finetune(tiny_config(tiny_model_dir, chat_file, single, train__grad_accum=2, **extra))

    sharded = tmp_path / "fsdp"
    overrides = tiny_overrides(tiny_model_dir, chat_file, sharded, train__grad_accum=1, **extra)
    flags = [arg for item in overrides for arg in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])]
    launch = [ACCELERATE, "launch", "--config_file", cpu_config(tmp_path), "--main_process_port", str(free_port()),
              "-m", "tunesmith.cli", "train", *flags]
    done = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ours, theirs = read_losses(sharded), read_losses(single)
    assert len(ours) == len(theirs) == 8
    assert ours == pytest.approx(theirs, rel=1e-5)
    a, b = load_file(sharded / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train

    checkpoint = sharded / "checkpoints" / "step-8"
    if not any("fsdp" in p.name for p in checkpoint.iterdir()):
        pytest.xfail(FSDP_ON_CPU)
