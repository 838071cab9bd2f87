"""What one training loop minimises: supervised fine-tuning, or a preference objective on pairs.

The loop (train/loop.py) is the same for every objective: the same epoch layout, packing,
accumulation, checkpoints and resume. An ``Objective`` tells it three things: what a step's loss
is averaged over (supervised tokens for SFT, pairs for the preference objectives), the summed
loss of a micro-batch, and the statistics to log beside it.

Preference pairs: a prompt with a chosen and a rejected answer. Both sides are encoded as whole
conversations with only the answer supervised, and packed side by side in the same rows with the
same block-diagonal attention as SFT, so one forward pass gives every sequence's log-probability
(the sum of its answer tokens' log-probabilities). Then, per pair, with beta and gamma from
``method``:

- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where ref
  is the model before training. The reference is frozen, so each pair's reference log-probabilities
  are computed once, the first time the pair is used, and kept (``Reference``): a 5-step run on a
  large file pays for the pairs it sees, not for the whole file. For an adapter they come from the
  same model with the adapter disabled, so no second copy is held; full and freeze training keep an
  explicit copy of the base model. Each pair is scored alone, so the value never depends on when or
  beside which pairs it was computed, and a resumed run gets the same numbers.
- SimPO (Meng et al. 2024): -log sigmoid(beta * (avg_c - avg_r) - gamma), avg = log-probability
  per answer token; no reference.
- ORPO (Hong et al. 2024): -avg_c + beta * -log sigmoid(log odds(avg_c) - log odds(avg_r)), with
  odds(p) = p / (1 - p) of the per-token probability p = exp(avg); no reference.

The SFT term (``sft_weight`` w, DPO and SimPO; RPO, Pang et al. 2024; TRL's ``rpo_alpha``): w times the
chosen answer's NLL per token is added to each pair's loss; the plan sets w = 1 and trains at 0.5x the SFT
rate (ORPO, whose loss holds the same term, at 1x: see train/plan.py). Why, measured with bench/preference_pairs.py (32 training pairs
whose chosen answer is the rejected one plus a phrase, 10 held out, SmolLM2-135M, LoRA, plan defaults, 85
steps) and bench/preference_margins.py:

- When the phrase ends the answer ("... Fair winds!"), the two sides share every token up to it. DPO's
  gradient on the shared tokens cancels between the sides (their per-token change was -0.39 on the chosen
  side, the same as with the term: -0.40), and only the first differing token carries the signal: the
  sign-off's first token (+10.7 nats) against the end-of-turn token that ends the rejected answer (-9.0).
  Preference accuracy reached 1.00 on held-out pairs, and the end-of-turn token lost wherever an answer
  could end: without the term (at the former 0.1x rate) 6 of 10 held-out greedy answers repeated
  "Fair winds!" until the token cap, and 4 of 10 closed with it once and stopped. With the term (0.5x),
  9 of 10 did, at the same preference accuracy (1.00).
- Which part does it, on the sign-off data (answers closing with it once and stopping, of 10): without the
  term, 4 at 0.1x, 0 at 0.5x (all 10 repeat it to the cap), 0 at beta 0.5 and 0.1x (the answers did not
  change); with the term, 7 at 0.1x (preference accuracy 0.80) and 9 at 0.5x. SimPO: 0 without the term (all
  repeat), 9 with it; ORPO, whose loss holds it, 7 to 9 at 0.5x and 10 at 1x, the rate the plan now gives it.
- At the start ("Ahoy! ...") 10 of 10 answers carry the phrase with the term; in the middle ("... Mark my
  words: ...") 10 of 10 with it, 1 of 10 without (6 repeat it, preference accuracy 0.70).

``label_smoothing`` e (DPO and SimPO) mixes in the flipped pair: (1 - e) * loss(x) + e * loss(-x),
the conservative DPO of Mitchell 2023. Rewards logged per step: beta * (pi - ref) for DPO,
beta * avg for SimPO and ORPO; their margin and the fraction of pairs whose chosen reward is higher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunesmith.config import MethodConfig
from tunesmith.data.packing import collate_packed, collate_padded, collate_pairs
from tunesmith.data.pairs import EncodedPair
from tunesmith.loss import sequence_logps, shard_batches, side_logps, supervised_loss
from tunesmith.run import is_adapter

PREFERENCE = ("dpo", "orpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}
# The SFT term's weight the plan gives each objective (see the module docstring); ORPO holds it already.
DEFAULT_SFT_WEIGHT = {"dpo": 1.0, "simpo": 1.0}
STAT_KEYS = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy")


def is_preference(objective: str) -> bool:
    return objective in PREFERENCE


# ---------------------------------------------------------------- the formulas, per pair


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair from summed answer log-probabilities."""
    reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return _sigmoid_loss(reward_chosen - reward_rejected, label_smoothing), reward_chosen, reward_rejected


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair from per-token average log-probabilities."""
    reward_chosen, reward_rejected = beta * avg_chosen, beta * avg_rejected
    return _sigmoid_loss(reward_chosen - reward_rejected - gamma, label_smoothing), reward_chosen, reward_rejected


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair: the chosen answer's NLL per token plus beta times the
    odds-ratio term. log odds(p) = log p - log(1 - p), with log p = avg; expm1 keeps 1 - p exact near p = 1."""
    def log_odds(avg: torch.Tensor) -> torch.Tensor:
        return avg - torch.log(-torch.expm1(avg))

    ratio = -F.logsigmoid(log_odds(avg_chosen) - log_odds(avg_rejected))
    return -avg_chosen + beta * ratio, beta * avg_chosen, beta * avg_rejected


