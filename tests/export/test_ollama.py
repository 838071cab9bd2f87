"""The Ollama Modelfile beside a GGUF export: the Go template renders what tunesmith renders, the stops and the
system prompt are the run's, and an existing Modelfile is kept unless told.

Ollama is not installed here, so its side is imitated in the test only, for exactly the constructs the writer
emits: the Go template is rewritten into Jinja action by action (an action it does not know fails the test),
and Ollama's rule for SYSTEM (given to a conversation that starts without a system message) is applied.
"""

import json
import re
import shutil

import jinja2
import pytest
from transformers import AutoTokenizer

from tunesmith.data.prompt import render_prompt
from tunesmith.data.templates import BUILTIN_TEMPLATES
from tunesmith.export.gguf import export_gguf
from tunesmith.export.ollama import Layout, NotExpressible, chat_layout, go_template, modelfile_path

# SmolLM2-Instruct's own template (the default model's): it inserts a system prompt when a conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_GO = (
    '{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
    '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}'
    '{{ else if eq .Role "tool" }}<|im_start|>tool\n{{ .Content }}<|im_end|>\n'
    '{{ end }}{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'
)
TWO_TURNS = [{"role": "system", "content": "You are Tuney. Answer briefly."},
             {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Tuney."},
             {"role": "user", "content": "你好！ What can you do?\n"}]

# ------------------------------------------------------------------ Ollama's side, imitated

GO_TO_JINJA = {
    "range $i, $_ := .Messages": ("{% for message in messages %}", "for"),
    "$last := eq (len (slice $.Messages $i)) 1": ("{% set last = loop.last %}", None),
    ".Content": ("{{ message['content'] }}", None),
    "if not $last": ("{% if not last %}", "if"),
    'if and $last (ne .Role "assistant")': ("{% if last and message['role'] != 'assistant' %}", "if"),
}


def go_to_jinja(template: str) -> str:
    out, open_blocks = [], []
    for literal, action in re.findall(r"(.*?)(?:\{\{(.*?)\}\}|\Z)", template, flags=re.S):
        out.append("{% raw %}" + literal + "{% endraw %}" if literal else "")
        if not action:
            continue
        action = action.strip()  # the writer never emits "{{-": it would arrive here and match nothing below
        if role := re.fullmatch(r'(if|else if) eq \.Role "(\w+)"', action):
            out.append(f"{{% {'if' if role[1] == 'if' else 'elif'} message['role'] == '{role[2]}' %}}")
            open_blocks += ["if"] if role[1] == "if" else []
        elif action == "end":
            out.append("{% end" + open_blocks.pop() + " %}")
        else:
            jinja, block = GO_TO_JINJA[action]
            out.append(jinja)
            open_blocks += [block] if block else []
    assert not open_blocks
    return "".join(out)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Commands as Ollama's parser reads them: a value is a word, "quoted" or \"\"\"triple-quoted\"\"\"."""
    value = r'"""(.*?)"""|"([^"\n]*)"|(\S+)'
    commands = re.findall(rf'^(FROM|TEMPLATE|SYSTEM|PARAMETER stop) (?:{value})[ \t]*$', text, flags=re.S | re.M)
    assert len(commands) == len(re.findall(r"^(?:FROM|TEMPLATE|SYSTEM|PARAMETER) ", text, flags=re.M))
    return [(name, next(v for v in values if v)) for name, *values in commands]


def ollama_render(modelfile: str, messages: list[dict]) -> str:
    commands = parse_modelfile(modelfile)
    template = dict(commands)["TEMPLATE"]
    system = dict(commands).get("SYSTEM")
    if system and messages[0]["role"] != "system":  # Ollama's ChatHandler
        messages = [{"role": "system", "content": system}, *messages]
    return jinja2.Environment(keep_trailing_newline=True).from_string(go_to_jinja(template)).render(
        messages=messages)


def go_render(layout: Layout, messages: list[dict], system: str | None = None) -> str:
    return ollama_render(f'TEMPLATE """{go_template(layout)}"""\n' + (f'SYSTEM """{system}"""\n' if system else ""),
                         messages)


# ------------------------------------------------------------------ the tests

@pytest.fixture
def exported(lora_run_dir, tmp_path):
    out = export_gguf(lora_run_dir, tmp_path / "model.gguf", dtype="f32", modelfile=True)
    return out, modelfile_path(out).read_text(encoding="utf-8")


def test_the_modelfile_for_a_chatml_run(exported, lora_run_dir):
    out, text = exported
    assert modelfile_path(out) == out.parent / "model.Modelfile"
    assert parse_modelfile(text) == [("FROM", "./model.gguf"), ("TEMPLATE", CHATML_GO),
                                     ("PARAMETER stop", "<|im_end|>"), ("PARAMETER stop", "<|endoftext|>")]
    tokenizer = AutoTokenizer.from_pretrained(lora_run_dir)
    expected = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert ollama_render(text, TWO_TURNS) == expected
    assert ollama_render(text, TWO_TURNS[1:]) == render_prompt(tokenizer, TWO_TURNS[1:])  # no system: none added


def test_the_runs_system_prompt_becomes_system(lora_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run_dir, run)
    system = 'You are "Tuney", 一个助手.\nBe brief.'
    info = json.loads((run / "tunesmith.json").read_text())
    (run / "tunesmith.json").write_text(json.dumps({**info, "system_prompt": system}))
    out = export_gguf(run, tmp_path / "run.gguf", dtype="f32", modelfile=True)
    text = modelfile_path(out).read_text(encoding="utf-8")
    assert ("SYSTEM", system) in parse_modelfile(text) and text.endswith(f'SYSTEM """{system}"""\n')
    tokenizer = AutoTokenizer.from_pretrained(run)
    info = json.loads((run / "tunesmith.json").read_text())
    assert ollama_render(text, TWO_TURNS[1:]) == render_prompt(tokenizer, TWO_TURNS[1:], info)
    assert ollama_render(text, TWO_TURNS) == render_prompt(tokenizer, TWO_TURNS, info)  # the caller's own wins


def test_a_template_default_system_prompt_becomes_system(tiny_tokenizer):
    tokenizer = _with_template(tiny_tokenizer, SMOLLM2_TEMPLATE)
    layout = chat_layout(tokenizer)
    assert layout.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert go_template(layout) == CHATML_GO  # the same markers, found by rendering, not by name
    for messages in (TWO_TURNS, TWO_TURNS[1:], TWO_TURNS[1:2]):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert go_render(layout, messages, system=layout.default_system) == expected


# Gemma and Mistral have no system turn: their templates open the first user turn with the system prompt, as
# the families' own templates do, which no per-message layout can write (Ollama then uses its own template).
SYSTEM_FOLDED = ("gemma", "mistral")


@pytest.mark.parametrize("name", [name for name in BUILTIN_TEMPLATES if name not in SYSTEM_FOLDED])
def test_every_builtin_template_translates(tiny_tokenizer, name):
    tokenizer = _with_template(tiny_tokenizer, BUILTIN_TEMPLATES[name])
    layout = chat_layout(tokenizer)
    tool_turns = [*TWO_TURNS[:3], {"role": "tool", "content": '{"temp": 21}'}]
    for messages in (TWO_TURNS, TWO_TURNS[1:], tool_turns):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert go_render(layout, messages, system=layout.default_system) == expected, name


@pytest.mark.parametrize("name", SYSTEM_FOLDED)
def test_templates_that_fold_the_system_prompt_are_refused(tiny_tokenizer, name):
    tokenizer = _with_template(tiny_tokenizer, BUILTIN_TEMPLATES[name])
    with pytest.raises(NotExpressible, match="depends on the message before it"):
        chat_layout(tokenizer)


def test_bos_written_by_the_template_is_left_to_llama_cpp():
    layout = Layout("<s>", {"user": "[U]"}, {"user": "[/U]"}, "[A]")
    assert go_template(layout).startswith("<s>{{ range")
    assert go_template(layout, bos_token="<s>").startswith("{{ range")


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}",  # trims content
    "{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}",  # numbers turns
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    "{{ m['content'] }}{% endfor %}",  # refuses a system message
])
def test_templates_without_a_per_message_layout_are_refused(tiny_tokenizer, template):
    with pytest.raises(NotExpressible):
        chat_layout(_with_template(tiny_tokenizer, template))


