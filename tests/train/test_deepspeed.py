"""DeepSpeed as far as a CPU allows: the launch configs, and a DeepSpeed launch on CPU.

DeepSpeed ZeRO-2/3 themselves run on CUDA GPUs only, through accelerate; nothing here trains with DeepSpeed.
What is tested: the example configs load as accelerate configs and leave gradient accumulation and clipping to
tunesmith's own options, and a process started by a DeepSpeed launch on CPU (accelerate sets
ACCELERATE_USE_DEEPSPEED=true for it) trains without DeepSpeed and says so, instead of failing on the missing
package or running as something else without a word.
"""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from tests.conftest import REPO
from tests.train.helpers import read_losses, tiny_config
from tunesmith.config import Config
from tunesmith.train.loop import finetune

EXAMPLES = REPO / "examples" / "accelerate"


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_launch_configs_leave_accumulation_and_clipping_to_tunesmith(name, stage):
    config = load_config_from_file(str(EXAMPLES / name))
    assert config.distributed_type == DistributedType.DEEPSPEED
    deepspeed = config.deepspeed_config
    assert deepspeed["zero_stage"] == stage
    assert deepspeed["gradient_accumulation_steps"] == 1  # the loop accumulates itself (train.grad_accum)
    assert deepspeed["gradient_clipping"] == Config().train.max_grad_norm


def test_fsdp_launch_config_asks_for_fsdp2():
    config = load_config_from_file(str(EXAMPLES / "fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2


def test_deepspeed_launch_on_cpu_trains_without_it_and_says_so(tiny_model_dir, chat_file, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DeepSpeed config
    result = finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "run", train__max_steps=3))
    assert result.steps == 3 and len(read_losses(tmp_path / "run")) == 3
    assert "DeepSpeed runs on CUDA GPUs only; on CPU this launch trains without it" in capsys.readouterr().err
