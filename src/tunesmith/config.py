"""The typed training configuration: the one source of every option, its default and its help.

A ``Config`` has six sections (model, data, method, train, eval, output), each a dataclass whose
fields carry their help text. Values come from three layers, later ones winning:
the defaults here, a YAML file, then overrides (``section.key=value``; the CLI turns
``--section.key value`` and the short flags in ``FLAG_ALIASES`` into these). Every value is
typed by its field: YAML strings are parsed the same way as CLI strings (PyYAML reads ``2e-4``
as a string, so this matters), bools are true/false, lists are comma separated. An unknown key
is an error that names it and the nearest valid key.

Usage::

    from tunesmith.config import Config, load_config
    config = load_config("examples/seed_lora.yaml", ["train.max_steps=5", "data.path=train.jsonl"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import UsageError

# The embedded default (models.resolve's alias table says where its weights come from).
DEFAULT_MODEL = "smollm2-135m-instruct"


def opt(default: Any, help: str, choices: tuple | None = None, *, minimum: float | None = None,
        fingerprint: bool = True):
    """A config field: its default, its help text (shown by --help) and, optionally, its valid values, its lower
    bound (checked by ``check_config``) and ``fingerprint=False`` for a field that does not change what is learned
    (a resume may differ in it without --resume-force)."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "fingerprint": fingerprint}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# peft adapter methods; the others ("full", "freeze") train the model's own weights.
ADAPTER_METHODS = ("lora", "dora", "rslora", "qlora")


@dataclass
class ModelConfig:
    name: str = opt(DEFAULT_MODEL, "base model: an alias (tunesmith models list), a local model directory or a .gguf file")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, ~30% slower")
    attn_implementation: str | None = opt(None, "attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice")
    allow_pickle: bool = opt(False, "load pickled weights (pytorch_model.bin) when a model has no safetensors; "
                                    "a pickle can run arbitrary code, so only for models you trust", fingerprint=False)


@dataclass
class DataConfig:
    path: list[str] = opt([], "training data files or directories (comma separated); every format `tunesmith data check` reads")
    eval_path: list[str] = opt([], "evaluation data files; when set, val_size is ignored")
    format: str | None = opt(None, "force the input format (alpaca, sharegpt, openai, prompt-completion, text); default: detected")
    columns: str | None = opt(None, "column mapping for alpaca-like files, e.g. instruction=question,output=answer")
    encoding: str | None = opt(None, "text encoding of the data files, e.g. latin-1 or cp1252; default: UTF-8 (with or "
                                     "without a byte-order mark)")
    template: str | None = opt(None, "chat template: chatml (Qwen, SmolLM), llama3, gemma, mistral, alpaca, seed, "
                                     "or a .jinja file; default: the tokenizer's own, else the model family's")
    system_prompt: str | None = opt(None, "system prompt for conversations that have none (saved with the run and used "
                                          "by chat/generate); default: whatever the template inserts")
    max_length: int = opt(1024, "longest training sequence in tokens", minimum=8)
    pack_length: int | None = opt(None, "tokens per packed row; default: max_length, or shorter on small data so that "
                                        "an epoch still has enough optimizer steps (see the run plan)")
    truncation: str = opt("truncate_prompt", "what happens to longer examples: drop them, truncate_prompt (the oldest "
                          "prompt tokens go first; the response keeps its end token), or error",
                          ("truncate_prompt", "drop", "error"))
    packing: bool = opt(True, "pack several examples into each row (block-diagonal attention, no padding); "
                              "false: length-grouped padded batches")
    train_on_prompt: bool = opt(False, "also compute the loss on prompt (system/user) tokens")
    last_turn_only: bool = opt(False, "supervise only the last assistant turn of each conversation")
    val_size: float = opt(0.0, "held-out validation split: a fraction (<1) or a number of examples (>=1); 0 disables",
                          minimum=0)
    max_samples: int = opt(0, "use only the first N training examples, in file order, before the validation split "
                              "(LLaMA-Factory's max_samples): a small run of a large file; 0 uses them all", minimum=0)


