"""Batched, left-padded, length-sorted greedy generation gives the one-at-a-time outputs (fp32)."""

from __future__ import annotations

import pytest
import torch

from tunesmith.inference import GenerationOptions, generate, render_prompt, stop_token_ids

QUESTIONS = [
    "hi",
    "What is the capital of France?",
    "Who are you? " * 5,
    "你好，世界！你是谁？",
    "Explain machine learning in one sentence.",
    "fox",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "weather",
]


@pytest.fixture
def tiny(tiny_model_dir):
    from tunesmith.models.load import load

    return load(str(tiny_model_dir), dtype=torch.float32, device="cpu")


def _prompts(tokenizer) -> list[str]:
    return [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def _boost_end_of_turn(model, factor: float) -> None:
    """Make <|im_end|> (id 2) likelier, so sequences in one batch stop at different steps."""
    with torch.no_grad():
        model.lm_head.weight[2] *= factor


def _assert_same(batched, single):
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.completion_tokens for g in batched] == [g.completion_tokens for g in single]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in single]


def test_batched_equals_sequential_long_outputs(tiny):
    prompts = _prompts(tiny.tokenizer)
    options = GenerationOptions(max_new_tokens=32)
    batched = generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=8)
    single = generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=1)
    _assert_same(batched, single)
    assert sum(g.completion_tokens for g in batched) > 16 * len(prompts)  # long answers, not early stops
    assert len({g.text for g in batched}) > 1  # the prompts really steer the outputs


def test_batched_equals_sequential_when_sequences_stop_at_different_steps(tiny):
    _boost_end_of_turn(tiny.model, 3.0)
    prompts = _prompts(tiny.tokenizer)
    options = GenerationOptions(max_new_tokens=30)
    single = generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=1)
    for batch_size in (3, 8):
        _assert_same(generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=batch_size), single)
    counts = [g.completion_tokens for g in single]
    assert len(set(counts)) >= 3, counts  # finished sequences wait in the batch while others go on
    assert {g.finish_reason for g in single} == {"stop", "length"}


def test_stops_exactly_where_the_end_of_turn_token_is_generated(tiny):
    """Swap the output rows of EOS and a token the model picks mid-answer: the answer now ends there."""
    prompt = _prompts(tiny.tokenizer)[1]
    ids = tiny.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        baseline = tiny.model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, eos_token_id=[],
                                       pad_token_id=3)[0, ids.shape[1]:].tolist()
    cut_token = baseline[6]
    assert not set(baseline[:7]) & set(stop_token_ids(tiny.model, tiny.tokenizer))  # nothing else stops it first
    expected = baseline[:baseline.index(cut_token)]
    with torch.no_grad():
        head = tiny.model.lm_head.weight
        head[[2, cut_token]] = head[[cut_token, 2]].clone()
    result = generate(tiny.model, tiny.tokenizer, [prompt], GenerationOptions(max_new_tokens=20))[0]
    assert result.completion_tokens == len(expected) < 20 and result.finish_reason == "stop"
    assert result.text == tiny.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert result.prompt_tokens == ids.shape[1]


def test_results_come_back_in_input_order_with_callbacks(tiny):
    prompts = _prompts(tiny.tokenizer)
    seen, advanced = {}, []
    options = GenerationOptions(max_new_tokens=5)
    results = generate(tiny.model, tiny.tokenizer, prompts, options, batch_size=3,
                       on_result=lambda i, g: seen.__setitem__(i, g), progress=advanced.append)
    assert sorted(seen) == list(range(len(prompts)))
    assert [seen[i] for i in range(len(prompts))] == results
    assert sum(advanced) == pytest.approx(len(prompts)) and len(advanced) > 3  # within batches too
    assert all(g.latency_s > 0 for g in results)
    one = generate(tiny.model, tiny.tokenizer, [prompts[2]], options)[0]
    assert one.text == results[2].text


