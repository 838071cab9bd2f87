"""One conversation, with a run's system prompt and tools, rendered by every path a model sees prompts
through: training, eval, generate, chat and serve must all give the very token ids training trained on."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch
from fastapi.testclient import TestClient

from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.prompt import render_prompt, with_system_prompt
from tunesmith.data.tokenize import IGNORE, EncodeOptions, encode, prompt_text
from tunesmith.inference import Generation
from tunesmith.serve import chat
from tunesmith.serve.server import create_app  # imported before any test patches inference.generate

SYSTEM = "You are Zed."
QUESTION = "What is the weather in Paris?"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather by city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A run trained with a system prompt: the tiny model with tunesmith.json naming it."""
    run = tmp_path_factory.mktemp("prompt-paths") / "run"
    shutil.copytree(tiny_model_dir, run)
    (run / "tunesmith.json").write_text(json.dumps({"system_prompt": SYSTEM}))
    (run.parent / "tools.json").write_text(json.dumps(TOOLS))
    return run


@pytest.fixture(scope="module")
def loaded(run_dir):
    from tunesmith.models.load import load

    return load(run_dir, dtype=torch.float32, device="cpu")


def _conversation() -> Conversation:
    return Conversation([Message("user", QUESTION), Message("assistant", "It is sunny.")], tools=TOOLS)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _trained_prompt_ids(tokenizer, tmp_path) -> list[int]:
    """The tokens training puts before the first supervised one: the conversation read from a file and encoded
    by the training loop's own data preparation, with data.system_prompt set as the run was trained."""
    from tunesmith.config import load_config
    from tunesmith.train.loop import prepare_data

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": "It is sunny."}], "tools": TOOLS}))
    config = load_config(None, [f"data.path={data}", f"data.system_prompt={SYSTEM}"])
    encoded = prepare_data(config, tokenizer).train[0]
    first = next(i for i, label in enumerate(encoded.labels) if label != IGNORE)
    # The same ids as the renderer's own rule for the run's system prompt gives.
    same = encode(with_system_prompt([_conversation()], SYSTEM)[0], tokenizer, EncodeOptions())
    assert same.input_ids == encoded.input_ids
    return encoded.input_ids[:first]


def _fake_generate(seen: list[str]):
    def fake(model, tokenizer, prompts, options=None, **kwargs):
        seen.extend(prompts)
        return [Generation("ok", 1, 1, 0.0, "stop") for _ in prompts]
    return fake


def _eval_prompt(run_dir) -> str:
    from tunesmith.evaluate.pipeline import evaluate

    result = evaluate(str(run_dir), [_conversation()], metrics="exact_match", max_new_tokens=2, progress=False)
    return result.predictions[0]["rendered_prompt"]


def _generate_prompt(run_dir, monkeypatch, capsys) -> str:
    from tunesmith import cli, inference

    seen: list[str] = []
    monkeypatch.setattr(inference, "generate", _fake_generate(seen))
    assert cli.main(["generate", str(run_dir), "--prompt", QUESTION, "--tools", str(run_dir.parent / "tools.json")]) == 0
    capsys.readouterr()
    return seen[0]


def _chat_prompt(run_dir, monkeypatch, capsys) -> str:
    seen: list[str] = []
    monkeypatch.setattr(chat, "stream", lambda model, tokenizer, prompt, options: seen.append(prompt) or iter(["ok"]))
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTION + "\n"))
    assert chat.chat_repl(str(run_dir), tools=str(run_dir.parent / "tools.json")) == 0
    capsys.readouterr()
    return seen[0]


def _serve_prompt(loaded, tools: list[dict] | None) -> str:
    app = create_app(loaded)
    seen: list[str] = []

    async def respond(prompt, request, chat):
        seen.append(prompt)
        return {"ok": True}

    app.state.engine.respond = respond
    body = {"messages": [{"role": "user", "content": QUESTION}], **({"tools": tools} if tools else {})}
    response = TestClient(app).post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return seen[0]


def test_every_path_renders_the_prompt_training_trained_on(run_dir, loaded, monkeypatch, capsys, tmp_path):
    tokenizer = loaded.tokenizer
    trained = _trained_prompt_ids(tokenizer, tmp_path)
    prompts = {"eval": _eval_prompt(run_dir), "generate": _generate_prompt(run_dir, monkeypatch, capsys),
               "chat": _chat_prompt(run_dir, monkeypatch, capsys), "serve": _serve_prompt(loaded, TOOLS)}
    assert SYSTEM in prompts["serve"] and "get_weather" in prompts["serve"]
    for path, prompt in prompts.items():
        assert _ids(tokenizer, prompt) == trained, path


def test_tools_sent_to_the_server_change_the_prompt_as_training_did(loaded):
    with_tools, without = _serve_prompt(loaded, TOOLS), _serve_prompt(loaded, None)
    assert with_tools != without and "get_weather" not in without
    trained = prompt_text(with_system_prompt([_conversation()], SYSTEM)[0], loaded.tokenizer)
    assert with_tools == trained


def test_tool_schemas_with_control_tokens_are_a_400(loaded):
    tools = [{"type": "function", "function": {"name": "x", "description": "<|im_end|>"}}]
    body = {"messages": [{"role": "user", "content": QUESTION}], "tools": tools}
    response = TestClient(create_app(loaded)).post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


def test_without_a_template_generation_uses_the_fallback_training_uses(tiny_model_dir):
    """generate, chat and serve used to join the messages with blank lines when a tokenizer had no template,
    while training and eval used the built-in fallback: the model was asked in a layout it never saw."""
    from tunesmith.data.templates import apply_template
    from tunesmith.models.load import load_tokenizer

    bare, trained = load_tokenizer(tiny_model_dir), load_tokenizer(tiny_model_dir)
    bare.chat_template = trained.chat_template = None
    apply_template(trained, None)
    messages = [{"role": "user", "content": QUESTION}]
    assert render_prompt(bare, messages) == render_prompt(trained, messages) == \
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
