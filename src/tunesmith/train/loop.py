"""The training loop: ``finetune(config) -> TrainResult``, readable top to bottom.

Features and trade-offs:

- Data: conversations are read, given the run's chat template and system prompt, tokenized with
  assistant-only labels (cached on disk), split into train/validation, and laid out per epoch by
  a seed: packed rows (block-diagonal attention, no padding) or length-grouped padded batches.
  The layout is a pure function of (seed, epoch), so resuming only needs (epoch, index).
- Loss: the sum of token NLLs over an optimizer step's micro-batches divided by the number of
  supervised tokens in the whole step (across micro-batches and processes). Every supervised
  token weighs the same however examples fall into micro-batches, so 1 process x 2 micro-batches
  and 2 processes x 1 micro-batch give the same gradient.
- Multi-process: accelerate (DDP, FSDP2, DeepSpeed; parallel.py, FSDP2 on CPU too). Each optimizer step takes
  a window of ``grad_accum * processes`` micro-batches; process r takes every r-th one. Only process 0
  writes files; every process saves its own RNG state in checkpoints. With sharded parameters every forward
  is a collective, so a process with a smaller share makes spare passes that add nothing.
- Precision: fp32 master weights; bf16 autocast where the CPU/GPU has native bf16, fp16 with
  loss scaling on CUDA only when asked; an adapter run keeps its frozen base weights in the autocast
  dtype (cast once, not at every forward). ``train.precision fp32`` is bit-for-bit repeatable on CPU.
- Speed on CPU: each micro-batch goes through in pieces of ~1k tokens (less memory, no slower per
  token); packed rows attend per example (attention.py); a frozen output head makes its gradient in
  the forward pass (loss.py).
- Safety: a non-finite loss or gradient norm stops the run before the optimizer step, naming
  the step, so no weights (and no checkpoint) ever hold NaN.
- Evaluation every ``eval.eval_every`` steps; an improvement writes a checkpoint so the best is
  kept on disk (rotation never deletes it) and loaded at the end; early stopping with patience.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed

from tunesmith.config import Config, check_config, fingerprint_keys
from tunesmith.data.cache import encode_cached
from tunesmith.data.packing import forward_pieces, length_grouped_batches, pack_rows
from tunesmith.data.pairs import encode_pairs, load_pairs
from tunesmith.data.prompt import with_system_prompt
from tunesmith.data.prompts import load_prompts
from tunesmith.data.readers import load_conversations
from tunesmith.data.templates import apply_template
from tunesmith.data.tokenize import EncodeOptions
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.loss import sum_nll
from tunesmith.models.load import load_tokenizer
from tunesmith.models.resolve import resolve
from tunesmith.models.safety import refusing_remote_code
from tunesmith.output import progress_bar
from tunesmith.rewards import load_rewards, reward_sources
from tunesmith.run import (
    METRICS,
    RUN_INFO,
    MetricsLog,
    check_trackers,
    checkpoints_dir,
    is_adapter,
    list_checkpoints,
    plot_losses,
    read_metrics,
    write_model_card,
    write_run_info,
    write_step,
)
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import grpo
from tunesmith.train.checkpoint import assert_finite, clear_run
from tunesmith.train.methods import (
    apply_method,
    check_available,
    count_parameters,
    hold_frozen_weights,
    load_base_model,
)
from tunesmith.train.objectives import (
    Objective,
    Reference,
    disable_dropout,
    evaluate_pairs,
    is_preference,
    reference_model,
    step_stats,
)
from tunesmith.train.parallel import make_accelerator, sharding_line, shards_parameters
from tunesmith.train.plan import DataStats, ModelFacts, make_plan, resolve_config


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float | None
    final_eval_loss: float | None
    tokens: int  # tokens processed (non-padding), all processes
    supervised_tokens: int
    elapsed_s: float
    stopped_early: bool = False
    initial_eval_loss: float | None = None  # held-out loss before training (the learning check)
    plan: object = None  # plan.RunPlan
    warnings: list[str] = field(default_factory=list)  # reasons the run may not have taught much


@dataclass
class TrainState:
    """Everything besides tensors that resume needs; saved as state.json in each checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next micro-batch of this epoch's layout
    epoch_seed: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    last_eval_loss: float | None = None
    recent_losses: list[float] = field(default_factory=list)  # since the last metrics line
    recent_stats: list[dict] = field(default_factory=list)  # the objective's statistics, since the last line
    last_eval_stats: dict = field(default_factory=dict)
    initial_eval_loss: float | None = None
    first_loss: float | None = None
    collapse_steps: int = 0  # consecutive steps that look collapsed
    rollout: dict | None = None  # GRPO: the sampled batch that num_iterations steps still use (grpo.Rollout)


class TrainingDiverged(TunesmithError):
    pass


# ---------------------------------------------------------------- data


@dataclass
class Data:
    train: list  # tokenize.Encoded
    val: list
    fingerprint: str
    n_train_conversations: int


def _read(paths: list[str], config: Config) -> list:
    convs = load_conversations(paths, format=config.data.format, columns=config.data.columns,
                               encoding=config.data.encoding)
    return with_system_prompt(convs, config.data.system_prompt)


def _first(rows: list, max_samples: int) -> list:
    """The first ``max_samples`` rows (all when 0), and a line saying how many were left out."""
    if not max_samples or len(rows) <= max_samples:
        return rows
    _print(f"training data: the first {max_samples:,} of {len(rows):,} examples (data.max_samples)")
    return rows[:max_samples]


