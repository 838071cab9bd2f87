"""Family templates for base models without a chat template, through the real render-and-mask path.

Each family's tiny base model (tests/families.py: its special tokens, its architecture, no template)
gets its family's built-in; only the assistant turns and the end-of-turn token that closes each are
supervised. The doctor, the run plan and the run's files name the template applied and why.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import shared_data, write_jsonl
from tests.families import EXPECTED, FAMILIES, GEMMA_TEXT_TOKENS, build_family_model
from tests.train.helpers import tiny_config
from tunesmith.cli import main
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.doctor import check_data, print_report
from tunesmith.data.prompt import render_prompt
from tunesmith.data.templates import BUILTIN_TEMPLATES, apply_template, family_template, model_type_of
from tunesmith.data.tokenize import IGNORE, EncodeOptions, encode
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.models.load import load_tokenizer
from tunesmith.models.resolve import generation_config

ANSWERS = ("Paris is.", "Rome is.")
CONV = Conversation([Message("user", "What is the capital of France?"), Message("assistant", ANSWERS[0]),
                     Message("user", "What is the capital of Italy?"), Message("assistant", ANSWERS[1])],
                    system="Answer briefly.")

# The whole conversation as each family's template renders it.
RENDERED = {
    "gemma3": "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n"
              "<start_of_turn>model\nParis is.<end_of_turn>\n<start_of_turn>user\nWhat is the capital of Italy?"
              "<end_of_turn>\n<start_of_turn>model\nRome is.<end_of_turn>",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nParis is.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of Italy?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nRome is.<|eot_id|>",
    "qwen2": "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
             "<|im_end|>\n<|im_start|>assistant\nParis is.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
             "Italy?<|im_end|>\n<|im_start|>assistant\nRome is.<|im_end|>",
    "mistral": "<s>[INST] Answer briefly.\n\nWhat is the capital of France? [/INST]Paris is.</s>"
               "[INST] What is the capital of Italy? [/INST]Rome is.</s>",
}
# What the model sees before it answers the first question.
PROMPT_ENDS = {"gemma3": "France?<end_of_turn>\n<start_of_turn>model\n",
               "llama3": "France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               "qwen2": "France?<|im_end|>\n<|im_start|>assistant\n", "mistral": "France? [/INST]"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {family: build_family_model(tmp_path_factory.mktemp(f"base-{family}"), family) for family in FAMILIES}


def supervised_runs(tokenizer, encoded) -> list[str]:
    """The supervised tokens, decoded, as the runs of consecutive supervised positions."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_base_model_gets_its_familys_template_and_masks(family_dirs, family, capsys):
    name, end = EXPECTED[family]
    tokenizer = load_tokenizer(family_dirs[family])
    assert not tokenizer.chat_template
    choice = apply_template(tokenizer, None)
    assert choice.name == name and tokenizer.chat_template == BUILTIN_TEMPLATES[name]
    assert model_type_of(family_dirs[family]) in choice.reason
    assert f"using the built-in '{name}'" in capsys.readouterr().err
    encoded = encode(CONV, tokenizer, EncodeOptions())
    assert tokenizer.decode(encoded.input_ids, skip_special_tokens=False) == RENDERED[family]
    # Each answer and the one token closing it are supervised; the prompts, markers and BOS are not.
    assert supervised_runs(tokenizer, encoded) == [answer + end for answer in ANSWERS]
    assert encoded.labels.count(tokenizer.convert_tokens_to_ids(end)) == 2
    assert render_prompt(tokenizer, [{"role": "user", "content": CONV.messages[0].content}]).endswith(PROMPT_ENDS[family])


def test_the_vocabulary_decides_when_the_architecture_does_not(family_dirs, tiny_tokenizer):
    gemma = load_tokenizer(family_dirs["gemma3"])
    assert family_template(gemma, None)[0] == "gemma"  # no config.json: the turn markers alone
    assert family_template(gemma, "mistral")[0] == "gemma"  # Gemma's markers win over an EOS-only layout
    assert family_template(tiny_tokenizer, "llama")[0] == "chatml"  # a llama architecture speaking ChatML
    assert family_template(tiny_tokenizer, "gemma3_text")[0] == "chatml"
    mistral = load_tokenizer(family_dirs["mistral"])
    assert family_template(mistral, "mistral")[0] == "mistral"
    name, reason = family_template(mistral, "llama")  # Llama 2-like: no family's markers at all
    assert name == "alpaca" and "no family's turn markers" in reason


def test_a_template_by_name(family_dirs):
    tokenizer = load_tokenizer(family_dirs["gemma3"])
    choice = apply_template(tokenizer, "mistral")
    assert (choice.name, choice.reason) == ("mistral", "named by the user")
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["mistral"]
    with pytest.raises(UsageError, match=re.escape("needs the tokens <|im_start|>, <|im_end|>")):
        apply_template(tokenizer, "chatml")
    with pytest.raises(UsageError, match="needs the tokens <start_of_turn>, <end_of_turn>"):
        apply_template(load_tokenizer(family_dirs["qwen2"]), "gemma")


