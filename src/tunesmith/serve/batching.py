"""Continuous batching for the server: one worker thread owns the model, and every running request
shares its forward passes.

The server submits a ``Request`` (prompt ids, options, seed, a callback) and reads back ``Piece``s
of text and one ``Done``. The worker repeats one step; a step boundary is where the batch changes:

1. admit: waiting requests join while fewer than ``max_batch`` run. A lone newcomer is prefilled
   as transformers' generate would; several are packed into one row for one forward pass (each
   prompt sees only itself: a block-diagonal causal mask, positions from 0), and the row's cache is
   cut per prompt. Prefill gives each its first token. The new caches join the running batch's:
   every cache is left-padded with zeros to the longest, then all are stacked along the batch; a
   [rows, columns] attention mask marks the padding with 0.
2. decode: one forward pass over the last token of every row. A row's position id is its own count
   of real tokens, so the rotary embeddings see what a lone request sees, whatever the padding.
3. pick: the argmax of every plain greedy row at once; a row that samples, or whose model's
   generation config asks for logits processors (Qwen2.5's repetition_penalty), first goes through
   the processors transformers' generate would build for it, then takes the argmax or draws from
   its own generator.
4. retire: rows that ended (an end-of-turn/EOS token, a stop string, max_tokens) or whose client
   left are dropped from the cache, and the columns that became padding in every row are cut off.

Greedy text equals a lone request's: same positions, padding masked out. What differs is the
float rounding of batched and packed matmuls (logits within 1e-4 of a lone request's on the
default model), which can flip an argmax only between near-tied tokens (tests/serve/test_batching.py
and bench/serve_load.py compare the texts).

Sampling applies what transformers' generate applies: the request's temperature and top_p, the
rest from the model's generation config (its top_k, 50 when it sets none). Seed: a request's
``seed`` seeds a torch.Generator of its own that only its tokens draw from, so
the same request with the same seed gives the same text alone or beside others (no one else
consumes its random numbers); without a seed the generator starts from fresh entropy. It is not
torch's global seed, so it does not reproduce transformers' generate() after torch.manual_seed.

Trade-offs: a prefill pauses the running rows (no chunked prefill); a short newcomer's padding
costs attention columns until a retire trims them; packing needs a mask the attention kernel
takes (sdpa, eager), so other kernels prefill newcomers one by one. Models whose cache is not one plain DynamicLayer per layer (sliding windows, linear
attention) cannot be padded and stacked this way, so they run one request at a time.
"""

from __future__ import annotations

import collections
import inspect
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tunesmith.data.packing import block_causal_mask
from tunesmith.inference import GenerationOptions, decode_new, joinable, logits_processors, stop_token_ids
from tunesmith.loss import model_inputs

DEFAULT_MAX_BATCH = 16
PACK_TOKENS = 2048  # newcomers' prompt tokens packed into one prefill row: its mask is PACK_TOKENS^2

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per model layer: keys and values [rows, heads, columns, dim]


@dataclass
class Piece:
    """Newly generated text; never any part of a stop string."""

    text: str


@dataclass
class Done:
    text: str  # the whole completion, cut before a stop string
    finish_reason: str  # "stop" (a stop token or string) or "length"
    completion_tokens: int


Event = Piece | Done | Exception


@dataclass
class Request:
    """What the server submits. ``emit`` is called on the worker thread with each event."""

    ids: list[int]
    options: GenerationOptions
    emit: Callable[[Event], None]
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Leave at the next step boundary (a client that went away); no further events come."""
        self.cancelled.set()


class Row:
    """One running request: its generated tokens, the text handed out so far, its logits processors
    and its own generator."""

    def __init__(self, request: Request, tokenizer, stop_ids: set[int], processors):
        self.request, self.tokenizer, self.stop_ids, self.processors = request, tokenizer, stop_ids, processors
        self.plain = not processors and not request.options.temperature  # its token is the batch argmax's
        self.tokens: list[int] = []
        self.text, self.sent, self.finish = "", 0, None
        seed = request.seed if request.seed is not None else random.SystemRandom().getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        # Text that may be the start of a stop string is held back until the next token decides.
        self.hold = max((len(s) for s in request.options.stop if s), default=1) - 1

    def advance(self, token: int) -> None:
        """Take the next token; end on a stop token, a stop string or the token limit."""
        options = self.request.options
        if token in self.stop_ids:
            return self._end("stop")
        self.tokens.append(token)
        self.text = decode_new(self.tokenizer, self.tokens)
        cut = min((i for s in options.stop if s and (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._end("stop")
        if len(self.tokens) >= options.max_new_tokens:
            return self._end("length")
        self._send(len(self.text) - self.hold)

    def _end(self, reason: str) -> None:
        self.finish = reason
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.request.emit(Piece(self.text[self.sent:upto]))
            self.sent = upto

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [vocab]: processed as generate would, then argmax or a draw."""
        scores = logits[None]
        if self.processors:
            scores = self.processors(torch.tensor([self.request.ids + self.tokens], device=logits.device), scores)
        if not self.request.options.temperature:
            return int(scores.argmax())
        return int(torch.multinomial(scores[0].softmax(-1).cpu(), 1, generator=self.generator))

    def done(self) -> Done:
        return Done(self.text, self.finish or "stop", len(self.tokens))


