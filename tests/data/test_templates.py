"""Choosing and installing chat templates."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.templates import BUILTIN_TEMPLATES, apply_template, missing_tokens, template_label
from tunesmith.data.tokenize import render
from tunesmith.errors import UsageError


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


CONV = Conversation([Message("user", "Explain machine learning."), Message("assistant", "It learns from data.")],
                    system="You are terse.")


def test_none_keeps_the_tokenizers_own_template(tokenizer):
    own = tokenizer.chat_template
    choice = apply_template(tokenizer, None)
    assert choice.text == own == tokenizer.chat_template and choice.name == "own"


def test_none_without_a_template_falls_back_with_a_note(tokenizer, capsys):
    tokenizer.chat_template = None
    assert apply_template(tokenizer, None).text == BUILTIN_TEMPLATES["chatml"]
    assert "no chat template" in capsys.readouterr().err


def plain_tokenizer():
    """A base-model-like tokenizer: EOS only, no ChatML tokens, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Explain machine learning. It learns from data."] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_fallback_is_alpaca_when_chatml_tokens_are_missing(capsys):
    tokenizer = plain_tokenizer()
    assert missing_tokens(tokenizer, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert apply_template(tokenizer, None).text == BUILTIN_TEMPLATES["alpaca"]
    assert "'alpaca'" in capsys.readouterr().err
    with pytest.raises(UsageError, match=re.escape("needs the tokens <|im_start|>, <|im_end|>")):
        apply_template(tokenizer, "chatml")
    assert render(CONV, tokenizer).text.endswith("### Response:\nIt learns from data.</s>")


def test_builtin_names_set_the_template(tokenizer):
    for name, text in BUILTIN_TEMPLATES.items():
        if name in ("llama3", "gemma"):  # their turn markers are not in this vocabulary
            continue
        assert apply_template(tokenizer, name).text == text == tokenizer.chat_template
        assert template_label(tokenizer) == f"the built-in '{name}' template"


def test_rendered_layouts(tokenizer):
    apply_template(tokenizer, "chatml")
    assert render(CONV, tokenizer).text == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
                                            "Explain machine learning.<|im_end|>\n<|im_start|>assistant\n"
                                            "It learns from data.<|im_end|>")
    apply_template(tokenizer, "seed")
    assert render(CONV, tokenizer).text == "You are terse.\n指令: Explain machine learning.\n输出: It learns from data.<|im_end|>"
    apply_template(tokenizer, "alpaca")
    assert render(CONV, tokenizer).text == ("You are terse.\n\n### Instruction:\nExplain machine learning.\n\n"
                                            "### Response:\nIt learns from data.<|im_end|>")
    prompt = tokenizer.apply_chat_template(CONV.prompt_messages(), tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Response:\n")


def test_llama3_needs_its_tokens(tokenizer):
    with pytest.raises(UsageError, match=r"<\|start_header_id\|>.*<\|eot_id\|>.*'alpaca', 'mistral' or 'seed'"):
        apply_template(tokenizer, "llama3")
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    apply_template(tokenizer, "llama3")
    assert render(CONV, tokenizer).text == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nExplain machine learning.<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nIt learns from data.<|eot_id|>")


def test_unknown_name_lists_the_choices(tokenizer):
    with pytest.raises(UsageError, match="chatml, llama3, gemma, mistral, alpaca, seed"):
        apply_template(tokenizer, "vicuna")


def test_a_jinja_file(tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(BUILTIN_TEMPLATES["chatml"].replace("<|im_start|>", "<|im_start|> "), encoding="utf-8")
    assert apply_template(tokenizer, str(path)).text == path.read_text(encoding="utf-8")
    assert template_label(tokenizer).startswith("the chat template of")
