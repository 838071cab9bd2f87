"""Preference pairs: every layout from real files, the errors with file:line and field, convert, data check."""

from __future__ import annotations

import csv
import json
import re

import pytest

from tests.conftest import shared_data, write_jsonl
from tunesmith.cli import main
from tunesmith.data.convert import ConversionError, convert_pairs
from tunesmith.data.pairs import (
    EncodedPair,
    encode_pair,
    is_preference_data,
    load_pairs,
    prefix_share,
    read_pairs,
    shares_long_prefix,
)
from tunesmith.data.readers import DataError, PreferenceDataError, load_conversations, read_dataset
from tunesmith.data.tokenize import IGNORE, EncodeOptions

DPO_DEMO_ROWS = 300
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"name": "get_weather", "description": "weather now", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}]


def pair_key(pair) -> tuple:
    """What a pair says, without where it was read from."""
    return (pair.prompt.system, json.dumps(pair.prompt.tools, sort_keys=True),
            [m.to_dict() for m in pair.prompt.messages], [m.to_dict() for m in pair.chosen],
            [m.to_dict() for m in pair.rejected])


def write_json(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def write_csv(path, rows):
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_convert(src, to, out, *extra) -> int:
    return main(["data", "convert", str(src), "--to", to, "--out", str(out), *extra])


def check_json(capsys, *argv) -> tuple[int, dict]:
    code = main(["data", "check", *map(str, argv), "--json"])
    return code, json.loads(capsys.readouterr().out)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- layouts from real files


def test_the_shipped_dpo_demo_reads_in_full_with_no_issue():
    result = read_pairs(shared_data("dpo_en_demo.json"))
    assert result.num_rows == len(result.pairs) == DPO_DEMO_ROWS and result.issues == []
    assert list(result.formats.values()) == ["sharegpt"]
    raw = json.loads(shared_data("dpo_en_demo.json").read_text(encoding="utf-8"))
    for pair, row in zip(result.pairs, raw, strict=True):
        turns = [t for t in row["conversations"] if t["from"] != "system"]
        assert [m.content for m in pair.prompt.messages] == [t["value"] for t in turns]
        assert pair.prompt.messages[-1].role == "user"
        assert [m.content for m in pair.chosen] == [row["chosen"]["value"]]
        assert [m.content for m in pair.rejected] == [row["rejected"]["value"]]
    with_system = next(p for p, r in zip(result.pairs, raw, strict=True) if r["conversations"][0]["from"] == "system")
    assert with_system.prompt.system and with_system.where.endswith("dpo_en_demo.json[1]")
    assert len(load_pairs(shared_data("dpo_en_demo.json"))) == DPO_DEMO_ROWS


def alpaca_pair_rows() -> list[dict]:
    return [{"instruction": "Translate into French.", "input": "Good morning", "chosen": "Bonjour.",
             "rejected": "Bonsoir.", "system": "You translate.", "history": [["Hi", "Hello! What shall I translate?"]]},
            {"instruction": "Name a primary colour.", "input": "", "chosen": "Red.", "rejected": "Green."}]


@pytest.mark.parametrize("write", [write_json, write_csv], ids=["json", "csv"])
def test_llamafactory_alpaca_pairs(tmp_path, write):
    rows = alpaca_pair_rows()
    if write is write_csv:
        rows = [{**r, "history": json.dumps(r.get("history", [])), "system": r.get("system", "")} for r in rows]
    path = write(tmp_path / f"pairs.{write.__name__[6:]}", rows)
    first, second = load_pairs(path)
    assert first.prompt.system == "You translate."
    assert [(m.role, m.content) for m in first.prompt.messages] == [
        ("user", "Hi"), ("assistant", "Hello! What shall I translate?"), ("user", "Translate into French.\nGood morning")]
    assert [m.content for m in first.chosen] == ["Bonjour."] and [m.content for m in first.rejected] == ["Bonsoir."]
    assert second.prompt.system is None and second.prompt.messages[0].content == "Name a primary colour."
    assert read_pairs(path).formats == {str(path): "alpaca"}


def test_llamafactory_sharegpt_pairs_with_role_content_and_tools(tmp_path):
    rows = [{"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
             "chosen": {"role": "assistant", "content": "Sunny."}, "rejected": {"role": "assistant", "content": "No."},
             "tools": json.dumps(TOOLS)},
            {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                               {"from": "function_call", "value": json.dumps(CALL)},
                               {"from": "observation", "value": "18 C"}],
             "chosen": {"from": "gpt", "value": "It is 18 C."}, "rejected": {"from": "gpt", "value": "Cold."}}]
    first, second = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert first.prompt.system == "Be brief." and first.prompt.tools[0]["function"]["name"] == "get_weather"
    assert [m.role for m in second.prompt.messages] == ["user", "assistant", "tool"]
    assert second.prompt.messages[1].tool_calls[0]["function"] == CALL
    assert second.prompt.messages[2].name == "get_weather"


