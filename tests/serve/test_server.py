"""`tunesmith serve` end to end: a real server process on localhost, the official openai client.

Every answer is checked against inference.generate's greedy output for the same rendered prompt,
computed in this process, so a server that garbled, mixed up or truncated answers would fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from tunesmith.inference import GenerationOptions, generate, render_prompt
from tunesmith.models.load import load

QUESTIONS = ["Who are you?", "What is the capital of France?", "你是谁？", "Explain machine learning in one sentence."]
MAX_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"server at {url} did not become healthy in {timeout}s")


@contextlib.contextmanager
def _served(model_dir, home, *flags: str, env: dict | None = None):
    """`tunesmith serve MODEL FLAGS` in a subprocess on a free port (``env`` added to this one's);
    yields (url, process) once healthy."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TUNESMITH_HOME=str(home), **(env or {}))
    process = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", str(model_dir), "--port", str(port),
                                *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with _served(tiny_model_dir, tmp_path_factory.mktemp("serve-home")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy answers and prompt token counts computed here, one prompt at a time."""
    loaded = load(tiny_model_dir, dtype=torch.float32, device="cpu")
    answers = {}
    for question in QUESTIONS:
        prompt = render_prompt(loaded.tokenizer, [{"role": "user", "content": question}])
        answers[question] = generate(loaded.model, loaded.tokenizer, [prompt], GenerationOptions(MAX_TOKENS))[0]
    return answers


def served_id(client) -> str:
    """The id the server serves; any other ``model`` is a 404."""
    return client.models.list().data[0].id


def _ask(client, question, model=None, **kwargs):
    return client.chat.completions.create(model=model or served_id(client),
                                          messages=[{"role": "user", "content": question}],
                                          max_tokens=MAX_TOKENS, temperature=0, **kwargs)


def test_chat_completion_returns_the_greedy_answer_with_usage(client, reference):
    expected = reference[QUESTIONS[0]]
    response = _ask(client, QUESTIONS[0])
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_streaming_chat_completion_returns_the_same_text(client, reference):
    expected = reference[QUESTIONS[1]]
    chunks = list(_ask(client, QUESTIONS[1], stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and text.strip() == expected.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "streamed in pieces"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_raw_sse_stream_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 4, "stream": True}
    status, text = _post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200
    events = [line for line in text.splitlines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_stop_sequence_cuts_the_answer(client, reference):
    expected = reference[QUESTIONS[0]].text
    stop = expected[3:5]
    response = _ask(client, QUESTIONS[0], stop=[stop])
    assert response.choices[0].message.content == expected[:expected.find(stop)].strip()
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(client, QUESTIONS[0], stop=stop, stream=True)
                       if c.choices)
    assert streamed.strip() == expected[:expected.find(stop)].strip()


def test_completions_endpoint_uses_the_raw_prompt(client, tiny_model_dir):
    loaded = load(tiny_model_dir, dtype=torch.float32, device="cpu")
    prompt = "The quick brown fox"
    expected = generate(loaded.model, loaded.tokenizer, [prompt], GenerationOptions(6))[0]
    response = client.completions.create(model=served_id(client), prompt=prompt, max_tokens=6, temperature=0)
    assert response.object == "text_completion"
    assert response.choices[0].text == expected.text
    assert response.usage.prompt_tokens == expected.prompt_tokens == len(loaded.tokenizer(prompt)["input_ids"])


def test_models_and_health(client, server):
    models = client.models.list().data
    assert len(models) == 1 and models[0].owned_by == "tunesmith"
    with urllib.request.urlopen(server + "/health") as response:
        assert json.load(response)["status"] == "ok"


def test_concurrent_requests_each_get_their_own_answer(client, reference):
    answers: dict[str, str] = {}

    def ask(question):
        answers[question] = _ask(client, question).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == {q: reference[q].text for q in QUESTIONS}


def _post(server, path, data: bytes) -> tuple[int, str]:
    request = urllib.request.Request(server + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


BAD_REQUESTS = {
    "malformed json": (b'{"messages": [', None),
    "missing messages": (b'{"model": "x"}', "messages"),
    "empty messages": (b'{"messages": []}', "messages"),
    "wrong type": (b'{"messages": "hello"}', "messages"),
    "unknown role": (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
    "n above one": (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    "negative max_tokens": (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "max_tokens"),
    "temperature out of range": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 7}',
                                 "temperature"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_400_with_an_openai_error(server, name):
    data, param = BAD_REQUESTS[name]
    status, text = _post(server, "/v1/chat/completions", data)
    assert status == 400
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=served_id(client), messages=[{"role": "user", "content": "hi"}], n=2)
    assert caught.value.status_code == 400
    assert "n=1" in caught.value.body["message"]


def test_server_survives_a_client_leaving_mid_stream(server, client, reference):
    body = {"messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": 200, "stream": True}
    request = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.readline().startswith(b"data: ")
    # The abandoned generation must release the model, or this request would hang.
    assert _ask(client, QUESTIONS[3]).choices[0].message.content == reference[QUESTIONS[3]].text


@contextlib.contextmanager
def in_process_server(loaded, **app_options):
    """A real uvicorn server on localhost in a thread, for tests that change the loaded model or the
    server's options (``create_app``'s keywords); yields its port."""
    import uvicorn

    from tunesmith.serve.server import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, **app_options), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_generation_is_serialized_across_concurrent_requests(tiny_model_dir):
    """In-process server whose real model counts how many forward passes overlap."""

    loaded = load(tiny_model_dir, dtype=torch.float32, device="cpu")
    counter_lock, active, peak = threading.Lock(), [0], [0]

    def enter(_module, _args):
        with counter_lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.002)  # widen the window in which unserialized requests would overlap

    def leave(_module, _args, _output):
        with counter_lock:
            active[0] -= 1

    loaded.model.register_forward_pre_hook(enter)
    loaded.model.register_forward_hook(leave)
    with in_process_server(loaded) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        results = {}

        def ask(i):
            reply = _ask(client, QUESTIONS[i % len(QUESTIONS)], stream=bool(i % 2))
            results[i] = reply if not i % 2 else "".join(c.choices[0].delta.content or "" for c in reply if c.choices)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 6
        assert peak[0] == 1


def test_messages_the_chat_template_refuses_get_a_400(tiny_model_dir):
    loaded = load(tiny_model_dir, dtype=torch.float32, device="cpu")
    loaded.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 == 1 %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with in_process_server(loaded) as port:
        body = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
        status, text = _post(f"http://127.0.0.1:{port}", "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400
        error = json.loads(text)["error"]
        assert "roles must alternate" in error["message"] and error["param"] == "messages"


def test_serve_precision_bf16_serves_the_bf16_model(tiny_model_dir, tmp_path, server):
    """--precision reaches the served model: /stats says bf16, and answers are generate's in bf16."""
    from tunesmith.inference import load_for_generation

    assert json.load(urllib.request.urlopen(server + "/stats", timeout=10))["precision"] == "fp32"  # the CPU default
    with _served(tiny_model_dir, tmp_path / "home", "--precision", "bf16") as (url, _):
        assert json.load(urllib.request.urlopen(url + "/stats", timeout=10))["precision"] == "bf16"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        bf16 = load_for_generation(tiny_model_dir, "bf16")
        prompt = render_prompt(bf16.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
        expected = generate(bf16.model, bf16.tokenizer, [prompt], GenerationOptions(MAX_TOKENS))[0].text
        assert _ask(client, QUESTIONS[0]).choices[0].message.content == expected