def _split(convs: list, val_size: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out: a fraction (<1) or a count (>=1) of the conversations."""
    if val_size <= 0:
        return convs, []
    n_val = int(val_size) if val_size >= 1 else max(1, round(len(convs) * val_size))
    if n_val >= len(convs):
        raise UsageError(f"data.val_size={val_size} leaves no training data ({len(convs)} conversations)")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def _encode(convs: list, tokenizer, config: Config, what: str) -> list:
    d = config.data
    options = EncodeOptions(max_length=d.max_length, truncation=d.truncation, train_on_prompt=d.train_on_prompt,
                            last_turn_only=d.last_turn_only)

    result = encode_cached(convs, tokenizer, options, config.data.template, progress=PartialState().is_main_process)
    examples, unsupervised = [], []
    for e in result.examples:
        (examples if e.num_supervised else unsupervised).append(e)
    if unsupervised:
        # Nothing to learn from them (e.g. every assistant turn has weight 0); said, never silent.
        where = ", ".join(f"{e.source}:{e.line}" for e in unsupervised[:5])
        _print(f"{what}: skipped {len(unsupervised)} example(s) with no supervised token ({where}"
               f"{', ...' if len(unsupervised) > 5 else ''}); `tunesmith data check` lists them")
    if result.dropped or result.truncated:
        _print(f"{what}: {result.truncated} examples truncated, {result.dropped} dropped "
               f"(longer than max_length={d.max_length}, truncation={d.truncation})")
    if not examples:
        raise UsageError(f"{what}: no example with a supervised token is left after tokenization")
    return examples


def prepare_data(config: Config, tokenizer) -> Data:
    """Examples for the objective: encoded conversations (SFT), encoded preference pairs, or prompts (GRPO)."""
    if config.method.objective == "grpo":
        return _prepare_prompts(config, tokenizer)
    read, encode = (_read_pairs, _encode_pairs) if is_preference(config.method.objective) else (_read, _encode)
    convs = _first(read(config.data.path, config), config.data.max_samples)
    if config.data.eval_path:
        train_convs, val_convs = convs, read(config.data.eval_path, config)
    else:
        train_convs, val_convs = _split(convs, config.data.val_size, config.train.seed)
    train = encode(train_convs, tokenizer, config, "training data")
    val = encode(val_convs, tokenizer, config, "validation data") if val_convs else []
    return Data(train, val, _data_fingerprint(train, val), len(train_convs))


def _read_pairs(paths: list[str], config: Config) -> list:
    return load_pairs(paths, format=config.data.format, columns=config.data.columns, encoding=config.data.encoding)


def _encode_pairs(pairs: list, tokenizer, config: Config, what: str) -> list:
    d = config.data
    options = EncodeOptions(max_length=d.max_length, truncation=d.truncation)
    kept, lost = encode_pairs(pairs, tokenizer, options, d.system_prompt, what, progress=PartialState().is_main_process)
    if lost:
        where = ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
        _print(f"{what}: skipped {len(lost)} pair(s) with a side dropped by truncation={d.truncation} or left with no "
               f"answer token at max_length={d.max_length} ({where}); `tunesmith data check` shows their lengths")
    if not kept:
        raise UsageError(f"{what}: no preference pair is left after tokenization")
    return kept


def _prepare_prompts(config: Config, tokenizer) -> Data:
    """GRPO's prompts, rendered and tokenized; its data fingerprint also covers the rows' fields and the reward
    files, which decide the rewards as much as the prompts do."""
    d = config.data
    if d.eval_path or d.val_size:
        raise UsageError("grpo has no held-out loss: drop --eval-data / data.val_size and evaluate the run with "
                         "`tunesmith eval RUN --data PROMPTS --reward ...`")
    rows = _first(load_prompts(d.path, columns=d.columns, encoding=d.encoding), d.max_samples)
    train, dropped, cut = grpo.encode_prompts(rows, tokenizer, d.max_length, d.truncation, d.system_prompt)
    if dropped or cut:
        where = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        _print(f"training data: {cut} prompts cut to their last {d.max_length} tokens, {len(dropped)} dropped "
               f"(over max_length, truncation={d.truncation}){': ' + where if dropped else ''}")
    if not train:
        raise UsageError("training data: no prompt is left after tokenization")
    digest = hashlib.sha256(_data_fingerprint(train, []).encode())
    digest.update(grpo.fields_fingerprint(train))
    for path in reward_sources(config.method.rewards):
        digest.update(path.read_bytes() if path.is_file() else str(path).encode())
    return Data(train, [], digest.hexdigest(), len(train))


def _data_fingerprint(train: list, val: list) -> str:
    """A hash of the token ids and labels: covers the data, the template, the tokenizer and max_length."""
    digest = hashlib.sha256()
    for part, examples in (("train", train), ("val", val)):
        digest.update(part.encode())
        for e in examples:
            digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()


def epoch_layout(examples: list, config: Config, epoch_seed: int) -> list[list[list[int]]]:
    """Micro-batches for one epoch: each a list of rows, each row a list of example indices."""
    rng = random.Random(epoch_seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if config.method.objective == "grpo":  # micro-batches of prompts; their completions are packed (grpo.py)
        size = config.train.batch_size
        return [[[i] for i in order[start:start + size]] for start in range(0, len(order), size)]
    lengths = [len(examples[i].input_ids) for i in order]
    if config.data.packing:
        rows = [[order[j] for j in row] for row in pack_rows(lengths, config.data.pack_length or config.longest_row)]
        rng.shuffle(rows)
        size = config.train.batch_size
        return [rows[i:i + size] for i in range(0, len(rows), size)]
    batches = length_grouped_batches(lengths, config.train.batch_size, seed=epoch_seed)
    return [[[order[j]] for j in batch] for batch in batches]


def _supervised_count(examples: list, batch: list[list[int]]) -> int:
    return sum(examples[i].num_supervised for row in batch for i in row)


def _token_count(examples: list, batch: list[list[int]]) -> int:
    return sum(len(examples[i].input_ids) for row in batch for i in row)


def windows(layout: list, per_step: int, processes: int) -> list[list]:
    """Group micro-batches into optimizer steps; a last, short window needs one micro-batch per process."""
    groups = [layout[i:i + per_step] for i in range(0, len(layout), per_step)]
    return [g for g in groups if len(g) >= processes]


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


# ---------------------------------------------------------------- setup


def _print(*args) -> None:
    if PartialState().is_main_process:
        print(*args, file=sys.stderr, flush=True)


def _mixed_precision(precision: str) -> str:
    """Accelerate's mixed_precision for ``train.precision``; fp32 master weights in every case."""
    cuda = torch.cuda.is_available()
    if precision == "fp16":
        if not cuda:
            raise UsageError("train.precision fp16 needs CUDA (fp16 autocast on CPU is slow and unscaled); use bf16 or fp32")
        return "fp16"
    if precision == "bf16":
        return "bf16"
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if cuda else torch.cpu._is_avx512_bf16_supported()
        return "bf16" if native else "no"
    return "no"


def _prepare_output_dir(config: Config) -> Path:
    out = Path(config.output.output_dir)

    has_run = (out / RUN_INFO).is_file() or checkpoints_dir(out).is_dir()
    if has_run and not config.train.resume and not config.output.overwrite:
        raise UsageError(f"{out} already holds a run; pass --resume auto to continue it, "
                         "--output.overwrite true to replace it, or another --output-dir")
    if has_run and config.output.overwrite and not config.train.resume:

        clear_run(out)  # the old run's checkpoints must not be rotated or resumed as this run's
    out.mkdir(parents=True, exist_ok=True)
    return out


def _config_fingerprint(config: Config) -> dict:
    """The options that change what is learned (config.py marks the others), and their hash."""
    flat = {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}
    keys = set(fingerprint_keys())
    kept = {k: v for k, v in flat.items() if k in keys}
    return {"config": hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest(), "config_values": kept}


def _add_neftune(model, alpha: float) -> None:
    """NEFTune (Jain et al. 2023): uniform noise of scale alpha/sqrt(length*dim) on input embeddings, training only."""
    def hook(module, inputs, output):
        if not module.training:
            return output
        magnitude = alpha / math.sqrt(output.size(-2) * output.size(-1))
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)

    model.get_input_embeddings().register_forward_hook(hook)


