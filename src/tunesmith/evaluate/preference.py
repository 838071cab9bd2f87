"""Preference metrics for `tunesmith eval` on pair data (a prompt with a chosen and a rejected answer).

Both answers of each held-out pair are scored by the model, with only the answer tokens counted
(encoded as training encodes pairs: the run's template and system prompt, cut at its max_length):

- ``preference_accuracy``: the fraction of pairs whose chosen answer the model finds more likely
  than the rejected one, and ``logp_margin``: the mean of log p(chosen) - log p(rejected). Both
  mean the same for any model, so ``--compare base`` shows what training changed.
- ``reward_accuracy`` and ``reward_margin``, for a run trained as an adapter: the same relative to
  its reference (the base, the adapter disabled), as DPO measures its implicit reward. A plain
  model is its own reference, so they are left out for it.

Generation metrics are computed on the prompts by the pipeline, with the chosen answer as the reference, and
``closer_to_chosen`` (metrics.py) says whether the greedy answers moved toward the chosen answers: a run can
make them likelier without changing what it says.
"""

from __future__ import annotations

from tunesmith.data.pairs import encode_pairs
from tunesmith.data.tokenize import EncodeOptions
from tunesmith.loss import side_logps

# Measures of the pair set, not of the model: never compared.
PAIR_SETTINGS = {"pairs"}


def preference_metrics(loaded, pairs: list, *, system_prompt: str | None, max_length: int | None, batch_size: int,
                       progress: bool = True) -> dict:
    options = EncodeOptions(max_length=max_length, truncation="truncate_prompt")
    encoded, _ = encode_pairs(pairs, loaded.tokenizer, options, system_prompt, "evaluation pairs", progress)
    if not encoded:
        return {}
    pad_id = loaded.tokenizer.pad_token_id or 0
    policy = side_logps(loaded.model, encoded, pad_id, batch_size=batch_size, progress=progress,
                        desc="scoring pairs")
    metrics = {"pairs": len(encoded), **_accuracy_and_margin("preference_accuracy", "logp_margin", policy)}
    if hasattr(loaded.model, "disable_adapter"):
        with loaded.model.disable_adapter():
            reference = side_logps(loaded.model, encoded, pad_id, batch_size=batch_size, progress=progress,
                                   desc="scoring pairs (reference)")
        relative = [(c - rc, r - rr) for (c, r), (rc, rr) in zip(policy, reference, strict=True)]
        metrics.update(_accuracy_and_margin("reward_accuracy", "reward_margin", relative))
    return metrics


def _accuracy_and_margin(accuracy: str, margin: str, values: list[tuple[float, float]]) -> dict:
    margins = [chosen - rejected for chosen, rejected in values]
    return {accuracy: sum(m > 0 for m in margins) / len(margins), margin: sum(margins) / len(margins)}
