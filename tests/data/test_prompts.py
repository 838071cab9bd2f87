"""Prompt-only data for GRPO and reward evaluation: every layout, every file type, fields kept, errors located."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl
from tunesmith.data.prompts import load_prompts, read_prompts
from tunesmith.data.readers import DataError


def test_every_prompt_layout_is_read_with_its_other_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], "answer": "hi"},
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}], "answer": "A2"},
        {"conversations": [{"from": "human", "value": "Sharegpt?"}], "answer": "yes"},
        {"instruction": "Add.", "input": "1 and 2", "answer": "3"},
    ])
    rows = load_prompts(path)
    assert [r.text for r in rows] == ["What is 2 + 2?", "Hi?", "Q2", "Sharegpt?", "Add.\n1 and 2"]
    assert [r.fields for r in rows] == [{"answer": a} for a in ("4", "hi", "A2", "yes", "3")]
    assert rows[1].conversation.system == "Be brief."
    assert [m.role for m in rows[2].conversation.messages] == ["user", "assistant", "user"]
    assert rows[0].where == f"{path}:1" and rows[4].where == f"{path}:5"


def test_csv_parquet_and_json_arrays(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    csv = tmp_path / "p.csv"
    csv.write_text('prompt,answer,tests\n"What is 3, plus 4?",7,"[1, 2]"\n'
                   '"[{""role"": ""user"", ""content"": ""hello""}]",x,[]\n', encoding="utf-8")
    rows = load_prompts(csv)
    assert [r.text for r in rows] == ["What is 3, plus 4?", "hello"]
    assert rows[0].fields == {"answer": "7", "tests": "[1, 2]"} and rows[1].where == f"{csv}:3"

    table = pyarrow.table({"instruction": ["Say hi", "Say bye"], "solution": [1, 2]})
    pq.write_table(table, tmp_path / "p.parquet")
    rows = load_prompts(tmp_path / "p.parquet")
    assert [(r.text, r.fields["solution"]) for r in rows] == [("Say hi", 1), ("Say bye", 2)]

    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a", "answer": 1}]), encoding="utf-8")
    assert load_prompts(tmp_path / "p.json")[0].where == f"{tmp_path / 'p.json'}[0]"


def test_bad_rows_are_named_with_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "fine", "answer": "1"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "answer": "2"},
        {"question": "no prompt column", "answer": "3"},
        {"prompt": "", "answer": "4"},
        {"prompt": "no answer here"},
        '"not an object"',
    ])
    with pytest.raises(DataError) as caught:
        load_prompts(path)
    message = str(caught.value)
    assert f"{path}:2 messages[1].role: the prompt's last turn is the assistant's" in message
    assert f"{path}:3 (columns): no prompt among the columns ['answer', 'question']" in message
    assert f"{path}:4 prompt: empty" in message
    assert f"{path}:5 answer: missing here but present in other rows" in message
    assert f"{path}:6 (row): expected an object" in message
    result = read_prompts(path)
    assert len(result.prompts) == 2 and len(result.errors) == 5  # nothing dropped silently: each one an error


def test_columns_rename_a_prompt_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "Why?", "solution": "Because."}])
    rows = load_prompts(path, columns="prompt=question,answer=solution")
    assert rows[0].text == "Why?" and rows[0].fields == {"answer": "Because."}


def test_data_check_reports_prompts_their_lengths_duplicates_and_cuts(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"},
                                              {"prompt": "What is 2 + 2?", "answer": "4"},
                                              {"prompt": "Explain machine learning in one sentence please.", "answer": "x"}])
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "data", "check", str(path), "--model",
                           str(tiny_model_dir), "--max-length", "20", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["kind"], report["num_valid"], report["fields"]) == ("prompts", 3, ["answer"])
    assert report["duplicates"] == [{"kind": "exact", "rows": [f"{path}:1", f"{path}:2"]}]
    assert report["token_lengths"]["max"] > 20 and report["over_max_length"] == [f"{path}:3"]
    assert report["token_lengths"]["p50"] <= 20
