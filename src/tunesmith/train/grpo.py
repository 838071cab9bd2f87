"""GRPO: learning from rewards, one step of the training loop at a time.

Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", section 4.1), as TRL's
GRPOTrainer computes it (trl 1.16, ``GRPOTrainer._generate_and_score_completions`` and
``_compute_loss``), on the same loop, checkpoints and run layout as SFT and DPO (loop.py). Per
optimizer step, for each of its prompts q:

1. Rollout. G completions o_1..o_G are sampled from the current policy pi (``method.num_generations``,
   ``temperature``, ``top_p``, at most ``max_completion_length`` tokens each, the stop token
   included) with inference.sample_tokens: tunesmith's batched KV-cache loop, finished rows leaving
   the batch. The sampling generator is seeded from (seed, step), so a resumed run draws the same
   completions.
2. Rewards. Each reward function k scores every completion (rewards.py); r_i = sum_k w_k r_ik.
3. Advantages, within each group: A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4), std unbiased;
   ``scale_rewards`` batch divides by the std of the whole step's rewards instead, none not at all
   (Dr. GRPO, Liu et al. 2025). A group whose rewards are all equal has A = 0: it gives no gradient,
   and its share is logged as ``zero_std_share``.
4. Loss, per completion token t of o_i, with rho = pi(o_it) / pi_old(o_it) and the log-probabilities
   taken at the sampling temperature (logits / T), as TRL takes them:

       l_it = -min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon) * A_i) + beta * rho * KL_it
       KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1      (Schulman's k3 estimator)

   (the KL term times rho corrects it for completions sampled from pi_old; TRL's default,
   ``use_bias_correction_kl``; its value is rho = 1 with one iteration, but not its gradient)

   pi_old is the policy that sampled the batch: with ``num_iterations`` 1 it is pi itself (detached,
   rho = 1, and the loss's gradient is the policy gradient A * grad log pi); with mu > 1 the same
   completions serve mu optimizer steps and their sampling log-probabilities are kept. ref is the model
   before training: for an adapter the same model with its adapter switched off (no second copy), for
   full or freeze training a copy of the base model; computed only when beta > 0.
5. Normalisation (``loss_type``), over the N completions of the step:
       grpo     (1/N) sum_i (1/|o_i|) sum_t l_it     (the paper's; long completions weigh less per token)
       dr_grpo  sum_i sum_t l_it / (N * max_completion_length)               (Liu et al. 2025)
       dapo     sum_i sum_t l_it / sum_i |o_i|       (Yu et al. 2025; TRL's default)

The backward pass packs the completions (prompt + completion, only the completion supervised) into
rows with the same block-diagonal attention as SFT (data/packing.py) and goes through in pieces of
loop.CPU_FORWARD_TOKENS on CPU; each piece's loss is a sum of per-token terms with fixed weights, so
the pieces' gradients add up to the step's. tests/train/test_grpo.py checks the loss and its gradient
against TRL's ``_compute_loss`` for each loss type.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tunesmith.data.conversation import location
from tunesmith.data.packing import collate_packed
from tunesmith.data.prompt import with_system_prompt
from tunesmith.data.tokenize import IGNORE, Encoded, generation_prompt
from tunesmith.errors import UsageError
from tunesmith.inference import decode_new, sample_tokens, stop_token_ids
from tunesmith.loss import token_logps
from tunesmith.rewards import Reward, score

SAMPLES_FILE = "samples.jsonl"
SAMPLES_PER_STEP = 4  # completions written to samples.jsonl when due: the first of a few groups


# ---------------------------------------------------------------- prompts as the loop sees them


@dataclass
class PromptExample:
    """A rendered, tokenized prompt and its row's fields; the loop lays these out like SFT examples."""

    input_ids: list[int]
    text: str  # the prompt as reward functions get it (the last user turn)
    fields: dict
    source: str = ""
    line: int = 0
    truncated: bool = False
    labels: list[int] = field(default_factory=list)  # nothing of a prompt is supervised

    @property
    def num_supervised(self) -> int:
        return 0

    @property
    def where(self) -> str:
        return location(self.source, self.line)


