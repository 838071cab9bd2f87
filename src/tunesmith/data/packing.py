"""Batches without wasted padding: packed rows, or padded batches of similar lengths.

Packing concatenates whole examples into rows of at most ``max_length`` tokens. Three things
keep the examples independent, and the packed-vs-unpacked loss test proves it:

- position_ids restart at 0 for each example (rotary positions as if it were alone);
- a 4D block-diagonal causal mask ``[B, 1, L, L]`` (True = may attend): transformers 5 passes a
  4D mask through to the attention unchanged, and position_ids alone do not isolate examples
  under sdpa or eager attention on CPU. loss.model_inputs adapts it per attention kernel;
- the first label of every example is ignored, so no token is predicted from the end of the
  previous example.

Sliding-window layers (Gemma 2 and 3, Mistral, Qwen2 with use_sliding_window) see only the last
``sliding_window`` tokens of their own example, as transformers' masks and kernels define them (a
query at i sees keys j with i - window < j <= i). ``layer_masks`` gives each layer type its mask.

``segment_ids`` (1, 2, ... per example in a row, 0 on padding) come along for per-example sums.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence

import torch

from tunesmith.data.tokenize import IGNORE, Encoded
from tunesmith.errors import UsageError


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of total length <= max_length.

    Longest first, each into the row it fills most tightly; deterministic (ties by index).
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise UsageError(f"{len(too_long)} examples are longer than the packing length {max_length} "
                         f"(first: index {too_long[0]}, {lengths[too_long[0]]} tokens); truncate them first")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted so bisect finds the tightest fit
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        slot = bisect_left(free, (need, -1))
        if slot == len(free):
            rows.append([index])
            insort(free, (max_length - need, len(rows) - 1))
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            insort(free, (room - need, row))
    return rows


def collate_packed(rows: Sequence[Sequence[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for packed rows: input_ids, labels, position_ids, segment_ids [B, L] and a 4D mask [B, 1, L, L]."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for k, example in enumerate(row, start=1):
            n = len(example.input_ids)
            input_ids[b, at:at + n] = torch.tensor(example.input_ids)
            labels[b, at + 1:at + n] = torch.tensor(example.labels[1:])  # never predicted across examples
            position_ids[b, at:at + n] = torch.arange(n)
            segment_ids[b, at:at + n] = k
            at += n
        position_ids[b, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": block_causal_mask(segment_ids), "segment_ids": segment_ids}


def block_causal_mask(segment_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[B, 1, L, L] boolean: a token sees earlier tokens of its own segment, the last ``window`` of them
    when given (padding is segment 0, causal among itself, so no row of the mask is empty and softmax
    never sees only -inf)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal_window(segment_ids.shape[1], window, segment_ids.device))[:, None]


def causal_window(length: int, window: int | None, device=None) -> torch.Tensor:
    """[L, L] boolean: query i sees key j when j <= i, and i - j < ``window`` when there is one."""
    offset = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (offset >= 0) & (offset < window) if window else offset >= 0


def layer_masks(mask: torch.Tensor, config) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed block-causal ``mask`` [B, 1, L, L] as the model's layers see it.

    transformers passes a ready 4D mask to every layer unchanged, so the window of sliding layers has to be
    in it: a model with ``layer_types`` takes one mask per layer type (a dict, as its forward accepts), one
    with only ``sliding_window`` (Mistral) slides on every layer; a model without a window gets ``mask``."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if not window or (types and "sliding_attention" not in types):
        return mask
    windowed = mask & causal_window(mask.shape[-1], window, mask.device)
    if not types:
        return windowed
    return {kind: windowed if kind == "sliding_attention" else mask for kind in types}


def forward_pieces(widths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """A micro-batch's rows (by index, in order) in consecutive pieces whose collated size, rows times
    the widest row, stays within ``max_tokens``; a wider row makes a piece of its own."""
    pieces: list[list[int]] = []
    widest = 0
    for index, width in enumerate(widths):
        if pieces and (len(pieces[-1]) + 1) * max(widest, width) <= max_tokens:
            pieces[-1].append(index)
            widest = max(widest, width)
        else:
            pieces.append([index])
            widest = width
    return pieces


def collate_padded(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, labels (IGNORE on padding) and a 2D attention mask."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[b, :n] = torch.tensor(example.input_ids)
        labels[b, :n] = torch.tensor(example.labels)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar lengths (little padding), in a deterministic shuffled order.

    Examples are shuffled, sorted by length within windows of 50 batches, cut into batches,
    and the batches shuffled again: similar lengths together without a fixed long-to-short order.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for begin in range(0, len(order), window):
        group = sorted(order[begin:begin + window], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def collate_pairs(pairs: Sequence, batch: list[list[int]], packing: bool, pad_id: int) -> dict:
    """Tensors for a micro-batch of preference pairs (``data.pairs.EncodedPair``; rows of pair indices) with ``seq_ids``: 2k is pair k's chosen
    side and 2k + 1 its rejected side, pairs numbered in row order."""
    rows = [[side for i in row for side in pairs[i].sides] for row in batch]
    if packing:
        out = collate_packed(rows, pad_id)
        segments = out.pop("segment_ids")
        first = torch.tensor([0] + [len(row) for row in rows[:-1]]).cumsum(0)  # sequences before each row
        out["seq_ids"] = torch.where(segments > 0, segments - 1 + first[:, None], -1)
        return out
    out = collate_padded([side for row in rows for side in row], pad_id)
    out["seq_ids"] = torch.where(out["attention_mask"] > 0, torch.arange(len(out["input_ids"]))[:, None], -1)
    return out
