"""Continuous batching: concurrent requests share the model's forward passes and get, token for
token, what they get alone.

Through a real uvicorn server on 127.0.0.1 and the official openai client (the tiny random model
of tests/conftest.py), and on the worker itself where the timing of a join must be certain.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest
import torch

from tests.serve.test_server import in_process_server
from tunesmith.inference import GenerationOptions, generate, render_prompt
from tunesmith.models.load import load
from tunesmith.serve.batching import Batcher, Done, Piece, Request

QUESTIONS = ["Who are you?", "What is the capital of France?", "你是谁？", "Explain machine learning in one sentence."]
LONG = QUESTIONS[0]  # the tiny model never ends this one early: it runs to any max_tokens below 300
# (question, max_tokens, cut by a stop string taken from its own answer, endpoint)
JOBS = [(q, n, stop, endpoint) for q in QUESTIONS for n, stop, endpoint in
        ((5, False, "chat"), (23, True, "chat"), (40, False, "completions"))]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def server(loaded):
    with in_process_server(loaded) as port:
        yield f"http://127.0.0.1:{port}"


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _ask(client, question: str, max_tokens: int, stop=None, endpoint: str = "chat", **kwargs) -> tuple[str, str]:
    """(text, finish_reason) of a greedy request, streamed or not."""
    common = dict(model=client.models.list().data[0].id, max_tokens=max_tokens, stop=stop,
                  temperature=kwargs.pop("temperature", 0), **kwargs)
    if endpoint == "completions":
        reply = client.completions.create(prompt=question, **common)
        return reply.choices[0].text, reply.choices[0].finish_reason
    reply = client.chat.completions.create(messages=[{"role": "user", "content": question}], **common)
    if not kwargs.get("stream"):
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    chunks = [c for c in reply if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    return "".join(c.choices[0].delta.content or "" for c in chunks).strip(), finish[-1]


@pytest.fixture(scope="module")
def alone(loaded):
    """Every job's stop string and (text, finish_reason), asked one at a time of a server of its own,
    and that server's /stats: the reference the concurrent runs must reproduce."""
    with in_process_server(loaded) as port:
        url = f"http://127.0.0.1:{port}"
        client = _client(url)
        stops = {}
        for job in JOBS:
            question, max_tokens, cut, endpoint = job
            text = _ask(client, question, max_tokens, endpoint=endpoint)[0]
            stops[job] = text.strip()[3:5] if cut else None
        answers = {job: _ask(client, job[0], job[1], stops[job], job[3]) for job in JOBS}
        return stops, answers, _get(url + "/stats")


def _run_together(calls: dict) -> dict:
    """Run the zero-argument ``calls`` at once (each from its own thread, released together)."""
    results, errors = {}, []
    barrier = threading.Barrier(len(calls))

    def run(key, call):
        try:
            barrier.wait(timeout=60)
            results[key] = call()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors[:3]
    return results


def _settled(url: str) -> dict:
    deadline = time.time() + 10
    while (health := _get(url + "/health"))["busy"] or health["waiting"]:
        assert time.time() < deadline, health
        time.sleep(0.02)
    return health


def test_requests_one_at_a_time_run_alone_and_stop_where_asked(alone):
    stops, answers, stats = alone
    assert stats["largest_batch"] == 1 and stats["requests"] == 2 * len(JOBS)
    for job, (text, finish) in answers.items():
        assert text, job
        if stops[job]:
            assert finish == "stop" and stops[job] not in text, job


def test_concurrent_greedy_answers_equal_the_answers_alone_and_share_batches(server, alone):
    stops, answers, _ = alone
    before = _get(server + "/stats")
    calls = {(job, i): (lambda job=job, i=i: _ask(_client(server), job[0], job[1], stops[job], job[3],
                                                  stream=i == 1 and job[3] == "chat"))
             for job in JOBS for i in range(2)}
    results = _run_together(calls)
    assert {key: text for key, (text, _) in results.items()} == {(job, i): answers[job][0] for job, i in calls}
    assert {key: finish for key, (_, finish) in results.items()} == {(job, i): answers[job][1] for job, i in calls}
    stats = _get(server + "/stats")
    assert stats["largest_batch"] >= 4, stats  # 24 requests released together did share forward passes
    assert stats["decode_steps"] - before["decode_steps"] < sum(n for _, n, _, _ in JOBS), (before, stats)
    _settled(server)


