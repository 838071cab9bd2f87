"""The run directory: the files a run holds besides the weights, and reading and writing them.

metrics.jsonl, loss.png, tunesmith.json (the run info: base model, method, template, system
prompt), config.yaml and README.md. Together with the adapter (or full weights) and the tokenizer
saved with its chat template, these make the folder self-describing: eval, chat, serve and export
need only its path, and read it through this module (checkpoints/step-N belong to train.checkpoint).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tunesmith import __version__
from tunesmith.config import ADAPTER_METHODS
from tunesmith.errors import UsageError
from tunesmith.output import fmt_number

# The run's own files at the top of its directory (checkpoint.py owns checkpoints/step-N).
RUN_INFO = "tunesmith.json"  # what chat, eval, serve and export read to use the run as trained
CONFIG = "config.yaml"  # the resolved config (each checkpoint keeps a copy under the same name)
METRICS = "metrics.jsonl"
STEP_FILE = "step.json"  # the step a training has reached, rewritten after each one (metrics come every log_every)
LOSS_PLOT = "loss.png"
MODEL_CARD = "README.md"
TENSORBOARD = "tensorboard"  # the TensorBoard tracker's folder
CHECKPOINTS = "checkpoints"  # output_dir/checkpoints/step-N, written by train.checkpoint
COMPLETE = "COMPLETE"  # the marker of a checkpoint written in full
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every step-N folder, oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path, (path / COMPLETE).is_file()))
    return sorted(found)


def unfinished_run(path: Path) -> str | None:
    """What a folder training left without a model is (a stopped run, or one of its checkpoints) and the
    command that continues it; None for any other folder."""
    path = Path(path)
    if STEP_DIR.match(path.name) and path.parent.name == CHECKPOINTS:
        run = path.parent.parent
        return (f"{path} is a training checkpoint, not a model: it holds the state to continue {run} from, "
                f"with `tunesmith train {path / CONFIG} --resume auto`; use {run} once its training finishes")
    complete = [(step, folder) for step, folder, done in list_checkpoints(path) if done]
    if complete:
        step, folder = complete[-1]
        return (f"{path} is a run that stopped at step {step} before saving its model (the last complete "
                f"checkpoint is {folder}); resume it with `tunesmith train {folder / CONFIG} --resume auto`")
    if (path / METRICS).is_file():
        return (f"{path} is a run that ended before its first checkpoint, so it holds no model and nothing to "
                "resume; train it again (`tunesmith runs` shows how it ended)")
    return None


def is_adapter(method: str) -> bool:
    """Whether a run of ``method`` saves a peft adapter (else full weights)."""
    return method in ADAPTER_METHODS


def read_run_info(path: Path) -> dict:
    """A run's tunesmith.json; {} for a directory that is not a tunesmith run."""
    info = Path(path) / RUN_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def write_step(run_dir: Path, step: int, total: int) -> None:
    """Record the step reached (whole or not at all: written beside, then renamed), for `tunesmith runs` and the UI."""
    tmp = Path(run_dir) / f".{STEP_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, "total_steps": total}), encoding="utf-8")
    tmp.replace(Path(run_dir) / STEP_FILE)


