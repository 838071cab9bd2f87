"""evaluate(): generation, scoring, resume, before-vs-after comparison and the report, on a tiny LoRA run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.evaluate.pipeline import evaluate, make_settings, read_predictions_file, score_file

QA = [("hi", "Hello! I am Aurora."), ("Who are you?", "I am Aurora, an AI assistant."),
      ("What is the capital of France?", "The capital of France is Paris."), ("你好", "你好，我是 Aurora。"),
      ("Explain machine learning in one sentence.", "Machine learning lets computers learn from data."),
      ("weather", "I cannot check the weather.")]
FAST = {"max_new_tokens": 6, "batch_size": 4, "progress": False}


def make_lora_run(run: Path, base: Path, seed: int = 1, info: dict | None = None) -> Path:
    """A run directory like training writes: a peft adapter at the root, the tokenizer, tunesmith.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(base).save_pretrained(run)
    (run / "tunesmith.json").write_text(json.dumps({"base_model": str(base), **(info or {})}))
    return run


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("run"), tiny_model_dir)


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_compare_base_writes_both_columns(tiny_run, qa_file, tmp_path):
    out = tmp_path / "eval"
    result = evaluate(str(tiny_run), str(qa_file), compare="base", out=str(out), **FAST)
    assert result.compare.startswith("base") and result.compare_metrics is not None
    for key in ("rougeL", "bleu", "chrf", "exact_match", "tokens_per_s", "latency_mean_s", "perplexity", "eval_loss"):
        assert key in result.metrics and key in result.compare_metrics
        assert result.deltas[key] == pytest.approx(result.metrics[key] - result.compare_metrics[key])
    # The adapter is random and non-zero: the two models really differ.
    assert result.metrics["perplexity"] != result.compare_metrics["perplexity"]
    assert result.metrics["supervised_tokens"] == result.compare_metrics["supervised_tokens"] > 0
    report = (out / "report.md").read_text(encoding="utf-8")
    header = next(line for line in report.splitlines() if line.startswith("| metric |"))
    cells = [cell.strip() for cell in header.strip("|").split("|")]
    assert cells[0] == "metric" and Path(cells[1]).name == tiny_run.name
    assert cells[2] == f"base ({Path(result.compare[6:-1]).name})" and cells[3] == "delta"
    assert "## Worst examples by ROUGE-L" in report and "## Sample predictions" in report
    for name in ("metric_deltas.png", "lengths.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["rougeL"] == result.metrics["rougeL"] and saved["deltas"] == result.deltas
    for name, predictions in (("predictions.jsonl", result.predictions),
                              ("predictions.base.jsonl", result.compare_predictions)):
        rows = _lines(out / name)
        assert [r["index"] for r in rows] == list(range(len(QA)))
        assert [r["reference"] for r in rows] == [a for _, a in QA]
        assert [r["prediction"] for r in rows] == [p["prediction"] for p in predictions]
        assert all(r["latency_s"] > 0 and 0 < r["completion_tokens"] <= 6 for r in rows)


def test_predictions_file_scores_back_to_the_same_metrics(tiny_run, qa_file, tmp_path):
    result = evaluate(str(tiny_run), str(qa_file), out=str(tmp_path / "eval"), metrics="rouge,bleu,chrf", **FAST)
    rescored = score_file(tmp_path / "eval" / "predictions.jsonl", metrics="rouge,bleu,chrf")
    for key in ("rouge1", "rougeL", "bleu", "chrf"):
        assert rescored.metrics[key] == result.metrics[key]
    assert "perplexity" not in result.metrics  # not asked for


def test_resume_skips_done_indices_only_for_the_same_fingerprint(tiny_run, qa_file, tmp_path):
    out = tmp_path / "eval"
    evaluate(str(tiny_run), str(qa_file), out=str(out), metrics="rouge", **FAST)
    path = out / "predictions.jsonl"
    rows = _lines(path)
    rows[1]["prediction"] = "KEPT FROM THE FIRST RUN"
    # An interrupted run: two complete lines and half of a third.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(rows[2])[:25], encoding="utf-8")
    resumed = evaluate(str(tiny_run), str(qa_file), out=str(out), metrics="rouge", **FAST)
    assert resumed.predictions[1]["prediction"] == "KEPT FROM THE FIRST RUN"
    assert [r["prediction"] for i, r in enumerate(resumed.predictions) if i != 1] == \
        [r["prediction"] for i, r in enumerate(rows) if i != 1]
    assert [r["index"] for r in _lines(path)] == list(range(len(QA)))
    # Other generation options: the old predictions do not count.
    changed = evaluate(str(tiny_run), str(qa_file), out=str(out), metrics="rouge", **{**FAST, "max_new_tokens": 5})
    assert "KEPT FROM THE FIRST RUN" not in [r["prediction"] for r in changed.predictions]
    assert all(r["completion_tokens"] <= 5 for r in _lines(path))


def test_run_system_prompt_is_used_for_the_run_and_its_base(tiny_model_dir, qa_file, tmp_path):
    run = make_lora_run(tmp_path / "run", tiny_model_dir, info={"system_prompt": "You are Zed."})
    result = evaluate(str(run), str(qa_file), compare="base", metrics="exact_match", limit=2, **FAST)
    assert len(result.predictions) == 2
    for record in result.predictions + result.compare_predictions:
        assert record["rendered_prompt"].startswith("<|im_start|>system\nYou are Zed.<|im_end|>")


def test_compare_base_needs_a_run(tiny_model_dir, qa_file):
    with pytest.raises(UsageError, match="--compare base needs a run"):
        evaluate(str(tiny_model_dir), str(qa_file), compare="base", **FAST)


def test_metric_names_and_labels_are_checked_before_generation():
    with pytest.raises(UsageError, match="unknown metric"):
        make_settings("rouge,blue", None)
    with pytest.raises(UsageError, match="needs labels"):
        make_settings(["classification"], None)
    settings = make_settings(None, "yes,no")
    assert "classification" in settings.metrics and settings.perplexity and settings.labels == ["yes", "no"]


def test_score_file_with_labels_and_report(tmp_path):
    rows = [{"prediction": "not_entailment", "reference": "x", "label": "not_entailment"},
            {"prediction": "entailment", "reference": "y", "label": "entailment"},
            {"prediction": "maybe", "reference": "z", "label": "entailment"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    result = score_file(path, metrics="classification,exact_match", labels="entailment,not_entailment",
                        out=str(tmp_path / "out"))
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)
    assert result.metrics["invalid_predictions"] == 1
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Classification" in report and "| not_entailment |" in report
    assert (tmp_path / "out" / "metrics.png").is_file()
    with pytest.raises(UsageError, match="perplexity needs a model"):
        score_file(path, metrics="perplexity")


@pytest.mark.parametrize(("line", "message"), [
    ('{"prediction": "a"}', ":2: field 'reference': missing"),
    ('{"prediction": 3, "reference": "a"}', ":2: field 'prediction': expected a string, got int"),
    ('{"prediction": "a", "reference": "b", "label": ["x"]}', ":2: field 'label': expected a string"),
    ('{"prediction": "a", ', ":2: not valid JSON"),
    ('["a", "b"]', ":2: expected a JSON object"),
])
def test_bad_prediction_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prediction": "a", "reference": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TunesmithError) as info:
        read_predictions_file(path)
    assert str(path) + message in str(info.value)


def test_data_without_reference_is_refused(tiny_run, tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}])
    with pytest.raises(TunesmithError, match="no assistant turn"):
        evaluate(str(tiny_run), str(path), **FAST)


