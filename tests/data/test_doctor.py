"""The data doctor: errors with file:line, token statistics, duplicates, overlap, the mask preview, exit codes."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import shared_data, write_jsonl
from tunesmith.cli import main
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.doctor import check_data, find_duplicates, length_stats, tally_tokens
from tunesmith.data.readers import PreferenceDataError, read_dataset

JSON_KEYS = {"num_examples", "num_valid", "errors", "warnings", "duplicates", "token_lengths", "truncated",
             "supervised_token_share", "preview"}


def check_json(capsys, *argv) -> tuple[int, dict]:
    code = main(["data", "check", *map(str, argv), "--json"])
    return code, json.loads(capsys.readouterr().out)


def qa_rows(n: int) -> list[dict]:
    topics = ["rivers", "volcanoes", "bread", "chess", "owls", "comets", "tides", "glass", "violins", "maps"]
    return [{"instruction": f"Tell me one fact about {topics[i % 10]} ({i}).", "input": "",
             "output": f"Fact {i}: {topics[i % 10]} are interesting in their own way."} for i in range(n)]


def broken_file(tmp_path):
    rows: list = qa_rows(25)
    rows[6] = '{"instruction": "broken", "output": '
    rows[11] = {"instruction": "Where is the answer?", "input": ""}
    rows[19] = {"messages": [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Hi"}]}
    return write_jsonl(tmp_path / "broken.jsonl", rows)


def test_three_broken_lines_exit_1_and_are_the_only_errors(tmp_path, capsys, tiny_model_dir):
    code, report = check_json(capsys, broken_file(tmp_path), "--model", tiny_model_dir)
    assert code == 1
    assert set(report) >= JSON_KEYS
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(7, "(json)"), (12, "output"), (20, "messages[0].role")]
    assert all({"file", "line", "field", "message"} <= set(e) for e in report["errors"])
    assert report["num_examples"] == 25 and report["num_valid"] == 22
    assert {"p50", "p90", "p99", "max"} <= set(report["token_lengths"])
    assert 0 < report["supervised_token_share"] < 1


def test_broken_lines_in_the_terminal_view(tmp_path, capsys, tiny_model_dir):
    path = broken_file(tmp_path)
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir)]) == 1
    out = capsys.readouterr().out
    for where in (f"{path}:7", f"{path}:12", f"{path}:20"):
        assert where in out
    assert "3 errors" in out and "mask preview" in out


@pytest.mark.parametrize("name", ["alpaca_zh_demo.json", "identity.json"])
def test_real_alpaca_files_check_clean(capsys, tiny_model_dir, name):
    code, report = check_json(capsys, shared_data(name), "--model", tiny_model_dir)
    assert code == 0 and report["errors"] == []
    assert report["num_valid"] == report["num_examples"] > 0


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "glaive_toolcall_en_demo.json",
                                  "glaive_toolcall_zh_demo.json", "c4_demo.jsonl"])
def test_every_other_shared_file_is_checked(tiny_model_dir, name):
    report = check_data([shared_data(name)], model=str(tiny_model_dir), max_length=256)
    assert report.errors == [] and report.num_valid == report.num_examples > 0
    assert report.token_lengths["max"] >= report.token_lengths["p99"] >= report.token_lengths["p50"] > 0
    assert report.truncated > 0  # every one of these files has examples over 256 tiny-tokenizer tokens


def test_preference_file_is_checked_as_pairs_and_refused_by_the_supervised_reader():
    report = check_data([shared_data("dpo_en_demo.json")], tokens=False)
    assert report.kind == "pairs" and report.ok and report.num_valid == report.num_examples == 300
    with pytest.raises(PreferenceDataError, match="preference \\(DPO/ORPO\\) data, not supervised fine-tuning data"):
        read_dataset(shared_data("dpo_en_demo.json"))


def test_usage_errors_exit_2(tmp_path, capsys):
    path = write_jsonl(tmp_path / "ok.jsonl", qa_rows(3))
    assert main(["data", "check", str(tmp_path / "nope.jsonl")]) == 2
    assert main(["data", "check", str(path), "--columns", "instruction"]) == 2
    assert main(["data", "check", str(path), "--max-length", "1", "--no-tokens"]) == 2
    assert "bad --columns entry" in capsys.readouterr().err


def test_mask_preview_marks_exactly_the_answer_and_its_end_token(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "one.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}]}])
    preview = check_data([path], model=str(tiny_model_dir)).preview
    assert preview["marked"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?"
                                 "<|im_end|>\n<|im_start|>assistant\n[[Paris.<|im_end|>]]")
    assert [s["supervised"] for s in preview["segments"]] == [False, True]
    assert preview["source"] == f"{path}:1"


def test_length_policies(tmp_path, tiny_model_dir):
    rows = qa_rows(4) + [{"instruction": "Long question " * 60, "input": "", "output": "Short."}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    kept = check_data([path], model=str(tiny_model_dir), max_length=100)
    assert (kept.truncated, kept.dropped, kept.errors) == (1, 0, [])
    dropped = check_data([path], model=str(tiny_model_dir), max_length=100, truncation="drop")
    assert (dropped.truncated, dropped.dropped, dropped.errors) == (0, 1, [])
    refused = check_data([path], model=str(tiny_model_dir), max_length=100, truncation="error")
    assert [(e.line, e.field) for e in refused.errors] == [(5, "(length)")]
    assert kept.supervised_token_share > check_data([path], model=str(tiny_model_dir)).supervised_token_share


def test_examples_with_no_supervised_tokens_are_errors(tiny_tokenizer):
    silent = Conversation([Message("user", "Hi"), Message("assistant", "Hello", train=False)], source="d.jsonl", line=3)
    fine = Conversation([Message("user", "Hi"), Message("assistant", "Hello")], source="d.jsonl", line=4)
    tally = tally_tokens([silent, fine], tiny_tokenizer, None, "truncate_prompt")
    assert tally.zero_supervised == 1
    assert [(i.line, i.field) for i in tally.issues] == [(3, "messages")]
    assert "no supervised tokens" in tally.issues[0].message


def test_exact_and_near_duplicates_name_their_rows(tmp_path):
    rows = qa_rows(6)
    rows.append(dict(rows[1]))  # exact copy of line 2
    rows.append({**rows[3], "instruction": rows[3]["instruction"].upper() + "!!"})  # same words, other case
    rows.append({**rows[4], "output": rows[4]["output"].replace("interesting", "intriguing")})  # reworded slightly
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    groups = find_duplicates(read_dataset(path).conversations)
    assert {(g["kind"], tuple(g["rows"])) for g in groups} == {
        ("exact", (f"{path}:2", f"{path}:7")), ("near", (f"{path}:4", f"{path}:8")),
        ("near", (f"{path}:5", f"{path}:9"))}


def test_duplicates_and_overlap_are_warnings_only(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(5) + qa_rows(1))
    evals = write_jsonl(tmp_path / "eval.jsonl", [qa_rows(5)[2], {"instruction": "New?", "output": "Yes."}])
    code, report = check_json(capsys, train, "--eval", evals, "--no-tokens")
    assert code == 0 and report["errors"] == []
    assert report["duplicates"] == [{"kind": "exact", "rows": [f"{train}:1", f"{train}:6"]}]
    assert report["overlap"] == [{"eval": f"{evals}:1", "train": [f"{train}:3"]}]
    assert {w["field"] for w in report["warnings"]} == {"(duplicate)", "(overlap)"}
    assert report["token_lengths"] is None and report["char_lengths"]["max"] > 0


def test_near_duplicate_search_is_fast_on_a_thousand_rows():
    convs = read_dataset(shared_data("alpaca_en_demo.json")).conversations
    started = time.perf_counter()
    groups = find_duplicates(convs)
    assert time.perf_counter() - started < 5
    assert all(len(g["rows"]) >= 2 for g in groups)


def test_builtin_template_choice(tmp_path, capsys, tiny_model_dir):
    path = write_jsonl(tmp_path / "ok.jsonl", qa_rows(3))
    code, report = check_json(capsys, path, "--model", tiny_model_dir, "--template", "alpaca")
    assert code == 0 and report["template"] == "alpaca" and "[[" in report["preview"]["marked"]
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--template", "nonesuch"]) == 2


def test_length_stats():
    assert length_stats([1, 2, 3, 4, 100]) == {"p50": 3, "p90": 100, "p99": 100, "max": 100, "mean": 22.0}
    assert length_stats([])["max"] == 0


@pytest.mark.slow
def test_default_model_check_of_alpaca_en_under_20_seconds(use_default_model, capsys):
    started = time.perf_counter()
    code, report = check_json(capsys, shared_data("alpaca_en_demo.json"))
    elapsed = time.perf_counter() - started
    assert code == 0 and report["model"] == "smollm2-135m-instruct"
    assert elapsed < 20, f"data check took {elapsed:.1f} s"
    # SmolLM2's template adds its own system prompt to examples without one: the doctor says so.
    assert any(w["field"] == "system" for w in report["warnings"])


def test_a_template_the_sandbox_refuses_is_reported_not_a_crash(tmp_path, capsys, tiny_model_dir):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = "{{ ''.__class__.__mro__ }}" + tokenizer.chat_template  # the sandbox refuses it
    tokenizer.save_pretrained(model)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(2))
    assert main(["data", "check", str(data), "--model", str(model)]) == 1
    captured = capsys.readouterr()
    assert "a bug in tunesmith" not in captured.err and "is unsafe" in captured.out
    assert "the chat template refused to render a lone user turn" in captured.out