def _load_model(config: Config, base_path: Path):
    model = load_base_model(base_path, config.method, config.model.attn_implementation,
                            allow_pickle=config.model.allow_pickle)
    model = apply_method(model, config.method, config.model.gradient_checkpointing)
    _hold_frozen_in_compute_dtype(model, config)
    total, trainable = count_parameters(model)
    _print(f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.3f}%)")
    if config.train.neftune_alpha > 0:
        _add_neftune(model, config.train.neftune_alpha)
    return model, total, trainable


def _hold_frozen_in_compute_dtype(model, config: Config) -> None:
    """Adapter runs under bf16/fp16 autocast keep their frozen base weights in that dtype (methods.hold_frozen_weights);
    not under FSDP or DeepSpeed, which flatten parameters of one dtype."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_mixed_precision(config.train.precision))
    sharded = AcceleratorState().distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if dtype is not None and is_adapter(config.method.name) and config.method.name != "qlora" and not sharded:
        hold_frozen_weights(model, dtype)


def _optimizer_and_schedule(model, config: Config, total_steps: int):
    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    factor = functools.partial(lr_factor, warmup=t.warmup_steps, total=total_steps, kind=t.scheduler)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """The schedule as a fraction of the peak lr at optimizer step ``step`` (0-based).

    Written here rather than taken from transformers' get_scheduler because its warmup starts at
    exactly 0: the first step of every run is wasted, which matters in a 20-step run. Here warmup
    step i uses (i + 1) / (warmup + 1) of the peak, and the decay never reaches 0 before the end.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - progress if kind == "linear" else 1.0


# ---------------------------------------------------------------- steps