def read_step(run_dir: Path) -> int | None:
    """The step ``write_step`` recorded last, if any."""
    try:
        return int(json.loads((Path(run_dir) / STEP_FILE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or one from a version that wrote none


def run_system_prompt(run_info: dict | None) -> str | None:
    """The system prompt a run was trained with (None: whatever the template inserts)."""
    return (run_info or {}).get("system_prompt")


def base_model(path: Path) -> str | None:
    """The base model a run or a peft adapter directory was trained from (tunesmith.json's base_model, else
    the adapter config's); None for a plain model."""
    path = Path(path)
    base = read_run_info(path).get("base_model")
    if not base and (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    return base or None


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines logged after the checkpoint's step.

    With ``config.output.report_to`` (or the older ``output.tensorboard``) each row also goes to
    those experiment trackers, through accelerate's tracker classes: the resolved config as
    hyperparameters when the log opens, every numeric field of every row at its step, and the
    final train and eval losses when it closes.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, config=None):
        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in read_metrics(self.path) if line["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.last_step = resume_step or 0
        self.trackers = start_trackers(Path(run_dir), config) if config is not None else []

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.last_step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and _is_number(v)}
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    def close(self, final_train_loss: float | None = None, final_eval_loss: float | None = None) -> None:
        final = {"final_train_loss": final_train_loss, "final_eval_loss": final_eval_loss}
        final = {k: v for k, v in final.items() if _is_number(v) and math.isfinite(v)}
        for tracker in self.trackers:
            if final:
                tracker.log(final, step=self.last_step)
            tracker.finish()
        self.trackers = []


# --------------------------------------------------------------- experiment trackers

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


def tracker_names(output) -> list[str]:
    """The trackers ``output.report_to`` names (``none`` or empty: none), ``output.tensorboard`` included."""
    names = [n.strip().lower() for n in output.report_to if n.strip().lower() not in ("", "none")]
    if output.tensorboard:
        names.append("tensorboard")
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"output.report_to: unknown tracker {name!r}; use a comma separated list of "
                             f"{', '.join(TRACKERS)}, or none")
    return list(dict.fromkeys(names))


def check_trackers(output) -> list[str]:
    """Fail before training when a tracker is asked for but its library is not installed."""
    import importlib.util

    missing = [n for n in tracker_names(output) if importlib.util.find_spec(n) is None]
    if missing:
        raise UsageError(f"output.report_to asks for {', '.join(missing)}, not installed: "
                         f"pip install {' '.join(missing)} (or the tunesmith extra of the same name)")
    return tracker_names(output)


def start_trackers(run_dir: Path, config) -> list:
    """accelerate's tracker objects for ``config.output``, started, with the config stored in each.

    Where each one writes is the tracker's own business, set by its usual environment variables
    (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, WANDB_MODE, WANDB_PROJECT, TRACKIO_DIR, ...);
    TensorBoard and W&B keep their local files inside the run directory.
    """
    import os

    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    run = Path(run_dir).resolve()
    trackers = []
    for name in check_trackers(config.output):
        if name == "tensorboard":
            tracker = TensorBoardTracker(TENSORBOARD, run)
        elif name == "mlflow":
            tracker = MLflowTracker(experiment_name="tunesmith", run_name=run.name)
        elif name == "wandb":
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "tunesmith"), name=run.name, dir=str(run))
        else:
            tracker = TrackioTracker(os.environ.get("TRACKIO_PROJECT", "tunesmith"), name=run.name)
        try:
            tracker.start()
            tracker.store_init_configuration(flat_config(config))
        except Exception as exc:  # a tracker's own setup problem (store URI, login, ...): say which, briefly
            for started in trackers:
                started.finish()
            raise UsageError(f"output.report_to: {name} could not start: {type(exc).__name__}: {exc}".strip()
                             ) from exc
        trackers.append(tracker)
    return trackers