def test_trl_plain_strings_from_csv(tmp_path):
    path = write_csv(tmp_path / "pairs.csv", [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
                                              {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}])
    pairs = load_pairs(path)
    assert [(m.role, m.content) for m in pairs[1].prompt.messages] == [("user", "2 + 2?")]
    assert [(m.role, m.content) for m in pairs[1].chosen] == [("assistant", "4")]
    assert read_pairs(path).formats == {str(path): "trl"}


def trl_conversational_rows() -> list[dict]:
    return [{"prompt": [{"role": "system", "content": "You are terse."}, user("Hi")], "chosen": [assistant("Hello.")],
             "rejected": [assistant("What do you want?")]},
            {"prompt": [user("Capital of France?")], "chosen": [assistant("Paris.")], "rejected": [assistant("Lyon.")]}]


@pytest.mark.parametrize("write", [write_parquet, write_csv], ids=["parquet", "csv"])
def test_trl_conversational_pairs_from_tables(tmp_path, write):
    rows = trl_conversational_rows()
    if write is write_csv:  # a table holds the lists as their JSON text
        rows = [{k: json.dumps(v) for k, v in r.items()} for r in rows]
    first, second = load_pairs(write(tmp_path / f"pairs.{write.__name__[6:]}", rows))
    assert first.prompt.system == "You are terse." and [m.content for m in first.prompt.messages] == ["Hi"]
    assert [m.content for m in first.rejected] == ["What do you want?"]
    assert second.where.endswith("[1]" if write is write_parquet else ":3")


def test_trl_implicit_prompt_is_the_shared_beginning(tmp_path):
    shared = [{"role": "system", "content": "Pirate."}, user("Hi"), assistant("Arr."), user("Weather?")]
    rows = [{"chosen": [*shared, assistant("Sunny, matey.")], "rejected": [*shared, assistant("Sunny.")]}]
    (pair,) = load_pairs(write_jsonl(tmp_path / "implicit.jsonl", rows))
    assert pair.prompt.system == "Pirate." and [m.content for m in pair.prompt.messages] == ["Hi", "Arr.", "Weather?"]
    assert [m.content for m in pair.chosen] == ["Sunny, matey."] and [m.content for m in pair.rejected] == ["Sunny."]


def test_a_prompt_beside_whole_conversations_is_checked_against_them(tmp_path):
    # UltraFeedback's layout: a prompt string, and chosen/rejected that repeat it as their first turn.
    rows = [{"prompt": "Why?", "chosen": [user("Why?"), assistant("Because.")],
             "rejected": [user("Why?"), assistant("No idea.")], "messages": [user("Why?"), assistant("Because.")]}]
    (pair,) = load_pairs(write_jsonl(tmp_path / "uf.jsonl", rows))
    assert [m.content for m in pair.prompt.messages] == ["Why?"] and pair.chosen[0].content == "Because."


