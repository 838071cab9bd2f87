"""GRPO training throughput: tunesmith against TRL's GRPOTrainer on the same prompts, rewards and settings.

Both systems train SmolLM2-135M-Instruct from the same prompts (examples/grpo/prompts.jsonl, "What is the
capital of X? Answer in as few words as possible.", 44 rows) with the same reward
(examples/grpo/rewards.py:short_answer) and the same settings: LoRA r=16 alpha=32 dropout 0 on all linear
layers (peft's all-linear, the output head excluded); ``--steps`` optimizer steps (default 6) of
``--prompts-per-step`` prompts (default 2) x ``--generations`` completions each (G, default 8) of at most
``--max-completion`` tokens (default 64), the stop token included; temperature 0.7, top-p 1 (no top-k);
lr 1e-4, constant, no warmup; AdamW, weight decay 0, gradient clipping at 1.0; the clipped policy loss with
epsilon 0.2, loss_type dapo, advantages scaled by each group's std, one iteration per batch, beta 0 (no
reference model, both systems' default); seed 42; bf16 autocast where the CPU has native bf16, else fp32,
for both. Prompts are conversations rendered by the model's chat template with its generation prompt in
both systems. Systems:

- tunesmith: ``tunesmith train --objective grpo --reward examples/grpo/rewards.py:short_answer`` with the
  settings above (``--batch-size`` = prompts per step, one micro-batch per step). Its sampling is its own
  batched KV-cache loop (finished rows leave the batch); the backward pass packs prompt + completion rows
  with block-diagonal attention.
- trl: GRPOTrainer with ``peft_config``, ``per_device_train_batch_size`` = prompts per step x G (its batch
  counts completions), gradient_accumulation_steps 1, so every optimizer step generates once with
  ``model.generate`` (left-padded batch of all the step's completions) and backpropagates one padded batch.
  ``gradient_checkpointing=False`` like tunesmith (TRL's default is True). The prompts are given as
  conversations (``[{"role": "user", ...}]``) so that TRL applies the chat template; the reward function
  gets the completions' text (TRL hands conversational completions as message lists).

Each run is its own subprocess, the systems interleaved in a rotating order per round. Only the training is
timed (model load, tokenization and saving excluded): tunesmith's metrics.jsonl ``elapsed_s`` of its last step,
TRL's from on_train_begin to on_train_end (a TrainerCallback). Where the time goes: "sampling" is the token
generation alone (tunesmith's ``sampling_s`` per step; for TRL the time in ``_generate_single_turn``, timed by a
subclass that only adds timers); "rollout" adds the decoding, the rewards and the advantages (tunesmith's
``generation_s``; TRL's ``_generate_and_score_completions``); "backward" is the loss's forward and backward
(tunesmith's ``backward_s``; for TRL each ``training_step`` less its rollout). The optimizer step and logging
are the rest. Peak RSS is the child's (wait4). Completions/s = steps x prompts per step x G / training seconds,
the same count for both. Mean reward: the mean over the run's steps of the mean reward of that step's sampled
completions (tunesmith's metrics.jsonl ``reward``, TRL's logged ``reward``), and the mean completion length
likewise (it decides how long the sampling takes). With 6 steps the reward says only that both sample
comparable completions, not which learns better. Every child uses ``--threads`` torch threads (default 1: on a
busy 2-core machine, 2 threads per process made a forward pass 2x to 20x slower and the comparison meaningless).

Run: ``python bench/grpo_throughput.py [--rounds 2] [--steps 6] [--json OUT]``. Compare the rows of one
invocation only; a busy machine moves the numbers from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.run import METRICS, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_throughput import _bf16, run_child  # noqa: E402  (the same bf16 decision and child runner)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "grpo"
PROMPTS = EXAMPLE / "prompts.jsonl"
REWARD_FILE, REWARD_FN = EXAMPLE / "rewards.py", "short_answer"
MODEL = "smollm2-135m-instruct"
SYSTEMS = ("tunesmith", "trl")
LR, R, ALPHA, SEED, TEMPERATURE, EPSILON = 1e-4, 16, 32, 42, 0.7, 0.2


# ---------------------------------------------------------------- the children


def tunesmith_command(out: Path, shape: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "tunesmith.cli", "train", "--objective", "grpo", "--data", str(PROMPTS),
            "--reward", f"{REWARD_FILE}:{REWARD_FN}", "--output-dir", str(out), "--model", MODEL,
            "--method.num_generations", str(shape.generations),
            "--method.max_completion_length", str(shape.max_completion),
            "--method.temperature", str(TEMPERATURE), "--method.top_p", "1.0", "--method.epsilon", str(EPSILON),
            "--method.loss_type", "dapo", "--method.scale_rewards", "group", "--method.num_iterations", "1",
            "--method.beta", "0", "--method.target_modules", "all-linear", "--method.r", str(R),
            "--method.alpha", str(ALPHA), "--method.dropout", "0", "--lr", str(LR), "--train.scheduler", "constant",
            "--train.warmup_steps", "0", "--train.max_grad_norm", "1.0", "--max-steps", str(shape.steps),
            "--batch-size", str(shape.prompts_per_step), "--grad-accum", "1", "--train.precision", "auto",
            "--train.log_every", "1", "--seed", str(SEED)]


def text_reward(reward):
    """``reward`` on the completions' text: TRL hands conversational completions as message lists."""
    def short_answer(prompts, completions, **fields):
        return reward(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions], **fields)
    return short_answer