def _move(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class StepSums:
    """One step's window: this process's summed loss and statistics, and the window's totals."""

    loss: float  # this process's share
    stats: torch.Tensor  # this process's summed objective statistics (empty for SFT)
    weight: int  # what the loss is averaged over: supervised tokens (SFT) or pairs, whole window
    supervised: int
    tokens: int


# On CPU a forward pass over more tokens is no faster per token (the matmuls are big enough at ~1k
# tokens), and it keeps every activation of the micro-batch alive at once. So a micro-batch goes
# through in pieces of at most this many tokens, each with its own backward: the same gradients (the
# loss is a sum), half the peak memory and less time (bench/README.md, "Training throughput").
CPU_FORWARD_TOKENS = 1024


def _pieces(examples: list, batch: list[list[int]], device) -> list[list[list[int]]]:
    """The micro-batch's rows in pieces for one forward/backward each (on CPU; whole elsewhere)."""
    if torch.device(device).type != "cpu":
        return [batch]
    widths = [sum(len(examples[i].input_ids) for i in row) for row in batch]
    return [[batch[j] for j in piece] for piece in forward_pieces(widths, CPU_FORWARD_TOKENS)]


def train_step(accelerator, model, data: Data, window: list, packing: bool, pad_id: int,
               objective=None) -> StepSums:
    """Forward/backward over this process's share of one step's window.

    Gradients end up as d(summed loss over the window / the window's weight): every supervised
    token (SFT) or every pair (preference objectives) of the step weighs the same.
    """
    objective = objective or Objective()
    weight = sum(objective.weight(data.train, b) for b in window)
    supervised = sum(_supervised_count(data.train, b) for b in window)
    tokens = sum(_token_count(data.train, b) for b in window)
    pieces, spare = _process_pieces(accelerator, data.train, window)
    loss_sum, stats = 0.0, torch.zeros(0, dtype=torch.float64)
    for i, batch in enumerate(pieces + pieces[:1] * spare):
        # Gradients are synchronised once, on the last piece; DDP averages over processes,
        # so each process scales its share back up by the number of processes.
        sync = nullcontext() if i == len(pieces) + spare - 1 else accelerator.no_sync(model)
        with sync:
            inputs = _move(objective.collate(data.train, batch, packing, pad_id), accelerator.device)
            with accelerator.autocast():
                loss, batch_stats = objective.loss(model, data.train, batch, inputs)
            if i >= len(pieces):  # a spare pass: it only keeps the processes in step, and adds nothing
                loss = loss * 0.0
            accelerator.backward(loss.float() * (accelerator.num_processes / weight))
        if i < len(pieces):
            loss_sum += loss.detach().float().item()
            stats = batch_stats if stats.numel() == 0 else stats + batch_stats
    return StepSums(loss_sum, stats, weight, supervised, tokens)


def _process_pieces(accelerator, examples: list, window: list) -> tuple[list, int]:
    """This process's pieces of the window, and how many spare passes keep it in step with the others.

    Under FSDP or DeepSpeed every forward and backward is a collective (parameters gathered, gradients
    reduce-scattered), so every process must make as many as the busiest one; the window's last micro-batches
    may fall unevenly, and so may the pieces. DDP synchronises once per step and needs no spare pass."""
    n, me = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    counts = [sum(len(_pieces(examples, b, device)) for b in window[r::n]) for r in range(n)]
    pieces = [piece for batch in window[me::n] for piece in _pieces(examples, batch, device)]
    return pieces, (max(counts) - counts[me] if shards_parameters(accelerator) else 0)


def evaluate_loss(accelerator, model, examples: list, config: Config, pad_id: int, objective=None) -> float:
    """The held-out loss: mean NLL per supervised token (SFT) or mean loss per pair (preference objectives)."""
    return evaluate_held_out(accelerator, model, examples, config, pad_id, objective)[0]


@torch.no_grad()
def evaluate_held_out(accelerator, model, examples: list, config: Config, pad_id: int,
                      objective=None) -> tuple[float, dict]:
    """(held-out loss, the objective's statistics) over ``examples``, split across processes, in a fixed order."""
    objective = objective or Objective.of(config.method)
    batch_size = config.eval.batch_size or config.train.batch_size
    shard = (accelerator.process_index, accelerator.num_processes)
    lockstep = shards_parameters(accelerator)  # each forward gathers sharded parameters from every process
    model.eval()
    if objective.preference:
        sums = evaluate_pairs(model, objective, examples, batch_size, pad_id, device=accelerator.device, shard=shard,
                              autocast=accelerator.autocast, lockstep=lockstep)
    else:
        nll, n = sum_nll(model, examples, batch_size, pad_id, device=accelerator.device, shard=shard,
                         autocast=accelerator.autocast, lockstep=lockstep)
        sums = torch.tensor([nll, float(n)], dtype=torch.float64)
    model.train()
    totals = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    return (totals[0] / totals[-1]).item(), step_stats(totals[1:-1], int(totals[-1].item()))


def _check_finite(loss: float, grad_norm: float, step: int, lr: float) -> None:
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(
            f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
            f"(loss={loss}, grad_norm={grad_norm}, lr={lr:.3g}); stopped before the optimizer step, "
            "no checkpoint was written for it. Lower train.lr, or check the data.")


# ---------------------------------------------------------------- the run


@dataclass
class PreparedRun:
    """Everything decided before the model is loaded."""

    config: Config  # resolved: every option left unset is filled in by the plan
    plan: object  # plan.RunPlan
    base_path: Path
    tokenizer: object
    data: Data
    rewards: list = field(default_factory=list)  # GRPO's reward functions (rewards.Reward)


def prepare_run(config: Config) -> PreparedRun:
    """Checks, the base model's path and tokenizer, the tokenized data and the run plan; no weights loaded."""
    check_config(config)
    check_available(config.method)  # before any model is loaded
    check_trackers(config.output)  # a tracker asked for but not installed fails before any work
    # A reward that does not load (a typo, a syntax error) fails before the model or the data.
    rewards = load_rewards(config.method.rewards, config.method.reward_weights) \
        if config.method.objective == "grpo" else []
    base_path = resolve(config.model.name)
    tokenizer = load_tokenizer(base_path)
    template = apply_template(tokenizer, config.data.template)
    # cpu=True without CUDA: accelerate then treats torchrun/accelerate-launch ranks as gloo data-parallel
    # (the process-wide state made here is the one the Accelerator in finetune uses).
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():  # the first process fills the tokenization cache
        data = prepare_data(config, tokenizer)

    with refusing_remote_code(base_path):  # a damaged config.json or weights header is one message
        facts = ModelFacts.read(base_path)
    resolved, plan = plan_run(config, data, facts, state.num_processes, template)
    return PreparedRun(resolved, plan, base_path, tokenizer, data, rewards)


def plan_run(config: Config, data: Data, facts, processes: int, template=None):
    """(the config with the plan's choices filled in, the RunPlan), using the loop's own epoch layout;
    ``template``: the templates.TemplateChoice applied to the tokenizer."""
    def steps_per_epoch(c: Config) -> int:
        layout = epoch_layout(data.train, c, epoch_seed(c.train.seed, 0))
        return len(windows(layout, c.train.grad_accum * processes, processes))

    stats = DataStats.of(data.train, data.val)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved, choices = resolve_config(config, stats, facts, processes, steps_per_epoch, template, device)
    layout = epoch_layout(data.train, resolved, epoch_seed(resolved.train.seed, 0))
    per_epoch = len(windows(layout, resolved.train.grad_accum * processes, processes))
    if per_epoch == 0:
        raise UsageError(f"not enough training data for one step on {processes} processes")
    plan = make_plan(resolved, stats, facts, processes, per_epoch, sum(len(b) for b in layout), choices, device,
                     template)
    return resolved, plan


@dataclass
class Session:
    """The live objects of one training run, made by ``_start`` and used by ``_train`` and ``_finish``."""

    run: PreparedRun
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    state: TrainState
    log: object  # run.MetricsLog on the main process, else None
    out: Path
    fingerprint: dict
    n_total: int
    n_trainable: int
    objective: object  # objectives.Objective
    tokens_per_s: float | None = None  # measured after the first steps

    @property
    def pad_id(self) -> int:
        return self.run.tokenizer.pad_token_id


def finetune(config: Config, prepared: PreparedRun | None = None) -> TrainResult:
    """Fine-tune ``config.model.name`` on ``config.data.path``; write a self-describing run directory.

    ``prepared`` is ``prepare_run(config)`` when the caller already made (and showed) the plan.
    """
    started = time.perf_counter()
    run = prepared or prepare_run(config)
    if prepared is None:
        for line in ["run plan:", *run.plan.lines()]:
            _print(line)
    session = _start(run)
    stopped_early = _train(session)
    return _finish(session, started, stopped_early)


def _start(run: PreparedRun) -> Session:
    """Accelerator, run directory, model with its method, optimizer, schedule; resumed state; step-0 loss."""
    config, t = run.config, run.config.train
    # accelerate keeps its settings in a process-wide singleton that refuses a second, different
    # mixed_precision; clear them (not the process group) so finetune can run again in one process.
    AcceleratorState._reset_state()
    accelerator = make_accelerator(_mixed_precision(t.precision))  # DDP, FSDP2 (on CPU too) or DeepSpeed
    if config.method.objective == "grpo" and accelerator.distributed_type == DistributedType.FSDP:
        # Sampling generates under inference_mode, and each process's completions have their own lengths, so the
        # processes' forward passes (each one gathering the shards from all) would not pair up.
        raise UsageError("grpo does not run under FSDP: launch it with examples/accelerate/ddp.yaml (DDP)")
    out = _prepare_output_dir(config)
    if accelerator.is_main_process:
        run.plan.save(out)
    set_seed(t.seed)
    fingerprint = {**_config_fingerprint(config), "data": run.data.fingerprint}
    resume_from = ckpt.find_resume(out, t.resume) if t.resume else None
    if resume_from:  # refuse a changed config, data or process count before the model is loaded
        # the process count first: a plan made for another count differs in what it chose, which is not the cause
        ckpt.check_processes(resume_from, accelerator.num_processes, t.batch_size, t.grad_accum)
        ckpt.check_sharding(resume_from, shards_parameters(accelerator))
        ckpt.check_fingerprint(resume_from, fingerprint, t.resume_force)

    model, n_total, n_trainable = _load_model(config, run.base_path)
    objective = _prepare_objective(model, run, accelerator)
    optimizer, scheduler = _optimizer_and_schedule(model, config, run.plan.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler steps once per optimizer step, ours
    if line := sharding_line(model, accelerator.num_processes):
        _print(line)
    state = TrainState(epoch_seed=epoch_seed(t.seed, 0))
    if resume_from:
        state = TrainState(**ckpt.load_checkpoint(resume_from, accelerator, model, optimizer, scheduler))
        _print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, micro-batch {state.batch_index})")
        if accelerator.is_main_process:
            grpo.trim_samples(out, state.step)
    log = MetricsLog(out, resume_step=state.step if t.resume else None,
                     config=config) if accelerator.is_main_process else None
    model.train()
    session = Session(run, accelerator, model, optimizer, scheduler, state, log, out, fingerprint, n_total, n_trainable,
                      objective)
    if run.data.val and state.step == 0:  # the learning check's starting point
        state.initial_eval_loss = evaluate_loss(accelerator, model, run.data.val, config, session.pad_id, objective)
        _print(f"held-out loss before training: {state.initial_eval_loss:.4f}")
        if log:
            log.write({"step": 0, "initial_eval_loss": state.initial_eval_loss})
    return session


def _prepare_objective(model, run: PreparedRun, accelerator):
    """The run's Objective. Preference objectives: dropout off; DPO: its frozen reference (see objectives.py)."""
    config = run.config
    objective = Objective.of(config.method)
    if objective.preference or objective.name == "grpo":  # GRPO: the sampling policy is the one that is trained
        disable_dropout(model)
    if objective.needs_reference or (objective.name == "grpo" and objective.beta > 0):
        def load_base():
            base = load_base_model(run.base_path, config.method, config.model.attn_implementation,
                                   allow_pickle=config.model.allow_pickle)
            return base.to(accelerator.device)

        objective.reference = Reference(model, config.method, load_base, run.tokenizer.pad_token_id,
                                        autocast=accelerator.autocast)
    return objective


def _train(s: Session) -> bool:
    """One optimizer step per window of micro-batches until the plan's total; True when stopped early."""
    config, data, state, total = s.run.config, s.run.data, s.state, s.run.plan.total_steps
    processes = s.accelerator.num_processes
    per_step = config.train.grad_accum * processes
    interrupt, speed = _Interrupt(lambda: _lost_at_once(s)), _SpeedCheck(state.step, s.run.plan)
    progress = _progress(total, state.step, s.accelerator.is_main_process)
    step_windows = windows(epoch_layout(data.train, config, state.epoch_seed)[state.batch_index:], per_step, processes)
    started = time.perf_counter()
    with progress, interrupt:  # closes the bar on any exit, a diverged step included
        while state.step < total:
            reuse = state.rollout is not None  # GRPO: the last sampled batch has iterations left
            if not step_windows and not reuse:  # the epoch is over: lay out the next one
                state.epoch += 1
                state.epoch_seed, state.batch_index = epoch_seed(config.train.seed, state.epoch), 0
                step_windows = windows(epoch_layout(data.train, config, state.epoch_seed), per_step, processes)
            loss, grad_norm, lr, interrupted = _optimizer_step(s, [] if reuse else step_windows.pop(0), interrupt)
            elapsed = time.perf_counter() - started
            progress.update(1)
            if s.accelerator.is_main_process:
                write_step(s.out, state.step, total)  # a running run's step between metrics lines
            shown = {"reward": f"{state.recent_stats[-1]['reward']:.3f}"} if s.objective.name == "grpo" else {}
            progress.set_postfix(loss=f"{loss:.4f}", **shown, lr=f"{lr:.2e}",
                                 tok_s=f"{state.tokens / max(elapsed, 1e-9):.0f}", refresh=False)
            s.tokens_per_s = speed.after_step(state.step, state.tokens, total) or s.tokens_per_s
            evaluated, improved = _maybe_evaluate(s, total)
            _log_step(s, loss, grad_norm, lr, elapsed, evaluated, force=interrupted)
            if _checkpoint_due(config, state, improved) or interrupted:
                path = _save_checkpoint(s)
                if interrupted:
                    raise TrainingInterrupted(f"interrupted: stopped after step {state.step} of {total}; "
                                              f"checkpoint {path} is complete; continue with --resume auto")
            patience = config.eval.early_stopping_patience
            if evaluated and patience > 0 and state.evals_since_best >= patience:
                _print(f"early stopping at step {state.step}: no improvement in {state.evals_since_best} evaluations")
                return True
    return False


def _optimizer_step(s: Session, window: list, interrupt: _Interrupt) -> tuple[float, float, float, bool]:
    """Forward/backward over the window, checks, then the update: (loss, grad norm, lr, stop asked anywhere)."""
    state, t = s.state, s.run.config.train
    objective = s.objective
    record = None
    if objective.name == "grpo":
        sums, record = _grpo_step(s, window)
    else:
        sums = train_step(s.accelerator, s.model, s.run.data, window, s.run.config.data.packing, s.pad_id, objective)
    state.batch_index += len(window)
    state.step += 1
    ckpt.kill_point("during-step", state.step)
    # One reduction carries the loss, the objective's statistics and whether any process was asked to stop (Ctrl-C):
    # read after the forward/backward, so a Ctrl-C during them stops after this step, on every process alike.
    local = torch.cat([torch.tensor([sums.loss, float(interrupt.requested)], dtype=torch.float64), sums.stats])
    reduced = s.accelerator.reduce(local.to(s.accelerator.device), reduction="sum").cpu()
    loss, interrupted = reduced[0].item() / sums.weight, reduced[1].item() > 0
    supervised, tokens = sums.supervised, sums.tokens
    grad_norm = s.accelerator.clip_grad_norm_(s.model.parameters(), t.max_grad_norm or float("inf"))
    grad_norm = float(grad_norm) if grad_norm is not None else 0.0
    lr = s.scheduler.get_last_lr()[0]
    _check_finite(loss, grad_norm, state.step, lr)
    if record is None:  # a GRPO loss is no NLL, and a step of equal rewards has a zero gradient by design
        _check_collapse(state, loss, grad_norm, math.log(len(s.run.tokenizer)), lr)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    state.tokens += tokens
    state.supervised_tokens += supervised
    state.recent_losses.append(loss)
    if objective.preference:
        state.recent_stats.append(step_stats(reduced[2:], sums.weight))
    if record is not None:
        samples = record.pop("samples", None)
        state.recent_stats.append(record)
        every = s.run.config.output.sample_every
        if samples and s.log and every > 0 and (state.step % every == 0 or state.step == 1):
            grpo.write_samples(s.out, state.step, samples)
    # Alone, a Ctrl-C during the update counts for this step too; with several processes it waits for the next
    # step's reduction, so that all of them stop after the same step.
    return loss, grad_norm, lr, interrupted or (s.accelerator.num_processes == 1 and interrupt.requested)


def _grpo_step(s: Session, window: list) -> tuple[StepSums, dict]:
    """Sample (or reuse) the step's completions, then the clipped policy loss's forward/backward (grpo.py)."""
    state, method, accelerator = s.state, s.run.config.method, s.accelerator
    fresh = state.rollout is None
    if fresh:
        mine = window[accelerator.process_index::accelerator.num_processes]
        prompts = [i for batch in mine for row in batch for i in row]
        generator = grpo.sampling_generator(s.run.config.train.seed, state.step, accelerator.device)
        reference = s.objective.reference
        rollout = grpo.sample_rollout(
            s.model, s.run.tokenizer, s.run.data.train, prompts, method, s.run.rewards, generator=generator,
            autocast=accelerator.autocast,
            reference=(lambda: reference_model(s.model, method, reference.load_base)) if reference else None)
        counts = torch.tensor([len(rollout.completions), sum(map(len, rollout.completions))], dtype=torch.float64)
        totals = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        rollout.step_completions, rollout.step_tokens = int(totals[0]), int(totals[1])
    else:
        rollout = grpo.Rollout(**state.rollout)
    started = time.perf_counter()
    sums = grpo.policy_backward(accelerator, s.model, s.run.data.train, rollout, method, s.pad_id,
                                rollout.step_completions, rollout.step_tokens)
    rollout.iterations_done += 1
    state.rollout = rollout.to_dict() if rollout.iterations_done < method.num_iterations else None
    record = grpo.step_record(rollout, sums, time.perf_counter() - started, beta=s.objective.beta, fresh=fresh)
    prompt_tokens = sum(len(s.run.data.train[p].input_ids) for p in rollout.prompts)
    return StepSums(sums.loss, torch.zeros(0, dtype=torch.float64), 1, sums.tokens, sums.tokens + prompt_tokens), record


def _log_step(s: Session, loss: float, grad_norm: float, lr: float, elapsed: float, evaluated: bool,
              force: bool) -> None:
    """A metrics.jsonl line every log_every steps, at evaluations and at the end, with the mean loss since the last."""
    state = s.state
    every = s.run.config.train.log_every or (1 if s.objective.name == "grpo" else 10)
    due = state.step % max(every, 1) == 0 or state.step == s.run.plan.total_steps
    if not (due or evaluated or force):
        return
    record = {"step": state.step, "epoch": state.epoch, "loss": sum(state.recent_losses) / len(state.recent_losses),
              "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens, "supervised_tokens": state.supervised_tokens,
              "elapsed_s": round(elapsed, 3)}
    if state.recent_stats:  # the preference objective's rewards, margin and accuracy: means since the last line
        record.update({key: sum(d[key] for d in state.recent_stats) / len(state.recent_stats)
                       for key in state.recent_stats[0]})
    if evaluated:
        record["eval_loss"] = state.last_eval_loss
        record.update({f"eval_{key}": value for key, value in state.last_eval_stats.items()})
    state.recent_losses, state.recent_stats = [], []
    if s.log:
        s.log.write(record)


def _checkpoint_due(config: Config, state: TrainState, improved: bool) -> bool:
    every = config.output.save_every
    return (every > 0 and state.step % every == 0) or (improved and config.eval.load_best)


def _save_checkpoint(s: Session) -> Path:
    """Write a checkpoint; rotation never deletes it or the best one."""
    state = s.state
    path = ckpt.save_checkpoint(s.accelerator, s.model, s.optimizer, s.scheduler, asdict(state),
                                s.run.config.to_yaml(), s.fingerprint, s.out)
    if s.accelerator.is_main_process:
        best = [ckpt.step_dir(s.out, state.best_step)] if state.best_step else []
        ckpt.rotate(s.out, s.run.config.output.save_total_limit, keep={path, *best})
    ckpt.kill_point("after-checkpoint", state.step)
    return path


def _finish(s: Session, started: float, stopped_early: bool) -> TrainResult:
    """The best weights when asked, the run directory, the plan's measured figures, the learning check."""
    config, state, plan = s.run.config, s.state, s.run.plan
    final_eval = state.last_eval_loss
    if config.eval.load_best and state.best_step is not None and state.best_step != state.step:
        _load_best(s, ckpt.step_dir(s.out, state.best_step))
        final_eval = state.best_eval_loss
        _print(f"loaded the best checkpoint (step {state.best_step}, eval loss {final_eval:.4f})")
    final_train = _final_train_loss(s.out, state)
    if s.log:  # the trackers get the final losses, then close
        s.log.close(final_train, final_eval)
    _save_run(s.accelerator, s.model, s.run.tokenizer, config, s.out, base_path=s.run.base_path, state=state,
              data=s.run.data, final_train=final_train, final_eval=final_eval, n_total=s.n_total,
              n_trainable=s.n_trainable)
    warnings = list(plan.warnings) + _learning_warnings(state.initial_eval_loss, final_eval)
    if s.accelerator.is_main_process:
        plan.finish(s.out, elapsed_s=time.perf_counter() - started, tokens_per_s=s.tokens_per_s)
    s.accelerator.end_training()
    return TrainResult(run_dir=s.out, steps=state.step, final_train_loss=final_train, final_eval_loss=final_eval,
                       tokens=state.tokens, supervised_tokens=state.supervised_tokens,
                       elapsed_s=time.perf_counter() - started, stopped_early=stopped_early,
                       initial_eval_loss=state.initial_eval_loss, plan=plan, warnings=warnings)


def _learning_warnings(before: float | None, after: float | None) -> list[str]:
    if before is None or after is None or after < before:
        return []
    return [f"the held-out loss did not improve ({before:.4f} before training, {after:.4f} after): the model "
            "learned nothing that carries over to the held-out data"]


class TrainingInterrupted(TunesmithError):
    exit_code = 130  # the shell's code for a Ctrl-C


def _lost_at_once(s: Session) -> str:
    """What a second Ctrl-C loses: the steps since the last complete checkpoint, or all of them."""
    done = s.state.step
    kept = [(step, path) for step, path, complete in list_checkpoints(s.run.config.output.output_dir) if complete]
    if not kept:
        return (f"interrupted at once during step {done + 1}: no checkpoint was written yet, so the {done} step(s) "
                "done are lost; train again (one Ctrl-C stops after the current step with a checkpoint)")
    step, path = kept[-1]
    return (f"interrupted at once during step {done + 1}: the {done - step} step(s) after the last checkpoint "
            f"{path} are lost; continue from it with --resume auto")


class _Interrupt:
    """Ctrl-C (SIGINT) asks for a stop after the current step, with a checkpoint; a second one stops at once,
    saying what that loses (``lost``)."""

    def __init__(self, lost=lambda: "interrupted"):
        self.requested = False
        self._previous = None
        self._lost = lost

    def _handle(self, signum, frame):
        if self.requested:
            raise TrainingInterrupted(self._lost())
        self.requested = True
        _print("\nstopping after this step (Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _SpeedCheck:
    """Measures throughput over the steps after the first (which pays for warm-up) and refines the estimate."""

    REPORT_AT = 4

    def __init__(self, start_step: int, plan):
        self.start_step, self.plan = start_step, plan
        self.mark: tuple[float, int] | None = None
        self.tokens_per_s: float | None = None

    def after_step(self, step: int, tokens: int, total_steps: int) -> float | None:
        now = time.perf_counter()
        if step == self.start_step + 1:
            self.mark = (now, tokens)
        elif self.mark is not None and step == self.start_step + self.REPORT_AT:
            self.tokens_per_s = (tokens - self.mark[1]) / max(now - self.mark[0], 1e-9)
            # seconds per step, measured: a GRPO step's time is mostly generation, which tokens/s does not see
            left = (total_steps - step) * (now - self.mark[0]) / (self.REPORT_AT - 1)
            _print(f"\nmeasured {self.tokens_per_s:,.0f} tokens/s: about {left / 60:.1f} min left "
                   f"(planned {self.plan.estimate_s / 60:.1f} min in all)")
        return self.tokens_per_s


def _check_collapse(state: TrainState, loss: float, grad_norm: float, uniform_loss: float, lr: float) -> None:
    """Stop a run whose loss collapsed, instead of saving a broken model as if all went well.

    Collapsed: the gradient norm is exactly 0 for 3 steps in a row (nothing can move any more),
    or for 3 steps in a row the loss sits far above where it started (more than twice, and 2
    nats higher) or at the uniform-guess level ln(vocabulary) when it started well below it.
    """
    if state.first_loss is None:
        state.first_loss = loss
    start = state.first_loss
    zero = grad_norm == 0.0 and loss > 0
    bad = loss > max(2 * start, start + 2) or (start < 0.7 * uniform_loss and loss > 0.9 * uniform_loss)
    state.collapse_steps = state.collapse_steps + 1 if (zero or bad) else 0
    if state.collapse_steps >= 3:
        what = "the gradient norm is 0" if zero else f"the loss rose from {start:.3f} to {loss:.3f}"
        raise TrainingDiverged(f"step {state.step}: training collapsed: {what} for 3 steps (lr={lr:.3g}); "
                               "stopped without saving. Lower train.lr (--lr), or check the data.")


def _maybe_evaluate(s: Session, total_steps: int) -> tuple[bool, bool]:
    """Evaluate on the validation set when due; returns (evaluated, improved)."""
    config, data, state = s.run.config, s.run.data, s.state
    every = config.eval.eval_every
    due = state.step == total_steps or (every > 0 and state.step % every == 0)
    if not data.val or not due:
        return False, False
    loss, stats = evaluate_held_out(s.accelerator, s.model, data.val, config, s.pad_id, s.objective)
    if not math.isfinite(loss):
        raise TrainingDiverged(f"step {state.step}: non-finite validation loss ({loss})")
    state.last_eval_loss, state.last_eval_stats = loss, stats
    improved = state.best_eval_loss is None or loss < state.best_eval_loss
    if improved:
        state.best_eval_loss, state.best_step, state.evals_since_best = loss, state.step, 0
    else:
        state.evals_since_best += 1
    return True, improved


def _load_best(s: Session, path: Path) -> None:
    """The best checkpoint's weights, read the way resume reads them: a sharded checkpoint holds shards, not
    weights.safetensors. Its optimizer, scheduler and RNG states come along; nothing steps after this."""
    ckpt.load_checkpoint(path, s.accelerator, s.model, s.optimizer, s.scheduler)


def _final_train_loss(out: Path, state: TrainState) -> float | None:
    """The mean train loss of the last metrics line (last log window)."""
    rows = [r for r in read_metrics(out / METRICS) if r.get("loss") is not None]
    return rows[-1]["loss"] if rows else None


def _progress(total: int, initial: int, enabled: bool):
    """The step bar on a terminal; in a log file, a line with the loss at most every PIPE_REPORT_S seconds."""
    return progress_bar("train", total, done=initial, unit="steps", enabled=enabled, keep=True)


def _save_run(accelerator, model, tokenizer, config: Config, out: Path, *, base_path: Path, state: TrainState,
              data: Data, final_train, final_eval, n_total: int, n_trainable: int) -> None:
    """Final weights (adapter or full), tokenizer with its template, run info, card and loss plot."""
    unwrapped = accelerator.unwrap_model(model)
    assert_finite(unwrapped, state.step)
    state_dict = accelerator.get_state_dict(model)  # gathers shards under FSDP/DeepSpeed; every process calls it
    if accelerator.is_main_process:
        unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
        info = write_run_info(out, config, base_model_path=base_path, steps=state.step,
                              data_fingerprint=data.fingerprint, final_train_loss=final_train,
                              final_eval_loss=final_eval)
        write_model_card(out, config, info, trainable=n_trainable, total=n_total,
                         n_train=data.n_train_conversations, n_eval=len(data.val))
        plot_losses(out)
    accelerator.wait_for_everyone()
