"""FSDP2 on 2 CPU processes (gloo), launched the way the README says for GPUs, against one process.

`accelerate launch --config_file examples/accelerate/fsdp.yaml` with the file set to 2 CPU processes (fp32). On CPU
accelerate would quietly run DDP; train/parallel.py puts it on its FSDP2 path, and these tests prove it did:
every parameter is a DTensor of which each process holds a part (the run says so), and the checkpoint's
distributed-checkpoint metadata shows each LoRA tensor written in two parts, one per process's file.

One process with 4 micro-batches per step and 2 processes with 2 each see the same global batch over the same
layout, so every step's loss and lr, every held-out loss and the final adapter agree to 1e-5 (fp32; measured
3e-7 on the adapter). The layout is chosen so that FSDP's collectives are tested where processes' shares differ:
one micro-batch per row, 19 rows, so step 5's window has 3 micro-batches (2 on one process, 1 on the other), and
5 held-out examples in batches of 2 (3 batches over 2 processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.train.helpers import chat_rows, tiny_config, tiny_overrides, write_chat
from tunesmith.run import read_metrics
from tunesmith.train.checkpoint import ResumeRefused, check_sharding
from tunesmith.train.loop import finetune

ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
needs_launcher = pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate's launcher is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_config(tmp_path, name: str = "fsdp.yaml") -> str:
    """An examples/accelerate launch config for 2 CPU processes, fp32.

    `use_cpu: true` in the file, not `accelerate launch --cpu`: with the flag, accelerate picks its
    simple launcher and starts one process, whatever --num_processes says.
    """
    config = yaml.safe_load((REPO / "examples" / "accelerate" / name).read_text())
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")
    path = tmp_path / f"cpu-{name}"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def flags(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])]


def launch(config: str, args: list[str], **env) -> subprocess.CompletedProcess:
    command = [ACCELERATE, "launch", "--config_file", config, "--main_process_port", str(free_port()),
               "-m", "tunesmith.cli", "train", *args]
    # a launch takes under a minute here; processes out of step under FSDP wait for each other for ever
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=300)


def steps(run_dir) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("eval_loss"), r.get("initial_eval_loss"))
            for r in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_curve(ours: list[tuple], theirs: list[tuple]) -> None:
    assert [r[0] for r in ours] == [r[0] for r in theirs] == list(range(9))
    for a, b in zip(ours, theirs, strict=True):
        assert [x is None for x in a] == [x is None for x in b], f"step {a[0]}: {a} against {b}"
        numbers = [(x, y) for x, y in zip(a[1:], b[1:], strict=True) if x is not None]
        assert [x for x, _ in numbers] == pytest.approx([y for _, y in numbers], rel=1e-5, abs=0), \
            f"step {a[0]}: {a} against {b}"


def assert_written_in_shards(sharded_dir) -> None:
    """The distributed checkpoint holds the LoRA tensors and their Adam moments and nothing of the frozen base;
    each LoRA tensor in two chunks of rows, in the two processes' files."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(sharded_dir)).read_metadata()
    model = {fqn: meta for fqn, meta in metadata.state_dict_metadata.items() if fqn.startswith("model.")}
    assert len(model) == 28 and all("lora_" in fqn for fqn in model)  # 2 layers x 7 projections x (A, B)
    moments = [fqn for fqn in metadata.state_dict_metadata if fqn.startswith("optimizer.state.")]
    assert len(moments) == 3 * 28 and all("lora_" in fqn for fqn in moments)  # step, exp_avg, exp_avg_sq
    for fqn, meta in model.items():
        assert len(meta.chunks) == 2, fqn
        assert sorted(c.offsets[0] for c in meta.chunks) == [0, meta.size[0] // 2], fqn
    files = {info.relative_path for index, info in metadata.storage_data.items() if "lora_" in index.fqn}
    assert files == {"__0_0.distcp", "__1_0.distcp"}


def logits_through_peft(base_dir, adapter_dir, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_fsdp_checkpoint_and_unsharded_checkpoint_do_not_resume_each_other(tiny_model_dir, chat_file, tmp_path):
    finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "run", train__max_steps=2, output__save_every=2))
    unsharded = tmp_path / "run" / "checkpoints" / "step-2"
    check_sharding(unsharded, sharded=False)
    with pytest.raises(ResumeRefused, match="written without sharding .one process or DDP., and this launch runs "
                                            "with sharded parameters .FSDP or DeepSpeed."):
        check_sharding(unsharded, sharded=True)
    fsdp = tmp_path / "fsdp"  # an FSDP checkpoint's distributed checkpoint folder
    (fsdp / "sharded").mkdir(parents=True)
    deepspeed = tmp_path / "deepspeed"  # what accelerate's save_state writes besides the shards: an RNG file a process
    deepspeed.mkdir()
    for rank in (0, 1):
        (deepspeed / f"random_states_{rank}.pkl").write_bytes(b"")
    for sharded in (fsdp, deepspeed):
        check_sharding(sharded, sharded=True)
        with pytest.raises(ResumeRefused, match="written with sharded parameters"):
            check_sharding(sharded, sharded=False)