# ---------------------------------------------------------------- pairs as the loop sees them


def _batch_pairs(pairs: Sequence[EncodedPair], batch: list[list[int]]) -> list[EncodedPair]:
    return [pairs[i] for row in batch for i in row]


# ---------------------------------------------------------------- the objective


@dataclass
class Objective:
    """The loss the loop minimises, from ``method`` (see config.py: objective, beta, gamma, label_smoothing)."""

    name: str = "sft"
    beta: float = 0.0
    gamma: float = 0.0
    label_smoothing: float = 0.0
    sft_weight: float = 0.0  # dpo/simpo: weight of the chosen answer's NLL per token beside the pair's loss
    reference: Reference | None = None  # DPO's frozen reference; pairs already holding theirs need none

    @classmethod
    def of(cls, method: MethodConfig) -> Objective:
        beta = method.beta if method.beta is not None else DEFAULT_BETA.get(method.objective, 0.0)
        sft_weight = method.sft_weight if method.sft_weight is not None else DEFAULT_SFT_WEIGHT.get(method.objective, 0.0)
        return cls(method.objective, beta, method.gamma, method.label_smoothing, sft_weight)

    @property
    def preference(self) -> bool:
        return is_preference(self.name)

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    def weight(self, examples: Sequence, batch: list[list[int]]) -> int:
        """What a step's loss is averaged over: supervised tokens (SFT) or pairs."""
        if self.preference:
            return sum(len(row) for row in batch)
        return sum(examples[i].num_supervised for row in batch for i in row)

    def collate(self, examples: Sequence, batch: list[list[int]], packing: bool, pad_id: int) -> dict:
        if self.preference:
            return collate_pairs(examples, batch, packing, pad_id)
        if packing:
            return collate_packed([[examples[i] for i in row] for row in batch], pad_id)
        return collate_padded([examples[row[0]] for row in batch], pad_id)

    def loss(self, model, examples: Sequence, batch: list[list[int]], inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the micro-batch's summed loss, its summed statistics [len(STAT_KEYS)]; empty for SFT)."""
        if not self.preference:
            nll, _ = supervised_loss(model, inputs)
            return nll, torch.zeros(0)
        pairs = _batch_pairs(examples, batch)
        losses, reward_chosen, reward_rejected = self.pair_losses(model, pairs, inputs)
        stats = torch.stack([reward_chosen.sum(), reward_rejected.sum(), (reward_chosen - reward_rejected).sum(),
                             (reward_chosen > reward_rejected).sum().to(reward_chosen.dtype)])
        return losses.sum(), stats.detach().double().cpu()

    def pair_losses(self, model, pairs: Sequence[EncodedPair], inputs: dict):
        """(loss, chosen reward, rejected reward) per pair of the micro-batch."""
        logps, counts = sequence_logps(model, inputs, 2 * len(pairs))
        logps = logps.float()
        chosen, rejected = logps[0::2], logps[1::2]
        avg_chosen, avg_rejected = chosen / counts[0::2].clamp(min=1), rejected / counts[1::2].clamp(min=1)
        if self.name == "orpo":
            return orpo_loss(avg_chosen, avg_rejected, self.beta)
        if self.name == "dpo":
            if self.reference is not None:
                self.reference.fill(pairs)
            reference = torch.tensor([p.reference for p in pairs], dtype=logps.dtype, device=logps.device)
            losses, reward_chosen, reward_rejected = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1],
                                                              self.beta, self.label_smoothing)
        else:
            losses, reward_chosen, reward_rejected = simpo_loss(avg_chosen, avg_rejected, self.beta, self.gamma,
                                                                self.label_smoothing)
        if self.sft_weight:
            losses = losses - self.sft_weight * avg_chosen
        return losses, reward_chosen, reward_rejected