def test_openai_preference_pairs_with_tool_calls_in_the_response(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    rows = [{"input": {"messages": [user("Weather in Paris?")], "tools": [{"type": "function", "function": TOOLS[0]}]},
             "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": "c1", "content": "18 C"}, assistant("18 C, mild.")],
             "non_preferred_output": [assistant("I cannot know.")]},
            {"input": {"messages": [user("Hi")]}, "preferred_output": [assistant("Hello!")],
             "non_preferred_output": [assistant("Go away.")]}]
    path = write_jsonl(tmp_path / "openai.jsonl", rows)
    first, second = load_pairs(path)
    assert [m.role for m in first.chosen] == ["assistant", "tool", "assistant"]
    assert first.chosen[0].tool_calls[0]["function"]["arguments"] == {"city": "Paris"}
    assert first.chosen[1].name == "get_weather" and first.prompt.tools[0]["function"]["name"] == "get_weather"
    assert read_pairs(path).formats == {str(path): "openai-preference"}
    assert second.chosen[0].content == "Hello!"
    parquet = write_parquet(tmp_path / "openai.parquet", rows[1:])
    assert [pair_key(p) for p in load_pairs(parquet)] == [pair_key(second)]


def test_columns_map_other_names(tmp_path):
    path = write_jsonl(tmp_path / "named.jsonl", [{"question": "Why?", "good": "Because.", "bad": "No."}])
    assert not is_preference_data(path)
    assert is_preference_data(path, columns="prompt=question,chosen=good,rejected=bad")
    (pair,) = load_pairs(path, columns="prompt=question,chosen=good,rejected=bad")
    assert pair.prompt.messages[0].content == "Why?" and pair.chosen[0].content == "Because."


def test_which_files_hold_pairs(tmp_path):
    assert is_preference_data(shared_data("dpo_en_demo.json"))
    assert not is_preference_data(shared_data("alpaca_zh_demo.json"))
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "q", "completion": "a"}])
    assert not is_preference_data(plain) and is_preference_data(plain, format="trl")
    assert not is_preference_data(shared_data("dpo_en_demo.json"), format="openai")


# ---------------------------------------------------------------- the sides as conversations


def test_each_side_is_the_prompt_plus_its_response_with_only_the_response_supervised(tmp_path, tiny_tokenizer):
    (pair,) = load_pairs(write_json(tmp_path / "a.json", alpaca_pair_rows()[:1]))
    chosen, rejected = pair.chosen_conversation(), pair.rejected_conversation()
    assert chosen.messages[:3] == rejected.messages[:3] == [*pair.prompt.messages[:1],
                                                            chosen.messages[1], pair.prompt.messages[2]]
    assert chosen.messages[-1].content == "Bonjour." and rejected.messages[-1].content == "Bonsoir."
    assert [m.train for m in chosen.messages] == [None, False, None, True] and chosen.system == "You translate."
    for options in (EncodeOptions(), EncodeOptions(last_turn_only=True)):
        encoded = encode_pair(pair, tiny_tokenizer, options)
        for side, text in zip(encoded, ("Bonjour.", "Bonsoir."), strict=True):
            supervised = tiny_tokenizer.decode([t for t, label in zip(side.input_ids, side.labels, strict=True)
                                                if label != IGNORE])
            assert supervised == text + "<|im_end|>"
    assert encode_pair(pair, tiny_tokenizer, EncodeOptions(max_length=8, truncation="drop")) is None


# ---------------------------------------------------------------- errors name the file, the line and the field

