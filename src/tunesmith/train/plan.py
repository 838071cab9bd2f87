"""The run plan: what a training run will do, decided and printed before the model is loaded.

Defaults that teach. A run is only as good as its number of optimizer steps and its learning
rate, and the amount of data decides both: packing 60 short examples into rows of 1024 tokens
with 16 rows per step leaves one optimizer step per epoch, and nothing is learned. So, for every
option the user leaves unset (``None`` in config.py), the plan chooses a value from the data, the
method and the model, and says why:

- Examples per optimizer step grow with the square root of the dataset size (sqrt(n)/3, 2 to 64): small
  data gets many small steps, large data fewer, larger, more efficient ones. LoRA in particular
  prefers small batches (Schulman et al., "LoRA Without Regret", Thinking Machines 2025). With
  packing, a step's tokens fill whole rows of max_length when there are enough of them, and one
  shorter row (pack_length) when there are not, so no step is mostly padding or mostly one row.
- Epochs: enough passes for at least ``MIN_STEPS`` optimizer steps, between 3 and 10 (small data
  needs repetition to be remembered), fewer passes for large data (2 from 10k examples, 1 from
  50k), where one more epoch mostly costs time.
- Learning rate: the width-scaled rule from the same study (a base of 5e-5 for full fine-tuning,
  times 10 for LoRA, times (2000 / hidden size) to a per-family power: 0.781 for llama-like
  models, 0.0775 for Qwen), which gives ~1.3e-3 for the 135M default and ~3e-4 for a 7B llama,
  in line with the 2e-4 that Unsloth and Axolotl recommend for 7B-class LoRA. Full fine-tuning
  and freeze use the base rate.
- Warmup: 5% of the steps (at most 100), none for runs under 10 steps, so it never eats most of a
  short run.
- Template: the tokenizer's own; without one, the model family's built-in (data.templates), named
  in the plan with its reason and written into the resolved config, so the run's files say which.

Anchors for comparison: LLaMA-Factory and TRL default to 3 epochs with a fixed batch (TRL lr
2e-5, LLaMA-Factory's examples lr 1e-4) whatever the data size; Axolotl's and Unsloth's examples
fix lr 2e-4 and a batch of 8 to 16 examples. On 60 examples all of them take 4 to 24 optimizer
steps at a rate that barely moves a small model; measured in bench/efficacy.py.

GRPO (learning from rewards) plans differently, because a step samples completions before its
backward pass and sampling dominates its time:

- Prompts per optimizer step: sqrt(n)/2, from 2 to 16 (all in one micro-batch: their completions are
  sampled together and packed for the backward pass); ``num_generations`` 8 completions each (TRL's
  default group; fewer make the group's mean and std, the baseline, too noisy).
- Completions of at most 256 tokens on a GPU, 128 on a CPU, where every sampled token costs a forward
  pass of the whole batch: enough for a short answer with its reasoning; set
  ``method.max_completion_length`` for longer ones.
- Steps: one pass over the prompts, and at least ``GRPO_MIN_STEPS``: the reward moves within tens of
  steps on a small model, and each step costs as much as dozens of SFT steps.
- Learning rate: the SFT rate of the same model and method, measured: on examples/grpo (48 steps
  of 3 prompts x 8 completions, SmolLM2-135M, LoRA) the sampled reward rose from 0.07 to 1.0 by
  step 27 at 1x (1.3e-3), and the held-out greedy reward from 0.19 to 0.89, while at 0.5x it was
  still 0.16 after 22 steps and at 0.1x (the 1/20 to 1/10 of DeepSeekMath and TRL's long runs)
  0.15-0.20 after 45. A CPU-sized run has tens of steps, not thousands, and each step is already
  bounded: advantages are normalised within the group and the clipping (epsilon) limits how far a
  reused batch moves the policy. For runs of hundreds of steps, set a lower ``train.lr``.
- The time estimate counts the sampled tokens (a forward pass each, at a lower rate than training's
  matmuls) and the backward pass over prompts and completions.

Every user-set value wins. ``warnings`` lists what makes a plan unlikely to teach anything.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith.config import Config
from tunesmith.data.pairs import EncodedPair, mostly_long_prefix, shares_long_prefix
from tunesmith.data.templates import BUILTIN_TEMPLATES, TemplateChoice
from tunesmith.run import is_adapter
from tunesmith.train.objectives import DEFAULT_SFT_WEIGHT

MIN_STEPS = 80  # optimizer steps a small dataset should get in all (the epoch rule aims for it)
MIN_EPOCHS, MAX_EPOCHS = 3, 10
MAX_EXAMPLES_PER_STEP = 64
GRPO_MIN_STEPS = 40
GRPO_GENERATIONS = 8
GRPO_COMPLETION_TOKENS = {"cpu": 128, "cuda": 256}
MICRO_BATCH_TOKENS = 4096  # tokens per micro-batch per process: what today's default (4 x 1024) holds in memory
PLAN_FILE = "plan.json"

# A rough prior for the time estimate before anything is measured; refined after the first steps.
PRIOR_FLOPS = {"cpu": 1.0e11, "cuda": 5.0e13}


@dataclass
class DataStats:
    examples: int
    tokens: int
    supervised_tokens: int
    longest: int
    val_examples: int = 0
    val_tokens: int = 0
    long_prefix_pairs: int = 0  # preference pairs whose answer tokens share a long prefix (pairs.shares_long_prefix)

    @classmethod
    def of(cls, train: list, val: list) -> DataStats:
        return cls(examples=len(train), tokens=sum(len(e.input_ids) for e in train),
                   supervised_tokens=sum(e.num_supervised for e in train),
                   longest=max((len(e.input_ids) for e in train), default=0), val_examples=len(val),
                   val_tokens=sum(len(e.input_ids) for e in val),
                   long_prefix_pairs=sum(isinstance(e, EncodedPair) and shares_long_prefix(e) for e in train))

    @property
    def mean_tokens(self) -> float:
        return self.tokens / max(self.examples, 1)


@dataclass
class ModelFacts:
    """What the plan needs to know of the base model, read without loading its weights."""

    params: int
    hidden_size: int
    model_type: str

    @classmethod
    def read(cls, path: Path) -> ModelFacts:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config)  # multimodal configs nest the language model's
        return cls(params=_count_params(Path(path)), hidden_size=int(config.get("hidden_size", 2048)),
                   model_type=str(config.get("model_type", "")))


def _count_params(path: Path) -> int:
    """Parameters from the safetensors headers (shapes only; no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                total += math.prod(handle.get_slice(key).get_shape())
    return total


@dataclass
class Choice:
    key: str
    value: object
    reason: str
    auto: bool  # chosen by the plan (True) or set by the user (False)


@dataclass
class RunPlan:
    examples: int
    tokens: int
    supervised_tokens: int
    val_examples: int
    method: str
    processes: int
    packing: bool
    row_length: int  # tokens per packed row (or the longest example, unpacked)
    rows_per_epoch: int
    micro_batch: int
    grad_accum: int
    steps_per_epoch: int
    epochs: float
    total_steps: int
    warmup_steps: int
    lr: float
    scheduler: str
    tokens_per_step: float
    estimate_s: float
    estimate_basis: str
    choices: list[Choice] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    objective: str = "sft"
    template: str | None = None  # the chat template applied: a built-in's name, "own" or a .jinja path
    template_reason: str | None = None
    prompts_per_step: int | None = None  # GRPO
    num_generations: int | None = None
    max_completion_length: int | None = None
    long_prefix_pairs: int = 0  # preference pairs whose answers share a long prefix
    sft_weight: float | None = None  # dpo/simpo: the resolved method.sft_weight
    measured_tokens_per_s: float | None = None  # filled in after the first steps
    elapsed_s: float | None = None  # filled in at the end

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan as the lines printed at the start of training and by ``train --plan``."""
        if self.objective == "grpo":
            return self._grpo_lines()
        unit = "packed rows" if self.packing else "examples"
        items = "examples" if self.objective == "sft" else "preference pairs (both sides counted in tokens)"
        out = [
            f"data: {self.examples} {items}, {self.tokens:,} tokens, {self.supervised_tokens:,} supervised "
            f"({100 * self.supervised_tokens / max(self.tokens, 1):.0f}%); {self.val_examples} held out"
            + (f"; {self.long_prefix_pairs} with answers sharing a long prefix" if self.long_prefix_pairs else ""),
            f"batches: {self.rows_per_epoch} {unit} of up to {self.row_length} tokens per epoch; "
            f"{self.micro_batch} per micro-batch x {self.grad_accum} accumulation x {self.processes} process(es) "
            f"= ~{self.tokens_per_step:,.0f} tokens per optimizer step",
            f"steps: {self.steps_per_epoch} per epoch x {_epochs(self.epochs)} epochs = {self.total_steps} optimizer steps, "
            f"{self.warmup_steps} of warmup",
            f"learning rate: {self.lr:.3g} peak, {self.scheduler} schedule ({self.method}"
            + (f", {self.objective})" if self.objective != "sft" else ")"),
            f"time: about {_duration(self.estimate_s)} ({self.estimate_basis})",
        ]
        if self.template:
            out.insert(1, f"template: {TemplateChoice(self.template, self.template_reason, '').describe()}")
        out += [f"  {c.key} = {c.value}: {c.reason}" for c in self.choices if c.auto]
        out += [f"WARNING: {w}" for w in self.warnings]
        return out

    def _grpo_lines(self) -> list[str]:
        out = [
            f"data: {self.examples} prompts, {self.tokens:,} prompt tokens (longest {self.row_length})",
            f"rollouts: {self.prompts_per_step} prompts per optimizer step x {self.num_generations} completions of up "
            f"to {self.max_completion_length} tokens = {self.prompts_per_step * self.num_generations} completions "
            f"per step, x {self.processes} process(es)",
            f"steps: {self.steps_per_epoch} per pass over the prompts x {_epochs(self.epochs)} = {self.total_steps} "
            f"optimizer steps, {self.warmup_steps} of warmup",
            f"learning rate: {self.lr:.3g} peak, {self.scheduler} schedule ({self.method}, grpo)",
            f"time: about {_duration(self.estimate_s)} ({self.estimate_basis})",
        ]
        out += [f"  {c.key} = {c.value}: {c.reason}" for c in self.choices if c.auto]
        return out + [f"WARNING: {w}" for w in self.warnings]

    def finish(self, run_dir: Path, *, elapsed_s: float, tokens_per_s: float | None) -> Path:
        """Record what the run measured beside what was planned."""
        self.elapsed_s, self.measured_tokens_per_s = round(elapsed_s, 1), tokens_per_s
        return self.save(run_dir)

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / PLAN_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------- choosing the defaults


def examples_per_step(n_examples: int) -> int:
    """sqrt(n)/3, from 2 to 64: 32 examples -> 2, 150 -> 4, 1,000 -> 11, 37,000+ -> 64.

    Measured on bench/efficacy.py (150 examples, 3 epochs, same tokens): 6 examples per step
    answered 92% of the held-out phrasings, 4 per step (as a plain loop with batch 4) 98%."""
    return max(2, min(MAX_EXAMPLES_PER_STEP, round(math.sqrt(n_examples) / 3)))


def _epochs(epochs: float) -> str:
    """Epochs as a person reads them: 3, 1.35, 0.06 (a max-steps run ends mid-epoch: 1.35135 says no more)."""
    if epochs < 0.1:
        return f"{epochs:.2g}"  # 0.0059, not 0
    return f"{epochs:.2f}".rstrip("0").rstrip(".")


def default_epochs(n_examples: int, steps_per_epoch: int) -> tuple[float, str]:
    if n_examples >= 50_000:
        return 1.0, f"{n_examples:,} examples: one pass already gives {steps_per_epoch:,} steps"
    if n_examples >= 10_000:
        return 2.0, f"{n_examples:,} examples: two passes give {2 * steps_per_epoch:,} steps"
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_STEPS / max(steps_per_epoch, 1))))
    why = (f"{steps_per_epoch} steps per epoch; {epochs} passes give {epochs * steps_per_epoch} steps "
           f"(aim: at least {MIN_STEPS}, {MIN_EPOCHS} to {MAX_EPOCHS} passes)")
    return float(epochs), why


# LoRA learning rate scales with width to a per-family power ("LoRA Without Regret"); see the docstring.
_LR_POWER = {"qwen": 0.0775}


# Preference objectives move a model that already follows instructions, and a pair's loss saturates fast: they
# train at a fraction of the SFT rate, as their papers do (DPO and SimPO about 1/10 to 1/20 of the SFT
# rate of the same model; ORPO, which also carries the SFT loss, about 1/2 in its paper, 1x here: below). GRPO: see
# the module docstring.
# ORPO, whose loss is the SFT loss plus a small odds-ratio term (beta 0.1), trains at the SFT rate: on the
# sign-off pairs of train/objectives.py's docstring it closed 10 of 10 held-out answers with the sign-off at 1x
# (two seeds), 7 to 9 of 10 at 0.5x (the rest repeating it or running on after it).
OBJECTIVE_LR_FACTOR = {"sft": 1.0, "dpo": 0.1, "simpo": 0.1, "orpo": 1.0, "grpo": 1.0}
# DPO and SimPO with their SFT term (method.sft_weight): the term keeps the chosen answers likely, so a higher
# rate moves the greedy answer without unlearning them (measured in train/objectives.py's docstring).
WITH_SFT_TERM_LR_FACTOR = 0.5


def default_lr(method: str, facts: ModelFacts, objective: str = "sft", sft_weight: float = 0.0) -> tuple[float, str]:
    power = next((p for family, p in _LR_POWER.items() if facts.model_type.startswith(family)), 0.781)
    scale = (2000 / facts.hidden_size) ** power
    adapter = is_adapter(method)
    factor = WITH_SFT_TERM_LR_FACTOR if sft_weight and objective in DEFAULT_SFT_WEIGHT else OBJECTIVE_LR_FACTOR[objective]
    lr = float(f"{5e-5 * (10 if adapter else 1) * scale * factor:.2g}")
    kind = "LoRA (10x the full fine-tuning rate)" if adapter else "full-weight training"
    if factor != 1:
        kind += f", {factor:g}x for {objective}" + (" with its SFT term" if objective in DEFAULT_SFT_WEIGHT
                                                    and sft_weight else "")
    return lr, f"{kind}, scaled to hidden size {facts.hidden_size} ({facts.model_type or 'unknown'} family)"


def default_warmup(total_steps: int) -> tuple[int, str]:
    if total_steps < 10:
        return 0, f"no warmup in a {total_steps}-step run"
    warmup = min(100, round(0.05 * total_steps))
    return warmup, f"5% of {total_steps} steps"


def _row_length(step_tokens: float, longest: int, max_length: int) -> int:
    """Full rows when a step has max_length tokens or more, else one row holding the step.

    Independent of the number of processes, so a data-parallel run packs the same rows as one
    process (and, with the same global batch, follows the same loss curve)."""
    if step_tokens >= max_length:
        return max_length
    return min(max_length, max(longest, math.ceil(step_tokens)))


def _batch_shape(stats: DataStats, config: Config, processes: int) -> tuple[int, int, int, list[Choice]]:
    """(row length, micro-batch, accumulation) for the user's values or the data-sized defaults."""
    d, t = config.data, config.train
    per_step = examples_per_step(stats.examples)
    step_tokens = per_step * stats.mean_tokens
    choices = []
    if d.packing:
        row_length = d.pack_length or _row_length(step_tokens, stats.longest, config.longest_row)
        if d.pack_length is None and row_length < config.longest_row:
            choices.append(Choice("data.pack_length", row_length, f"~{per_step} examples per step need "
                                  f"~{step_tokens:,.0f} tokens, less than a full row of {config.longest_row}", True))
        rows, unit_tokens = max(processes, round(step_tokens / row_length)), row_length
    else:
        rows, unit_tokens = max(processes, per_step), max(stats.longest, 1)
    per_process = math.ceil(rows / processes)
    micro = t.batch_size or max(1, min(per_process, MICRO_BATCH_TOKENS // unit_tokens))
    accum = t.grad_accum or max(1, math.ceil(per_process / micro))
    unit = "rows" if d.packing else "examples"
    if t.batch_size is None:
        choices.append(Choice("train.batch_size", micro, f"{MICRO_BATCH_TOKENS} tokens per micro-batch at most "
                              f"({unit} of up to {unit_tokens} tokens)", True))
    if t.grad_accum is None:
        choices.append(Choice("train.grad_accum", accum, f"~{per_step} examples per optimizer step for "
                              f"{stats.examples} examples (sqrt(n)/3, 2 to {MAX_EXAMPLES_PER_STEP})", True))
    return row_length if d.packing else unit_tokens, micro, accum, choices


def resolve_config(config: Config, stats: DataStats, facts: ModelFacts, processes: int,
                   steps_per_epoch_of, template: TemplateChoice | None = None,
                   device: str = "cpu") -> tuple[Config, list[Choice]]:
    """A copy of ``config`` with every unset (None) training option chosen, and the reasons.

    ``steps_per_epoch_of(config)`` counts the optimizer steps of one epoch for a resolved batch
    shape (the loop's own layout, so the plan and the run cannot disagree). ``template``: the one
    templates.apply_template put on the tokenizer; a built-in chosen for a model without a template
    becomes data.template.
    """
    if template is not None and config.data.template is None and template.name in BUILTIN_TEMPLATES:
        config = copy.deepcopy(config)
        config.data.template = template.name
    if config.method.objective == "grpo":
        return _resolve_grpo(config, stats, facts, processes, steps_per_epoch_of, device)
    resolved = copy.deepcopy(config)
    d, t = resolved.data, resolved.train
    row_length, micro, accum, choices = _batch_shape(stats, config, processes)
    if d.packing and d.pack_length is None:
        d.pack_length = row_length
    t.batch_size, t.grad_accum = micro, accum
    steps_per_epoch = steps_per_epoch_of(resolved)
    if t.epochs is None:
        t.epochs, why = default_epochs(stats.examples, steps_per_epoch)
        choices.append(Choice("train.epochs", t.epochs, why, t.max_steps == 0))
    m = resolved.method
    if m.objective in DEFAULT_SFT_WEIGHT and m.sft_weight is None:
        m.sft_weight = DEFAULT_SFT_WEIGHT[m.objective]
        choices.append(Choice("method.sft_weight", m.sft_weight, "the chosen answer's NLL beside the pair loss, so "
                              "the greedy answer follows the preference, not only its likelihood (RPO)", True))
    if t.lr is None:
        t.lr, why = default_lr(m.name, facts, m.objective, m.sft_weight or 0.0)
        choices.append(Choice("train.lr", t.lr, why, True))
    total = total_steps(resolved, steps_per_epoch)
    if t.warmup_steps is None:
        if t.warmup_ratio is not None:
            t.warmup_steps = math.ceil(t.warmup_ratio * total)
        else:
            t.warmup_steps, why = default_warmup(total)
            choices.append(Choice("train.warmup_steps", t.warmup_steps, why, True))
    return resolved, choices


def prompts_per_step(n_prompts: int) -> int:
    """sqrt(n)/2, from 2 to 16: 16 prompts -> 2, 64 -> 4, 1,000+ -> 16."""
    return max(2, min(16, round(math.sqrt(n_prompts) / 2)))


def _resolve_grpo(config: Config, stats: DataStats, facts: ModelFacts, processes: int, steps_per_epoch_of,
                  device: str) -> tuple[Config, list[Choice]]:
    """GRPO's choices (see the module docstring): rollout shape, steps, learning rate, warmup."""
    resolved = copy.deepcopy(config)
    m, t, choices = resolved.method, resolved.train, []

    def choose(key: str, value, why: str):
        choices.append(Choice(key, value, why, True))
        return value

    if m.num_generations is None:
        m.num_generations = choose("method.num_generations", GRPO_GENERATIONS, "completions per prompt (TRL's "
                                   "default group): the group's mean and std are each completion's baseline")
    if m.max_completion_length is None:
        m.max_completion_length = choose("method.max_completion_length", GRPO_COMPLETION_TOKENS[device],
                                         f"a short answer with its reasoning; every sampled token costs a forward "
                                         f"pass of the whole batch on {device}")
    if t.batch_size is None:
        per_step = prompts_per_step(stats.examples)
        t.batch_size = choose("train.batch_size", math.ceil(per_step / processes),
                              f"~{per_step} prompts per optimizer step for {stats.examples} prompts (sqrt(n)/2, 2 to 16)")
    if t.grad_accum is None:
        t.grad_accum = 1  # the step's prompts are sampled together; the backward pass is packed in pieces anyway
    steps_per_epoch = steps_per_epoch_of(resolved)
    if t.epochs is None:
        t.epochs = float(max(1, math.ceil(GRPO_MIN_STEPS / max(steps_per_epoch, 1))))
        choices.append(Choice("train.epochs", t.epochs, f"{steps_per_epoch} steps per pass over the prompts; at least "
                              f"{GRPO_MIN_STEPS} steps in all", t.max_steps == 0))
    if t.lr is None:
        t.lr, why = default_lr(m.name, facts, "grpo")
        choose("train.lr", t.lr, why + "; the SFT rate, as measured for tens of GRPO steps (see the plan's docstring)")
    if t.warmup_steps is None:
        if t.warmup_ratio is not None:
            t.warmup_steps = math.ceil(t.warmup_ratio * total_steps(resolved, steps_per_epoch))
        else:
            t.warmup_steps, why = default_warmup(total_steps(resolved, steps_per_epoch))
            choose("train.warmup_steps", t.warmup_steps, why)
    return resolved, choices


def total_steps(config: Config, steps_per_epoch: int) -> int:
    t = config.train
    return t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)


# ---------------------------------------------------------------- warnings and the estimate


LR_STEPS_TO_TEACH = {"adapter": 0.01, "full": 0.001}  # sum of the peak lr over steps below which little moves


def lr_steps(lr: float, steps: int, warmup: int) -> float:
    """The learning rate summed over the run's steps, warmup rising linearly to ``lr`` (the decay after it is
    not counted: what matters is how far the weights can move). A run shorter than its warmup never reaches
    ``lr``: its steps sum to lr * steps^2 / (2 * warmup)."""
    warm = min(warmup, steps)
    return lr * ((warm * warm / (2 * warmup) if warmup else 0.0) + steps - warm)


def plan_warnings(plan: RunPlan) -> list[str]:
    out = []
    if plan.total_steps < 20:
        out.append(f"only {plan.total_steps} optimizer steps: too few to teach a model much; lower "
                   "--batch-size/--grad-accum or raise --epochs")
    budget = LR_STEPS_TO_TEACH["adapter" if is_adapter(plan.method) else "full"]
    effective = lr_steps(plan.lr, plan.total_steps, plan.warmup_steps)
    # GRPO: the budget is an SFT measurement; a policy-gradient run trains at a tenth of the rate on purpose
    if effective < budget and plan.objective != "grpo":
        out.append(f"learning rate x steps = {effective:.2g}, far below the ~{budget:g} that visibly moves a "
                   f"{plan.method} model; raise --lr or the number of steps")
    if plan.objective != "grpo" and (plan.supervised_tokens < 100 or plan.supervised_tokens < 0.02 * plan.tokens):
        out.append(f"only {plan.supervised_tokens} supervised tokens ({100 * plan.supervised_tokens / max(plan.tokens, 1):.1f}% "
                   "of all): almost nothing is in the loss; check the template and `tunesmith data check`")
    if plan.warmup_steps > plan.total_steps / 2:
        out.append(f"warmup ({plan.warmup_steps} steps) takes more than half of the {plan.total_steps} steps")
    return out + shared_prefix_warning(plan)


def shared_prefix_warning(plan: RunPlan) -> list[str]:
    """DPO or SimPO without its SFT term on pairs that mostly share a long answer prefix."""
    if (plan.objective not in DEFAULT_SFT_WEIGHT or plan.sft_weight != 0
            or not mostly_long_prefix(plan.long_prefix_pairs, plan.examples)):
        return []
    share = plan.long_prefix_pairs / plan.examples
    return [f"{share:.0%} of the pairs ({plan.long_prefix_pairs}) have answers sharing a long prefix and the SFT "
            "term is off: on the shared tokens the chosen and rejected gradients cancel, so only the first "
            "differing token carries the preference; its likelihood moves, the greedy answers may not follow "
            "(see train/objectives.py). Keep "
            "--method.sft_weight 1 (the default) or use --objective orpo"]


def estimate_seconds(tokens: float, facts: ModelFacts, method: str, device: str) -> float:
    """FLOPs at a rough device rate: 6N per token for full training, 4N when the base is frozen."""
    per_token = (4 if is_adapter(method) or method == "freeze" else 6) * facts.params
    return tokens * per_token / PRIOR_FLOPS[device]


# Sampling runs one token of every row per forward pass, far from the matmul peak training reaches.
GENERATION_EFFICIENCY = {"cpu": 0.25, "cuda": 0.05}


def grpo_estimate(config: Config, stats: DataStats, facts: ModelFacts, device: str, total: int) -> float:
    """Seconds: the sampled tokens (2N FLOPs each, at GENERATION_EFFICIENCY of the prior rate; half the length on
    average) plus the backward pass over prompts and completions (as training)."""
    m = config.method
    completions = config.train.batch_size * config.train.grad_accum * m.num_generations
    sampled = completions * m.max_completion_length / 2
    generation = sampled * 2 * facts.params / (PRIOR_FLOPS[device] * GENERATION_EFFICIENCY[device])
    trained = completions * (stats.mean_tokens + m.max_completion_length / 2)
    return total * (generation + estimate_seconds(trained, facts, config.method.name, device))


def make_plan(config: Config, stats: DataStats, facts: ModelFacts, processes: int, steps_per_epoch: int,
              rows_per_epoch: int, choices: list[Choice], device: str,
              template: TemplateChoice | None = None) -> RunPlan:
    """The plan of an already resolved config (see ``resolve_config``); ``template``: the one applied."""
    t = config.train
    total = total_steps(config, steps_per_epoch)
    trained_tokens = stats.tokens * total / max(steps_per_epoch, 1)
    evals = 2 * stats.val_tokens / 3  # the held-out loss at the start and the end: forward only
    plan = RunPlan(
        examples=stats.examples, tokens=stats.tokens, supervised_tokens=stats.supervised_tokens,
        val_examples=stats.val_examples, method=config.method.name, processes=processes,
        packing=config.data.packing, row_length=config.data.pack_length if config.data.packing else stats.longest,
        rows_per_epoch=rows_per_epoch, micro_batch=t.batch_size, grad_accum=t.grad_accum,
        steps_per_epoch=steps_per_epoch, epochs=t.epochs if t.max_steps == 0 else total / max(steps_per_epoch, 1),
        total_steps=total, warmup_steps=t.warmup_steps, lr=t.lr, scheduler=t.scheduler,
        tokens_per_step=stats.tokens / max(steps_per_epoch, 1),
        estimate_s=estimate_seconds((trained_tokens + evals) / processes, facts, config.method.name, device),
        estimate_basis=f"rough, from {facts.params / 1e6:.0f}M parameters on {device}; refined after the first steps",
        choices=choices, objective=config.method.objective, long_prefix_pairs=stats.long_prefix_pairs,
        sft_weight=config.method.sft_weight,
        template=template.name if template else None, template_reason=template.reason if template else None)
    if config.method.objective == "grpo":
        m = config.method
        plan.prompts_per_step = t.batch_size * t.grad_accum * processes
        plan.num_generations, plan.max_completion_length = m.num_generations, m.max_completion_length
        plan.row_length = stats.longest
        plan.estimate_s = grpo_estimate(config, stats, facts, device, total)
        plan.estimate_basis = (f"rough: sampling and the backward pass, from {facts.params / 1e6:.0f}M parameters on "
                               f"{device}; refined after the first steps")
    plan.warnings = plan_warnings(plan)
    return plan
