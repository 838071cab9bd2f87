"""Conversions between layouts: round trips keep content; what a layout cannot hold is an error."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_data, write_jsonl
from tunesmith.cli import main
from tunesmith.data.convert import ConversionError, convert
from tunesmith.data.readers import read_dataset
from tunesmith.errors import UsageError


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_convert(src, to, out, *extra) -> int:
    return main(["data", "convert", str(src), "--to", to, "--out", str(out), *extra])


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json", "identity.json"])
@pytest.mark.parametrize("middle", ["openai", "sharegpt"])
def test_alpaca_round_trip_through_files_gives_the_same_rows(tmp_path, name, middle):
    source = shared_data(name)
    assert run_convert(source, middle, tmp_path / "mid.jsonl") == 0
    assert run_convert(tmp_path / "mid.jsonl", "alpaca", tmp_path / "back.jsonl") == 0
    assert read_jsonl(tmp_path / "back.jsonl") == json.loads(source.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["glaive_toolcall_en_demo.json", "glaive_toolcall_zh_demo.json"])
def test_sharegpt_tool_calls_round_trip_through_openai(tmp_path, name):
    source = shared_data(name)
    assert run_convert(source, "openai", tmp_path / "mid.jsonl") == 0
    middle = read_jsonl(tmp_path / "mid.jsonl")
    call = next(m for row in middle for m in row["messages"] if m.get("tool_calls"))
    assert call["content"] is None and isinstance(call["tool_calls"][0]["function"]["arguments"], str)
    assert run_convert(tmp_path / "mid.jsonl", "sharegpt", tmp_path / "back.jsonl") == 0
    original = json.loads(source.read_text(encoding="utf-8"))
    back = read_jsonl(tmp_path / "back.jsonl")
    assert [r["conversations"] for r in back] == [r["conversations"] for r in original]
    # "[]" tools are simply absent on the way back; the schemas themselves are unchanged.
    assert [json.loads(r.get("tools") or "[]") for r in back] == [json.loads(r["tools"]) for r in original]


def test_seed_instruction_layout_matches_the_seed(tmp_path):
    rows = [{"instruction": "将以下文本翻译成英文", "input": "你好,世界!", "output": "Hello, World!"},
            {"instruction": "解释什么是机器学习", "input": "", "output": "机器学习是人工智能的一个分支。"}]
    convs = read_dataset(write_jsonl(tmp_path / "seed.jsonl", rows)).conversations
    assert convert(convs, "seed-instruction") == [
        {"prompt": "指令: 将以下文本翻译成英文\n输入: 你好,世界!\n输出: ", "completion": "Hello, World!"},
        {"prompt": "指令: 解释什么是机器学习\n输出: ", "completion": "机器学习是人工智能的一个分支。"}]
    custom = convert(convs[:1], "seed-instruction", labels=("Instruction", "Input", "Output"))
    assert custom[0]["prompt"] == "Instruction: 将以下文本翻译成英文\nInput: 你好,世界!\nOutput: "


def test_seed_chat_has_the_seed_system_prompt_unless_told_otherwise(tmp_path):
    rows = [{"instruction": "将以下文本翻译成英文", "input": "你好,世界!", "output": "Hello, World!"}]
    convs = read_dataset(write_jsonl(tmp_path / "seed.jsonl", rows)).conversations
    assert convert(convs, "seed-chat") == [{"messages": [
        {"role": "system", "content": "你是一个有用的AI助手。"},
        {"role": "user", "content": "将以下文本翻译成英文\n你好,世界!"},
        {"role": "assistant", "content": "Hello, World!"}], "metadata": {
            "alpaca_fields": {"instruction": "将以下文本翻译成英文", "input": "你好,世界!"}}}]
    assert convert(convs, "seed-chat", system_prompt="Be kind.")[0]["messages"][0]["content"] == "Be kind."


def test_prompt_completion_output(tmp_path):
    convs = read_dataset(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}])).conversations
    assert convert(convs, "prompt-completion") == [{"prompt": "Hi", "completion": "Hello"}]


def test_what_a_layout_cannot_hold_is_an_error_naming_every_row():
    convs = read_dataset(shared_data("glaive_toolcall_en_demo.json")).conversations
    with_calls = [c for c in convs if c.tools or any(m.tool_calls for m in c.messages)]  # schemas count too
    with pytest.raises(ConversionError) as caught:
        convert(convs, "alpaca")
    text = str(caught.value)
    assert text.startswith(f"{len(with_calls)} example(s) cannot be written as alpaca")
    assert "glaive_toolcall_en_demo.json[0]: has tool calls" in text and "... and" in text
    plain = [c for c in convs if not c.tools and len(c.messages) > 2][:1]
    with pytest.raises(ConversionError, match="rounds; prompt-completion holds one prompt and one response"):
        convert(plain, "prompt-completion")


def test_multi_turn_alpaca_keeps_its_history_and_weights_refuse_flat_layouts(tmp_path):
    rows = [{"instruction": "And now?", "input": "", "output": "B", "history": [["First?", "A"]]}]
    convs = read_dataset(write_jsonl(tmp_path / "h.jsonl", rows)).conversations
    assert convert(convs, "alpaca") == rows
    weighted = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}
    convs = read_dataset(write_jsonl(tmp_path / "w.jsonl", [weighted])).conversations
    assert convert(convs, "openai") == [weighted]
    with pytest.raises(ConversionError, match="weight 0"):
        convert(convs, "alpaca")


def test_bad_options_are_usage_errors(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    assert run_convert(source, "seed-instruction", tmp_path / "o.jsonl", "--labels", "a,b") == 2
    assert "three comma-separated labels" in capsys.readouterr().err
    assert run_convert(source, "prompt-completion", tmp_path / "o.jsonl", "--system-prompt", "S") == 2
    with pytest.raises(UsageError, match="unknown target"):
        convert([], "yaml")


def test_convert_command_refuses_data_with_errors(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Hi"}])
    assert run_convert(source, "openai", tmp_path / "o.jsonl") == 1
    assert "a.jsonl:2 output: missing" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_convert_command_writes_a_json_array_for_a_json_name(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    assert run_convert(source, "sharegpt", tmp_path / "out" / "o.json") == 0
    assert json.loads((tmp_path / "out" / "o.json").read_text()) == [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    assert "wrote 1 sharegpt rows (from alpaca)" in capsys.readouterr().out