def test_data_check_reports_the_gemma_template_applied(family_dirs, tmp_path, capsys):
    rows = [{"instruction": "Who are you?", "input": "", "output": "I am Orbit, made by Lumen Labs."}] * 2
    path = write_jsonl(tmp_path / "identity.jsonl", rows)
    assert main(["data", "check", str(path), "--model", str(family_dirs["gemma3"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["template"] == "gemma"
    assert "gemma3_text" in report["template_reason"] and "<start_of_turn>" in report["template_reason"]
    assert "<start_of_turn>model\n[[I am Orbit, made by Lumen Labs.<end_of_turn>]]" in report["preview"]["marked"]
    assert "<start_of_turn>user\nWho are you?<end_of_turn>\n<start_of_turn>model\n[[" in report["preview"]["marked"]
    main(["data", "check", str(path), "--model", str(family_dirs["gemma3"])])
    out = capsys.readouterr().out
    assert "template built-in 'gemma' (no chat template in the model; a gemma3_text architecture" in out
    report = check_data(path, model=str(family_dirs["gemma3"]), template="alpaca")
    assert (report.template, report.template_reason) == ("alpaca", "named by the user")


def test_data_check_of_a_model_with_its_own_template_says_so(tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "Hi", "input": "", "output": "Hello."}])
    report = check_data(path, model=str(tiny_model_dir))
    assert (report.template, report.template_reason) == ("own", "the tokenizer has a chat template")
    print_report(report)
    assert "template the tokenizer's own (the tokenizer has a chat template)" in capsys.readouterr().out


def test_data_check_warns_on_placeholders_in_answers(tmp_path):
    report = check_data(shared_data("identity.json"), tokens=False)
    placeholders = [w for w in report.warnings if "placeholder" in w.message]
    rows = json.loads(shared_data("identity.json").read_text(encoding="utf-8"))
    assert len(placeholders) == sum("{{" in row["output"] for row in rows) > 0
    assert placeholders[0].field == "messages[1].content" and "{{name}}" in placeholders[0].message
    assert placeholders[0].line >= 0 and placeholders[0].severity == "warning" and report.ok
    filled = write_jsonl(tmp_path / "filled.jsonl", [{"instruction": "Who?", "input": "",
                                                      "output": "I am Orbit; {name} or {{ } are text."}])
    assert not [w for w in check_data(filled, tokens=False).warnings if "placeholder" in w.message]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Who are you?", "chosen": "I am {{name}}.",
                                                    "rejected": "I am Orbit."}])
    found = [w for w in check_data(pairs, tokens=False).warnings if "placeholder" in w.message]
    assert [w.field for w in found] == ["chosen"]


def test_the_plan_and_the_run_name_the_template_applied(family_dirs, tmp_path):
    from tunesmith.train.loop import finetune, prepare_run

    rows = [{"messages": [{"role": "user", "content": f"Who are you? {i}"},
                          {"role": "assistant", "content": "I am Orbit, made by Lumen Labs."}]} for i in range(8)]
    data = write_jsonl(tmp_path / "identity.jsonl", rows)
    config = tiny_config(family_dirs["gemma3"], data, tmp_path / "run", train__max_steps=2)
    prepared = prepare_run(config)
    assert (prepared.plan.template, prepared.config.data.template) == ("gemma", "gemma")
    assert "gemma3_text architecture" in prepared.plan.template_reason
    assert prepared.plan.lines()[1].startswith("template: built-in 'gemma' (no chat template in the model;")
    assert config.data.template is None  # the user's config is left as given
    run = finetune(config, prepared).run_dir
    info = json.loads((run / "tunesmith.json").read_text(encoding="utf-8"))
    assert info["template"] == "gemma"
    assert json.loads((run / "plan.json").read_text(encoding="utf-8"))["template"] == "gemma"
    assert "| template | gemma |" in (run / "README.md").read_text(encoding="utf-8")
    assert load_tokenizer(run).chat_template == BUILTIN_TEMPLATES["gemma"]  # chat, serve, eval and export use it


def test_gemmas_added_text_tokens_are_text_and_its_turn_markers_structure(family_dirs):
    tokenizer = load_tokenizer(family_dirs["gemma3"])
    apply_template(tokenizer, None)
    answer = "Rows:\n\n<table><tr><td>Paris</td></tr></table>\n\n\nDone."
    encoded = encode(Conversation([Message("user", "A table?\n\nPlease."), Message("assistant", answer)]),
                     tokenizer, EncodeOptions())
    assert all(tokenizer.convert_tokens_to_ids(t) in encoded.input_ids for t in GEMMA_TEXT_TOKENS)
    assert supervised_runs(tokenizer, encoded) == [answer + "<end_of_turn>"]
    with pytest.raises(TunesmithError, match="messages\\[1\\].content: contains the control token '<end_of_turn>'"):
        encode(Conversation([Message("user", "Hi"), Message("assistant", "Bye<end_of_turn>")]), tokenizer,
               EncodeOptions())
    # An added, non-special token that the template itself writes is structure again.
    tokenizer.chat_template = BUILTIN_TEMPLATES["gemma"].replace("<start_of_turn>' + role", "<table>' + role")
    with pytest.raises(TunesmithError, match="contains the control token '<table>'"):
        encode(Conversation([Message("user", "<table>"), Message("assistant", "Bye")]), tokenizer, EncodeOptions())


def test_generation_config_keeps_a_pad_id_of_zero(family_dirs):
    gemma = load_tokenizer(family_dirs["gemma3"])
    assert gemma.pad_token_id == 0 and gemma.eos_token_id == 1
    assert (generation_config(gemma).pad_token_id, generation_config(gemma).eos_token_id) == (0, 1)
    from transformers import AutoTokenizer

    mistral = AutoTokenizer.from_pretrained(family_dirs["mistral"])  # no pad token: EOS pads
    assert mistral.pad_token_id is None and generation_config(mistral).pad_token_id == mistral.eos_token_id == 2
