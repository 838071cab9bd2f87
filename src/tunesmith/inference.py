"""Batched generation, shared by generate, eval, chat and serve (prompts come from data.prompt).

Prompts are sorted by length and generated in left-padded batches, greedy unless a temperature
is given, stopping at EOS or the template's end-of-turn token. Returned text never contains the
prompt: only the newly generated tokens are decoded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tunesmith.data.prompt import render_prompt  # noqa: F401  (generate, chat and serve render through it)
from tunesmith.data.templates import END_OF_TURN_TOKENS, find_control_token  # noqa: F401


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str  # "stop" or "length"


def stop_token_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def _sampling_kwargs(options: GenerationOptions) -> dict:
    if options.temperature and options.temperature > 0:
        return {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def _truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], options: GenerationOptions | None = None,
             batch_size: int = 8, on_result: Callable[[int, Generation], None] | None = None,
             progress: Callable[[int], None] | None = None) -> list[Generation]:
    """Generate for every prompt; ``on_result(index, generation)`` fires as each batch finishes."""
    options = options or GenerationOptions()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        generations = _generate_batch(model, tokenizer, [encoded[i] for i in batch], options)
        for index, gen in zip(batch, generations, strict=True):
            results[index] = gen
            if on_result:
                on_result(index, gen)
        if progress:
            progress(len(batch))
    return results  # type: ignore[return-value]


def _generate_batch(model, tokenizer, batch: list[list[int]], options: GenerationOptions) -> list[Generation]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    stops = stop_token_ids(model, tokenizer)
    started = time.perf_counter()
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                         max_new_tokens=options.max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                         **_sampling_kwargs(options))
    elapsed = time.perf_counter() - started
    generations = []
    for ids, row in zip(batch, out[:, width:].tolist(), strict=True):
        new = _until_stop(row, stops)
        text, hit_stop = _truncate_at_stop(decode_new(tokenizer, new), options.stop)
        finished = hit_stop or len(new) < len(row) or (new and new[-1] in stops)
        generations.append(Generation(text=text.strip(), prompt_tokens=len(ids), completion_tokens=len(new),
                                      latency_s=elapsed / len(batch), finish_reason="stop" if finished else "length"))
    return generations


def decode_new(tokenizer, ids: list[int]) -> str:
    """Decode generated ids; a token limit can cut a multi-byte character (CJK, emoji) in half,
    which decodes to U+FFFD: drop that half character rather than show garbage."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def _until_stop(row: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stops:
            return row[:i]
    return row


def stream(model, tokenizer, prompt: str, options: GenerationOptions | None = None,
           cancel: threading.Event | None = None) -> Iterator[str]:
    """Yield text pieces as they are generated (for chat and streaming responses).

    Setting ``cancel`` stops generation at the next token (a client that went away)."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    options = options or GenerationOptions()
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=options.max_new_tokens, streamer=streamer,
                  eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                  **_sampling_kwargs(options))
    if cancel is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([Cancelled()])
    thread = threading.Thread(target=lambda: torch.inference_mode()(model.generate)(**kwargs), daemon=True)
    thread.start()
    held = ""  # a trailing U+FFFD may be half a character; show it only once more text follows
    for piece in streamer:
        held += piece
        if ready := held.rstrip("\ufffd"):
            yield ready
            held = held[len(ready):]
    thread.join()
