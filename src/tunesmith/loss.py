"""The supervised loss: negative log-likelihood over supervised tokens only.

Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` and the
token at position t+1 is predicted from the hidden state at position t (the shift happens here).

Efficiency: the transformer body runs on every token, but the output head (the vocabulary
projection, ~20% of a small model's compute) runs only where the next label is supervised, and
the cross-entropy runs in chunks of ``CHUNK_TOKENS`` rows, recomputed in backward, so the fp32
[tokens x vocab] logits are never held at once. A frozen head (the adapter methods) goes one better:
each chunk's gradient for the hidden states is made in the forward pass, so backward recomputes nothing. This path needs an unwrapped model (a plain HF
causal LM or a peft PeftModel); a wrapper such as DistributedDataParallel, whose forward must be
called, and a model whose parameters are sharded (FSDP2, DeepSpeed ZeRO-3), which only its forward
gathers, go through that forward with ``logits_to_keep`` (logits still only where supervised).

The loss is a sum and a count: the mean (sum / count) is token-weighted, so it does not depend on
how examples are grouped into batches or how much padding there is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from tunesmith.attention import PACKED_SDPA
from tunesmith.data.packing import collate_padded, collate_pairs, layer_masks
from tunesmith.data.tokenize import IGNORE
from tunesmith.output import progress_bar

CHUNK_TOKENS = 1024
# The frozen-head path keeps nothing of a chunk but its gradient, so smaller chunks only cut the peak
# (fp32 logits of 256 x 49k tokens: 50 MB); measured no slower on the default model.
HEAD_CHUNK_TOKENS = 256


def supervised_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of NLL over supervised tokens, number of supervised tokens)."""
    nll, _ = _supervised_nll(model, batch)
    return nll.sum(), nll.numel()


# no_grad, not inference_mode: FSDP2 writes into tensors made during the pass (its unsharded parameters) on a later
# forward, and an inference tensor refuses that ("Inplace update to inference tensor outside InferenceMode").
@torch.no_grad()
def sum_nll(model, examples: Sequence, batch_size: int, pad_id: int | None, *, device=None,
            shard: tuple[int, int] = (0, 1), autocast: Callable = nullcontext,
            on_batch: Callable[[int], None] | None = None, lockstep: bool = False) -> tuple[float, int]:
    """(sum of NLL, count) over the supervised tokens of encoded ``examples``: the eval loss of training's
    validation and of `tunesmith eval` alike.

    Examples go in length-sorted, right-padded batches of ``batch_size`` (similar lengths: little padding).
    ``shard=(index, count)``: only every count-th batch from ``index`` (the others run in other processes;
    their sums add up). ``on_batch(n)`` is called after each batch of n examples (a progress bar).
    ``lockstep``: every shard makes as many forward passes as the busiest (a spare one's result is dropped), which
    parameters sharded across processes (FSDP, DeepSpeed ZeRO-3) need: each forward gathers them from all."""
    pad_id = 0 if pad_id is None else pad_id  # any id works: padding is masked out of attention and loss
    device = device if device is not None else model.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    total_nll, total_tokens = 0.0, 0
    for batch, counts in shard_batches(batches, shard, lockstep):
        inputs = {k: v.to(device) for k, v in collate_padded([examples[i] for i in batch], pad_id).items()}
        with autocast():
            nll, count = supervised_loss(model, inputs)
        if not counts:
            continue
        total_nll += float(nll.double())  # accumulate in float64: thousands of batches, no drift
        total_tokens += count
        if on_batch:
            on_batch(len(batch))
    return total_nll, total_tokens


