"""Readers: every format and file type in, one Conversation type out; every schema error reported."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_data, write_jsonl
from tunesmith.data.readers import (
    DataError,
    PreferenceDataError,
    load_conversations,
    parse_columns,
    read_dataset,
    validate,
)
from tunesmith.errors import UsageError


def errors_of(result) -> list[tuple[int, str]]:
    return sorted((i.line, i.field) for i in result.errors)


# ---------------------------------------------------------------- the real files


@pytest.mark.parametrize("name, rows, fmt", [
    ("alpaca_en_demo.json", 999, "alpaca"), ("alpaca_zh_demo.json", 1000, "alpaca"), ("identity.json", 91, "alpaca"),
    ("glaive_toolcall_en_demo.json", 300, "sharegpt"), ("glaive_toolcall_zh_demo.json", 300, "sharegpt"),
    ("c4_demo.jsonl", 300, "text"),
])
def test_every_shared_file_reads_without_errors(name, rows, fmt):
    result = read_dataset(shared_data(name))
    assert result.num_rows == rows and len(result.conversations) == rows
    assert result.errors == []
    assert list(result.formats.values()) == [fmt]


def test_preference_data_is_refused_with_a_clear_message():
    with pytest.raises(PreferenceDataError, match=r"dpo_en_demo.json is preference \(DPO/ORPO\) data, not supervised"):
        read_dataset(shared_data("dpo_en_demo.json"))


def test_alpaca_row_becomes_user_and_assistant_with_the_input_on_a_new_line():
    conv = read_dataset(shared_data("alpaca_zh_demo.json")).conversations[0]
    raw = json.loads(shared_data("alpaca_zh_demo.json").read_text())[0]
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    expected_user = raw["instruction"] + ("\n" + raw["input"] if raw["input"] else "")
    assert conv.messages[0].content == expected_user and conv.messages[1].content == raw["output"]
    assert conv.line == 0 and conv.where.endswith("alpaca_zh_demo.json[0]")


def test_glaive_function_calls_become_assistant_tool_calls_with_text_and_named_tool_results():
    raw = json.loads(shared_data("glaive_toolcall_en_demo.json").read_text())[0]
    conv = read_dataset(shared_data("glaive_toolcall_en_demo.json")).conversations[0]
    roles = [m.role for m in conv.messages]
    assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"][:len(roles)]
    call = conv.messages[3]
    assert call.content == raw["conversations"][3]["value"]  # templates that read only content still see it
    assert call.tool_calls == [{"type": "function", "function": {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]
    assert conv.messages[4].name == "search_recipes"
    assert conv.tools[0]["type"] == "function" and conv.tools[0]["function"]["name"] == "search_recipes"


def test_glaive_tool_result_after_a_plain_answer_is_a_warning_not_an_error():
    result = read_dataset(shared_data("glaive_toolcall_zh_demo.json"))
    flagged = {i.line for i in result.warnings if "calls no tool" in i.message}
    assert flagged == {197, 293} and result.errors == []


# ---------------------------------------------------------------- formats


def test_alpaca_system_history_and_metadata(tmp_path):
    row = {"instruction": "And now?", "input": "", "output": "Now B.", "system": "Be brief.",
           "history": [["First?", "A."]], "metadata": {"source": "hand", "id": 7}}
    conv = read_dataset(write_jsonl(tmp_path / "a.jsonl", [row])).conversations[0]
    assert conv.system == "Be brief."
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", "First?"), ("assistant", "A."), ("user", "And now?"), ("assistant", "Now B.")]
    assert conv.metadata == {"source": "hand", "id": 7}


def test_openai_messages_with_weights_tool_calls_and_content_parts(tmp_path):
    row = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees.", "weight": 0},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome.", "weight": 1}]}
    conv = read_dataset(write_jsonl(tmp_path / "o.jsonl", [row])).conversations[0]
    assert conv.system == "sys" and conv.messages[0].content == "Weather in Paris?"
    call = conv.messages[1]
    assert call.tool_calls[0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert json.loads(call.content) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert conv.messages[2].role == "tool" and conv.messages[2].name == "get_weather"
    assert [m.train for m in conv.messages if m.role == "assistant"] == [None, False, True]


def test_prompt_completion_and_text(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    conv = read_dataset(path).conversations[0]
    assert [(m.role, m.content) for m in conv.messages] == [("user", "2+2="), ("assistant", "4")]
    conversational = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}
    conv = read_dataset(write_jsonl(tmp_path / "pc2.jsonl", [conversational])).conversations[0]
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    text = read_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "Plain words."}])).conversations[0]
    assert text.is_text and text.messages[0].content == "Plain words."


def test_sharegpt_system_turn_and_observation(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}]}
    conv = read_dataset(write_jsonl(tmp_path / "s.jsonl", [row])).conversations[0]
    assert conv.system == "S" and [m.role for m in conv.messages] == ["user", "assistant"]


# ---------------------------------------------------------------- file types and columns


def test_csv_with_a_column_mapping_reports_file_lines(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"What is 1+1?",2\n"multi\nline?",yes\n"no answer",\n', encoding="utf-8")
    result = read_dataset(path, columns="instruction=question,output=answer")
    assert [c.messages[0].content for c in result.conversations] == ["What is 1+1?", "multi\nline?"]
    assert [c.line for c in result.conversations] == [2, 3]
    assert [(i.where, i.field) for i in result.errors] == [(f"{path}:5", "output (column 'answer')")]


def test_question_and_answer_columns_are_read_as_alpaca_and_said_so(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"What is 1+1?",2\n"no answer",\n', encoding="utf-8")
    result = read_dataset(path)
    assert [(c.messages[0].content, c.messages[1].content) for c in result.conversations] == [("What is 1+1?", "2")]
    assert [(i.where, i.field) for i in result.errors] == [(f"{path}:3", "output (column 'answer')")]
    assert [i.message for i in result.warnings if i.field == "(columns)"] == [
        "read as alpaca with --columns instruction=question,output=answer"]
    assert result.formats == {str(path): "alpaca"}


def test_columns_of_no_layout_are_one_error_for_the_file_not_one_per_row(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": f"q{i}", "a": "a"} for i in range(40)])
    result = read_dataset(path)
    assert [(i.where, i.field) for i in result.errors] == [(str(path), "(columns)")]
    assert "columns ['a', 'q'], so none of its 40 row(s) was read" in result.errors[0].message
    assert "--columns instruction=question,output=answer" in result.errors[0].message
    assert result.conversations == [] and result.num_rows == 40


def test_parquet_directory_and_saved_dataset(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Say bye", "input": "", "output": "bye"}]
    folder = tmp_path / "folder"
    folder.mkdir()
    pd.DataFrame(rows).to_parquet(folder / "part.parquet")
    write_jsonl(folder / "more.jsonl", rows[:1])
    result = read_dataset(folder)
    assert len(result.conversations) == 3 and set(result.formats.values()) == {"alpaca"}
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    saved = read_dataset(tmp_path / "saved")
    assert [c.messages[1].content for c in saved.conversations] == ["hi", "bye"]


def test_json_file_holding_json_lines_is_read(tmp_path):
    path = tmp_path / "lines.json"
    write_jsonl(path, [{"text": "one"}, {"text": "two"}])
    assert len(read_dataset(path).conversations) == 2


def test_format_override_and_bad_options(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "completion": "c", "text": "t"}])
    assert read_dataset(path, format="text").conversations[0].is_text
    with pytest.raises(UsageError, match="unknown format"):
        read_dataset(path, format="csv")
    with pytest.raises(UsageError, match="bad --columns entry 'instruction'"):
        parse_columns("instruction,output=answer")
    with pytest.raises(UsageError, match="no such file"):
        read_dataset(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- errors


def test_the_three_broken_lines_are_each_reported_and_nothing_else(tmp_path):
    rows = [{"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}."} for i in range(1, 26)]
    rows[6] = '{"instruction": "broken", "output": '
    rows[11] = {"instruction": "Where is the answer?", "input": ""}
    rows[19] = {"messages": [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Hi"}]}
    result = read_dataset(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert errors_of(result) == [(7, "(json)"), (12, "output"), (20, "messages[0].role")]
    assert len(result.conversations) == 22 and result.num_rows == 25
    assert "starts with an assistant turn" in result.errors[2].message


@pytest.mark.parametrize("row, field, message", [
    ({"instruction": "q", "input": "", "output": 5}, "output", "expected a string, got a number"),
    ({"instruction": "  ", "input": "", "output": "a"}, "instruction", "empty"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from", "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "messages[1].role", "two user turns in a row"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "c"}]}, "messages[1].role", "system message must come first"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
     "messages[1].content", "empty assistant content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}]},
     "messages[1].weight", "expected 0 or 1"),
    ({"messages": "hello"}, "messages", "expected a list or an object"),
    ({"messages": []}, "messages", "expected a non-empty list of messages, got an empty list"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}]},
     "conversations[1].value", "function call is not valid JSON"),
    (["a", "list"], "(row)", "expected an object, got a list"),
])
def test_each_schema_error_names_its_field(tmp_path, row, field, message):
    result = read_dataset(write_jsonl(tmp_path / "e.jsonl", [row]))
    assert [(i.line, i.field) for i in result.errors] == [(1, field)]
    assert message in result.errors[0].message
    assert result.conversations == []


def test_every_error_in_a_row_is_reported(tmp_path):
    row = {"instruction": 3, "input": "", "output": ""}
    result = read_dataset(write_jsonl(tmp_path / "two.jsonl", [row]))
    assert errors_of(result) == [(1, "instruction"), (1, "output")]


def test_invalid_json_array_names_the_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]', encoding="utf-8")
    result = read_dataset(path)
    assert len(result.errors) == 1 and "line 3" in result.errors[0].message


def test_load_conversations_raises_with_every_issue_listed_and_capped(tmp_path):
    rows = [{"instruction": "q", "input": ""} for _ in range(25)]
    with pytest.raises(DataError) as caught:
        load_conversations(write_jsonl(tmp_path / "many.jsonl", rows))
    text = str(caught.value)
    assert text.startswith("25 problem(s)") and "many.jsonl:20 output: missing" in text
    assert "many.jsonl:21" not in text and "... and 5 more" in text


def test_validate_accepts_a_well_formed_tool_conversation():
    conv = read_dataset(shared_data("glaive_toolcall_en_demo.json")).conversations[0]
    assert validate(conv) == []