def test_tunesmith_evaluate_is_callable_even_after_submodule_imports(tiny_run):
    import tunesmith
    import tunesmith.evaluate.metrics  # binds the package to tunesmith.evaluate
    from tunesmith.data.conversation import Conversation, Message

    conv = Conversation([Message("user", "hi"), Message("assistant", "Hello!")], source="mem", line=1)
    result = tunesmith.evaluate(str(tiny_run), [conv], metrics=["exact_match"], **FAST)
    assert result.predictions[0]["reference"] == "Hello!" and "exact_match" in result.metrics
    with pytest.raises(UsageError, match="no evaluation data"):
        tunesmith.evaluate(str(tiny_run), [], **FAST)


def test_perplexity_cuts_examples_at_the_runs_max_length_for_the_run_and_its_base(tiny_model_dir, qa_file, tmp_path):
    """Eval loss is the quantity training validated: examples cut at the run's max_length (it used the model's
    whole context, so a run trained on short rows was scored on tokens it never saw)."""
    whole = evaluate(str(make_lora_run(tmp_path / "long", tiny_model_dir)), str(qa_file), metrics="perplexity", **FAST)
    run = make_lora_run(tmp_path / "short", tiny_model_dir, info={"max_length": 8})
    short = evaluate(str(run), str(qa_file), compare="base", metrics="perplexity", **FAST)
    assert 0 < short.metrics["supervised_tokens"] == short.compare_metrics["supervised_tokens"] \
        < whole.metrics["supervised_tokens"]


def test_a_run_records_the_max_length_eval_cuts_at(tmp_path):
    from tunesmith.config import load_config
    from tunesmith.run import write_run_info

    config = load_config(None, ["data.max_length=96"])
    info = write_run_info(tmp_path, config, base_model_path=tmp_path, steps=1, data_fingerprint="x",
                          final_train_loss=1.0, final_eval_loss=None)
    assert info["max_length"] == json.loads((tmp_path / "tunesmith.json").read_text())["max_length"] == 96