def encode_prompts(rows: Sequence, tokenizer, max_length: int, truncation: str,
                   system_prompt: str | None) -> tuple[list[PromptExample], list[str], int]:
    """(prompts rendered with the template's generation prompt and tokenized, where the dropped ones were, how many
    were cut). A prompt over max_length tokens is dropped, cut to its last max_length tokens (truncate_prompt) or an
    error, per ``data.truncation``."""
    kept, dropped, cut = [], [], 0
    for row in rows:
        conv = with_system_prompt([row.conversation], system_prompt)[0]
        ids = tokenizer(generation_prompt(conv, tokenizer), add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            if truncation == "error":
                raise UsageError(f"{row.where}: the prompt is {len(ids)} tokens, over data.max_length={max_length}")
            if truncation == "drop":
                dropped.append(row.where)
                continue
            ids, cut = ids[-max_length:], cut + 1
        kept.append(PromptExample(ids, row.text, row.fields, row.conversation.source, row.conversation.line,
                                  truncated=len(ids) == max_length and cut > 0))
    return kept, dropped, cut


def fields_fingerprint(examples: Sequence[PromptExample]) -> bytes:
    return json.dumps([e.fields for e in examples], sort_keys=True, default=str).encode()


# ---------------------------------------------------------------- the formulas


def group_advantages(rewards: torch.Tensor, group: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage per completion, whether each group's rewards are all equal), rewards in groups of ``group``."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    group_std = grouped.std(1)
    std = rewards.std().expand_as(rewards) if scale == "batch" else group_std.repeat_interleave(group)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(group_std, torch.zeros_like(group_std))


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                 beta: float = 0.0, ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """l_t for each token (see the module docstring) and per-token diagnostics (clipped, kl)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    was_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    out = {"clipped": was_clipped}
    if beta:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        loss = loss + beta * kl * ratio  # importance-corrected for samples of pi_old, as TRL does by default
        out["kl"] = kl
    return loss, out


def sequence_weights(loss_type: str, lengths: Sequence[int], completions: int, max_completion_length: int,
                     total_tokens: int) -> list[float]:
    """The factor each completion's summed token losses get (see the module docstring): ``completions`` and
    ``total_tokens`` count the whole step, every process included."""
    if loss_type == "grpo":
        return [1.0 / (completions * n) for n in lengths]
    if loss_type == "dr_grpo":
        return [1.0 / (completions * max_completion_length)] * len(lengths)
    return [1.0 / max(total_tokens, 1)] * len(lengths)


# ---------------------------------------------------------------- one batch of completions


@dataclass
class Rollout:
    """One step's sampled completions and what the loss needs of them; saved in checkpoints (state.json) while
    ``num_iterations`` steps still use it."""

    prompts: list[int]  # per completion: its prompt's index in the training examples
    completions: list[list[int]]  # token ids, the stop token included
    advantages: list[float]
    old_logps: list[list[float]] | None = None  # per token, when num_iterations > 1
    ref_logps: list[list[float]] | None = None  # per token, when beta > 0
    iterations_done: int = 0
    step_completions: int = 0  # completions and completion tokens of the whole step, every process
    step_tokens: int = 0
    stats: dict = field(default_factory=dict)  # rewards and lengths, logged with each step that uses the batch

    def to_dict(self) -> dict:
        return asdict(self)


def sampling_generator(seed: int, step: int, device) -> torch.Generator:
    """The rollout of step ``step`` draws from its own generator: resume needs no RNG state to repeat it."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + 7_919 * step) % (2**63))


def _sequences(examples: Sequence[PromptExample], rollout: Rollout) -> list[Encoded]:
    return [Encoded(examples[p].input_ids + ids, [IGNORE] * len(examples[p].input_ids) + ids)
            for p, ids in zip(rollout.prompts, rollout.completions, strict=True)]


# Tokens per packed row of the backward pass on CPU (loop.CPU_FORWARD_TOKENS: no slower per token, less memory);
# elsewhere rows are longer.
CPU_ROW_TOKENS = 1024


def _packed_pieces(sequences: list[Encoded], device) -> list[list[int]]:
    """Consecutive sequences (by index, in order) packed into rows of at most a row's tokens; a longer
    sequence is a row of its own."""
    budget = CPU_ROW_TOKENS if torch.device(device).type == "cpu" else 8 * CPU_ROW_TOKENS
    pieces: list[list[int]] = []
    used = 0
    for i, sequence in enumerate(sequences):
        n = len(sequence.input_ids)
        if pieces and used + n <= budget:
            pieces[-1].append(i)
            used += n
        else:
            pieces.append([i])
            used = n
    return pieces


@torch.no_grad()
def _logps_of(model, sequences: list[Encoded], pad_id: int, temperature: float, autocast: Callable) -> list[list[float]]:
    """Per-token completion log-probabilities of each sequence, without gradients (pi_old and the reference)."""
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for piece in _packed_pieces(sequences, device):
        inputs = {k: v.to(device) for k, v in collate_packed([[sequences[i] for i in piece]], pad_id).items()}
        with autocast():
            flat = token_logps(model, inputs, temperature).float().cpu().tolist()
        at = 0
        for i in piece:
            n = sequences[i].num_supervised
            out.append(flat[at:at + n])
            at += n
    return out


def sample_rollout(model, tokenizer, examples: Sequence[PromptExample], prompt_indices: list[int], method,
                   rewards: Sequence[Reward], *, generator: torch.Generator, autocast: Callable = nullcontext,
                   reference: Callable | None = None) -> Rollout:
    """G completions for each prompt, their rewards and advantages, and pi_old / ref log-probabilities when needed.

    ``reference()``: a context giving the reference model (beta > 0)."""
    started = time.perf_counter()
    group, pad_id = method.num_generations, tokenizer.pad_token_id
    prompts = [i for i in prompt_indices for _ in range(group)]
    stops = stop_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    with autocast():
        completions = sample_tokens(model, [examples[i].input_ids for i in prompts], stops, pad_id,
                                    method.max_completion_length, temperature=method.temperature, top_p=method.top_p,
                                    generator=generator)
    generation_s = time.perf_counter() - started
    texts = [decode_new(tokenizer, ids[:-1] if ids and ids[-1] in stops else ids).strip() for ids in completions]
    per_function = score(rewards, [examples[i].text for i in prompts], texts,
                         {k: [examples[i].fields[k] for i in prompts] for k in examples[prompts[0]].fields},
                         [examples[i].where for i in prompts])
    table = torch.tensor(per_function, dtype=torch.float64).reshape(len(prompts), len(rewards))
    total = (table * torch.tensor([r.weight for r in rewards], dtype=torch.float64)).sum(1)
    advantages, zero_std = group_advantages(total, group, method.scale_rewards)
    rollout = Rollout(prompts, completions, advantages.tolist())
    sequences = _sequences(examples, rollout)
    if method.num_iterations > 1:
        rollout.old_logps = _logps_of(model, sequences, pad_id, method.temperature, autocast)
    if (method.beta or 0) > 0:
        with reference() as frozen:
            rollout.ref_logps = _logps_of(frozen, sequences, pad_id, method.temperature, autocast)
    model.train(was_training)
    lengths = [len(ids) for ids in completions]
    ended = [bool(ids) and ids[-1] in stops for ids in completions]
    rollout.stats = {
        **{f"reward/{r.key}": float(table[:, k].mean()) for k, r in enumerate(rewards)},
        **{f"reward/{r.key}/std": float(table[:, k].std()) for k, r in enumerate(rewards)},
        "reward": float(total.mean()), "reward_std": float(total.std()),
        "completion_length": sum(lengths) / len(lengths), "completion_length_max": max(lengths),
        "clipped_share": sum(not e for e in ended) / len(ended),
        "zero_std_share": float(zero_std.double().mean()), "generation_s": round(time.perf_counter() - started, 3),
        "sampling_s": round(generation_s, 3),
    }
    rollout.stats["samples"] = [{"prompt": examples[prompts[i]].text, "completion": texts[i],
                                 "rewards": dict(zip([r.key for r in rewards], per_function[i], strict=True)),
                                 "advantage": rollout.advantages[i], "source": examples[prompts[i]].where}
                                for i in range(0, len(prompts), group)[:SAMPLES_PER_STEP]]
    return rollout


# ---------------------------------------------------------------- the backward pass


@dataclass
class PolicySums:
    loss: float  # this process's share of the step's loss
    tokens: int  # completion tokens, this process
    clipped: int
    kl: float  # summed over this process's tokens


def policy_backward(accelerator, model, examples: Sequence[PromptExample], rollout: Rollout, method, pad_id: int,
                    completions_in_step: int, tokens_in_step: int) -> PolicySums:
    """Forward/backward of the clipped policy loss over this process's completions, in packed pieces; gradients
    end up as d(the step's loss) (see the module docstring)."""
    sequences = _sequences(examples, rollout)
    lengths = [len(ids) for ids in rollout.completions]
    weights = sequence_weights(method.loss_type, lengths, completions_in_step, method.max_completion_length,
                               tokens_in_step)
    beta = method.beta or 0.0
    pieces = _packed_pieces(sequences, accelerator.device)
    sums = PolicySums(0.0, sum(lengths), 0, 0.0)
    for n, piece in enumerate(pieces):
        sync = nullcontext() if n == len(pieces) - 1 else accelerator.no_sync(model)
        with sync:
            inputs = {k: v.to(accelerator.device) for k, v in
                      collate_packed([[sequences[i] for i in piece]], pad_id).items()}
            with accelerator.autocast():
                logps = token_logps(model, inputs, method.temperature).float()
            per_token = _per_token(rollout, piece, lengths, weights, logps)
            old = logps.detach() if rollout.old_logps is None else per_token["old"]
            losses, info = token_losses(logps, old, per_token["advantage"], method.epsilon, beta,
                                        per_token.get("ref"))
            loss = (losses * per_token["weight"]).sum()
            accelerator.backward(loss * accelerator.num_processes)
        sums.loss += float(loss.detach())
        sums.clipped += int(info["clipped"].sum())
        sums.kl += float(info["kl"].detach().sum()) if "kl" in info else 0.0
    return sums


def _per_token(rollout: Rollout, piece: list[int], lengths: list[int], weights: list[float],
               logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-sequence values of ``piece`` spread over its tokens, in the order token_logps returns them."""
    def spread(values: Sequence[float]) -> torch.Tensor:
        flat = [values[i] for i in piece for _ in range(lengths[i])]
        return torch.tensor(flat, dtype=logps.dtype, device=logps.device)

    out = {"advantage": spread(rollout.advantages), "weight": spread(weights)}
    for key, per_seq in (("old", rollout.old_logps), ("ref", rollout.ref_logps)):
        if per_seq is not None:
            out[key] = torch.tensor([v for i in piece for v in per_seq[i]], dtype=logps.dtype, device=logps.device)
    if out["advantage"].numel() != logps.numel():
        raise RuntimeError(f"{logps.numel()} log-probabilities for {out['advantage'].numel()} completion tokens")
    return out


def step_record(rollout: Rollout, sums: PolicySums, backward_s: float, *, beta: float, fresh: bool) -> dict:
    """The step's metrics (metrics.jsonl, the progress bar): the rollout's and the backward pass's; "samples" holds
    the completions to write to samples.jsonl (only on the step that sampled them)."""
    record = dict(rollout.stats)
    if not fresh:
        record.pop("samples", None)
        record.update(generation_s=0.0, sampling_s=0.0)
    tokens = max(sums.tokens, 1)
    record.update(clip_ratio=sums.clipped / tokens, backward_s=round(backward_s, 3))
    if beta > 0:
        record["kl"] = sums.kl / tokens
    return record


def write_samples(run_dir: Path, step: int, samples: list[dict]) -> None:
    with (Path(run_dir) / SAMPLES_FILE).open("a", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")


def trim_samples(run_dir: Path, step: int) -> None:
    """A resumed run drops the samples written after its checkpoint (they are sampled again, identically)."""
    path = Path(run_dir) / SAMPLES_FILE
    if path.is_file():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(kept), encoding="utf-8")
