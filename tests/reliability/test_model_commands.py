"""`train`, `eval` and `eval --predictions` on every hostile input, on the tiny in-process model.

The commands run through the CLI's own entry (`tunesmith.cli.main`, the function the `tunesmith`
script calls) with the output captured; one case of each also runs in a fresh interpreter. A bad
input must stop before any file is written: no adapter, no checkpoint, no predictions, no report.
"""

from __future__ import annotations

import json

import pytest

from tests.reliability.conftest import Outcome, cli, files_under
from tests.reliability.corpus import INVALID, PAIRS_FOR_SFT, PREDICTION_CASES, VALID, build
from tunesmith.cli import main

VALID_PREDICTIONS = [c for c in PREDICTION_CASES if c.code == 0]
INVALID_PREDICTIONS = [c for c in PREDICTION_CASES if c.code != 0]


def run_main(capfd, *argv) -> Outcome:
    code = main([str(a) for a in argv])
    captured = capfd.readouterr()
    return Outcome(code, captured.out + captured.err)


def train_argv(model, data, out) -> list:
    return ["train", "--model.name", model, "--data.path", data, "--output.output_dir", out, "--train.max_steps", 1,
            "--data.max_length", 64, "--train.batch_size", 1, "--train.grad_accum", 1, "--train.precision", "fp32",
            "--train.lr", 1e-3]


def eval_argv(model, data, out) -> list:
    return ["eval", model, "--data", data, "--out", out, "--max-new-tokens", 2, "--metrics", "exact_match,rouge",
            "--batch-size", 8]