def flat_config(config) -> dict:
    """``{"section.key": value}`` with only the scalar types every tracker takes (lists joined, None as "none")."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, list):
                value = ",".join(map(str, value))
            flat[f"{section}.{key}"] = "none" if value is None else value
    return flat


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: the train loss per logged step and the eval loss where computed; for a preference objective, a
    second panel with the reward margin and the preference accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / METRICS)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    # the held-out loss before training (step 0) starts the eval curve
    evals = [(r["step"], r.get("eval_loss", r.get("initial_eval_loss"))) for r in rows
             if r.get("eval_loss", r.get("initial_eval_loss")) is not None]
    if not train and not evals:
        return None
    preference = any("reward_margin" in r for r in rows)
    rewards = any("reward_std" in r for r in rows)  # GRPO
    panels = 2 if preference or rewards else 1
    fig, axes = plt.subplots(1, panels, figsize=(12 if panels == 2 else 7, 4), squeeze=False)
    ax = axes[0][0]
    if preference:
        _plot_preference(axes[0][1], rows)
    if rewards:
        _plot_rewards(axes[0][1], rows)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per pair)" if preference else "loss (GRPO policy loss)" if rewards else
                  "loss (mean NLL per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / LOSS_PLOT
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_rewards(ax, rows: list[dict]) -> None:
    """GRPO: the mean reward of each step's completions, and of each reward function when there are several."""
    keys = ["reward"] + sorted({k for r in rows for k in r if k.startswith("reward/") and not k.endswith("/std")})
    for key in keys if len(keys) > 2 else keys[:1]:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the sampled completions")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_preference(ax, rows: list[dict]) -> None:
    for key, style, label in (("reward_margin", "-", "reward margin (chosen - rejected)"),
                              ("eval_reward_margin", "o-", "held-out reward margin")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward margin")
    ax.grid(alpha=0.3)
    accuracy = ax.twinx()
    points = [(r["step"], r["preference_accuracy"]) for r in rows if r.get("preference_accuracy") is not None]
    accuracy.plot([s for s, _ in points], [v for _, v in points], "--", color="tab:green", label="preference accuracy")
    accuracy.set_ylim(0, 1.05)
    accuracy.set_ylabel("preference accuracy")
    handles = ax.get_legend_handles_labels()[0] + accuracy.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right")


def write_run_info(run_dir: Path, config, *, base_model_path: Path, steps: int, data_fingerprint: str,
                   final_train_loss: float | None, final_eval_loss: float | None) -> dict:
    """tunesmith.json: what chat, eval, serve and export read to use the run like training did."""
    info = {
        "base_model": config.model.name,
        "base_model_path": str(base_model_path),
        "method": config.method.name,
        "objective": config.method.objective,
        "template": config.data.template,  # the built-in or .jinja file applied (the resolved config names a
        # family fallback); null: the tokenizer's own
        "system_prompt": config.data.system_prompt,
        "max_length": config.data.max_length,  # eval's perplexity cuts examples as training did
        "steps": steps,
        "data_fingerprint": data_fingerprint,
        "final_train_loss": _finite_or_none(final_train_loss),
        "final_eval_loss": _finite_or_none(final_eval_loss),
        "tunesmith_version": __version__,
    }
    (Path(run_dir) / RUN_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    (Path(run_dir) / CONFIG).write_text(config.to_yaml(), encoding="utf-8")
    return info


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def write_model_card(run_dir: Path, config, info: dict, *, trainable: int, total: int, n_train: int,
                     n_eval: int) -> None:
    """README.md: a short model card with the facts of the run and how to use it."""
    run = Path(run_dir)
    eval_loss = info["final_eval_loss"]
    lines = [
        f"# {run.name}",
        "",
        f"Fine-tuned from `{config.model.name}` with tunesmith {__version__} ({config.method.name}).",
        "",
        "| | |", "| --- | --- |",
        f"| base model | `{config.model.name}` |",
        f"| method | {_method_summary(config)} |",
        f"| trainable parameters | {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%) |",
        f"| training data | {', '.join(f'`{p}`' for p in config.data.path)} ({n_train} examples) |",
        f"| validation | {n_eval} examples |",
        f"| template | {config.data.template or 'the tokenizer’s own'} |",
        f"| system prompt | {config.data.system_prompt or 'the template default'} |",
        f"| steps | {info['steps']} (lr {config.train.lr}, batch {config.train.batch_size} x "
        f"{config.train.grad_accum} accumulation, max length {config.data.max_length}) |",
        f"| final train loss | {fmt_number(info['final_train_loss'], missing='n/a')} |",
        f"| final eval loss | {fmt_number(eval_loss, missing='n/a')} |",
        f"| data fingerprint | `{info['data_fingerprint'][:16]}` |",
        "",
        "![loss](loss.png)",
        "",
        "## Use",
        "",
        "```bash",
        f"tunesmith generate {run} --prompt \"Hello\"",
        f"tunesmith chat {run}",
        f"tunesmith eval {run} --data held_out.jsonl --compare base",
        f"tunesmith export {run} --merge --out merged/",
        "```",
        "",
        _python_usage(config, run),
    ]
    (run / MODEL_CARD).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _method_summary(config) -> str:
    m = config.method
    if is_adapter(m.name):
        return f"{m.name} r={m.r} alpha={m.alpha} dropout={m.dropout} on {','.join(m.target_modules)}"
    if m.name == "freeze":
        return f"freeze: last {m.trainable_layers} layers trained"
    return m.name


def _python_usage(config, run: Path) -> str:
    if is_adapter(config.method.name):
        body = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{run}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{run}\")")
    else:
        body = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{run}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{run}\")")
    return f"With plain transformers/peft:\n\n```python\n{body}\n```"


