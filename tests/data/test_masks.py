"""Loss masks: exactly the assistant contents and their end tokens are supervised, for every template."""

from __future__ import annotations

import json
import time

import pytest
from transformers import AutoTokenizer

from tests.conftest import shared_data
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.templates import BUILTIN_TEMPLATES, apply_template
from tunesmith.data.tokenize import (
    IGNORE,
    TOOLS_PREAMBLE,
    EncodeOptions,
    encode,
    encode_all,
    prompt_text,
    render,
)
from tunesmith.errors import TunesmithError

# The default model's (SmolLM2-135M-Instruct) own template, copied from its tokenizer_config.json.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture
def tokenizer(tiny_model_dir):
    """A fresh copy per test: templates are set on the tokenizer."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def with_template(tokenizer, name: str):
    """(tokenizer, end-of-turn token) for a template under test."""
    if name == "smollm2":
        tokenizer.chat_template = SMOLLM2_TEMPLATE
        return tokenizer, "<|im_end|>"
    if name == "llama3":
        tokenizer.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    apply_template(tokenizer, name)
    return tokenizer, {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(name, tokenizer.eos_token)


def supervised(encoded):
    assert all(label in (IGNORE, token) for token, label in zip(encoded.input_ids, encoded.labels, strict=True))
    return [token for token, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]


def expected_text(conv: Conversation, end: str, options: EncodeOptions) -> str:
    turns = [m for m in conv.messages if m.role == "assistant"]
    chosen = [m for i, m in enumerate(turns)
              if (m.train if m.train is not None else (not options.last_turn_only or i == len(turns) - 1))]
    return "".join(m.content + end for m in chosen)


def assert_masked(tokenizer, end: str, conv: Conversation, options: EncodeOptions | None = None, encoded=None):
    options = options or EncodeOptions()
    encoded = encoded or encode(conv, tokenizer, options)
    tokens = supervised(encoded)
    assert tokens[-1] == tokenizer.convert_tokens_to_ids(end), "the last supervised label must be the end token"
    # Decoding exactly the assistant contents + end tokens proves no prompt token is supervised.
    text = tokenizer.decode(tokens)
    if tokenizer.chat_template == BUILTIN_TEMPLATES["seed"]:
        # "输出: " ends with a space that BPE joins to the answer's first word: that token is the answer's.
        text = text.lstrip(" ").replace(end + " ", end)
    assert text == expected_text(conv, end, options)
    return encoded


def chat(*turns, system=None, **kw) -> Conversation:
    roles = ["user", "assistant"] * len(turns)
    return Conversation([Message(r, t) for r, t in zip(roles, turns, strict=False)], system=system, source="chat.jsonl", line=4, **kw)


MULTI = chat("Who are you?", "I am a helpful assistant.", "What is the capital of France?",
             "The capital of France is Paris.", "你好，世界！", "你好！我是一个有用的AI助手。")

TEMPLATES = ["smollm2", "chatml", "llama3", "alpaca", "seed"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_single_and_multi_turn(tokenizer, name):
    tokenizer, end = with_template(tokenizer, name)
    assert_masked(tokenizer, end, chat("Explain machine learning.", "It learns from data."))
    assert_masked(tokenizer, end, chat("Who are you?", "An assistant.", system="You are terse."))
    encoded = assert_masked(tokenizer, end, MULTI)
    assert supervised(encoded).count(tokenizer.convert_tokens_to_ids(end)) == 3


def test_default_system_prompt_is_never_supervised(tokenizer):
    tokenizer, end = with_template(tokenizer, "smollm2")
    conv = chat("Who are you?", "I am SmolLM.")
    assert "named SmolLM" in render(conv, tokenizer).text
    assert "named SmolLM" not in tokenizer.decode(supervised(encode(conv, tokenizer, EncodeOptions())))


@pytest.mark.parametrize("name", ["smollm2", "chatml", "llama3"])
@pytest.mark.parametrize("file", ["glaive_toolcall_en_demo.json", "glaive_toolcall_zh_demo.json"])
def test_tool_call_conversations(tokenizer, name, file):
    from tunesmith.data.readers import read_dataset

    tokenizer, end = with_template(tokenizer, name)
    convs = read_dataset(shared_data(file)).conversations
    assert len(convs) == 300
    calls = 0
    for conv, encoded in zip(convs, encode_all(convs, tokenizer, EncodeOptions(), progress=False).examples, strict=True):
        assert_masked(tokenizer, end, conv, encoded=encoded)
        text = tokenizer.decode(supervised(encoded))
        for message in conv.messages:  # tool results and the tool schemas are never supervised
            if message.role == "tool" and message.content not in expected_text(conv, end, EncodeOptions()):
                assert message.content not in text
        assert conv.tools is None or json.dumps(conv.tools[0], ensure_ascii=False)[:40] not in text
        calls += sum(bool(m.tool_calls) for m in conv.messages)
    assert calls > 100  # the function-call turns are among the supervised ones


def test_tool_calls_without_content_become_json_text(tokenizer):
    tokenizer, end = with_template(tokenizer, "chatml")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    conv = Conversation([Message("user", "weather?"), Message("assistant", "", tool_calls=[call]),
                         Message("tool", "sunny", name="get_weather"), Message("assistant", "It is sunny.")],
                        tools=[{"name": "get_weather", "parameters": {}}])
    text = tokenizer.decode(supervised(encode(conv, tokenizer, EncodeOptions())))
    assert text == '{"name": "get_weather", "arguments": {"city": "Paris"}}<|im_end|>It is sunny.<|im_end|>'
    assert '"get_weather", "parameters"' in render(conv, tokenizer).text  # schemas in the system prompt


def test_template_reading_tools_gets_them_and_shows_each_call_once(tokenizer):
    tokenizer.chat_template = (
        "{% if tools %}{{ '<|im_start|>system\nTOOLS ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% for c in m.tool_calls or [] %}{{ 'CALL ' + c['function']['name'] }}{% endfor %}{{ '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    # As the readers give it: a call-only turn carries its JSON in content too.
    conv = Conversation([Message("user", "weather?"),
                         Message("assistant", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                                 tool_calls=[call]),
                         Message("tool", "sunny", name="get_weather"), Message("assistant", "It is sunny.")],
                        tools=[{"name": "get_weather", "parameters": {}}])
    text = tokenizer.decode(supervised(encode(conv, tokenizer, EncodeOptions())))
    assert text == "CALL get_weather<|im_end|>It is sunny.<|im_end|>"
    rendered = render(conv, tokenizer).text
    assert rendered.startswith("<|im_start|>system\nTOOLS [") and TOOLS_PREAMBLE not in rendered


def test_prompt_text_is_the_prefix_trained_on(tokenizer):
    tokenizer, _ = with_template(tokenizer, "smollm2")
    conv = Conversation([Message("user", "weather?"), Message("assistant", "Sunny.")],
                        tools=[{"name": "get_weather", "parameters": {}}])
    rendered = render(conv, tokenizer)
    prompt = prompt_text(conv, tokenizer)
    assert TOOLS_PREAMBLE in prompt and rendered.text.startswith(prompt) and len(prompt) == rendered.spans[-1][0]


def test_pad_equal_to_eos_keeps_eos_supervised(tokenizer):
    tokenizer, end = with_template(tokenizer, "alpaca")
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    encoded = assert_masked(tokenizer, end, MULTI)
    assert encoded.labels[-1] == tokenizer.eos_token_id


def test_train_flags_and_last_turn_only(tokenizer):
    tokenizer, end = with_template(tokenizer, "chatml")
    conv = chat("a?", "first answer", "b?", "second answer", "c?", "third answer")
    conv.messages[3].train = False
    assert tokenizer.decode(supervised(encode(conv, tokenizer, EncodeOptions()))) == \
        "first answer<|im_end|>third answer<|im_end|>"
    only_last = EncodeOptions(last_turn_only=True)
    assert tokenizer.decode(supervised(encode(conv, tokenizer, only_last))) == "third answer<|im_end|>"
    conv.messages[1].train = True
    assert tokenizer.decode(supervised(encode(conv, tokenizer, only_last))) == \
        "first answer<|im_end|>third answer<|im_end|>"
    assert_masked(tokenizer, end, conv, only_last)


def test_train_on_prompt(tokenizer):
    tokenizer, _ = with_template(tokenizer, "smollm2")
    conv = chat("a?", "first answer", "b?", "second answer")
    encoded = encode(conv, tokenizer, EncodeOptions(train_on_prompt=True))
    # Everything, including the default system prompt, but the first token: nothing comes before it to predict it.
    assert encoded.labels[1:] == encoded.input_ids[1:] and encoded.labels[0] == IGNORE
    assert encoded.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # no trailing newline
    conv.messages[1].train = False
    encoded = encode(conv, tokenizer, EncodeOptions(train_on_prompt=True))
    unsupervised = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label == IGNORE]
    assert tokenizer.decode(unsupervised[1:]) == "first answer<|im_end|>"


def test_plain_text_is_fully_supervised_and_ends_with_eos(tokenizer):
    tokenizer, _ = with_template(tokenizer, "chatml")
    conv = Conversation([Message("assistant", "The quick brown fox jumps over the lazy dog.")], is_text=True)
    encoded = encode(conv, tokenizer, EncodeOptions())
    assert encoded.labels[1:] == encoded.input_ids[1:] and encoded.labels[0] == IGNORE
    assert encoded.input_ids[:-1] == tokenizer(conv.messages[0].content, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    short = encode(conv, tokenizer, EncodeOptions(max_length=5))
    assert short.truncated and short.input_ids == encoded.input_ids[:5]


# ---------------------------------------------------------------------------- truncation

LONG_PROMPT = chat("Explain machine learning in one sentence. " * 20, "It learns from data.")


def test_truncate_prompt_keeps_the_whole_response(tokenizer):
    tokenizer, end = with_template(tokenizer, "chatml")
    full = encode(LONG_PROMPT, tokenizer, EncodeOptions())
    cut = encode(LONG_PROMPT, tokenizer, EncodeOptions(max_length=40))
    assert len(full.input_ids) > 40 and len(cut.input_ids) == 40 and cut.truncated
    assert supervised(cut) == supervised(full)  # the response and its end token survive whole
    assert cut.input_ids == full.input_ids[-40:]  # the oldest prompt tokens went first


def test_truncate_prompt_keeps_a_leading_bos(tokenizer):
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer, end = with_template(tokenizer, "llama3")  # writes bos_token first, like Llama 3's own template
    full = encode(LONG_PROMPT, tokenizer, EncodeOptions())
    cut = encode(LONG_PROMPT, tokenizer, EncodeOptions(max_length=40))
    assert full.input_ids[0] == cut.input_ids[0] == tokenizer.bos_token_id
    assert cut.input_ids[1:] == full.input_ids[-39:] and supervised(cut) == supervised(full)


def test_overlong_response_is_cut_but_keeps_its_end_token(tokenizer):
    tokenizer, end = with_template(tokenizer, "chatml")
    conv = chat("Hi", "The quick brown fox jumps over the lazy dog. " * 20)
    cut = encode(conv, tokenizer, EncodeOptions(max_length=30))
    assert len(cut.input_ids) == 30 and cut.truncated
    assert cut.input_ids[-1] == cut.labels[-1] == tokenizer.convert_tokens_to_ids(end)
    assert tokenizer.decode(cut.input_ids).startswith("The quick brown fox")  # nothing of the prompt is left
    assert len(supervised(cut)) == 29  # every token but the first, which nothing precedes


def test_drop_and_error_policies(tokenizer):
    tokenizer, _ = with_template(tokenizer, "chatml")
    short = chat("Hi", "Hello.")
    drop = EncodeOptions(max_length=40, truncation="drop")
    assert encode(LONG_PROMPT, tokenizer, drop) is None
    result = encode_all([short, LONG_PROMPT, short], tokenizer, drop, progress=False)
    assert (len(result.examples), result.dropped, result.dropped_at) == (2, 1, ["chat.jsonl:4"])
    with pytest.raises(TunesmithError, match=r"chat\.jsonl:4: .* longer than max_length 40"):
        encode(LONG_PROMPT, tokenizer, EncodeOptions(max_length=40, truncation="error"))


def test_encode_all_matches_encode(tokenizer):
    tokenizer, _ = with_template(tokenizer, "llama3")
    convs = [MULTI, LONG_PROMPT, chat("Hi", "Hello.")]
    result = encode_all(convs, tokenizer, EncodeOptions(max_length=60), progress=False, chunk_size=2)
    assert [e.input_ids for e in result.examples] == \
        [encode(c, tokenizer, EncodeOptions(max_length=60)).input_ids for c in convs]
    lengths = [len(encode(c, tokenizer, EncodeOptions()).input_ids) for c in convs]
    assert result.truncated == sum(n > 60 for n in lengths) >= 1


# ---------------------------------------------------------------------------- templates that cannot work

def test_template_that_rewrites_history_fails_loudly(tokenizer):
    # Like templates that strip earlier assistant turns: prefixes no longer match the full text.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n...' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(TunesmithError, match="cannot yield an assistant mask"):
        encode(MULTI, tokenizer, EncodeOptions())


def test_template_without_end_token_fails_loudly(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
                              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    with pytest.raises(TunesmithError, match="end-of-turn"):
        encode(MULTI, tokenizer, EncodeOptions())


def test_conversation_without_assistant_turn_names_its_line(tokenizer):
    tokenizer, _ = with_template(tokenizer, "chatml")
    with pytest.raises(TunesmithError, match=r"chat\.jsonl:4: messages: .*no assistant turn"):
        encode(Conversation([Message("user", "hi")], source="chat.jsonl", line=4), tokenizer, EncodeOptions())


# ---------------------------------------------------------------------------- the real default model

@pytest.mark.slow
def test_default_model_template_and_speed(use_default_model):
    from tunesmith.data.readers import load_conversations
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.resolve import resolve

    tokenizer = load_tokenizer(resolve("smollm2-135m-instruct"))
    apply_template(tokenizer, None)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2 pads with <|im_end|>
    for conv in load_conversations(shared_data("glaive_toolcall_en_demo.json"))[:100]:
        assert_masked(tokenizer, "<|im_end|>", conv)
    convs = load_conversations(shared_data("alpaca_en_demo.json"))
    started = time.perf_counter()
    result = encode_all(convs, tokenizer, EncodeOptions(max_length=1024), progress=False)
    assert time.perf_counter() - started < 10
    assert len(result.examples) == len(convs)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(supervised(e)[-1] == end for e in result.examples)
