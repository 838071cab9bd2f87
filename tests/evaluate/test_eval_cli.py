"""`tunesmith eval` end to end through the command table, on a tiny LoRA run and its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import shared_data, write_jsonl
from tests.evaluate.test_pipeline import make_lora_run
from tunesmith.cli import main


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