def test_progress_moves_within_a_batch_token_by_token(tiny):
    """One batch of 8 long answers: the progress callback hears of every token step, not only the batch's end,
    and its running total climbs to exactly the 8 answers (a row that stops early counts whole at its stop)."""
    _boost_end_of_turn(tiny.model, 3.0)
    prompts, steps = _prompts(tiny.tokenizer), 30
    advanced = []
    results = generate(tiny.model, tiny.tokenizer, prompts, GenerationOptions(max_new_tokens=steps), batch_size=8,
                       progress=advanced.append)
    longest = max(g.completion_tokens for g in results)
    assert longest == steps and len(advanced) == steps + 1  # one report per token step, then the batch's own
    totals = [sum(advanced[:k + 1]) for k in range(len(advanced))]
    assert all(b >= a for a, b in zip(totals, totals[1:], strict=False))
    assert 0 < totals[longest // 2] < len(prompts)  # halfway through the batch, part of it is done
    assert totals[-2] == pytest.approx(len(prompts)) and totals[-1] == pytest.approx(len(prompts))
    stopped_first = min(g.completion_tokens for g in results if g.finish_reason == "stop")  # its stop token's step
    assert totals[stopped_first] >= 1 > totals[stopped_first] - advanced[stopped_first]  # whole at once


def test_stop_strings_cut_the_text(tiny):
    prompt = _prompts(tiny.tokenizer)[1]
    full = generate(tiny.model, tiny.tokenizer, [prompt], GenerationOptions(max_new_tokens=30))[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = generate(tiny.model, tiny.tokenizer, [prompt], GenerationOptions(max_new_tokens=30, stop=[stop]))[0]
    assert cut.text == full.text[:full.text.find(stop)].strip() and cut.finish_reason == "stop"


def test_empty_prompt_list(tiny):
    assert generate(tiny.model, tiny.tokenizer, [], GenerationOptions()) == []


def test_half_a_multibyte_character_is_not_shown(tiny_tokenizer):
    from tunesmith.inference import decode_new

    ids = tiny_tokenizer("好龘", add_special_tokens=False)["input_ids"]
    assert "\ufffd" in tiny_tokenizer.decode(ids[:-1])  # the rare character spans several byte tokens
    assert decode_new(tiny_tokenizer, ids[:-1]) == "好"
    assert decode_new(tiny_tokenizer, ids) == "好龘"


def _old_path(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """What generate did before its own decoding loop: one left-padded model.generate over the batch."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    stops = stop_token_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=pad, do_sample=False, temperature=None, top_p=None, top_k=None)
    rows = out[:, width:].tolist()
    return [row[:next((i for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def _decoded(tokenizer, rows: list[list[int]]) -> list[str]:
    from tunesmith.inference import decode_new

    return [decode_new(tokenizer, row).strip() for row in rows]


def test_greedy_loop_gives_the_old_model_generate_output(tiny, monkeypatch):
    """fp32: the decoding loop that drops finished rows answers exactly as the batched model.generate did."""
    from tunesmith import inference

    _boost_end_of_turn(tiny.model, 3.0)
    prompts = _prompts(tiny.tokenizer)
    calls = []
    real = inference._greedy_tokens
    monkeypatch.setattr(inference, "_greedy_tokens", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    new = generate(tiny.model, tiny.tokenizer, prompts, GenerationOptions(max_new_tokens=30), batch_size=8)
    assert calls == [torch.Size([8, max(len(tiny.tokenizer(p)["input_ids"]) for p in prompts)])]  # one batch, own loop
    old = _old_path(tiny.model, tiny.tokenizer, prompts, 30)
    assert [g.text for g in new] == _decoded(tiny.tokenizer, old)
    assert [g.completion_tokens for g in new] == [len(row) for row in old]
    assert len({len(row) for row in old}) >= 3  # rows really stopped at different steps


@pytest.mark.parametrize("prefill_rows", [3, 64])
def test_one_batch_equals_a_plain_generate_per_prompt(tiny, monkeypatch, prefill_rows):
    """fp32, prompts of different lengths in one batch, prefilled in groups of 3 rows or all together: exactly
    what model.generate gives each prompt alone."""
    from tunesmith import inference

    monkeypatch.setattr(inference, "PREFILL_ROWS", prefill_rows)
    _boost_end_of_turn(tiny.model, 2.5)
    prompts = _prompts(tiny.tokenizer) + [render_prompt(tiny.tokenizer, [{"role": "user", "content": "a " * n}])
                                          for n in (1, 7, 30, 60)]
    lengths = [len(tiny.tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) >= 8 and max(lengths) > 4 * min(lengths)
    batched = generate(tiny.model, tiny.tokenizer, prompts, GenerationOptions(max_new_tokens=40), batch_size=64)
    alone = [_old_path(tiny.model, tiny.tokenizer, [p], 40)[0] for p in prompts]
    assert [g.text for g in batched] == _decoded(tiny.tokenizer, alone)
    assert [g.completion_tokens for g in batched] == [len(row) for row in alone]
    assert {g.finish_reason for g in batched} == {"stop", "length"}


def test_finished_rows_leave_the_batch(tiny):
    _boost_end_of_turn(tiny.model, 3.0)
    rows = []
    hook = tiny.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
    try:
        results = generate(tiny.model, tiny.tokenizer, _prompts(tiny.tokenizer), GenerationOptions(max_new_tokens=30),
                           batch_size=8)
    finally:
        hook.remove()
    assert rows[0] == 8 and rows == sorted(rows, reverse=True) and rows[-1] < 8
    # One forward per step of the longest answer; each row is in the batch for as long as it generates.
    assert len(rows) == max(g.completion_tokens + (g.finish_reason == "stop") for g in results)
    assert sum(rows) - 8 == sum(g.completion_tokens + (g.finish_reason == "stop") for g in results) - 8


def test_a_model_asking_for_a_repetition_penalty_still_gets_it(tiny):
    """A generation config with a logits processor (Qwen2.5 ships repetition_penalty) is decoded by model.generate."""
    prompts = _prompts(tiny.tokenizer)
    plain = generate(tiny.model, tiny.tokenizer, prompts, GenerationOptions(max_new_tokens=24), batch_size=8)
    tiny.model.generation_config.repetition_penalty = 5.0
    penalized = generate(tiny.model, tiny.tokenizer, prompts, GenerationOptions(max_new_tokens=24), batch_size=8)
    assert [g.text for g in penalized] == _decoded(tiny.tokenizer, _old_path(tiny.model, tiny.tokenizer, prompts, 24))
    assert [g.text for g in penalized] != [g.text for g in plain]


@pytest.mark.parametrize(("options", "message"), [
    ({"top_p": -1.0}, "top_p must be above 0 and at most 1, not -1.0"),
    ({"top_p": 0.0}, "top_p must be above 0"),
    ({"top_p": float("nan")}, "top_p must be above 0"),
    ({"temperature": -0.1}, "temperature must be a number of at least 0"),
    ({"temperature": float("inf")}, "temperature must be a number of at least 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer of at least 1, not 0"),
    ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
])
def test_sampling_options_are_checked_when_made(options, message):
    """Every way in (generate, eval, chat, the UI, serve) builds GenerationOptions, so each refuses these at once."""
    from tunesmith.errors import UsageError

    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        GenerationOptions(**options)
    assert GenerationOptions(max_new_tokens=1, temperature=2.5, top_p=1.0).top_p == 1.0


def test_eval_refuses_a_bad_top_p_before_loading_anything(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "held.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    for command in (["eval", "nowhere", "--data", str(data), "--top-p", "-1"],
                    ["generate", "nowhere", "hi", "--top-p", "-1"]):
        done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *command], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and "--top-p: must be above 0 and at most 1, not -1" in done.stderr, done.stderr


def test_an_end_of_turn_name_that_is_plain_text_does_not_stop_generation(tmp_path, tiny_tokenizer):
    """Gemma's vocabulary holds "</s>" as an HTML tag (a non-special token): generating it is text, not a stop."""
    from types import SimpleNamespace

    from tests.families import build_tokenizer

    gemma = build_tokenizer(tmp_path, "gemma3")
    gemma.add_tokens(["</s>"])  # added, not special, as in the real vocabulary
    no_config = SimpleNamespace(generation_config=None)
    stops = stop_token_ids(no_config, gemma)
    assert gemma.convert_tokens_to_ids("<end_of_turn>") in stops and gemma.eos_token_id in stops
    assert gemma.convert_tokens_to_ids("</s>") not in stops
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(no_config, tiny_tokenizer)
