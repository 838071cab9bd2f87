"""The training loop on the tiny model: learning, the run directory, methods, safety stops."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import chat_rows, read_losses, tiny_config, write_chat
from tunesmith.errors import UsageError
from tunesmith.train.loop import TrainingDiverged, finetune


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_lora_30_steps_learns_and_loads_with_plain_peft(tiny_model_dir, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.models.load import load

    run = tmp_path / "run"
    result = finetune(tiny_config(tiny_model_dir, chat_file, run, train__max_steps=30, data__val_size=8,
                                  eval__eval_every=10))
    losses = read_losses(run)
    assert result.steps == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert result.final_eval_loss is not None and result.supervised_tokens > 0

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml",
                 "metrics.jsonl", "loss.png", "README.md", "tunesmith.json"):
        assert (run / name).is_file(), name
    info = json.loads((run / "tunesmith.json").read_text())
    assert info["base_model"] == str(tiny_model_dir) and info["method"] == "lora" and info["steps"] == 30
    assert len(info["data_fingerprint"]) == 64 and math.isfinite(info["final_train_loss"])
    card = (run / "README.md").read_text()
    assert str(tiny_model_dir) in card and "lora r=16" in card and "| steps | 30 " in card
    assert f"{info['final_eval_loss']:.4f}" in card

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = [5, 17, 42, 99, 2, 7, 11]
    base_logits = _logits(base, ids)
    plain = PeftModel.from_pretrained(base, str(run)).eval()
    ours = load(run, dtype=torch.float32, device="cpu")
    diff = (_logits(plain, ids) - _logits(ours.model, ids)).abs().max().item()
    assert diff < 1e-5
    assert (_logits(plain, ids) - base_logits).abs().max().item() > 1e-3  # the adapter is not a no-op
    assert ours.tokenizer.chat_template  # the template used in training travels with the run


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "full", "freeze"])
def test_methods_train_the_right_parameters(method, tiny_model_dir, chat_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = tmp_path / method
    result = finetune(tiny_config(tiny_model_dir, chat_file, run, method__name=method, train__max_steps=2,
                                  method__trainable_layers=1))
    assert result.steps == 2 and math.isfinite(result.final_train_loss)
    assert "trainable" in capsys.readouterr().err  # the parameter counts are printed, as in the seed
    if method in ("lora", "dora", "rslora"):
        adapter = json.loads((run / "adapter_config.json").read_text())
        assert adapter["use_dora"] is (method == "dora") and adapter["use_rslora"] is (method == "rslora")
        assert any("lora_magnitude" in k for k in load_file(run / "adapter_model.safetensors")) is (method == "dora")
        return
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    if method == "full":
        assert any("layers.0." in k for k in changed) and any("layers.1." in k for k in changed)
    else:  # freeze: only the last layer (and the final norm) moved
        assert changed and all("layers.1." in k or k == "model.norm.weight" for k in changed), changed


def test_qlora_on_cpu_fails_before_loading_a_model(chat_file, tmp_path):
    from tunesmith.config import load_config

    # A model name that does not exist: reaching the loader would raise a different error.
    config = load_config(None, ["method.name=qlora", "model.name=no-such-model", f"data.path={chat_file}",
                                f"output.output_dir={tmp_path / 'q'}"])
    with pytest.raises(UsageError, match="qlora needs a CUDA GPU"):
        finetune(config)


def test_non_finite_loss_stops_naming_the_step_and_saves_no_nan(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "nan"
    config = tiny_config(tiny_model_dir, chat_file, run, train__lr=1e30, train__warmup_steps=0,
                         train__max_grad_norm=0, output__save_every=1, train__scheduler="constant")
    with pytest.raises(TrainingDiverged, match=r"step \d+: non-finite") as info:
        finetune(config)
    step = int(str(info.value).split()[1].rstrip(":"))
    assert step >= 2
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert [p.name for p in saved][-1] == f"step-{step - 1}"  # nothing for the diverged step
    for path in saved:
        for tensor in load_file(path / "weights.safetensors").values():
            assert torch.isfinite(tensor).all()


def test_eval_keeps_and_loads_the_best_and_stops_early(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "es"
    # A learning rate this high makes the validation loss rise after a few steps.
    config = tiny_config(tiny_model_dir, chat_file, run, train__max_steps=40, data__val_size=8, eval__eval_every=2,
                         eval__early_stopping_patience=2, train__lr=0.3, train__scheduler="constant",
                         output__save_total_limit=1, method__name="full")
    result = finetune(config)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    best_step, best = min(evals, key=lambda e: e[1])
    assert result.stopped_early and result.steps < 40 and result.steps == evals[-1][0]
    assert result.final_eval_loss == pytest.approx(best)
    assert (run / "checkpoints" / f"step-{best_step}" / "COMPLETE").is_file()  # rotation kept the best

    from accelerate.utils import DistributedType

    from tunesmith.models.load import load
    from tunesmith.train.loop import evaluate_loss, prepare_data

    loaded = load(run, dtype=torch.float32, device="cpu")
    data = prepare_data(config, loaded.tokenizer)

    class Single:  # the few Accelerator members evaluate_loss uses, for one process
        process_index, num_processes, device = 0, 1, torch.device("cpu")
        distributed_type = DistributedType.NO

        def autocast(self):
            return torch.autocast("cpu", enabled=False)

        def reduce(self, tensor, reduction):
            return tensor

    assert evaluate_loss(Single(), loaded.model, data.val, config, 3) == pytest.approx(best, rel=1e-5)


def test_existing_run_is_not_overwritten(tiny_model_dir, chat_file, tmp_path):
    run = tmp_path / "once"
    finetune(tiny_config(tiny_model_dir, chat_file, run, train__max_steps=1))
    with pytest.raises(UsageError, match="already holds a run"):
        finetune(tiny_config(tiny_model_dir, chat_file, run, train__max_steps=1))


def test_loss_is_token_weighted_over_the_whole_step(tiny_model_dir, chat_file, tmp_path):
    # The same 4 packed rows per step, as 1 micro-batch of 4 or 4 micro-batches of 1: rows hold
    # different numbers of supervised tokens, so a per-micro-batch mean would differ.
    one = finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "one", train__batch_size=4, train__grad_accum=1,
                               train__max_steps=4, method__dropout=0))
    four = finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "four", train__batch_size=1,
                                train__grad_accum=4, train__max_steps=4, method__dropout=0))
    assert one.supervised_tokens == four.supervised_tokens
    assert read_losses(tmp_path / "four") == pytest.approx(read_losses(tmp_path / "one"), rel=1e-5)


def test_micro_batches_in_pieces_give_the_same_losses(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    from tunesmith.train import loop

    settings = {"train__batch_size": 4, "train__grad_accum": 1, "train__max_steps": 4, "method__dropout": 0}
    finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "whole", **settings))
    monkeypatch.setattr(loop, "CPU_FORWARD_TOKENS", 64)  # rows of up to 64 tokens: a forward/backward per row
    pieces = []
    original = loop._pieces
    monkeypatch.setattr(loop, "_pieces", lambda *args: pieces.append(original(*args)) or pieces[-1])
    finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "pieces", **settings))
    assert pieces and all(len(p) == 4 for p in pieces)
    assert read_losses(tmp_path / "pieces") == pytest.approx(read_losses(tmp_path / "whole"), rel=1e-5)


def test_frozen_weights_in_bf16_change_no_bf16_loss(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    from tunesmith.train import loop, methods

    if not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("bf16 autocast needs AVX512-BF16 here")
    held = []
    monkeypatch.setattr(loop, "hold_frozen_weights",
                        lambda model, dtype, hold=methods.hold_frozen_weights: held.append(hold(model, dtype)))
    settings = {"train__precision": "bf16", "train__max_steps": 3, "method__dropout": 0}
    finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "held", **settings))
    assert held == [2 * 7 + 1]  # 2 layers x 7 linear layers (q/k/v/o base layers, gate/up/down), the output head
    monkeypatch.setattr(loop, "_hold_frozen_in_compute_dtype", lambda model, config: None)
    finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "cast", **settings))
    assert read_losses(tmp_path / "held") == pytest.approx(read_losses(tmp_path / "cast"), rel=1e-6)


def test_padded_batches_and_bf16_autocast_train_too(tiny_model_dir, chat_file, tmp_path):
    # bf16 after fp32 runs in the same process: accelerate's process-wide state must not refuse it.
    result = finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "padded", data__packing=False,
                                  train__max_steps=3, train__precision="bf16"))
    assert result.steps == 3 and math.isfinite(result.final_train_loss)


def test_tensorboard_when_asked(tiny_model_dir, chat_file, tmp_path):
    import importlib.util

    config = tiny_config(tiny_model_dir, chat_file, tmp_path / "tb", output__tensorboard=True, train__max_steps=1)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UsageError, match="pip install tensorboard"):
            finetune(config)
        assert not (tmp_path / "tb").exists()  # refused before anything was written
    else:
        finetune(config)
        assert list((tmp_path / "tb" / "tensorboard").glob("events.*"))


def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, chat_file, tmp_path):
    plain = tmp_path / "plain"
    finetune(tiny_config(tiny_model_dir, chat_file, plain, train__max_steps=3, method__dropout=0))
    checkpointed = tmp_path / "gc"
    finetune(tiny_config(tiny_model_dir, chat_file, checkpointed, train__max_steps=3, method__dropout=0,
                         model__gradient_checkpointing=True))
    assert read_losses(checkpointed) == pytest.approx(read_losses(plain), rel=1e-5)


def test_fp16_is_refused_on_cpu(tiny_model_dir, chat_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    with pytest.raises(UsageError, match="fp16 needs CUDA"):
        finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "fp16", train__precision="fp16"))


def test_examples_without_supervised_tokens_are_reported_not_silently_dropped(tiny_model_dir, tmp_path, capsys):
    rows = chat_rows(10)
    # Only the last turn is supervised (last_turn_only), and this row's last turn has weight 0.
    rows[3]["messages"] += [{"role": "user", "content": "And then?"},
                            {"role": "assistant", "content": "Nothing more.", "weight": 0}]
    data = write_chat(tmp_path / "weighted.jsonl", rows)
    finetune(tiny_config(tiny_model_dir, data, tmp_path / "run", train__max_steps=1, data__last_turn_only=True))
    out = capsys.readouterr()
    assert "skipped 1 example(s) with no supervised token" in out.out + out.err
    assert "weighted.jsonl:4" in out.out + out.err