@dataclass
class MethodConfig:
    name: str = opt("lora", "fine-tuning method", (*ADAPTER_METHODS, "full", "freeze"))
    r: int = opt(16, "LoRA rank", minimum=1)
    alpha: int = opt(32, "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) for rslora)")
    dropout: float = opt(0.05, "dropout on the LoRA input")
    target_modules: list[str] = opt(["all-linear"], "modules that get adapters: names (q_proj,v_proj) or all-linear")
    trainable_layers: int = opt(2, "freeze: train only the last N transformer layers", minimum=0)
    train_norm: bool = opt(True, "freeze: also train the final norm")
    train_lm_head: bool = opt(False, "freeze: also train the output head (tied to the input embeddings in many "
                                     "small models, which then train too)")
    objective: str = opt("sft", "what is learned: sft (imitate the assistant turns); on preference pairs (a prompt "
                         "with a chosen and a rejected answer), dpo, orpo or simpo; on prompts with reward functions "
                         "(--reward), grpo. The objectives other than sft turn dropout off so the model is compared "
                         "with itself", ("sft", "dpo", "orpo", "simpo", "grpo"))
    beta: float | None = opt(None, "preference strength: DPO's beta (how far from the reference model the policy may "
                                   "move; default 0.1), SimPO's reward scale (default 2.0), ORPO's weight of the "
                                   "odds-ratio term beside the SFT loss (default 0.1); GRPO's KL penalty against the "
                                   "model before training (default 0: no reference is computed)", minimum=0)
    rewards: list[str] = opt([], "grpo (and eval): reward functions, each FILE.py:FUNCTION (a Python function "
                             "fn(prompts, completions, **fields) -> list of floats, TRL's convention) or a built-in: "
                             "exact, contains (against the row's `answer`), regex:PATTERN, max_words:N, "
                             "json_schema:FILE. On the command line, --reward is repeatable; in the web UI, one a line")
    reward_weights: list[float] = opt([], "grpo: one weight per reward function for their weighted sum; default: 1 each")
    num_generations: int | None = opt(None, "grpo: completions sampled per prompt (the group); default: chosen by "
                                            "the plan", minimum=2)
    max_completion_length: int | None = opt(None, "grpo: most tokens sampled per completion; default: chosen by the "
                                                  "plan", minimum=1)
    temperature: float = opt(0.7, "grpo: sampling temperature of the completions, also applied to the log-"
                                  "probabilities of the loss, as TRL does. Below TRL's 1.0 because small models "
                                  "sample off-topic text at 1.0 (SmolLM2-135M: half of its answers to a question "
                                  "it knows at 1.0, a fifth at 0.7)", minimum=0.01)
    top_p: float = opt(1.0, "grpo: nucleus sampling of the completions (1: off)", minimum=0.01)
    epsilon: float = opt(0.2, "grpo: clipping range of the policy ratio, [1 - epsilon, 1 + epsilon]", minimum=0)
    num_iterations: int = opt(1, "grpo: optimizer steps taken on each batch of sampled completions (mu of the "
                                 "paper); above 1 the policy ratio moves away from 1 and clipping acts", minimum=1)
    loss_type: str = opt("dapo", "grpo: how token losses are averaged: grpo (per completion, then over completions), "
                                 "dr_grpo (sum over max_completion_length x completions), dapo (over every token "
                                 "of the step)", ("grpo", "dr_grpo", "dapo"))
    scale_rewards: str = opt("group", "grpo: divide each advantage by the std of its group's rewards, of the whole "
                                      "step's (batch), or not at all (none, Dr. GRPO)", ("group", "batch", "none"))
    gamma: float = opt(0.5, "simpo: the target margin between the chosen and the rejected reward", minimum=0)
    label_smoothing: float = opt(0.0, "dpo/simpo: assumed fraction of pairs whose labels are flipped (conservative "
                                      "DPO); 0 trusts every pair", minimum=0)
    sft_weight: float | None = opt(None, "dpo/simpo: weight of an SFT term beside the preference loss, the chosen "
                                         "answer's NLL per token (RPO, Pang et al. 2024; TRL's rpo_alpha). Without "
                                         "it a pair whose answers share a long prefix is won by likelihood while the "
                                         "greedy answer stays the same (see train/objectives.py); default: 1 for dpo "
                                         "and simpo, 0 turns it off. orpo holds this term already", minimum=0)