def test_a_stream_and_a_whole_answer_share_the_batch(server, alone):
    _, answers, _ = alone
    client = _client(server)
    model = client.models.list().data[0].id
    before = _get(server + "/stats")
    stream = client.chat.completions.create(model=model, max_tokens=250, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": LONG}])
    chunks = iter(stream)
    text = ""
    while not text:  # the stream is generating before the other request is sent
        chunk = next(chunks)
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    whole = _ask(client, QUESTIONS[1], 40, endpoint="completions")
    text += "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole == answers[(QUESTIONS[1], 40, False, "completions")]
    assert text.strip() == _ask(client, LONG, 250)[0]
    after = _get(server + "/stats")
    assert after["largest_batch"] >= 2 and after["requests"] == before["requests"] + 3


def test_a_client_leaving_mid_stream_leaves_the_others_unharmed(server, alone, loaded):
    stops, answers, _ = alone
    client = _client(server)
    model = client.models.list().data[0].id
    started = _get(server + "/stats")["decode_steps"]
    leaving = client.chat.completions.create(model=model, max_tokens=300, stream=True,
                                             messages=[{"role": "user", "content": LONG}])
    chunks = iter(leaving)
    while not next(chunks).choices[0].delta.content:
        pass
    others = [job for job in JOBS if job[1] > 5]
    results = _run_together({job: lambda job=job: _ask(_client(server), job[0], job[1], stops[job], job[3])
                             for job in others} | {"leave": leaving.close})
    del results["leave"]
    assert results == {job: answers[job] for job in others}
    _settled(server)
    time.sleep(0.3)  # an orphaned row would keep the worker stepping towards max_tokens=300
    steps = _get(server + "/stats")["decode_steps"] - started
    assert steps < 150, f"{steps} decode steps: the abandoned stream ran on (the others need at most 40)"
    assert _ask(client, *JOBS[1][:2], stops[JOBS[1]]) == answers[JOBS[1]]


def test_a_seeded_request_samples_the_same_text_alone_and_in_a_batch(server):
    client = _client(server)

    def sampled(seed):
        return _ask(client, QUESTIONS[2], 30, temperature=1.0, top_p=0.9, seed=seed)[0]

    first = sampled(1234)
    assert sampled(1234) == first
    assert sampled(99) != first  # the seed decides the draw (30 tokens from a 600-token vocabulary)
    greedy = {i: lambda i=i: _ask(_client(server), LONG, 40)[0] for i in range(4)}
    together = _run_together(greedy | {"seeded": lambda: sampled(1234)})
    assert together["seeded"] == first
    assert len({together[i] for i in range(4)}) == 1


# ------------------------------------------------------------------------------------- the worker

def _until(condition, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline
        time.sleep(0.001)


def _submit(batcher: Batcher, ids: list[int], options: GenerationOptions, seed=None):
    """Submit; return the request, its events as they come, and a flag set when it is done."""
    events, finished = [], threading.Event()

    def emit(event):
        events.append(event)
        if isinstance(event, Done | Exception):
            finished.set()

    return batcher.submit(Request(ids, options, emit, seed)), events, finished


def test_newcomers_joining_a_running_batch_get_their_lone_greedy_tokens(loaded):
    """The first request is decoding when the others join, packed into one prefill: the packed row's
    block mask, left-padded caches, per-row positions and the padding mask must leave every answer
    as it is alone."""
    tokenizer = loaded.tokenizer
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts.append("The quick brown fox jumps over the lazy dog. " * 6)  # longer than the running row's cache
    options = [GenerationOptions(80)] + [GenerationOptions(30)] * (len(prompts) - 1)
    lone = [generate(loaded.model, tokenizer, [p], o)[0] for p, o in zip(prompts, options, strict=True)]
    batcher = Batcher(loaded.model, tokenizer)
    try:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        runs = [_submit(batcher, ids[0], options[0])]
        _until(lambda: runs[0][1])  # running: it has handed out text
        with batcher.wake:  # the worker takes none of them until all four wait: one packed prefill
            runs += [_submit(batcher, i, o) for i, o in zip(ids[1:], options[1:], strict=True)]
        for _, _, finished in runs:
            assert finished.wait(60)
        results = [events[-1] for _, events, _ in runs]
        assert [(r.text.strip(), r.completion_tokens, r.finish_reason) for r in results] == \
            [(g.text, g.completion_tokens, g.finish_reason) for g in lone]
        assert ["".join(e.text for e in events if isinstance(e, Piece)) for _, events, _ in runs] == \
            [r.text for r in results]
        stats = batcher.stats()
        assert stats["largest_batch"] == len(prompts) and stats["prefill_passes"] == 2
        assert batcher.counts() == {"busy": 0, "waiting": 0}
    finally:
        batcher.close()


def test_a_cancelled_request_leaves_the_batch_and_frees_the_worker(loaded):
    tokenizer = loaded.tokenizer
    ids = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": LONG}]), add_special_tokens=False)["input_ids"]
    batcher = Batcher(loaded.model, tokenizer, max_batch=1)
    try:
        request, events, _ = _submit(batcher, ids, GenerationOptions(300))
        _, _, queued_done = _submit(batcher, ids, GenerationOptions(3))
        _until(lambda: events)
        assert batcher.counts() == {"busy": 1, "waiting": 1}
        request.cancel()
        assert queued_done.wait(30)  # the one waiting got the only row
        assert not any(isinstance(e, Done) for e in events) and batcher.stats()["decode_steps"] < 100
    finally:
        batcher.close()


def test_a_failing_forward_pass_fails_its_request_not_the_worker(loaded):
    tokenizer = loaded.tokenizer
    ids = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": "hi"}]), add_special_tokens=False)["input_ids"]
    fail_next = [True]

    def out_of_memory(_module, _args):
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("simulated: out of memory")

    handle = loaded.model.register_forward_pre_hook(out_of_memory)
    batcher = Batcher(loaded.model, tokenizer)
    try:
        _, events, finished = _submit(batcher, ids, GenerationOptions(5))
        assert finished.wait(30) and isinstance(events[-1], RuntimeError)
        _, events, finished = _submit(batcher, ids, GenerationOptions(5))
        assert finished.wait(30) and isinstance(events[-1], Done)
        assert batcher.counts() == {"busy": 0, "waiting": 0}
    finally:
        handle.remove()
        batcher.close()


def test_the_generation_configs_repetition_penalty_applies_as_in_generate(loaded):
    """A model whose generation config asks for a logits processor (Qwen2.5 sets repetition_penalty)
    is served what `tunesmith generate` (model.generate) gives it, in a batch too."""
    tokenizer, config = loaded.tokenizer, loaded.model.generation_config
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    plain = [g.text for g in generate(loaded.model, tokenizer, prompts, GenerationOptions(40), batch_size=1)]
    config.repetition_penalty = 5.0
    batcher = Batcher(loaded.model, tokenizer)
    try:
        penalized = [g.text for g in generate(loaded.model, tokenizer, prompts, GenerationOptions(40), batch_size=1)]
        with batcher.wake:  # all four in one batch
            runs = [_submit(batcher, tokenizer(p, add_special_tokens=False)["input_ids"], GenerationOptions(40))
                    for p in prompts]
        for _, _, finished in runs:
            assert finished.wait(60)
        assert [events[-1].text.strip() for _, events, _ in runs] == penalized != plain
        assert batcher.stats()["largest_batch"] == len(prompts)
    finally:
        config.repetition_penalty = 1.0
        batcher.close()