ERRORS = [
    ("identical", {"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    ("empty_alpaca_side", {"instruction": "q", "chosen": "", "rejected": "b"}, "chosen", "empty"),
    ("empty_list_side", {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": []}, "rejected",
     "empty: no response"),
    ("empty_content", {"prompt": "q", "chosen": [assistant("  ")], "rejected": "b"}, "chosen[0]",
     "empty assistant content"),
    ("missing_side", {"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    ("prompt_ends_with_assistant", {"prompt": [user("q"), assistant("a")], "chosen": [assistant("b")],
                                    "rejected": [assistant("c")]}, "prompt[1]", "the prompt ends with an assistant"),
    ("sharegpt_prompt_ends_with_gpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                                       "chosen": {"from": "gpt", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}},
     "conversations[1]", "the prompt ends with an assistant"),
    ("chosen_is_a_user_turn", {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human",
                                                                                             "value": "b"},
                               "rejected": {"from": "gpt", "value": "c"}}, "chosen", "expected an assistant message"),
    ("rejected_holds_a_user_turn", {"prompt": [user("q")], "chosen": [assistant("a")],
                                    "rejected": [assistant("b"), user("more")]}, "rejected[1]",
     "expected an assistant message"),
    ("implicit_prompts_differ", {"chosen": [user("q1"), assistant("a")], "rejected": [user("q2"), assistant("b")]},
     "chosen[0]", "the prompt differs between chosen and rejected"),
    ("implicit_plain_strings", {"chosen": "The sky is blue.", "rejected": "The sky is green."}, "prompt",
     "missing: without a prompt"),
    ("prompt_beside_other_conversations", {"prompt": "Why?", "chosen": [user("How?"), assistant("a")],
                                           "rejected": [user("How?"), assistant("b")]}, "prompt", "differs from"),
    ("openai_without_input", {"preferred_output": [assistant("a")], "non_preferred_output": [assistant("b")]},
     "input", "missing"),
    ("openai_identical", {"input": {"messages": [user("q")]}, "preferred_output": [assistant("a")],
                          "non_preferred_output": [assistant("a")]}, "non_preferred_output", "identical"),
    ("response_ends_with_tool", {"prompt": [user("q")], "rejected": [assistant("b")], "chosen": [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
        {"role": "tool", "content": "18"}]}, "chosen[1]", "ends with a tool result"),
]


@pytest.mark.parametrize(("row", "field", "says"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_every_error_names_file_line_and_field(tmp_path, row, field, says):
    good = {"prompt": "fine", "chosen": "yes", "rejected": "no"}
    if "instruction" in row or "conversations" in row or "input" in row:
        good = {"instruction": "fine", "chosen": "yes", "rejected": "no"} if "instruction" in row else \
            {"input": {"messages": [user("fine")]}, "preferred_output": [assistant("yes")],
             "non_preferred_output": [assistant("no")]} if "input" in row else \
            {"conversations": [{"from": "human", "value": "fine"}], "chosen": {"from": "gpt", "value": "yes"},
             "rejected": {"from": "gpt", "value": "no"}}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    result = read_pairs(path)
    assert len(result.pairs) == 1 and result.num_rows == 2
    assert [(e.line, e.field) for e in result.errors] == [(2, field)], result.errors
    assert says in result.errors[0].message
    with pytest.raises(DataError, match=re.escape(f"{path}:2 {field}: ")):
        load_pairs(path)


def test_a_weight_is_ignored_with_a_warning(tmp_path):
    rows = [{"prompt": [user("q")], "chosen": [{**assistant("a"), "weight": 1}], "rejected": [assistant("b")]}]
    result = read_pairs(write_jsonl(tmp_path / "w.jsonl", rows))
    assert result.errors == [] and [(w.line, w.field) for w in result.warnings] == [(1, "chosen[0].weight")]
    assert result.pairs[0].chosen[0].train is None


def test_supervised_data_is_not_read_as_pairs(tmp_path):
    with pytest.raises(DataError) as raised:
        load_pairs(shared_data("alpaca_zh_demo.json"))
    (issue,) = raised.value.issues
    assert issue.field == "(format)" and "holds supervised examples (alpaca)" in issue.message
    assert "--method.objective sft" in issue.message
    with pytest.raises(DataError, match=r"x.jsonl:1 \(columns\): not a preference pair"):
        load_pairs(write_jsonl(tmp_path / "x.jsonl", [{"question": "q"}]))


def test_supervised_readers_refuse_pairs_and_name_the_objective(tmp_path):
    openai_pairs = write_jsonl(tmp_path / "pref.jsonl", [{"input": {"messages": [user("q")]},
                                                          "preferred_output": [assistant("a")],
                                                          "non_preferred_output": [assistant("b")]}])
    for path in (shared_data("dpo_en_demo.json"), openai_pairs):
        for read in (read_dataset, load_conversations):
            with pytest.raises(PreferenceDataError, match=r"preference \(DPO/ORPO\) data") as raised:
                read(path)
            assert "--method.objective dpo (or orpo, simpo)" in str(raised.value)


# ---------------------------------------------------------------- convert


@pytest.mark.parametrize("middle", ["trl", "openai-preference", "alpaca"])
def test_the_demo_round_trips_through_every_pair_layout(tmp_path, middle):
    source = shared_data("dpo_en_demo.json")
    assert run_convert(source, middle, tmp_path / "mid.jsonl") == 0
    assert run_convert(tmp_path / "mid.jsonl", "sharegpt", tmp_path / "back.json") == 0
    assert json.loads((tmp_path / "back.json").read_text(encoding="utf-8")) == json.loads(
        source.read_text(encoding="utf-8"))
    assert [pair_key(p) for p in load_pairs(tmp_path / "mid.jsonl")] == [pair_key(p) for p in load_pairs(source)]


def test_alpaca_pairs_keep_instruction_and_input_through_trl(tmp_path):
    source = write_json(tmp_path / "a.json", alpaca_pair_rows())
    assert run_convert(source, "trl", tmp_path / "trl.jsonl") == 0
    trl = read_jsonl(tmp_path / "trl.jsonl")
    assert trl[1] == {"prompt": [user("Name a primary colour.")], "chosen": [assistant("Red.")],
                      "rejected": [assistant("Green.")]}
    assert run_convert(tmp_path / "trl.jsonl", "alpaca", tmp_path / "back.jsonl") == 0
    back = read_jsonl(tmp_path / "back.jsonl")
    assert back[1] == alpaca_pair_rows()[1]
    assert {k: v for k, v in back[0].items() if k != "metadata"} == alpaca_pair_rows()[0]


@pytest.mark.parametrize("middle", ["trl", "sharegpt"])
def test_tool_calls_round_trip_between_openai_preference_and(tmp_path, middle):
    call = {"id": "call_1_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    rows = [{"input": {"messages": [user("Weather?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                                    {"role": "tool", "content": "18 C", "tool_call_id": "call_1_0",
                                     "name": "get_weather"}],
                       "tools": [{"type": "function", "function": TOOLS[0]}]},
             "preferred_output": [assistant("18 C.")], "non_preferred_output": [assistant("Cold.")]}]
    source = write_jsonl(tmp_path / "openai.jsonl", rows)
    assert run_convert(source, middle, tmp_path / "mid.jsonl") == 0
    assert run_convert(tmp_path / "mid.jsonl", "openai-preference", tmp_path / "back.jsonl") == 0
    assert [pair_key(p) for p in load_pairs(tmp_path / "back.jsonl")] == [pair_key(p) for p in load_pairs(source)]


def test_what_a_layout_cannot_hold_is_named(tmp_path):
    rows = [{"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            {"prompt": [user("q")], "chosen": [{"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": CALL}]}, {"role": "tool", "content": "18"}, assistant("18.")],
             "rejected": [assistant("no")]}]
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    for target in ("alpaca", "sharegpt"):
        with pytest.raises(ConversionError, match=rf"p.jsonl:2: has a response of several messages, which {target}"):
            convert_pairs(pairs, target)
    assert len(convert_pairs(pairs, "trl")) == 2


def test_convert_refuses_a_target_of_the_other_kind(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run_convert(shared_data("dpo_en_demo.json"), "openai", out) == 2
    err = capsys.readouterr().err
    assert "dpo_en_demo.json holds preference pairs" in err  # the file is named
    assert "pairs convert to one of alpaca, sharegpt, trl, openai-preference" in err
    assert run_convert(shared_data("alpaca_zh_demo.json"), "trl", out) == 2
    assert "holds supervised examples (no rejected response)" in capsys.readouterr().err
    assert not out.exists()


def test_convert_of_bad_pairs_writes_nothing(tmp_path, capsys):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    assert run_convert(source, "trl", tmp_path / "out.jsonl") == 1
    assert f"{source}:1 rejected: identical to chosen" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------- data check


def check_rows() -> list:
    long_prompt = "Tell me about the capital of France and its history. " * 6
    return [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
            {"prompt": "Who are you?", "chosen": "I am a helpful assistant.", "rejected": "Nobody."},
            {"prompt": "Capital of France?", "chosen": "Rome.", "rejected": "Paris."},  # contradicts line 1
            {"prompt": "q", "chosen": "same", "rejected": "same"},  # an error
            {"prompt": long_prompt, "chosen": "Paris. " * 3, "rejected": "The capital of France is Paris. " * 12}]


def test_data_check_on_pairs_reports_lengths_truncation_and_issues(tmp_path, capsys, tiny_model_dir):
    path = write_jsonl(tmp_path / "pairs.jsonl", check_rows())
    code, report = check_json(capsys, path, "--model", tiny_model_dir, "--max-length", "64")
    assert code == 1 and report["kind"] == "pairs" and report["ok"] is False
    assert report["num_examples"] == 5 and report["num_valid"] == 4
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(4, "rejected")]
    # Swapped responses also read as a near duplicate of line 1.
    warnings = {w["field"]: w for w in report["warnings"]}
    assert [(w["line"], w["field"]) for w in report["warnings"]] == [(3, "(duplicate)"), (3, "(contradiction)")]
    assert f"prefers the response that {path}:1 rejects" in warnings["(contradiction)"]["message"]
    tokens = report["token_lengths"]
    assert {"prompt", "chosen", "rejected"} <= set(tokens) and "response" not in tokens
    assert tokens["max"] >= tokens["prompt"]["max"] + tokens["rejected"]["max"] - 10
    assert all(tokens[side]["p50"] > 0 for side in ("prompt", "chosen", "rejected"))
    assert {"p50", "p90", "max"} <= set(report["char_lengths"]["chosen"])
    cut = report["pairs"]["truncation"]
    assert cut["over_max_length"] == report["truncated"] == 1 and report["dropped"] == 0
    assert cut["prompt_tokens_cut"]["rejected"] > 0 and cut["response_tokens_cut"]["rejected"] > 0
    assert cut["responses_cut"] == {"chosen": 0, "rejected": 1}
    assert [g["rows"] for g in report["pairs"]["prompt_duplicates"]] == [[f"{path}:1", f"{path}:3"]]
    assert 0 < report["supervised_token_share"] < 1 and report["preview"]["source"] == f"{path}:1"
    assert "[[Paris.<|im_end|>]]" in report["preview"]["marked"]


def test_data_check_on_pairs_with_the_drop_policy_and_in_the_terminal(tmp_path, capsys, tiny_model_dir):
    path = write_jsonl(tmp_path / "pairs.jsonl", [r for r in check_rows() if r["chosen"] != r["rejected"]])
    code, report = check_json(capsys, path, "--model", tiny_model_dir, "--max-length", "64", "--truncation", "drop")
    assert code == 0 and report["dropped"] == 1 and report["truncated"] == 0
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    for text in ("data check (preference pairs)", "tokens chosen", "tokens rejected", "1 pair(s) longer",
                 "rejected: ", "contradicting pairs (1)", "mask preview (chosen side)", f"{path}:3"):
        assert text in out, text
    assert "sharing a long prefix" not in out  # none does here
    # the pair sharing its prompt is the contradicting pair: listed once, under its contradiction
    assert "prompts shared by several pairs" not in out


def test_data_check_on_the_demo_without_tokens(capsys):
    code, report = check_json(capsys, shared_data("dpo_en_demo.json"), "--no-tokens")
    assert code == 0 and report["kind"] == "pairs" and report["num_valid"] == DPO_DEMO_ROWS
    assert report["token_lengths"] is None and report["char_lengths"]["rejected"]["max"] > 0
    assert report["errors"] == [] and len(report["duplicates"]) == len(report["pairs"]["prompt_duplicates"]) == 5


# ---------------------------------------------------------------- answers sharing a long prefix


def test_prefix_share_of_strings_and_token_lists():
    assert prefix_share("", "") == prefix_share("", "abc") == prefix_share([], [1, 2]) == 0.0
    assert prefix_share("abc", "abc") == prefix_share([1, 2, 3], [1, 2, 3]) == 1.0
    assert prefix_share("abc", "abcdef") == prefix_share([1, 2, 3, 4], [1, 2]) == 1.0  # one begins the other
    assert prefix_share("abcd", "xbcd") == 0.0  # differ from the start
    assert prefix_share("abcd", "abxyz") == 0.5 and prefix_share([1, 2, 3, 4], [1, 2, 3, 9]) == 0.75


def shared_prefix_rows() -> list[dict]:
    """Three of five pairs share more than half of the shorter answer; the last shares exactly half."""
    return [{"prompt": "q1", "chosen": "The answer is 42. Hope this helps!", "rejected": "The answer is 42."},
            {"prompt": "q2", "chosen": "Paris is the capital of France.", "rejected": "Paris is the capital of Italy."},
            {"prompt": "q3", "chosen": "Sure:\n\n  one two three", "rejected": "Sure: one two four"},  # whitespace
            {"prompt": "q4", "chosen": "Yes.", "rejected": "No."},
            {"prompt": "q5", "chosen": "abcd", "rejected": "abxy"}]


def test_a_pair_shares_a_long_prefix_in_collapsed_text_or_in_answer_tokens(tmp_path, tiny_tokenizer):
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", shared_prefix_rows())).pairs
    assert [shares_long_prefix(p) for p in pairs] == [True, True, True, False, False]
    options = EncodeOptions()
    first, yes = (EncodedPair(*encode_pair(p, tiny_tokenizer, options)) for p in (pairs[0], pairs[3]))
    assert shares_long_prefix(first) and not shares_long_prefix(yes)
    assert all(IGNORE not in side for side in first.answers()) and len(first.answers()[0]) > len(first.answers()[1])


def test_data_check_counts_pairs_sharing_a_long_prefix_and_warns_once_when_most_do(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", shared_prefix_rows())
    code, report = check_json(capsys, path, "--no-tokens")
    assert code == 0 and report["pairs"]["long_shared_prefix"] == {"pairs": 3, "share": 0.6}
    warnings = [w for w in report["warnings"] if w["field"] == "(answers)"]
    assert len(warnings) == 1 and warnings[0]["line"] == -1
    assert "3 pairs (60%)" in warnings[0]["message"] and "--method.sft_weight" in warnings[0]["message"]
    assert main(["data", "check", str(path), "--no-tokens"]) == 0
    out = capsys.readouterr().out
    assert "answers sharing a long prefix: 3 of 5 pairs (60%)" in out
    assert out.count("DPO's signal is then only the first differing token") == 1  # in the warning, not again
    # a minority is counted, not warned about
    path = write_jsonl(tmp_path / "few.jsonl", shared_prefix_rows()[:1] + check_rows()[:2])
    code, report = check_json(capsys, path, "--no-tokens")
    assert report["pairs"]["long_shared_prefix"] == {"pairs": 1, "share": 0.3333}
    assert not [w for w in report["warnings"] if w["field"] == "(answers)"]
    assert main(["data", "check", str(path), "--no-tokens"]) == 0
    out = capsys.readouterr().out
    assert "1 of 3 pairs (33%); DPO's signal is then only the first differing token" in out  # the reason, once