def test_an_untranslatable_template_gets_the_fallback(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "trim"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"].replace("message['content']", "(message['content'] | trim)")
    tokenizer.save_pretrained(model)
    out = export_gguf(model, tmp_path / "trim.gguf", dtype="f32", modelfile=True)
    commands = parse_modelfile(modelfile_path(out).read_text(encoding="utf-8"))
    assert [name for name, _ in commands] == ["FROM", "PARAMETER stop", "PARAMETER stop"]
    assert "trim.Modelfile has no TEMPLATE, so Ollama picks the closest of its own" in capsys.readouterr().err


def test_a_system_prompt_a_modelfile_cannot_hold_writes_none(lora_run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run_dir, run)
    (run / "tunesmith.json").write_text(json.dumps({**json.loads((run / "tunesmith.json").read_text()),
                                                    "system_prompt": 'Say """hi"""'}))
    out = export_gguf(run, tmp_path / "run.gguf", dtype="f32", modelfile=True)
    assert out.is_file() and not modelfile_path(out).exists()
    assert "no Ollama Modelfile written: the system prompt contains '\"\"\"'" in capsys.readouterr().err


def test_export_command_writes_the_modelfile_and_keeps_an_existing_one(lora_run_dir, tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "model.gguf"
    argv = ["export", str(lora_run_dir), "--gguf", "--dtype", "f32", "--out", str(out), "--no-verify"]
    assert main(argv) == 0
    modelfile = tmp_path / "model.Modelfile"
    assert f"Ollama Modelfile written to {modelfile} (ollama create NAME -f {modelfile})" in capsys.readouterr().out
    modelfile.write_text("FROM ./model.gguf\n# edited by hand\n")
    out.unlink()
    assert main(argv) == 2
    assert f"{modelfile} already exists; pass --overwrite" in capsys.readouterr().err
    assert not out.exists() and modelfile.read_text() == "FROM ./model.gguf\n# edited by hand\n"
    assert main([*argv, "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modelfile"] == str(modelfile)
    assert "TEMPLATE" in modelfile.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.Modelfile", "model.gguf"]  # no temporaries


def _with_template(tokenizer, template: str):
    copy = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = template
    return copy