# ------------------------------------------------------------------------------ the model and caches

def cache_kwarg(model) -> str:
    """The forward() keyword for the KV cache: transformers 5.24 renamed past_key_values to cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out) -> DynamicCache:
    return out["cache"] if "cache" in out else out["past_key_values"]


def kv(cache: DynamicCache) -> Layers:
    return [(layer.keys, layer.values) for layer in cache.layers]


def packable(model) -> bool:
    """Whether the attention kernel takes the packed rows' block-diagonal mask (see loss.model_inputs)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


def prefill(model, prompts: list[list[int]]) -> tuple[list[Layers], torch.Tensor]:
    """Prompts in one forward pass: the cache of each and the logits after each, [prompts, vocab].

    One prompt runs as transformers' generate runs it; several are packed into one row where each
    sees only itself, then the row's cache is cut into one per prompt."""
    if len(prompts) == 1:
        input_ids = torch.tensor(prompts, device=model.device)
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True, logits_to_keep=1)
        return [kv(_cache_of(out))], out.logits[:, -1].float()
    lengths = torch.tensor([len(p) for p in prompts])
    segments = torch.repeat_interleave(torch.arange(1, len(prompts) + 1), lengths)[None]
    batch = {"input_ids": torch.tensor([sum(prompts, [])]), "attention_mask": block_causal_mask(segments),
             "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None]}
    inputs = model_inputs(model, {key: value.to(model.device) for key, value in batch.items()})
    ends = lengths.cumsum(0)
    out = model(**{**inputs, "use_cache": True}, logits_to_keep=(ends - 1).to(model.device))
    row = kv(_cache_of(out))
    spans = zip((ends - lengths).tolist(), ends.tolist(), strict=True)
    caches = [[(k[:, :, a:b], v[:, :, a:b]) for k, v in row] for a, b in spans]
    return caches, out.logits[0].float()


def packs(requests: list[Request], limit: int) -> list[list[Request]]:
    """Consecutive groups of at most ``limit`` prompt tokens, prefilled together (a longer prompt alone)."""
    groups: list[list[Request]] = []
    size = 0
    for request in requests:
        if groups and size + len(request.ids) <= limit:
            groups[-1].append(request)
            size += len(request.ids)
        else:
            groups.append([request])
            size = len(request.ids)
    return groups


def decode_step(model, cache: DynamicCache, mask: torch.Tensor, last: list[int],
                cache_arg: str = "cache") -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every row: the logits of each row's next token, and the mask grown by a column."""
    mask = F.pad(mask, (0, 1), value=1)
    positions = mask.sum(-1, keepdim=True) - 1  # each row's count of real tokens before this one
    input_ids = torch.tensor(last, device=mask.device)[:, None]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_arg: cache})
    return out.logits[:, -1].float(), mask


def join(parts: list[tuple[Layers, torch.Tensor]]) -> tuple[DynamicCache, torch.Tensor]:
    """Several groups of rows as one batch: each one's keys, values and mask left-padded to the widest, then stacked."""
    width = max(mask.shape[1] for _, mask in parts)

    def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:  # each [rows, heads, columns, dim]
        return torch.cat([F.pad(t, (0, 0, width - t.shape[-2], 0)) for t in tensors])

    layers = [(stacked([p[0][i][0] for p in parts]), stacked([p[0][i][1] for p in parts]))
              for i in range(len(parts[0][0]))]
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for _, m in parts])
    return DynamicCache(ddp_cache_data=layers), mask


