"""Attention for packed rows without a dense mask: transformers' sdpa, run on each example's span.

A packed row holds several examples, and each must see only itself. A dense ``[rows, 1, L, L]``
block-diagonal mask does that with any kernel, but it costs memory and time in L squared per row,
sends sdpa to its masked path (every score computed, then masked) and makes transformers repeat the
key/value heads of grouped-query attention. ``PACKED_SDPA`` is sdpa with one change: given no mask and
position_ids that restart (a new example starts where the position does not follow the previous one),
it runs sdpa's causal kernel on each example's span, so the work is the sum of the squared example
lengths and nothing of size L x L is made. loss.model_inputs passes it the packed batch that way. Any
other call (a padding mask, a KV cache, one query token) goes to transformers' sdpa unchanged.

Sliding-window layers (Gemma 2 and 3, Mistral, Qwen2 with use_sliding_window) pass their window as the
``sliding_window`` argument, as they do to every kernel: an example longer than the window gets the
banded causal mask transformers' own sliding mask makes (packing.causal_window), so training attends as
generate, serve and eval do. Shorter examples, and layers without a window, keep the causal kernel.

The training model gets it in place of sdpa (train.methods.load_base_model); the packed-vs-unpacked
loss tests (tests/data/test_packing.py) prove the examples stay independent. Measured on the default
model (bench/README.md, "Training throughput"): 10% less CPU time per training step on rows of 512.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils.import_utils import is_torch_greater_or_equal

from tunesmith.data.packing import causal_window

PACKED_SDPA = "tunesmith_packed_sdpa"
_GQA = is_torch_greater_or_equal("2.5")  # sdpa's enable_gqa: no repeated key/value heads


def example_spans(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    """[(start, end), ...] of each row's examples: a new one starts where the position does not follow on."""
    positions = position_ids.expand(rows, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    length, spans = positions.shape[1], [[] for _ in range(rows)]
    found = starts.nonzero().tolist()
    for k, (row, start) in enumerate(found):
        end = found[k + 1][1] if k + 1 < len(found) and found[k + 1][0] == row else length
        spans[row].append((start, end))
    return spans


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; query [B, H, L, D], key/value [B, H_kv, L, D]."""
    positions = kwargs.get("position_ids")
    length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or positions is None or not causal or length == 1 or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and not _GQA:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    options = {"dropout_p": dropout, "scale": scaling, **({"enable_gqa": True} if groups > 1 and _GQA else {})}
    window = kwargs.get("sliding_window")
    rows = []
    for b, spans in enumerate(example_spans(positions, query.shape[0])):
        parts = [_example_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], window,
                                    options) for s, e in spans]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _example_attention(query, key, value, window: int | None, options: dict) -> torch.Tensor:
    """One example's causal attention, within the layer's sliding window when the example is longer."""
    length = query.shape[2]
    if not window or length <= window:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, **options)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=causal_window(length, window, query.device),
                                          **options)


def _mask(attention_mask=None, **kwargs):
    """No mask without a padding mask (packed examples are found from position_ids); sdpa's mask otherwise."""
    return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, _mask)


def use_packed_sdpa(model) -> bool:
    """Switch a model running transformers' sdpa to PACKED_SDPA; False when it runs another kernel."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(PACKED_SDPA)
    return model.config._attn_implementation == PACKED_SDPA