def shard_batches(batches: list, shard: tuple[int, int], lockstep: bool = False) -> list[tuple[list, bool]]:
    """This shard's batches (every count-th from index), each with whether it counts; with ``lockstep``, spare
    passes (not counted) so that every shard makes as many forward passes as the busiest."""
    mine = batches[shard[0]::shard[1]]
    spare = -(-len(batches) // shard[1]) - len(mine) if lockstep else 0
    return [(batch, True) for batch in mine] + [(batch, False) for batch in batches[:spare]]


def token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL [B, L] aligned with ``labels`` (0 where not supervised) and the supervised mask."""
    nll, select = _supervised_nll(model, batch)
    per_position = torch.zeros(select.shape, dtype=nll.dtype, device=nll.device)
    mask = torch.zeros_like(select)
    mask[:, 1:] = select[:, :-1]
    per_position[mask] = nll
    return per_position, mask


def token_logps(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of every supervised token (row-major order: a packed row's sequences in turn, each one's
    tokens in order) under softmax(logits / temperature); GRPO's per-token policy terms."""
    nll, _ = _supervised_nll(model, batch, temperature)
    return -nll


def _supervised_nll(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every supervised next token (row-major order) and where they are predicted from [B, L].

    ``temperature`` divides the logits; the output head has no bias, so dividing the hidden states before it is
    the same and keeps the frozen-head path."""
    labels = batch["labels"]
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][select[:, :-1]]
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_sharded(model) or not hasattr(hf_model, "get_output_embeddings"):  # a wrapper: its forward must run
        logits = model(**model_inputs(model, batch), logits_to_keep=select).logits
        return F.cross_entropy(logits.float() / temperature, targets, reduction="none"), select
    hidden = hf_model.get_decoder()(**model_inputs(hf_model, batch)).last_hidden_state[select]
    if temperature != 1.0:
        hidden = hidden / temperature
    return _chunked_nll(hf_model.get_output_embeddings(), hf_model.config, hidden, targets), select


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are split across processes (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions).

    Only the wrapped model's own forward gathers them (FSDP2 unshards the embeddings and the head in its root
    module's pre-forward hook), so the loss must call it instead of the decoder and the head one by one."""
    param = next(model.parameters(), None)
    return isinstance(param, DTensor) or hasattr(param, "ds_id")


def _chunked_nll(head, config, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if _plain_frozen(head) and not _adjusts_logits(config):
        return _FrozenHeadNLL.apply(hidden, head.weight, targets)

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = _adjust_logits(config, head(h).float())
        return F.cross_entropy(logits, y, reduction="none")

    if hidden.shape[0] <= CHUNK_TOKENS or not torch.is_grad_enabled():
        return torch.cat([piece(hidden[s:s + CHUNK_TOKENS], targets[s:s + CHUNK_TOKENS])
                          for s in range(0, max(hidden.shape[0], 1), CHUNK_TOKENS)])
    # Recompute each chunk's logits in backward instead of keeping them all alive.
    return torch.cat([checkpoint(piece, hidden[s:s + CHUNK_TOKENS], targets[s:s + CHUNK_TOKENS], use_reentrant=False)
                      for s in range(0, hidden.shape[0], CHUNK_TOKENS)])


def _plain_frozen(head) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def _adjusts_logits(config) -> bool:
    return any(getattr(config, name, None) for name in ("logit_scale", "logits_scaling", "final_logit_softcapping"))


class _FrozenHeadNLL(torch.autograd.Function):
    """Per-token NLL through a frozen output head, with the gradient for ``hidden`` made in the forward pass.

    The usual path computes each chunk's logits three times (forward, recomputed in backward, and the
    backward matmul) and writes the fp32 log-softmax twice. With a frozen head (LoRA and the other adapter
    methods) the loss's gradient w.r.t. the hidden states, (softmax - onehot) @ W, is cheap to make while
    the chunk's logits are at hand, and it is all backward needs: [tokens, hidden] instead of the logits.
    The matmuls run in the autocast dtype when autocast is on (the weight cast once, not once per chunk);
    softmax and NLL in fp32. Without autocast everything is fp32, deterministic as before.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.to(dtype)
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        with torch.autocast(device, enabled=False):
            for s in range(0, hidden.shape[0], HEAD_CHUNK_TOKENS):
                e = s + HEAD_CHUNK_TOKENS
                h, y = hidden[s:e].to(dtype), targets[s:e]
                logprobs = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)
                nll[s:e] = -logprobs.gather(1, y[:, None])[:, 0]
                if grad is not None:  # d nll / d logits = softmax - onehot, made in place of the log-probabilities
                    probs = logprobs.exp_()
                    probs[torch.arange(len(y), device=y.device), y] -= 1
                    grad[s:e] = probs.to(dtype) @ w
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None].to(grad.dtype), None, None


def _adjust_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """The few post-head transforms some causal LMs apply in their forward (Gemma 2/3, Cohere, Granite)."""
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def model_inputs(model, batch: dict) -> dict:
    """The forward arguments for ``batch``, with a packed 4D mask shaped for the model's attention kernel.

    sdpa takes the boolean mask; eager adds the mask to the scores, so it gets 0 / -inf floats; a model
    with sliding-window layers gets their window in the mask (packing.layer_masks). flash-attention and
    attention.PACKED_SDPA (what training uses in place of sdpa) take no mask: they find the packed
    examples from the restarting position_ids and apply each layer's window themselves.
    """
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim == 4:
        config = getattr(getattr(model, "module", model), "config", None)  # DDP keeps the model in .module
        kernel = getattr(config, "_attn_implementation", None) or "sdpa"
        if "flash" in kernel or kernel == PACKED_SDPA:
            mask = None
        else:
            mask = layer_masks(mask, config)
            if kernel != "sdpa":
                dtype = next(model.parameters()).dtype
                mask = {k: _additive(m, dtype) for k, m in mask.items()} if isinstance(mask, dict) \
                    else _additive(mask, dtype)
    inputs["attention_mask"] = mask
    return inputs


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the 0 / -inf floats eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def sequence_logps(model, batch: dict, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, supervised-token count) of each of ``sequences`` sequences in ``batch``.

    ``batch["seq_ids"]`` [B, L] numbers the sequences (0 .. sequences-1, -1 on padding); a position
    belongs to the sequence of the token it predicts from, which in a packed row is the sequence of
    the token it predicts (every sequence's first label is ignored). The preference objectives use it.
    """
    nll, select = _supervised_nll(model, batch)
    owner = batch["seq_ids"][select]
    logps = torch.zeros(sequences, dtype=nll.dtype, device=nll.device).index_add(0, owner, -nll)
    counts = torch.zeros(sequences, dtype=torch.long, device=nll.device).index_add(0, owner, torch.ones_like(owner))
    return logps, counts


@torch.no_grad()
def side_logps(model, pairs: Sequence, pad_id: int, *, batch_size: int = 4,
               autocast: Callable = nullcontext, progress: bool = True,
               desc: str = "log-probs") -> list[tuple[float, float]]:
    """(chosen, rejected) summed answer log-probabilities of each pair under ``model`` as it is (eval mode).

    Pairs go in a fixed order and fixed padded batches, so the same model always gives the same values."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    with progress_bar(desc, len(pairs), enabled=progress, unit="pair", keep=True) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = list(range(start, min(start + batch_size, len(pairs))))
            inputs = collate_pairs(pairs, [[i] for i in chunk], False, pad_id)
            with autocast():
                logps, _ = sequence_logps(model, {k: v.to(device) for k, v in inputs.items()}, 2 * len(chunk))
            values = logps.double().cpu().tolist()
            out += [(values[2 * k], values[2 * k + 1]) for k in range(len(chunk))]
            bar.update(len(chunk))
    model.train(was_training)
    return out