def load_reward():
    """The example's reward function, loaded from its file as tunesmith's --reward FILE.py:FUNCTION does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_example_rewards", REWARD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, REWARD_FN)


def train_trl(out: Path, shape: argparse.Namespace) -> None:
    """The TRL child: GRPOTrainer as its docs show it, timed from on_train_begin to on_train_end."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from tunesmith.models.resolve import resolve

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.elapsed = time.perf_counter() - self.start

    class TimedGRPOTrainer(trl.GRPOTrainer):
        """GRPOTrainer with timers around its sampling, its rollout and its training step; nothing else changed."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.timings = {"sampling_s": 0.0, "rollout_s": 0.0, "step_s": 0.0}

        def _timed(self, key, method, *args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            self.timings[key] += time.perf_counter() - start
            return result

        def _generate_single_turn(self, *args, **kwargs):
            return self._timed("sampling_s", super()._generate_single_turn, *args, **kwargs)

        def _generate_and_score_completions(self, *args, **kwargs):
            return self._timed("rollout_s", super()._generate_and_score_completions, *args, **kwargs)

        def training_step(self, *args, **kwargs):
            return self._timed("step_s", super().training_step, *args, **kwargs)

    path = resolve(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = Dataset.from_list([{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in rows])
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    args = trl.GRPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=shape.prompts_per_step * shape.generations,
        gradient_accumulation_steps=1, num_generations=shape.generations, max_completion_length=shape.max_completion,
        max_steps=shape.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=0.0, epsilon=EPSILON, loss_type="dapo",
        scale_rewards="group", num_iterations=1, logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, bf16=_bf16(), use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=SEED,
        gradient_checkpointing=False, log_completions=False)  # TRL's default is True; tunesmith's is False
    timer = Timer()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=text_reward(load_reward()), args=args, processing_class=tokenizer,
                               train_dataset=dataset, peft_config=lora, callbacks=[timer])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    timings = trainer.timings
    result = {"elapsed_s": timer.elapsed, "steps": trainer.state.global_step,
              "rewards": [entry["reward"] for entry in logged],
              "lengths": [entry["completions/mean_length"] for entry in logged],
              "sampling_s": timings["sampling_s"], "rollout_s": timings["rollout_s"],
              "backward_s": timings["step_s"] - timings["rollout_s"]}
    (out / "bench_result.json").write_text(json.dumps(result), encoding="utf-8")


def tunesmith_result(out: Path) -> dict:
    """Training seconds, steps, per-step rewards and lengths, and the summed phase timings from metrics.jsonl."""
    steps = [r for r in read_metrics(out / METRICS) if "reward" in r]
    return {"elapsed_s": steps[-1]["elapsed_s"], "steps": steps[-1]["step"],
            "rewards": [r["reward"] for r in steps], "lengths": [r["completion_length"] for r in steps],
            "sampling_s": sum(r["sampling_s"] for r in steps), "rollout_s": sum(r["generation_s"] for r in steps),
            "backward_s": sum(r["backward_s"] for r in steps)}


def run_system(system: str, out: Path, shape: argparse.Namespace, env: dict) -> dict:
    """Train ``system`` once in a subprocess: its result (see tunesmith_result) and its peak RSS."""
    if system == "trl":
        command = [sys.executable, __file__, "--system", "trl", "--out", str(out), *shape_flags(shape)]
    else:
        command = tunesmith_command(out, shape)
    out.mkdir(parents=True)
    rss = run_child(command, out.parent / f"{out.name}.log", env)
    result = (json.loads((out / "bench_result.json").read_text(encoding="utf-8")) if system == "trl"
              else tunesmith_result(out))
    if result["steps"] != shape.steps or len(result["rewards"]) != shape.steps:
        raise SystemExit(f"{system}: {result['steps']} steps and {len(result['rewards'])} logged rewards, "
                         f"expected {shape.steps}; see {out.parent / f'{out.name}.log'}")
    return {**result, "rss_mb": rss}


def shape_flags(shape: argparse.Namespace) -> list[str]:
    return ["--steps", str(shape.steps), "--prompts-per-step", str(shape.prompts_per_step),
            "--generations", str(shape.generations), "--max-completion", str(shape.max_completion)]


# ---------------------------------------------------------------- the table


def versions() -> str:
    import importlib.metadata as md

    names = ("tunesmith", "torch", "transformers", "peft", "trl", "accelerate")
    return ", ".join(f"{n} {md.version(n)}" for n in names)


def summarize(runs: dict[str, list[dict]], completions_per_step: int) -> dict:
    """Per system the medians over rounds (rates, RSS, phase shares), the means of reward and length; ratios
    tunesmith / system."""
    rows = {}
    for system, results in runs.items():
        rows[system] = {
            "completions_per_s": statistics.median(r["steps"] * completions_per_step / r["elapsed_s"] for r in results),
            "steps_per_min": statistics.median(60 * r["steps"] / r["elapsed_s"] for r in results),
            "train_s": [round(r["elapsed_s"], 1) for r in results], "steps": results[0]["steps"],
            "peak_rss_mb": statistics.median(r["rss_mb"] for r in results),
            "mean_reward": statistics.mean(v for r in results for v in r["rewards"]),
            "mean_length": statistics.mean(v for r in results for v in r["lengths"]),
            **{f"{phase}_share": statistics.median(r[f"{phase}_s"] / r["elapsed_s"] for r in results)
               for phase in ("sampling", "rollout", "backward")},
            **{f"{phase}_s_per_step": statistics.median(r[f"{phase}_s"] / r["steps"] for r in results)
               for phase in ("sampling", "backward")},
        }
    ours = rows["tunesmith"]
    ratios = {system: {"completions_per_s": ours["completions_per_s"] / row["completions_per_s"],
                       "steps_per_min": ours["steps_per_min"] / row["steps_per_min"],
                       "peak_rss_mb": ours["peak_rss_mb"] / row["peak_rss_mb"]} for system, row in rows.items()}
    return {"rows": rows, "ratios": ratios}


def table_lines(summary: dict) -> list[str]:
    lines = ["| system | steps | completions/s | steps/min | peak RSS MB | mean reward | mean length | "
             "sampling s/step | backward s/step | sampling / rollout / backward share | "
             "tunesmith / this (steps/min) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for system, row in summary["rows"].items():
        shares = " / ".join(f"{row[f'{p}_share']:.0%}" for p in ("sampling", "rollout", "backward"))
        lines.append(f"| {system} | {row['steps']} | {row['completions_per_s']:.2f} | {row['steps_per_min']:.2f} | "
                     f"{row['peak_rss_mb']:,.0f} | {row['mean_reward']:.3f} | {row['mean_length']:.1f} | "
                     f"{row['sampling_s_per_step']:.1f} | {row['backward_s_per_step']:.1f} | {shares} | "
                     f"{summary['ratios'][system]['steps_per_min']:.2f}x |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each trains every system once")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-completion", type=int, default=64, help="most tokens per completion")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every child; 1 keeps a shared machine's numbers stable (2 threads on "
                             "2 busy cores made one forward pass 2x to 20x slower here)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--system", choices=["trl"], help=argparse.SUPPRESS)  # the TRL child
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.system:
        train_trl(Path(args.out), args)
        return
    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="grpo-throughput-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for round_ in range(args.rounds):
        order = SYSTEMS[round_ % len(SYSTEMS):] + SYSTEMS[:round_ % len(SYSTEMS)]
        for system in order:
            result = run_system(system, work / f"r{round_}-{system}", args, env)
            runs[system].append(result)
            print(f"round {round_ + 1}: {system}: {result['elapsed_s']:.1f} s, {result['steps']} steps, "
                  f"sampling {result['sampling_s']:.1f} s, backward {result['backward_s']:.1f} s, "
                  f"peak RSS {result['rss_mb']:,.0f} MB", file=sys.stderr, flush=True)
    summary = summarize(runs, args.prompts_per_step * args.generations)
    precision = "bf16 autocast" if _bf16() else "fp32"
    print(f"\n{args.steps} steps x {args.prompts_per_step} prompts x G={args.generations} completions of at most "
          f"{args.max_completion} tokens, {PROMPTS.relative_to(ROOT)}, {MODEL}, {precision}, {args.rounds} round(s) "
          f"(median), {args.threads} thread(s) per system, {os.cpu_count()} CPUs, "
          f"{time.perf_counter() - started:.0f} s in all")
    print(versions() + "\n")
    print("\n".join(table_lines(summary)))
    if args.json:
        report = {**summary, "runs": runs, "rounds": args.rounds, "steps": args.steps,
                  "prompts_per_step": args.prompts_per_step, "generations": args.generations,
                  "max_completion": args.max_completion, "precision": precision, "threads": args.threads,
                  "versions": versions(), "model": MODEL}
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
