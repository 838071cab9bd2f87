"""Eval loss and perplexity over the supervised (assistant) tokens of a dataset.

Token-weighted: the negative log-likelihood is summed over every supervised token of every
example and divided by the number of those tokens, and only then exponentiated. A mean of
per-batch or per-sequence perplexities would change with the batch size and would let short
examples weigh as much as long ones. Padding is never supervised (collate_padded puts IGNORE there),
and the masks are the ones training uses (tokenize.encode_all), so the eval loss here is the
same quantity as the training run's validation loss, summed by loss.sum_nll.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tunesmith.data.conversation import Conversation
from tunesmith.data.tokenize import EncodeOptions, encode_all
from tunesmith.errors import UsageError
from tunesmith.loss import sum_nll
from tunesmith.output import progress_bar


@dataclass
class PerplexityResult:
    eval_loss: float  # mean NLL per supervised token (nats)
    perplexity: float  # exp(eval_loss)
    supervised_tokens: int
    examples: int
    truncated: int = 0  # examples cut to max_length (their dropped prompt tokens are not scored anyway)

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(model, tokenizer, conversations: Sequence[Conversation], *, batch_size: int = 8,
               max_length: int | None = None, progress: bool = True) -> PerplexityResult:
    """Eval loss and perplexity of ``model`` on the assistant turns of ``conversations``.

    The tokenizer must carry the chat template the model is used with (a run's saved tokenizer does).
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, not {batch_size}")
    encoded = encode_all(conversations, tokenizer, EncodeOptions(max_length=max_length), progress=progress)
    examples = [e for e in encoded.examples if e.num_supervised > 0]
    if not examples:
        raise UsageError("no supervised tokens to score: every example's assistant turns are masked or dropped")
    total_nll, total_tokens = _sum_nll(model, examples, batch_size, tokenizer.pad_token_id, progress)
    loss = total_nll / total_tokens
    return PerplexityResult(eval_loss=loss, perplexity=math.exp(loss), supervised_tokens=total_tokens,
                            examples=len(examples), truncated=encoded.truncated)


def _sum_nll(model, examples, batch_size: int, pad_id: int | None, progress: bool) -> tuple[float, int]:
    """loss.sum_nll (the quantity training validates with) under a progress bar."""
    with progress_bar("perplexity", len(examples), enabled=progress) as bar:
        return sum_nll(model, examples, batch_size, pad_id, on_batch=bar.update)
