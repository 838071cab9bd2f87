"""`tunesmith chat` as a real process: stdin piped in, the real tiny model, output read back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tunesmith.inference import GenerationOptions, generate, render_prompt
from tunesmith.models.load import load

MAX_NEW_TOKENS = 8


def _chat(model_dir, lines: list[str], tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TUNESMITH_HOME=str(tmp_path / "home"))
    command = [sys.executable, "-m", "tunesmith.cli", "chat", str(model_dir), "--max-new-tokens", str(MAX_NEW_TOKENS),
               *extra]
    return subprocess.run(command, input="\n".join(lines) + "\n", capture_output=True, text=True, env=env,
                          timeout=180)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir, dtype=torch.float32, device="cpu")


def _greedy(tiny, messages) -> str:
    prompt = render_prompt(tiny.tokenizer, messages)
    return generate(tiny.model, tiny.tokenizer, [prompt], GenerationOptions(MAX_NEW_TOKENS))[0].text


def _answers(stdout: str) -> list[str]:
    return [line.removeprefix("assistant> ").strip() for line in stdout.splitlines() if line.startswith("assistant> ")]


def test_chat_keeps_history_and_applies_commands(tiny_model_dir, tiny, tmp_path):
    result = _chat(tiny_model_dir, ["/system You are Aurora.", "/history", "Who are you?", "What is the capital of France?",
                                    "/history", "/prompt", "/reset", "/history", "/exit", "Never answered"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout

    system = {"role": "system", "content": "You are Aurora."}
    first = {"role": "user", "content": "Who are you?"}
    first_answer = _greedy(tiny, [system, first])
    second = {"role": "user", "content": "What is the capital of France?"}
    second_answer = _greedy(tiny, [system, first, {"role": "assistant", "content": first_answer}, second])
    # The second answer is generated from the whole conversation, system prompt included.
    assert _answers(out) == [first_answer, second_answer]
    assert second_answer != _greedy(tiny, [second]), "history should change the answer in this test"

    counts = [line for line in out.splitlines() if line.startswith("(") and "messages" in line]
    assert counts == ["(0 messages, plus the system prompt)", "(4 messages, plus the system prompt)",
                      "(0 messages, plus the system prompt)"]
    assert "[system] You are Aurora." in out and f"[assistant] {first_answer}" in out
    assert "<|im_start|>system\nYou are Aurora.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>" in out
    assert "Never answered" not in out and len(_answers(out)) == 2


def test_reset_and_system_change_what_the_model_sees(tiny_model_dir, tiny, tmp_path):
    result = _chat(tiny_model_dir, ["Who are you?", "/reset", "/system", "Who are you?", "/system Be brief.",
                                    "/prompt", "/frobnicate"], tmp_path, "--system", "You are Aurora.")
    assert result.returncode == 0, result.stderr  # end of input leaves like /exit
    question = {"role": "user", "content": "Who are you?"}
    with_system = _greedy(tiny, [{"role": "system", "content": "You are Aurora."}, question])
    assert _answers(result.stdout) == [with_system, _greedy(tiny, [question])]
    assert "(system prompt removed)" in result.stdout
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?" in result.stdout
    assert "You are Aurora.<|im_end|>" not in result.stdout
    assert "unknown command /frobnicate; commands: /reset" in result.stdout



def test_chat_in_bf16_answers_as_generate_in_bf16(tiny_model_dir, tmp_path):
    from tunesmith.inference import load_for_generation

    result = _chat(tiny_model_dir, ["Who are you?", "/exit"], tmp_path, "--precision", "bf16")
    assert result.returncode == 0, result.stderr
    bf16 = load_for_generation(tiny_model_dir, "bf16")
    assert bf16.model.dtype == torch.bfloat16
    assert _answers(result.stdout) == [_greedy(bf16, [{"role": "user", "content": "Who are you?"}])]


def test_a_generation_that_fails_in_its_thread_ends_the_stream_with_its_error(tiny):
    """top_p=-1 past every check: transformers raises in generate's thread; the stream must raise it, not wait."""
    import threading

    from tunesmith.inference import stream

    options = GenerationOptions(max_new_tokens=4, temperature=0.7)
    options.top_p = -1.0  # as if a caller skipped the check when the options were made
    prompt = render_prompt(tiny.tokenizer, [{"role": "user", "content": "hi"}])
    outcome: list = []

    def read() -> None:
        try:
            outcome.append(list(stream(tiny.model, tiny.tokenizer, prompt, options)))
        except ValueError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the stream never ended"
    assert isinstance(outcome[0], ValueError) and "top_p" in str(outcome[0])
    again = list(stream(tiny.model, tiny.tokenizer, prompt, GenerationOptions(max_new_tokens=4)))
    assert "".join(again).strip() == generate(tiny.model, tiny.tokenizer, [prompt], GenerationOptions(4))[0].text