def select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Only the rows in ``keep``, less the leading columns that are padding in every one of them."""
    index = torch.tensor(keep, device=mask.device)
    mask = mask[index]
    lead = int((mask.cumsum(-1) == 0).sum(-1).min())
    layers = [(k[index, :, lead:], v[index, :, lead:]) for k, v in kv(cache)]
    return DynamicCache(ddp_cache_data=layers), mask[:, lead:]


# ----------------------------------------------------------------------------------------- sampling

def pick(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """The next token of every row: one argmax for the plain greedy rows, each other row its own choice."""
    tokens = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if not row.plain:
            tokens[i] = row.choose(logits[i])
    return tokens


# --------------------------------------------------------------------------------------- the worker

class Batcher:
    """The generation worker: a thread that owns ``model`` and runs every admitted request in one batch.

    ``counts()`` and ``stats()`` may be read from any thread."""

    def __init__(self, model, tokenizer, max_batch: int = DEFAULT_MAX_BATCH):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch if joinable(model) else 1
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        logits_processors(model, GenerationOptions(), sorted(self.stop_ids), 1)  # fails here, not per request
        self.cache_arg = cache_kwarg(model)
        self.pack_tokens = PACK_TOKENS if packable(model) else 0
        self.queue: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.rows: list[Row] = []  # in the order of the cache's rows
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.active = 0  # requests taken from the queue and not yet retired
        self.largest_batch = self.steps = self.rows_decoded = self.requests = self.prefills = 0
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="tunesmith-batcher", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Request:
        with self.wake:
            self.queue.append(request)
            self.wake.notify()
        return request

    def counts(self) -> dict:
        return {"busy": self.active, "waiting": len(self.queue)}

    def stats(self) -> dict:
        """What the worker has done since it started: for GET /stats, tests and benchmarks."""
        return {**self.counts(), "max_batch": self.max_batch, "largest_batch": self.largest_batch,
                "decode_steps": self.steps, "rows_decoded": self.rows_decoded, "prefill_passes": self.prefills,
                "requests": self.requests}

    def full(self) -> bool:
        return self.active >= self.max_batch

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._step()
                except Exception as exc:  # a failed forward pass fails the running rows, not the worker
                    self._fail(exc)
        self._fail(RuntimeError("the server is shutting down"), waiting=True)

    def _wait_for_work(self) -> bool:
        with self.wake:
            while not (self.closed or self.queue or self.rows):
                self.wake.wait()
            return not self.closed

    def _step(self) -> None:
        self._admit()
        self._retire()
        if self.rows:
            last = [row.tokens[-1] for row in self.rows]
            logits, self.mask = decode_step(self.model, self.cache, self.mask, last, self.cache_arg)
            self._count(len(self.rows))
            for row, token in zip(self.rows, pick(logits, self.rows), strict=True):
                row.advance(token)
            self._retire()

    def _count(self, rows: int) -> None:
        self.largest_batch = max(self.largest_batch, rows)
        self.steps += 1
        self.rows_decoded += rows

    def _admit(self) -> None:
        """Prefill the waiting requests there is room for, and stack their caches under the running rows."""
        running = bool(self.rows)
        parts = [(kv(self.cache), self.mask)] if running else []
        for group in packs(self._take(self.max_batch - len(self.rows)), self.pack_tokens):
            parts += self._prefilled([row for request in group if (row := self._row(request))])
        if len(parts) > running:  # someone joined
            self.cache, self.mask = join(parts)

    def _prefilled(self, rows: list[Row]) -> list[tuple[Layers, torch.Tensor]]:
        """Prefill ``rows`` together and add them to the batch; their caches and masks to join. If the packed
        prefill fails, each is tried alone, so that one request's failure is that request's alone."""
        if not rows:
            return []
        try:
            self.prefills += 1
            caches, logits = prefill(self.model, [row.request.ids for row in rows])
        except Exception as exc:  # e.g. out of memory: the running rows go on
            if len(rows) > 1:
                return [part for row in rows for part in self._prefilled([row])]
            self._refuse(rows[0].request, exc)
            return []
        parts = []
        for row, layers, row_logits in zip(rows, caches, logits, strict=True):
            row.advance(pick(row_logits[None], [row])[0])
            self.rows.append(row)
            parts.append((layers, torch.ones(1, len(row.request.ids), dtype=torch.long, device=row_logits.device)))
        return parts

    def _refuse(self, request: Request, exc: Exception) -> None:
        self.active -= 1
        request.emit(exc)

    def _row(self, request: Request) -> Row | None:
        """The request's row, or None where it cannot run (a seed torch refuses...): then it alone is failed."""
        stops = sorted(self.stop_ids)
        try:
            return Row(request, self.tokenizer, self.stop_ids,
                       logits_processors(self.model, request.options, stops, len(request.ids)))
        except Exception as exc:
            self._refuse(request, exc)
            return None

    def _take(self, room: int) -> list[Request]:
        """Up to ``room`` waiting requests, in order, skipping those cancelled while they waited."""
        taken = []
        with self.wake:
            while self.queue and len(taken) < room:
                request = self.queue.popleft()
                if not request.cancelled.is_set():
                    taken.append(request)
            self.active += len(taken)
            self.requests += len(taken)
        return taken

    def _retire(self) -> None:
        """Drop the rows that ended or were cancelled; tell the finished ones' clients."""
        keep = [i for i, row in enumerate(self.rows) if not (row.finish or row.request.cancelled.is_set())]
        if len(keep) == len(self.rows):
            return
        kept = set(keep)
        gone = [row for i, row in enumerate(self.rows) if i not in kept]
        self.rows = [self.rows[i] for i in keep]
        self.cache, self.mask = select(self.cache, self.mask, keep) if keep else (None, None)
        self.active -= len(gone)  # before Done goes out: a client that got its answer sees itself gone
        for row in gone:
            if row.finish and not row.request.cancelled.is_set():
                row.request.emit(row.done())

    def _fail(self, exc: Exception, waiting: bool = False) -> None:
        """Answer ``exc`` to every running request (and the waiting ones too, when ``waiting``)."""
        with self.wake:
            queued, self.queue = (list(self.queue), collections.deque()) if waiting else ([], self.queue)
        rows, self.rows, self.cache, self.mask = self.rows, [], None, None
        self.active -= len(rows)
        for request in [row.request for row in rows] + queued:
            request.emit(exc)