@dataclass
class TrainConfig:
    epochs: float | None = opt(None, "passes over the training data (ignored when max_steps > 0); default: chosen "
                                     "from the data size so that a small dataset gets enough optimizer steps")
    max_steps: int = opt(0, "optimizer steps to run; 0: derived from epochs")
    lr: float | None = opt(None, "peak learning rate; default: chosen from the method and the model's width")
    batch_size: int | None = opt(None, "rows per micro-batch per process (with packing, each row holds up to "
                                       "pack_length tokens); default: chosen from the data and max_length", minimum=1)
    grad_accum: int | None = opt(None, "micro-batches per optimizer step; the loss is averaged over every supervised "
                                       "token of the step; default: chosen from the data size", minimum=1)
    scheduler: str = opt("cosine", "learning-rate schedule after warmup", ("cosine", "linear", "constant"))
    warmup_steps: int | None = opt(None, "linear warmup steps (wins over warmup_ratio); default: 5% of the steps, "
                                         "none in runs under 10 steps", minimum=0)
    warmup_ratio: float | None = opt(None, "warmup as a fraction of all steps; default: see warmup_steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this; 0 disables clipping (the norm is still checked)")
    precision: str = opt("auto", "auto: bf16 autocast where the CPU/GPU supports it, else fp32; fp16 is CUDA only",
                         ("auto", "fp32", "bf16", "fp16"))
    neftune_alpha: float = opt(0.0, "NEFTune: noise scale on input embeddings during training (5 is typical); 0 disables")
    seed: int = opt(42, "seed for data order, splits, dropout and adapter init; CPU fp32 runs are bit-for-bit repeatable")
    log_every: int | None = opt(None, "write a metrics.jsonl line every N steps; default: 10, every step for grpo "
                                      "(whose steps are long)", fingerprint=False)
    resume: str | None = opt(None, "auto: continue from the newest complete checkpoint in output_dir; or a checkpoint path",
                             fingerprint=False)
    resume_force: bool = opt(False, "resume even if the config or the data changed since the checkpoint",
                             fingerprint=False)


@dataclass
class EvalConfig:
    eval_every: int = opt(0, "compute the validation loss every N steps (and at the end); 0: only at the end")
    batch_size: int = opt(0, "validation micro-batch size; 0: train.batch_size", fingerprint=False)
    early_stopping_patience: int = opt(0, "stop after N evaluations without improvement; 0 disables")
    load_best: bool = opt(True, "end with the weights of the best validation loss (its checkpoint is always kept)")


