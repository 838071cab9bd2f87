"""Generation precision: bf16 only where the hardware has it (or when asked), fp32 when forced; eval records it."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import write_jsonl
from tests.evaluate.test_pipeline import QA, make_lora_run
from tunesmith import inference
from tunesmith.errors import UsageError
from tunesmith.evaluate import pipeline
from tunesmith.evaluate.pipeline import evaluate
from tunesmith.inference import for_generation, generation_dtype, native_bf16, precision_name

FAST = {"max_new_tokens": 6, "batch_size": 4, "progress": False}


def _cpu_has_bf16(monkeypatch, avx512_bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("avx512_bf16", "amx", "auto"), [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, torch.float32)])
def test_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, auto):
    _cpu_has_bf16(monkeypatch, avx512_bf16, amx)
    assert native_bf16("cpu") == (auto == torch.bfloat16)
    assert generation_dtype("auto", "cpu") == auto
    assert generation_dtype("fp32", "cpu") == torch.float32
    assert generation_dtype("bf16", "cpu") == torch.bfloat16  # asked for: emulated where not native
    assert not native_bf16("mps")


def test_auto_on_cuda_follows_the_gpu(monkeypatch):
    _cpu_has_bf16(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert generation_dtype("auto", "cuda:0") == dtype


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="precision must be one of auto, bf16, fp32, not 'fp16'"):
        generation_dtype("fp16")
    assert [precision_name(d) for d in (torch.bfloat16, torch.float32, torch.float16)] == ["bf16", "fp32", "fp16"]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    return make_lora_run(tmp_path_factory.mktemp("run"), tiny_model_dir)


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])


@pytest.fixture
def generation_dtypes(monkeypatch):
    """The dtype of the model each generate call ran on."""
    seen = []
    real = inference.generate

    def spy(model, *args, **kwargs):
        seen.append(model.dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(inference, "generate", spy)  # what `tunesmith generate` calls
    monkeypatch.setattr(pipeline, "generate", spy)  # the name the eval pipeline calls
    return seen


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_eval_generates_in_bf16_where_supported_and_records_it(tiny_run, qa_file, tmp_path, monkeypatch,
                                                               generation_dtypes, native, expected):
    _cpu_has_bf16(monkeypatch, native)
    out = tmp_path / "eval"
    result = evaluate(str(tiny_run), str(qa_file), out=str(out), compare="base", **FAST)
    assert result.options["precision"] == expected
    assert generation_dtypes == [torch.bfloat16 if native else torch.float32] * 2  # the run and its base
    assert json.loads((out / "metrics.json").read_text())["options"]["precision"] == expected
    assert f"precision {expected}" in (out / "report.md").read_text(encoding="utf-8")


def test_fp32_forced_on_bf16_hardware(tiny_run, qa_file, monkeypatch, generation_dtypes):
    """fp32 generates in fp32 and answers as the batched model.generate always did; perplexity never changes."""
    from tests.evaluate.test_generation import _decoded, _old_path
    from tunesmith.models.load import load

    _cpu_has_bf16(monkeypatch, True)
    forced = evaluate(str(tiny_run), str(qa_file), precision="fp32", **FAST)
    assert forced.options["precision"] == "fp32" and generation_dtypes == [torch.float32]
    loaded = load(str(tiny_run), dtype=torch.float32, device="cpu")
    prompts = [r["rendered_prompt"] for r in forced.predictions]
    ordered = sorted(prompts, key=lambda p: -len(loaded.tokenizer(p, add_special_tokens=False)["input_ids"]))
    old = {}
    for i in range(0, len(ordered), 4):  # the old path on the batches eval makes
        batch = ordered[i:i + 4]
        old.update(zip(batch, _decoded(loaded.tokenizer, _old_path(loaded.model, loaded.tokenizer, batch, 6)),
                       strict=True))
    assert [r["prediction"] for r in forced.predictions] == [old[p] for p in prompts]
    auto = evaluate(str(tiny_run), str(qa_file), **FAST)
    assert auto.options["precision"] == "bf16" and generation_dtypes[-1] == torch.bfloat16
    assert auto.metrics["eval_loss"] == forced.metrics["eval_loss"]  # measured before the cast, in fp32 both times


def test_predictions_of_another_precision_are_not_resumed(tiny_run, qa_file, tmp_path, monkeypatch, capsys):
    _cpu_has_bf16(monkeypatch, True)
    out = tmp_path / "eval"
    evaluate(str(tiny_run), str(qa_file), out=str(out), metrics="rouge", **FAST)
    evaluate(str(tiny_run), str(qa_file), out=str(out), metrics="rouge", precision="fp32", **FAST)
    assert "was written for another model, data or generation options" in capsys.readouterr().err


def test_cli_precision_flag(tiny_run, qa_file, tmp_path, monkeypatch, capsys, generation_dtypes):
    from tunesmith.cli import main

    _cpu_has_bf16(monkeypatch, True)
    assert main(["eval", str(tiny_run), "--data", str(qa_file), "--precision", "fp32", "--max-new-tokens", "4",
                 "--metrics", "rouge", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["precision"] == "fp32"
    assert generation_dtypes == [torch.float32]
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_run), "--data", str(qa_file), "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    assert main(["generate", str(tiny_run), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert generation_dtypes[-1] == torch.bfloat16


def test_an_adapter_is_merged_for_bf16_and_kept_separate_for_fp32(tiny_run, tiny_model_dir):
    from peft import PeftModel

    from tunesmith.models.load import load

    def logits(model):
        ids = torch.tensor([[5, 17, 42, 99, 7]])
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    adapter = load(str(tiny_run), dtype=torch.float32, device="cpu").model
    kept = for_generation(adapter, "fp32")
    assert isinstance(kept, PeftModel) and kept.dtype == torch.float32
    tuned = logits(kept)
    merged = for_generation(load(str(tiny_run), dtype=torch.float32, device="cpu").model, "bf16")
    assert not isinstance(merged, PeftModel) and merged.dtype == torch.bfloat16
    base = logits(load(str(tiny_model_dir), dtype=torch.float32, device="cpu").model)
    # The adapter's effect survives the merge: the merged bf16 model is far nearer the tuned model than the base.
    assert (logits(merged) - tuned).abs().max() < 0.2 * (base - tuned).abs().max()
