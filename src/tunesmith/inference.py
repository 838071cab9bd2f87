"""Batched generation, shared by generate, eval, chat and serve (prompts come from data.prompt).

Prompts are sorted by length and generated in left-padded batches, greedy unless a temperature
is given, stopping at EOS or the template's end-of-turn token. Returned text never contains the
prompt: only the newly generated tokens are decoded.

Greedy batches run through ``_greedy_tokens``, a plain decoding loop over the model's KV cache
that prefills the sorted prompts in groups of similar length and drops each sequence from the
batch as soon as it ends: with the 64 rows eval uses, the few long answers no longer drag every
finished row through the remaining steps. Sampling, and any model whose generation config asks
for a logits processor (a repetition penalty, banned words...: ``logits_processors``), go through
``model.generate``.
Precision is the model's dtype: ``generation_dtype`` picks bf16 where the hardware computes it
natively (AVX512-BF16 or AMX CPUs, CUDA with bf16); ``for_generation`` casts a model (merging a
peft adapter first). On an AVX512-BF16 CPU, 64 rows generate 2.5x faster in bf16 than in fp32.
Measurements: bench/README.md, "Evaluation generation".
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunesmith.data.prompt import render_prompt  # noqa: F401  (generate, chat and serve render through it)
from tunesmith.data.templates import END_OF_TURN_TOKENS, find_control_token  # noqa: F401
from tunesmith.errors import UsageError
from tunesmith.models.load import default_device, load

# --precision of eval and generate. auto: bf16 where the hardware computes it natively, else fp32.
PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` has bf16 matmuls in hardware (elsewhere bf16 is emulated and slower than fp32)."""
    device = str(device)
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def generation_dtype(precision: str = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The dtype to generate in for ``precision`` (one of PRECISIONS) on ``device`` (default: the default device)."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device or default_device()) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def for_generation(model, precision: str = "auto"):
    """``model`` ready to generate in ``precision``, changed in place (its fp32 weights are not kept): cast to the
    dtype, and a peft adapter merged into the base weights first (in fp32) unless that dtype is fp32, where the
    adapter stays separate so that answers are bit for bit the ones of the model as trained. Merged, a LoRA
    run generated 15% more tokens/s (bf16, 64 rows, r16 on every linear of the default model)."""
    dtype = generation_dtype(precision, model.device)
    if dtype != torch.float32 and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.to(dtype)


def load_for_generation(name_or_run, precision: str | None = "auto", *, allow_pickle: bool = False):
    """``models.load`` for generate, chat and serve: in ``precision`` (see ``for_generation``), or with
    ``precision=None`` as loaded (fp32 on CPU, bf16 on a GPU that has it)."""
    loaded = load(name_or_run, dtype=torch.float32 if precision == "fp32" else None, allow_pickle=allow_pickle)
    if precision is not None:
        loaded.model = for_generation(loaded.model, precision)
    return loaded


def precision_name(dtype: torch.dtype) -> str:
    """"bf16", "fp32", "fp16" for reports; the dtype's own name otherwise."""
    names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


@dataclass
class GenerationOptions:
    """How to generate, checked when made: every way in (generate, eval, chat, the web UI, serve) refuses a value
    that transformers would only fail on later, inside a generation thread (``top_p=-1``), with a clear message."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral) \
                or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be an integer of at least 1, not {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise UsageError(f"temperature must be a number of at least 0 (0: greedy), not {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be above 0 and at most 1, not {self.top_p!r}")


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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
    # An end-of-turn name counts only as a special token: in Gemma's vocabulary "</s>" is an HTML tag, plain text.
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] in special)
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
             progress: Callable[[float], None] | None = None) -> list[Generation]:
    """Generate for every prompt; ``on_result(index, generation)`` fires as each batch finishes.

    ``progress(answers)`` is told the answers done since its last call, a fraction while a batch is generating
    (greedy decoding reports every token step: each row's share of its ``max_new_tokens``, and a row that stops
    early counts whole), so that a bar moves and gives an ETA within a batch of long answers."""
    options = options or GenerationOptions()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        counted = _Counted(progress) if progress else None
        generations = _generate_batch(model, tokenizer, [encoded[i] for i in batch], options, counted)
        for index, gen in zip(batch, generations, strict=True):
            results[index] = gen
            if on_result:
                on_result(index, gen)
        if progress:
            progress(len(batch) - counted.total)  # the batch counts whole (sampling reports nothing before)
    return results  # type: ignore[return-value]


class _Counted:
    """A progress callback that also keeps the sum of what it was told."""

    def __init__(self, progress: Callable[[float], None]):
        self.progress, self.total = progress, 0.0

    def __call__(self, answers: float) -> None:
        self.total += answers
        self.progress(answers)


def _generate_batch(model, tokenizer, batch: list[list[int]], options: GenerationOptions,
                    progress: Callable[[float], None] | None = None) -> list[Generation]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=model.device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
    stops = stop_token_ids(model, tokenizer)
    started = time.perf_counter()
    if not options.temperature and not logits_processors(model, options, stops, width):
        rows = _greedy_tokens(model, input_ids, attention, stops, options.max_new_tokens, progress=progress)
    else:
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=options.max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad_id, **_sampling_kwargs(options))
        rows = out[:, width:].tolist()
    elapsed = time.perf_counter() - started
    generations = []
    for ids, row in zip(batch, rows, strict=True):
        new = _until_stop(row, stops)
        text, hit_stop = _truncate_at_stop(decode_new(tokenizer, new), options.stop)
        finished = hit_stop or len(new) < len(row) or (new and new[-1] in stops)
        generations.append(Generation(text=text.strip(), prompt_tokens=len(ids), completion_tokens=len(new),
                                      latency_s=elapsed / len(batch), finish_reason="stop" if finished else "length"))
    return generations


def logits_processors(model, options: GenerationOptions, stop_ids: list[int], prompt_length: int):
    """The logits processors transformers' generate builds for ``options`` and the model's generation
    config (a repetition penalty, the temperature, top-k and top-p warpers when sampling); empty for
    plain greedy decoding. Built by generate's own (private) method, so the server processes a request
    as ``tunesmith generate`` does, and ``_greedy_tokens`` runs only where generate would add nothing."""
    import copy

    from transformers import GenerationConfig

    config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    if options.temperature:
        config.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
    else:
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad_id = config.pad_token_id if config.pad_token_id is not None else next(iter(stop_ids), None)
    config.update(eos_token_id=stop_ids, pad_token_id=pad_id)
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=model.device)
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt_length,
                                       device=model.device)


def joinable(model) -> bool:
    """Whether this model's KV caches are plain per-layer tensors (no sliding window, no linear attention):
    rows can then be left-padded, stacked and dropped (``_greedy_tokens``, the server's batching)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


# Prompts prefilled together. Rows come sorted by length, so each group is cut to its own longest prompt and carries
# little padding; on the 64-prompt bench this gave +5% (fp32) to +10% (bf16) tokens/s over one 64-row prefill.
PREFILL_ROWS = 16


def _greedy_tokens(model, input_ids: torch.Tensor, attention: torch.Tensor, stops: list[int],
                   max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   progress: Callable[[float], None] | None = None) -> list[list[int]]:
    """Greedy decoding of a left-padded batch; each row's new tokens, up to and including its stop token.

    A row that stops leaves the batch: its cache rows, mask and position are dropped, so the steps left
    run on the rows still generating. Position ids count real tokens only, as model.generate's do.
    ``pick(logits) -> tokens`` replaces the argmax (``sample_tokens`` samples through it).
    ``progress(rows)``: after each step, the rows' share of work done in it (see ``generate``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    plain = joinable(model)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    if plain and input_ids.shape[0] > PREFILL_ROWS:
        cache, logits = _prefill_in_groups(model, input_ids, attention, positions)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    stop_ids = torch.tensor(stops, device=input_ids.device, dtype=torch.long)
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    alive = list(range(input_ids.shape[0]))  # batch position -> row
    finished = torch.zeros(len(alive), dtype=torch.bool, device=input_ids.device)
    positions = positions[:, -1:]
    for step in range(max_new_tokens):
        # fp32 as model.generate does; bf16 argmax is also 4x slower on CPU
        tokens = logits.float().argmax(-1) if pick is None else pick(logits.float())
        for row, token, ended in zip(alive, tokens.tolist(), finished.tolist(), strict=True):
            if not ended:
                rows[row].append(token)
        was_finished = finished
        finished = finished | torch.isin(tokens, stop_ids)
        if progress:
            _report_step(progress, was_finished, finished, step, max_new_tokens)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if plain and bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive = [alive[k] for k in keep.tolist()]
            tokens, attention, positions, finished = tokens[keep], attention[keep], positions[keep], finished[keep]
        attention = torch.cat([attention, attention.new_ones(len(alive), 1)], dim=1)
        positions = positions + 1
        logits = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True).logits[:, -1]
    return rows


def _report_step(progress: Callable[[float], None], was_finished: torch.Tensor, finished: torch.Tensor,
                 step: int, max_new_tokens: int) -> None:
    """One token step's work in answers: each row still generating did 1/max_new_tokens of its answer; a row
    that stopped at this step is done, and the budget it leaves unused counts too."""
    generating = int((~was_finished).sum())
    stopped = int((finished & ~was_finished).sum())
    progress((generating + stopped * (max_new_tokens - step - 1)) / max_new_tokens)


def sampler(temperature: float, top_p: float, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """``pick`` for ``_greedy_tokens``: one token per row from softmax(logits / temperature), cut to the smallest
    set of tokens whose probability reaches ``top_p`` (nucleus sampling), drawn from ``generator`` alone, so the
    same generator state always gives the same tokens."""
    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the most likely token always stays
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return pick


@torch.no_grad()
def sample_tokens(model, prompt_ids: Sequence[list[int]], stops: list[int], pad_id: int, max_new_tokens: int, *,
                  temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """Sampled completions of token-id prompts (GRPO's rollouts): each row's new token ids, up to and including
    its stop token, through the same KV-cache loop as greedy decoding (finished rows leave the batch)."""
    width = max(len(ids) for ids in prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompt_ids], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    pick = sampler(temperature, top_p, generator or torch.Generator(device=device))
    return _greedy_tokens(model, input_ids, attention, stops, max_new_tokens, pick=pick)


def _prefill_in_groups(model, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor):
    """The prompts' forward pass, PREFILL_ROWS rows at a time, each group without the padding columns all its rows
    share; the groups' K/V are then left-padded to the batch width and joined. A padded column is masked out of
    attention, so the cache holds what one forward over the whole batch would have put there."""
    from transformers import DynamicCache

    width = input_ids.shape[1]
    groups, logits = [], []
    for start in range(0, input_ids.shape[0], PREFILL_ROWS):
        rows = slice(start, start + PREFILL_ROWS)
        cut = width - int(attention[rows].sum(1).max())
        cache = DynamicCache(config=model.config)
        logits.append(model(input_ids=input_ids[rows, cut:], attention_mask=attention[rows, cut:],
                            position_ids=positions[rows, cut:], cache=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1])
        groups.append((cache, cut))
    joined = groups[0][0]
    for i, layer in enumerate(joined.layers):
        layer.keys = torch.cat([F.pad(cache.layers[i].keys, (0, 0, cut, 0)) for cache, cut in groups])
        layer.values = torch.cat([F.pad(cache.layers[i].values, (0, 0, cut, 0)) for cache, cut in groups])
    return joined, torch.cat(logits)


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

    Setting ``cancel`` stops generation at the next token (a client that went away); so does closing this
    iterator, which returns only once the generation thread has ended. An error in that thread ends the
    stream and is raised here (without this, the streamer would wait for text forever)."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    cancel = cancel or threading.Event()

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    options = options or GenerationOptions()
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=options.max_new_tokens, streamer=streamer,
                  eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([Cancelled()]), **_sampling_kwargs(options))
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # handed to the reader below, which raises it
            failed.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        held = ""  # a trailing U+FFFD may be half a character; show it only once more text follows
        for piece in streamer:
            held += piece
            if ready := held.rstrip("\ufffd"):
                yield ready
                held = held[len(ready):]
    finally:
        cancel.set()  # a reader that left early: generation stops at its next token
        thread.join()
    if failed:
        raise failed[0]