@needs_launcher
@pytest.mark.slow  # two launches of two processes each: about a minute here
def test_fsdp2_shards_trains_evaluates_and_resumes_like_one_process(tiny_model_dir, chat_file, tmp_path):
    val = write_chat(tmp_path / "val.jsonl", chat_rows(5, offset=100))
    extra = {"train__max_steps": 8, "train__batch_size": 1, "method__dropout": 0.0, "output__save_every": 4,
             "data__pack_length": 64, "data__eval_path": val, "eval__eval_every": 4, "eval__batch_size": 2}
    single = tmp_path / "single"
    finetune(tiny_config(tiny_model_dir, chat_file, single, train__grad_accum=4, **extra))

    sharded = tmp_path / "fsdp"
    args = flags(tiny_overrides(tiny_model_dir, chat_file, sharded, train__grad_accum=2, **extra))
    config = cpu_config(tmp_path)
    killed = launch(config, args, TUNESMITH_TEST_KILL="during-step:6")  # SIGKILL in the middle of step 6
    assert f"exitcode  : -{int(signal.SIGKILL)}" in killed.stderr, killed.stderr[-3000:]
    assert sorted(p.name for p in (sharded / "checkpoints").iterdir()) == ["step-4"]

    resumed = launch(config, [*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    # Sharded for real: every parameter a DTensor, this process holding half of the values.
    assert "FSDP2: 49 parameter tensors sharded over 2 processes; this one holds 91,808 of 183,616 values" \
        in resumed.stderr
    checkpoint = sharded / "checkpoints" / "step-8"
    assert_written_in_shards(checkpoint / "sharded")
    assert (checkpoint / "scheduler.pt").is_file()

    # Every step's loss and lr, the held-out losses (before training, steps 4 and 8): as one process.
    assert_same_curve(steps(sharded), steps(single))
    assert steps(sharded)[5][2] == pytest.approx(0.00375)  # step 5 continues the schedule, not its warmup

    a, b = load_file(sharded / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train
    input_ids = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, theirs = (logits_through_peft(tiny_model_dir, run, input_ids) for run in (sharded, single))
    assert (ours - theirs).abs().max().item() < 1e-5

    # The world size changed: one process refuses the two processes' checkpoint, naming both and the batch.
    alone = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *args, "--resume", "auto"],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2, alone.stderr[-3000:]
    assert "written by 2 process(es), a global batch of 2 x 2 = 4 micro-batch rows" in alone.stderr
    assert "this run has 1, which would make it 2" in alone.stderr and "Traceback" not in alone.stderr


@needs_launcher
@pytest.mark.slow  # one launch of two processes: about half a minute here
def test_fsdp2_early_stopping_loads_the_best_sharded_checkpoint(tiny_model_dir, chat_file, tmp_path):
    """The held-out loss rises from step 2 to step 4 (lr 0.02), so the run stops and loads step 2's checkpoint,
    which under FSDP holds shards and no weights.safetensors: the run's adapter is that checkpoint's, exactly."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    val = write_chat(tmp_path / "val.jsonl", chat_rows(5, offset=100))
    extra = {"train__max_steps": 8, "train__batch_size": 1, "method__dropout": 0.0, "output__save_every": 0,
             "data__pack_length": 64, "data__eval_path": val, "eval__eval_every": 2, "eval__batch_size": 2,
             "eval__early_stopping_patience": 1, "train__lr": 0.02}
    single = tmp_path / "single"
    finetune(tiny_config(tiny_model_dir, chat_file, single, train__grad_accum=4, **extra))

    sharded = tmp_path / "fsdp"
    done = launch(cpu_config(tmp_path), flags(tiny_overrides(tiny_model_dir, chat_file, sharded, train__grad_accum=2,
                                                             **extra)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "early stopping at step 4" in done.stderr and "loaded the best checkpoint (step 2," in done.stderr
    best = sharded / "checkpoints" / "step-2"
    assert not (best / "weights.safetensors").exists()
    dcp_to_torch_save(best / "sharded", tmp_path / "best.pt")
    saved = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    adapter = load_file(sharded / "adapter_model.safetensors")
    assert len(adapter) == len(saved) == 28  # the trainable tensors only, no frozen base
    assert all(torch.equal(adapter[k], saved[k.replace(".weight", ".default.weight")]) for k in adapter)
    # and as one process, which loads its own best checkpoint the same way (Adam's first steps amplify the
    # float-sum differences at this lr: 6e-5 measured)
    theirs = load_file(single / "adapter_model.safetensors")
    assert max((adapter[k] - theirs[k]).abs().max().item() for k in adapter) < 1e-4