def step_stats(stats: torch.Tensor, pairs: int) -> dict[str, float]:
    """Per-pair means of summed statistics, with the names metrics.jsonl uses."""
    if stats.numel() == 0 or pairs == 0:
        return {}
    return {key: float(value) / pairs for key, value in zip(STAT_KEYS, stats.tolist(), strict=True)}


# ---------------------------------------------------------------- the frozen reference


def compute_reference(model, pairs: Sequence[EncodedPair], pad_id: int, *, batch_size: int = 4,
                      autocast: Callable = nullcontext, progress: bool = True) -> None:
    """Fill each pair's ``reference`` with both sides' log-probabilities under ``model`` (the frozen reference);
    a resumed run computes the same values."""
    values = side_logps(model, pairs, pad_id, batch_size=batch_size, autocast=autocast, progress=progress,
                        desc="reference log-probs")
    for pair, reference in zip(pairs, values, strict=True):
        pair.reference = reference


class Reference:
    """DPO's frozen reference: each pair's log-probabilities, computed the first time it is needed and kept.

    ``load_base`` loads the explicit copy that full and freeze training need (called once, then kept)."""

    def __init__(self, model, method: MethodConfig, load_base: Callable, pad_id: int, *,
                 autocast: Callable = nullcontext):
        self.model, self.method, self.pad_id, self.autocast = model, method, pad_id, autocast
        self._base = None
        self._load_base = load_base

    def load_base(self):
        if self._base is None:
            self._base = self._load_base().eval()
        return self._base

    def fill(self, pairs: Sequence[EncodedPair]) -> None:
        missing = [p for p in pairs if p.reference is None]
        if not missing:
            return
        with reference_model(self.model, self.method, self.load_base) as frozen:
            for pair in missing:  # alone: the same numbers whenever and beside whatever it is computed
                pair.reference = side_logps(frozen, [pair], self.pad_id, batch_size=1, autocast=self.autocast,
                                            progress=False)[0]


def reference_model(model, method: MethodConfig, load_base: Callable):
    """A context giving the frozen reference: the adapter disabled, or a fresh copy of the base model."""
    if is_adapter(method.name) and hasattr(model, "disable_adapter"):
        return _AdapterOff(model)
    return _BaseCopy(load_base)


class _AdapterOff:
    def __init__(self, model):
        self.model, self._context = model, model.disable_adapter()

    def __enter__(self):
        self._context.__enter__()
        return self.model

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


class _BaseCopy:
    def __init__(self, load_base: Callable):
        self.load_base, self.model = load_base, None

    def __enter__(self):
        self.model = self.load_base()
        return self.model

    def __exit__(self, *exc):
        self.model = None  # dropped: the reference is only needed until its log-probabilities are kept
        return False


def disable_dropout(model) -> None:
    """Dropout off everywhere: a preference objective compares the model's log-probabilities with each other
    (and, for DPO, with the reference's), and random masks would make the same answer score differently."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@torch.no_grad()
def evaluate_pairs(model, objective: Objective, pairs: Sequence[EncodedPair], batch_size: int, pad_id: int, *,
                   device=None, shard: tuple[int, int] = (0, 1), autocast: Callable = nullcontext,
                   lockstep: bool = False) -> torch.Tensor:
    """[summed loss, summed statistics (STAT_KEYS), pairs] over this shard of ``pairs``, in length-sorted padded
    batches of ``batch_size`` pairs; the sums of every shard add up to the whole set's. ``lockstep``: as in
    loss.sum_nll, spare passes for parameters sharded across processes."""
    device = device if device is not None else next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    total = torch.zeros(2 + len(STAT_KEYS), dtype=torch.float64)
    for batch, counts in shard_batches(batches, shard, lockstep):
        rows = [[i] for i in batch]
        inputs = {k: v.to(device) for k, v in collate_pairs(pairs, rows, False, pad_id).items()}
        with autocast():
            loss, stats = objective.loss(model, pairs, rows, inputs)
        if not counts:
            continue
        total += torch.cat([loss.detach().double().cpu().reshape(1), stats, torch.tensor([float(len(batch))],
                                                                                        dtype=torch.float64)])
    return total
