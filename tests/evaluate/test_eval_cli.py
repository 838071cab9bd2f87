"""`tunesmith eval` end to end through the command table, on a tiny LoRA run and its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import shared_data, write_jsonl
from tests.evaluate.test_pipeline import make_lora_run
from tunesmith.cli import main
from tunesmith.output import fmt_delta, fmt_number


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("cli-run"), tiny_model_dir, seed=2)


def test_eval_run_on_identity_with_compare_base(tiny_run, tmp_path, capsys):
    data = shared_data("identity.json")
    rows = json.loads(data.read_text(encoding="utf-8"))
    out = tmp_path / "eval"
    code = main(["eval", str(tiny_run), "--data", str(data), "--compare", "base", "--out", str(out),
                 "--max-new-tokens", "4", "--batch-size", "16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "delta" in printed and f"report: {out / 'report.md'}" in printed.replace("\n", "")
    report = (out / "report.md").read_text(encoding="utf-8")
    header = next(line for line in report.splitlines() if line.startswith("| metric |"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == [_base_label(out), "delta"]
    rouge_row = next(line for line in report.splitlines() if line.startswith("| rougeL |"))
    assert len([c for c in rouge_row.strip("|").split("|")]) == 4  # metric, run, base, delta
    for name in ("predictions.jsonl", "predictions.base.jsonl"):
        lines = (out / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(rows)
        assert json.loads(lines[0])["reference"] == rows[0]["output"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compare_metrics"]["n"] == metrics["metrics"]["n"] == len(rows)


def _base_label(out: Path) -> str:
    compare = json.loads((out / "metrics.json").read_text())["compare"]
    return f"base ({Path(compare[6:-1]).name})"


def test_predictions_json_output_is_clean(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prediction": "Paris", "reference": "Paris"},
                                              {"prediction": "巴黎", "reference": "北京"}])
    assert main(["eval", "--predictions", str(path), "--json", "--metrics", "exact_match,rouge"]) == 0
    document = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    assert document["metrics"]["exact_match"] == 0.5
    assert document["metrics"]["rouge1"] == pytest.approx(0.5)


def test_bad_predictions_line_exits_with_file_and_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prediction": "a", "reference": "a"}, {"reference": "b"}])
    assert main(["eval", "--predictions", str(path)]) == 1
    assert f"{path}:2: field 'prediction': missing" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["eval", "some-model"],
    ["eval", "--data", "x.jsonl"],
    ["eval", "--predictions", "p.jsonl", "--compare", "base"],
    ["eval", "--predictions", "p.jsonl", "--metrics", "rouge,nope"],
])
def test_usage_errors(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_eval_reports_generation_progress_with_an_eta_to_a_log(tiny_run, tmp_path, capsys, monkeypatch):
    """stderr to a file (as under pytest): with the reporting interval at 0, a line per token step, the answers
    done climbing within one batch (a fraction shown whole) and an ETA; --help names the token cap."""
    import re

    from tunesmith import output

    data = write_jsonl(tmp_path / "held.jsonl", [{"instruction": f"question {i}?", "output": "answer"}
                                                 for i in range(6)])
    monkeypatch.setattr(output, "PIPE_REPORT_S", 0.0)
    assert main(["eval", str(tiny_run), "--data", str(data), "--out", str(tmp_path / "eval"), "--metrics",
                 "exact_match", "--max-new-tokens", "12", "--batch-size", "6"]) == 0
    lines = re.findall(r"generating \(.*?\): (\d+)/6 answers \((\d+)%\), [\d:]+ elapsed(, about [\d:]+ left)?",
                       capsys.readouterr().err)
    shares = [int(share) for _, share, _ in lines]
    assert len(lines) >= 6 and shares == sorted(shares) and shares[-1] == 100
    assert any(0 < int(share) < 100 and eta for _, share, eta in lines)  # inside the one batch, with an ETA
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 256)" in capsys.readouterr().out.split("--max-new-tokens MAX_NEW_TOKENS\n", 1)[1][:200]


def _pair_rows(chosen: list[str], rejected: list[str]) -> list[dict]:
    return [{"prompt": f"Question {i}: what is the capital of France?", "chosen": c, "rejected": r}
            for i, (c, r) in enumerate(zip(chosen, rejected, strict=True))]


def _closer_by_hand(records: list[dict], rows: list[dict]) -> float:
    """closer_to_chosen from a predictions file and the pairs it answered: 1 nearer chosen, 0.5 a tie, 0 else."""
    from tunesmith.evaluate.metrics import token_f1

    assert [r["index"] for r in records] == list(range(len(rows)))
    votes = []
    for record, row in zip(records, rows, strict=True):
        assert record["reference"] == row["chosen"] and record["rejected"] == row["rejected"]
        chosen, rejected = token_f1(record["prediction"], row["chosen"]), token_f1(record["prediction"], row["rejected"])
        votes.append(1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0)
    return sum(votes) / len(votes)


def test_eval_on_pairs_reports_closer_to_chosen_for_the_run_and_its_base(tiny_run, tmp_path, capsys):
    rows = _pair_rows(["Paris is the capital."] * 6, ["I do not know."] * 6)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    first = tmp_path / "first"
    flags = ["--compare", "base", "--max-new-tokens", "8", "--batch-size", "6", "--metrics", "exact_match"]
    assert main(["eval", str(tiny_run), "--data", str(data), "--out", str(first), "--json", *flags]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == {**json.loads((first / "metrics.json").read_text()), "paths": document["paths"]}
    for metrics, name in ((document["metrics"], "predictions.jsonl"),
                          (document["compare_metrics"], "predictions.base.jsonl")):
        assert 0 <= metrics["closer_to_chosen"] <= 1 and "f1_chosen_minus_rejected" in metrics
        assert metrics["closer_to_chosen"] == pytest.approx(_closer_by_hand(_lines(first / name), rows))
    assert "closer_to_chosen" in document["deltas"]

    # The random models say nothing like either answer (every pair a tie); pairs whose chosen answer is what the
    # base said and whose rejected answer is what the run said must then put the base at 1 and the run below it.
    said = [r["prediction"] for r in _lines(first / "predictions.base.jsonl")]
    run_said = [r["prediction"] for r in _lines(first / "predictions.jsonl")]
    assert all(a != b for a, b in zip(said, run_said, strict=True))
    rows = _pair_rows(said, run_said)
    second = tmp_path / "second"
    assert main(["eval", str(tiny_run), "--data", str(write_jsonl(tmp_path / "said.jsonl", rows)),
                 "--out", str(second), *flags]) == 0
    table = next(line.split("\t") for line in capsys.readouterr().out.splitlines()
                 if line.startswith("closer_to_chosen\t"))
    document = json.loads((second / "metrics.json").read_text())
    tuned, base = document["metrics"]["closer_to_chosen"], document["compare_metrics"]["closer_to_chosen"]
    assert base == 1.0 == _closer_by_hand(_lines(second / "predictions.base.jsonl"), rows)
    assert tuned < 0.5 and tuned == pytest.approx(_closer_by_hand(_lines(second / "predictions.jsonl"), rows))
    assert table[1:] == [fmt_number(tuned), fmt_number(base), fmt_delta(tuned - base)]
    # a predictions file that keeps the rejected answers scores the same with no model
    assert main(["eval", "--predictions", str(second / "predictions.jsonl"), "--json", "--metrics", "exact_match"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["closer_to_chosen"] == tuned


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(("likelihood", "behaviour", "flagged"), [(0.5, 0.0, True), (0.3, 0.09, True),
                                                                     (0.5, 0.1, False), (0.29, 0.0, False)])
def test_a_likelihood_rise_without_a_behaviour_rise_is_flagged(likelihood, behaviour, flagged, capsys):
    from tunesmith.evaluate.commands import print_summary
    from tunesmith.evaluate.pipeline import EvalResult
    from tunesmith.evaluate.report import render_markdown

    tuned = {"preference_accuracy": 0.5 + likelihood, "closer_to_chosen": 0.5 + behaviour}
    result = EvalResult(model="run", data="pairs.jsonl", metrics=tuned, predictions=[], compare="base",
                        compare_metrics={"preference_accuracy": 0.5, "closer_to_chosen": 0.5},
                        deltas={"preference_accuracy": likelihood, "closer_to_chosen": behaviour})
    print_summary(result)
    line = "likelihood moved but behaviour did not"
    assert (line in capsys.readouterr().out) == flagged
    assert (line in render_markdown(result, {})) == flagged