@dataclass
class OutputConfig:
    output_dir: str = opt("runs/train", "run directory: final weights, tokenizer, config, metrics, checkpoints",
                          fingerprint=False)
    save_every: int = opt(0, "write a checkpoint every N steps; 0: none except for the best evaluation",
                          fingerprint=False)
    save_total_limit: int = opt(2, "checkpoints to keep (the best and the newest are never deleted); 0 keeps all",
                                fingerprint=False)
    overwrite: bool = opt(False, "allow writing into an output_dir that already holds a run (without --resume)",
                          fingerprint=False)
    report_to: list[str] = opt([], "experiment trackers that also get the config, every metrics row and the final "
                                   "losses (comma separated): tensorboard, mlflow, wandb, trackio; none by default. "
                                   "Each needs its library (`pip install tunesmith[NAME]`)", fingerprint=False)
    sample_every: int = opt(10, "grpo: write a few sampled completions with their rewards to samples.jsonl every N "
                                "steps; 0: never", minimum=0, fingerprint=False)
    tensorboard: bool = opt(False, "older spelling of report_to=tensorboard (TensorBoard under output_dir/tensorboard)",
                            fingerprint=False)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def longest_row(self) -> int:
        """The most tokens one packed row may hold: max_length, twice for preference pairs (both answers of a
        pair share a row, each side at most max_length)."""
        return self.data.max_length * (1 if self.method.objective in ("sft", "grpo") else 2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# Short flags people use most; each sets one dotted key. These spellings are part of the interface.
FLAG_ALIASES = {
    "model": "model.name", "data": "data.path", "eval-data": "data.eval_path", "output-dir": "output.output_dir",
    "method": "method.name", "epochs": "train.epochs", "max-steps": "train.max_steps", "lr": "train.lr",
    "batch-size": "train.batch_size", "grad-accum": "train.grad_accum", "max-length": "data.max_length",
    "seed": "train.seed", "save-every": "output.save_every", "resume": "train.resume",
    "resume-force": "train.resume_force", "objective": "method.objective", "reward": "method.rewards",
    "reward-weights": "method.reward_weights",
}
# Short flags that may be given more than once, each adding one item (a reward's regex may hold a comma).
REPEATABLE_FLAGS = ("reward",)


@dataclass(frozen=True)
class FieldInfo:
    key: str  # "section.name"
    type: Any
    default: Any
    help: str
    choices: tuple | None
    minimum: float | None = None
    fingerprint: bool = True


def fields_info() -> list[FieldInfo]:
    """Every option, in declaration order, for the CLI and for error messages."""
    out = []
    for section in dataclasses.fields(Config):
        section_cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(section_cls)
        defaults = section_cls()
        for f in dataclasses.fields(section_cls):
            out.append(FieldInfo(f"{section.name}.{f.name}", hints[f.name], getattr(defaults, f.name),
                                 f.metadata["help"], f.metadata.get("choices"), f.metadata.get("minimum"),
                                 f.metadata.get("fingerprint", True)))
    return out


def choices(key: str) -> tuple:
    """The valid values of option ``key`` ("data.truncation"), for the CLI and the libraries that take it."""
    return _field_map()[key].choices


def minimum(key: str) -> float:
    """The lower bound of option ``key`` ("data.max_length")."""
    return _field_map()[key].minimum


def fingerprint_keys() -> list[str]:
    """The options a resume must find unchanged (without --resume-force): those that change what is learned."""
    return [info.key for info in fields_info() if info.fingerprint]


def _field_map() -> dict[str, FieldInfo]:
    return {info.key: info for info in fields_info()}


def unknown_key_error(key: str, where: str = "", valid: list[str] | None = None) -> UsageError:
    if valid is not None:  # a section name
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
        return UsageError(f"{where}unknown config section {key!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                                       f"; sections: {', '.join(valid)}"))
    valid = list(_field_map()) + list(FLAG_ALIASES)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.4) or difflib.get_close_matches(
        key.split(".")[-1], [k.split(".")[-1] for k in valid], n=1, cutoff=0.5)
    hint = f"; did you mean {_full_key(near[0])!r}?" if near else ""
    return UsageError(f"{where}unknown config key {key!r}{hint}")


def _full_key(name: str) -> str:
    if name in FLAG_ALIASES:
        return FLAG_ALIASES[name]
    matches = [k for k in _field_map() if k.split(".")[-1] == name]
    return matches[0] if matches else name


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    """(inner type, allows None) for ``X | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def parse_value(info: FieldInfo, raw: Any) -> Any:
    """Coerce a YAML value or a CLI string to the field's type, or raise naming the key."""
    tp, nullable = _optional_inner(info.type)
    try:
        value = _coerce(tp, nullable, raw)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{info.key}: {exc}") from None
    if info.choices and value is not None and value not in info.choices:
        raise UsageError(f"{info.key}: {value!r} is not one of {', '.join(info.choices)}")
    return value


def _coerce(tp: Any, nullable: bool, raw: Any) -> Any:
    if raw is None or (nullable and isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        if nullable:
            return None
        raise ValueError("a value is required (null is not allowed here)")
    if typing.get_origin(tp) is list:
        items = raw if isinstance(raw, list) else [s.strip() for s in str(raw).split(",") if s.strip()]
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        return [_coerce(inner, False, item) if inner is not str else str(item) for item in items]
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "false"):
            return str(raw).lower() == "true"
        raise ValueError(f"expected true or false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(f"expected an integer, got {raw!r}")
        return int(float(raw)) if isinstance(raw, str) and "e" in raw.lower() else int(raw)
    if tp is float:
        if isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        return float(raw)
    return str(raw)


def set_value(config: Config, key: str, raw: Any, where: str = "") -> None:
    key = FLAG_ALIASES.get(key, key)
    info = _field_map().get(key)
    if info is None:
        raise unknown_key_error(key, where)
    section, name = key.split(".")
    setattr(getattr(config, section), name, parse_value(info, raw))


def _yaml_line(node: yaml.Node, section: str, key: str | None = None) -> int:
    """1-based line of ``section`` (or ``section.key``) in a composed YAML document, for error messages."""
    for k, v in node.value if isinstance(node, yaml.MappingNode) else []:
        if k.value == section:
            if key is None:
                return k.start_mark.line + 1
            return _yaml_line(v, key)
    return 0


def apply_yaml(config: Config, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of sections (model, data, method, train, eval, output)")
    for section, values in data.items():
        if section not in _sections():
            raise unknown_key_error(str(section), f"{path}:{_yaml_line(root, section)}: ", _sections())
        if not isinstance(values, dict):
            raise UsageError(f"{path}:{_yaml_line(root, section)}: section {section!r} must be a mapping")
        for key, value in values.items():
            set_value(config, f"{section}.{key}", value, f"{path}:{_yaml_line(root, section, key)}: ")


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def apply_overrides(config: Config, overrides: typing.Iterable[str]) -> None:
    """Apply ``section.key=value`` strings, or (key, value) pairs (a short flag name works as the key too)."""
    for item in overrides:
        if isinstance(item, tuple):  # (key, value): a value that is already a list (a repeated flag)
            set_value(config, item[0], item[1])
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"override {item!r} must look like section.key=value")
        set_value(config, key.strip().lstrip("-"), value)


def check_config(config: Config) -> Config:
    """The checks a type alone cannot express: each field's lower bound (declared with the field) and the
    cross-field ones."""
    t, d = config.train, config.data
    checks = [
        (bool(d.path), "data.path: no training data given (--data FILE)"),
        (t.max_steps >= 0 and (t.epochs is None or t.epochs > 0), "train.epochs must be > 0 (or set train.max_steps)"),
        (t.lr is None or t.lr > 0, "train.lr must be > 0"),
        (d.pack_length is None or minimum("data.max_length") <= d.pack_length <= config.longest_row,
         f"data.pack_length must be in [{minimum('data.max_length')}, {config.longest_row}] (max_length"
         + (")" if config.longest_row == d.max_length else " for each side of a pair)")),
        (t.warmup_ratio is None or 0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (config.method.label_smoothing < 0.5, "method.label_smoothing must be below 0.5 (at 0.5 every pair is a "
                                               "coin flip)"),
        (config.method.objective == "sft" or not d.train_on_prompt,
         f"data.train_on_prompt does not apply to {config.method.objective}: a preference objective compares the "
         "answers only" if config.method.objective != "grpo" else "data.train_on_prompt does not apply to grpo: "
         "only the sampled completions are in the loss"),
        (config.method.objective != "grpo" or bool(config.method.rewards),
         "method.rewards: grpo needs at least one reward function (--reward FILE.py:FUNCTION, or a built-in: exact, "
         "contains, regex:PATTERN, max_words:N, json_schema:FILE)"),
        (config.method.sft_weight in (None, 0) or config.method.objective in ("dpo", "simpo"),
         f"method.sft_weight applies to dpo and simpo, not {config.method.objective}"
         + (": orpo's loss already holds the SFT term" if config.method.objective == "orpo" else "")),
        (not config.method.reward_weights or len(config.method.reward_weights) == len(config.method.rewards),
         f"method.reward_weights: {len(config.method.reward_weights)} weight(s) for {len(config.method.rewards)} "
         "reward function(s); give one weight per --reward"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    for info in fields_info():
        section, name = info.key.split(".")
        value = getattr(getattr(config, section), name)
        if info.minimum is not None and value is not None and value < info.minimum:
            raise UsageError(f"{info.key} must be >= {info.minimum}")
    return config


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``section.key=value`` overrides."""
    config = Config()
    if path is not None:
        apply_yaml(config, path)
    apply_overrides(config, overrides)
    return config


@dataclass
class UIConfig:
    """`tunesmith ui`'s options; each field is its flag (``runs_dir`` is ``--runs-dir``). Not part of ``Config``:
    they configure the page's server, not a training."""

    host: str = opt("127.0.0.1", "address to bind (default: this machine only); any other needs --token or "
                                 "--insecure-no-auth")
    port: int = opt(7860, "port to listen on", minimum=1)
    lang: str = opt("en", "page language (switchable in the page)", ("en", "zh"))
    runs_dir: str = opt("runs", "the UI's workspace: runs are listed and written here, uploads go to its uploads "
                                "folder, and every file the page reads or writes must lie inside it")
    token: str | None = opt(None, "the token every API call must carry (default: $TUNESMITH_UI_TOKEN, else a new "
                                  "one at each launch, printed in the page's address)")
    insecure_no_auth: bool = opt(False, "serve without any token, even off this machine: whoever reaches the port "
                                        "can start trainings and read and write the workspace")
    max_upload_mb: float = opt(512.0, "largest data file the page may upload, in MiB of 2**20 bytes (counted while it arrives)",
                               minimum=0)


def ui_fields() -> list[FieldInfo]:
    """`tunesmith ui`'s options, as ``fields_info`` lists the training ones (keys are the bare field names)."""
    hints = typing.get_type_hints(UIConfig)
    return [FieldInfo(f.name, hints[f.name], f.default, f.metadata["help"], f.metadata.get("choices"),
                      f.metadata.get("minimum")) for f in dataclasses.fields(UIConfig)]