@pytest.mark.parametrize("case", INVALID, ids=[c.name for c in INVALID])
def test_train_refuses_bad_data_before_writing(case, tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "run"
    # Pair data is trained with a preference objective (as SFT it is refused whole, naming --method.objective).
    objective = ["--objective", "dpo"] if case.name.startswith("preference") else []
    run_main(capfd, *train_argv(tiny_model_dir, build(case, tmp_path), out), *objective).check(case, tmp_path)
    assert files_under(out) == []


def test_preference_pairs_given_to_sft_training_name_the_objective(tiny_model_dir, tmp_path, capfd):
    data = build(PAIRS_FOR_SFT, tmp_path)
    checked = run_main(capfd, "data", "check", data, "--no-tokens")  # read, and shown as what they are
    assert checked.code == 0 and "preference pairs" in checked.out and f"valid {PAIRS_FOR_SFT.examples}," in checked.out
    out = tmp_path / "run"
    run_main(capfd, *train_argv(tiny_model_dir, data, out)).check(PAIRS_FOR_SFT, tmp_path)
    assert files_under(out) == []
    trained = run_main(capfd, *train_argv(tiny_model_dir, data, out), "--objective", "dpo")
    assert trained.code == 0 and "Traceback" not in trained.out, trained.out[-3000:]


@pytest.mark.parametrize("case", VALID, ids=[c.name for c in VALID])
def test_train_reads_valid_oddities(case, tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "run"
    result = run_main(capfd, *train_argv(tiny_model_dir, build(case, tmp_path), out))
    assert result.code == 0 and "Traceback" not in result.out, result.out[-3000:]
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("case", INVALID, ids=[c.name for c in INVALID])
def test_eval_refuses_bad_data_before_writing(case, tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "report"
    run_main(capfd, *eval_argv(tiny_model_dir, build(case, tmp_path), out)).check(case, tmp_path)
    assert files_under(out) == []


@pytest.mark.parametrize("case", [c for c in VALID if c.name != "huge_example"],
                         ids=[c.name for c in VALID if c.name != "huge_example"])
def test_eval_reads_valid_oddities(case, tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "report"
    result = run_main(capfd, *eval_argv(tiny_model_dir, build(case, tmp_path), out))
    assert result.code == 0 and "Traceback" not in result.out, result.out[-3000:]
    assert len((out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()) == case.examples


def test_eval_names_a_prompt_longer_than_the_context(tiny_model_dir, tmp_path, capfd):
    """The 5 MB example is valid data, but no 512-token model can answer it: named, not an out-of-memory crash."""
    case = next(c for c in VALID if c.name == "huge_example")
    out = tmp_path / "report"
    result = run_main(capfd, *eval_argv(tiny_model_dir, build(case, tmp_path), out))
    assert result.code == 1 and "Traceback" not in result.out, result.out[-3000:]
    assert f"{tmp_path / case.name / 'huge.jsonl'}:1: messages: the prompt is" in result.out
    assert "exceeds the model's context of 512 tokens" in result.out
    assert files_under(out) == []


@pytest.mark.parametrize("case", INVALID_PREDICTIONS, ids=[c.name for c in INVALID_PREDICTIONS])
def test_scoring_refuses_bad_predictions(case, tmp_path, capfd):
    out = tmp_path / "report"
    run_main(capfd, "eval", "--predictions", build(case, tmp_path), "--out", out).check(case, tmp_path)
    assert files_under(out) == []


@pytest.mark.parametrize("case", VALID_PREDICTIONS, ids=[c.name for c in VALID_PREDICTIONS])
def test_scoring_reads_valid_oddities(case, tmp_path, capfd):
    result = run_main(capfd, "eval", "--predictions", build(case, tmp_path), "--json", "--metrics", "exact_match")
    assert result.code == 0 and "Traceback" not in result.out, result.out[-3000:]
    assert json.loads(result.out)["metrics"]["n"] == case.examples


def test_fresh_interpreter_train_and_eval(tiny_model_dir, tmp_path):
    """The same guarantees when the CLI is its own process: the exit code is the process's."""
    bad = next(c for c in INVALID if c.name == "latin1_byte")
    data = build(bad, tmp_path)
    cli(*train_argv(tiny_model_dir, data, tmp_path / "run")).check(bad, tmp_path)
    cli(*eval_argv(tiny_model_dir, data, tmp_path / "report")).check(bad, tmp_path)
    assert files_under(tmp_path / "run") == files_under(tmp_path / "report") == []
    good = build(next(c for c in VALID if c.name == "bom"), tmp_path)
    result = cli(*train_argv(tiny_model_dir, good, tmp_path / "run"))
    assert result.code == 0 and "Traceback" not in result.out, result.out[-3000:]


def test_train_reads_latin1_with_data_encoding(tiny_model_dir, tmp_path, capfd):
    data = tmp_path / "latin1.csv"
    data.write_bytes("instruction,output\nCafé ou thé ?,Un café.\nOù ?,Ici.\n".encode("latin-1"))
    out = tmp_path / "run"
    result = run_main(capfd, *train_argv(tiny_model_dir, data, out), "--data.encoding", "latin-1")
    assert result.code == 0, result.out[-3000:]


def test_eval_and_scoring_read_other_encodings_when_told(tiny_model_dir, tmp_path, capfd):
    data = tmp_path / "latin1.csv"
    data.write_bytes("instruction,output\nCafé ou thé ?,Un café.\n".encode("latin-1"))
    refused = run_main(capfd, *eval_argv(tiny_model_dir, data, tmp_path / "refused"))
    assert refused.code == 1 and f"{data}:2 (encoding): byte 0xe9" in refused.out
    read = run_main(capfd, *eval_argv(tiny_model_dir, data, tmp_path / "report"), "--encoding", "latin-1")
    assert read.code == 0, read.out[-3000:]
    assert json.loads((tmp_path / "report" / "predictions.jsonl").read_text(encoding="utf-8"))["reference"] == "Un café."
    predictions = tmp_path / "p.jsonl"
    predictions.write_bytes('{"prediction": "café", "reference": "café"}\n'.encode("cp1252"))
    assert run_main(capfd, "eval", "--predictions", predictions).code == 1
    scored = run_main(capfd, "eval", "--predictions", predictions, "--json", "--metrics", "exact_match",
                      "--encoding", "cp1252")
    assert scored.code == 0 and json.loads(scored.out)["metrics"]["exact_match"] == 1.0
