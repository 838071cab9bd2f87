"""Several processes: DDP, FSDP2 or DeepSpeed, as the ``accelerate launch`` config says, on GPUs and on CPU.

- DDP (``distributed_type: MULTI_GPU``, or a launch on CPU with no FSDP config): every process holds the whole
  model; gradients are averaged.
- FSDP2 (``distributed_type: FSDP``, ``fsdp_version: 2``): parameters, gradients and optimizer state are sharded
  (each parameter a DTensor, each process holding a part); checkpoints hold the trainable tensors' shards (torch
  distributed checkpoint, train/checkpoint.py), the run directory the gathered weights.
- DeepSpeed ZeRO-2/3 (``distributed_type: DEEPSPEED``): through accelerate, on CUDA GPUs only.

On CPU (gloo), accelerate 1.16 never enables FSDP: ``AcceleratorState`` switches to ``DistributedType.FSDP`` only
for GPU-like backends and leaves a CPU launch as ``MULTI_CPU``, which wraps the model in DDP without a word. torch's
FSDP2 itself runs on gloo, so ``make_accelerator`` sets the state as FSDP, with the plugin accelerate builds from
the launch's ``FSDP_*`` variables, and everything after that (prepare, get_state_dict, clip_grad_norm_) is
accelerate's own FSDP2 path, the one GPUs take; checkpoints (train/checkpoint.py) are the same on both. That is
what the CPU tests run.
DeepSpeed is not forced the same way: it needs its own accelerator and communication backend (deepspeed 0.19.8's
CPU accelerator, tried with 2 gloo processes, made no progress in accelerate's set-up). A DeepSpeed config on CPU
trains without DeepSpeed, as DDP across its processes, and the run says so in one line.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import accelerate
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

from tunesmith.errors import UsageError


def _launch_asks(kind: str) -> bool:
    """Whether ``accelerate launch`` was given an FSDP or DeepSpeed config (it says so in the environment)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def make_accelerator(mixed_precision: str) -> Accelerator:
    """The run's Accelerator: what the launch config asked for, FSDP2 on CPU included (see the module docstring)."""
    cpu = not torch.cuda.is_available()
    if _launch_asks("DEEPSPEED"):
        _check_deepspeed(cpu)
    # cpu=True without CUDA: accelerate then treats torchrun/accelerate-launch ranks as gloo data-parallel.
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if cpu and accelerator.num_processes > 1 and _launch_asks("FSDP"):
        _enable_fsdp_on_cpu(accelerator, mixed_precision)
    return accelerator


def _check_deepspeed(cpu: bool) -> None:
    """A DeepSpeed launch: on GPUs deepspeed must be installed; on CPU it trains without DeepSpeed, and says so."""
    if not cpu:
        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError("the accelerate config asks for DeepSpeed, which is not installed: "
                             "pip install deepspeed (or launch with examples/accelerate/fsdp.yaml)")
        return
    # With cpu=True accelerate never uses DeepSpeed, but it would still build the plugin, which needs the package.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    if PartialState(cpu=True).is_main_process:
        print("note: DeepSpeed runs on CUDA GPUs only; on CPU this launch trains without it, as plain data-parallel "
              "(DDP) across its processes", file=sys.stderr, flush=True)


def _enable_fsdp_on_cpu(accelerator: Accelerator, mixed_precision: str) -> None:
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables that accelerate launch set
    if plugin.fsdp_version != 2:
        raise UsageError("FSDP on CPU runs with fsdp_version: 2 (FSDP2) only; set it in the accelerate config "
                         "(examples/accelerate/fsdp.yaml does)")
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:  # the attributes set above are accelerate's internals, tested with 1.16
        raise UsageError(f"FSDP on CPU: accelerate {accelerate.__version__} did not take the FSDP2 state "
                         "(tested with accelerate 1.16); run this config on GPUs, or use DDP on CPU")


def shards_parameters(accelerator) -> bool:
    """Whether the model's parameters or optimizer state are split across processes (FSDP, DeepSpeed)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def sharding_line(model, processes: int) -> str | None:
    """One line saying how FSDP2 split the parameters (this process's part of the whole), or None if it did not."""
    params = list(model.parameters())
    if not params or not all(isinstance(p, DTensor) for p in params):
        return None
    total = sum(p.numel() for p in params)
    local = sum(p.to_local().numel() for p in params)
    return (f"FSDP2: {len(params)} parameter tensors sharded over {processes} processes; this one holds "
            f"{local:,} of {total:,} values")
