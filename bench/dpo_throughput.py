"""DPO training throughput: tunesmith against TRL's DPOTrainer on the same pairs and LoRA settings.

Every system trains one pass over the same preference pairs (bench/preference_pairs.py: the chosen
answer opens with "Ahoy!", the rejected one does not) from SmolLM2-135M-Instruct with the same
settings: LoRA r=16 alpha=32 dropout 0 on q,k,v,o; DPO beta 0.1; lr 1e-4, constant, no warmup;
4 pairs per optimizer step; at most 512 tokens per side; bf16 autocast where the CPU has native
bf16, else fp32 for both. Systems:

- tunesmith: `tunesmith train --method.objective dpo` without packing, 4 pairs per micro-batch.
- tunesmith packed: its default packing (both sides of a pair in one row, block-diagonal
  attention), pack_length chosen so that about 4 pairs fill a row; one row per step.
- trl: DPOTrainer (peft_config, the reference is the model with the adapter disabled, computed in
  every step), per_device_train_batch_size=4.

Each run is its own subprocess, the systems interleaved in a rotating order per round. Only the
training is timed (model load and tokenization excluded): tunesmith's metrics.jsonl ``elapsed_s``
(its training loop, which computes each pair's reference log-probabilities the first time the pair
is used), TRL's from on_train_begin to on_train_end. Peak RSS is the child's (wait4). Tokens/s counts
the non-padding tokens of both sides of every pair, rendered by the model's chat template, counted
once here and used for every system. Held-out accuracy: the share of held-out pairs whose chosen
answer gets the higher summed log-probability under the trained adapter; held-out margin: the mean
log p(chosen) - log p(rejected) in nats (negative at the start: the chosen answer is the rejected
one plus a greeting). Both are scored here in fp32 by one function for every system and the base.
Every child and the scorer use ``--threads`` torch threads (default 1: on a busy 2-core machine, 2
threads per process made a forward pass 2x to 20x slower and the comparison meaningless).

Run: ``python bench/dpo_throughput.py [--rounds 3] [--pairs 64] [--json OUT]``. Compare the rows of
one invocation only; a busy machine moves the numbers from run to run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.run import METRICS, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preference_pairs import write_pairs  # noqa: E402

MODEL = "smollm2-135m-instruct"
HELDOUT = 20
PAIRS_PER_STEP = 4
MAX_LENGTH = 512
SYSTEMS = ("tunesmith", "tunesmith packed", "trl")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LR, BETA, R, ALPHA, SEED = 1e-4, 0.1, 16, 32, 42


def _bf16() -> bool:
    """Native bf16 on this CPU: what tunesmith's precision auto decides, and then TRL's bf16=True too."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) or torch.cpu._is_avx512_bf16_supported()


# ---------------------------------------------------------------- the children


def tunesmith_command(data: Path, out: Path, pack_length: int | None) -> list[str]:
    layout = (["--data.packing", "false", "--batch-size", str(PAIRS_PER_STEP)] if pack_length is None
              else ["--data.pack_length", str(pack_length), "--batch-size", "1"])
    return [sys.executable, "-m", "tunesmith.cli", "train", "--data", str(data), "--output-dir", str(out),
            "--model", MODEL, "--method.objective", "dpo", "--method.beta", str(BETA),
            "--method.target_modules", ",".join(TARGETS), "--method.r", str(R), "--method.alpha", str(ALPHA),
            "--method.dropout", "0", "--lr", str(LR), "--train.scheduler", "constant", "--train.warmup_steps", "0",
            "--epochs", "1", "--grad-accum", "1", "--max-length", str(MAX_LENGTH), "--train.precision", "auto",
            "--seed", str(SEED), *layout]


def train_trl(data: Path, out: Path) -> None:
    """The TRL child: DPOTrainer as its docs show it, timed from on_train_begin to on_train_end."""
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

    path = resolve(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    args = trl.DPOConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=PAIRS_PER_STEP,
                         gradient_accumulation_steps=1, max_length=MAX_LENGTH, num_train_epochs=1,
                         logging_steps=10_000, save_strategy="no", report_to=[], dataloader_num_workers=0,
                         beta=BETA, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, bf16=_bf16(),
                         use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=SEED,
                         gradient_checkpointing=False)  # TRL's default is True; tunesmith's is False
    timer = Timer()
    trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows), peft_config=lora, callbacks=[timer])
    trainer.train()
    trainer.save_model(str(out))
    result = {"elapsed_s": timer.elapsed, "steps": trainer.state.global_step}
    (out / "bench_result.json").write_text(json.dumps(result), encoding="utf-8")


def run_child(command: list[str], log: Path, env: dict) -> float:
    """Run ``command`` to its end; its peak RSS in MB (wait4 gives this child's own rusage)."""
    with log.open("w", encoding="utf-8") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({proc.returncode}); end of {log}:\n{tail}")
    return usage.ru_maxrss / 1024  # KB on Linux


def run_system(system: str, data: Path, out: Path, pack_length: int, env: dict) -> dict:
    """Train ``system`` once in a subprocess: training seconds, optimizer steps, peak RSS, adapter folder."""
    if system == "trl":
        command = [sys.executable, __file__, "--system", "trl", "--data", str(data), "--out", str(out)]
    else:
        command = tunesmith_command(data, out, pack_length if system == "tunesmith packed" else None)
    out.mkdir(parents=True)
    rss = run_child(command, out.parent / f"{out.name}.log", env)
    if system == "trl":
        result = json.loads((out / "bench_result.json").read_text(encoding="utf-8"))
    else:
        last = read_metrics(out / METRICS)[-1]
        result = {"elapsed_s": last["elapsed_s"], "steps": last["step"]}
    return {**result, "rss_mb": rss, "adapter": str(out)}


# ---------------------------------------------------------------- tokens and the shared scorer


def side_ids(tokenizer, pair: dict) -> list[tuple[list[int], int]]:
    """(token ids of the whole conversation, where the answer starts) for the chosen and the rejected side."""
    prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for side in ("chosen", "rejected"):
        text = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids[:len(prompt_ids)] != prompt_ids:
            raise SystemExit("the chat template does not render the prompt as a prefix of the conversation")
        out.append((ids, len(prompt_ids)))
    return out


@torch.no_grad()
def preference_scores(model, tokenizer, pairs: list[dict], batch_size: int = 8) -> dict:
    """Share of pairs whose chosen answer has the higher summed log-probability, and the mean of log p(chosen) -
    log p(rejected) in nats (fp32, right-padded batches)."""
    model.eval()
    sides = [side for pair in pairs for side in side_ids(tokenizer, pair)]  # chosen, rejected, chosen, ...
    scores = []
    for s in range(0, len(sides), batch_size):
        chunk = sides[s:s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token_logps = logps.gather(2, ids[:, 1:, None])[..., 0]
        scores += [token_logps[k, start - 1:len(x) - 1].sum().item() for k, (x, start) in enumerate(chunk)]
    margins = [c - r for c, r in zip(scores[0::2], scores[1::2], strict=True)]
    return {"accuracy": sum(m > 0 for m in margins) / len(pairs), "margin": statistics.mean(margins)}


def score(adapter: str | None, pairs: list[dict]) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.resolve import resolve

    path = resolve(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return preference_scores(model, AutoTokenizer.from_pretrained(path), pairs)


# ---------------------------------------------------------------- the table


def versions() -> str:
    import importlib.metadata as md

    names = ("tunesmith", "torch", "transformers", "peft", "trl", "accelerate")
    return ", ".join(f"{n} {md.version(n)}" for n in names)


def summarize(runs: dict[str, list[dict]], n_pairs: int, tokens: int, scores: dict) -> dict:
    rows = {}
    for system, results in runs.items():
        pairs_s = statistics.median(n_pairs / r["elapsed_s"] for r in results)
        rows[system] = {"pairs_per_s": pairs_s, "tokens_per_s": pairs_s * tokens / n_pairs,
                        "train_s": [round(r["elapsed_s"], 1) for r in results], "steps": results[0]["steps"],
                        "peak_rss_mb": statistics.median(r["rss_mb"] for r in results),
                        "heldout_accuracy": statistics.mean(s["accuracy"] for s in scores[system]),
                        "heldout_margin": statistics.mean(s["margin"] for s in scores[system])}
    ours = [s for s in SYSTEMS if s.startswith("tunesmith")]
    ratios = {system: {o: rows[o]["pairs_per_s"] / row["pairs_per_s"] for o in ours} for system, row in rows.items()}
    return {"rows": rows, "ratios": ratios}


def print_table(summary: dict, base: dict) -> None:
    ours = [s for s in SYSTEMS if s.startswith("tunesmith")]
    print("| system | steps | pairs/s | tokens/s | peak RSS MB | held-out accuracy | held-out margin | "
          + " | ".join(f"{o} / this" for o in ours) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in ours) + " |")
    for system, row in summary["rows"].items():
        ratios = " | ".join(f"{summary['ratios'][system][o]:.2f}x" for o in ours)
        print(f"| {system} | {row['steps']} | {row['pairs_per_s']:.2f} | {row['tokens_per_s']:.0f} | "
              f"{row['peak_rss_mb']:,.0f} | {row['heldout_accuracy']:.0%} | {row['heldout_margin']:+.2f} | {ratios} |")
    print(f"| base model (untrained) | | | | | {base['accuracy']:.0%} | {base['margin']:+.2f} |" + " |" * len(ours))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each trains every system once")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs (one pass)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every child and of the scorer; 1 keeps a shared machine's numbers "
                             "stable (2 threads on 2 busy cores made one forward pass 2x to 20x slower here)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--system", choices=["trl"], help=argparse.SUPPRESS)  # the TRL child
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        train_trl(Path(args.data), Path(args.out))
        return
    from transformers import AutoTokenizer

    from tunesmith.models.resolve import resolve

    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="dpo-throughput-"))
    paths = write_pairs(work / "data", args.pairs, HELDOUT)
    train, heldout = ([json.loads(line) for line in paths[k].read_text(encoding="utf-8").splitlines()]
                      for k in ("train", "heldout"))
    tokenizer = AutoTokenizer.from_pretrained(resolve(MODEL))
    tokens = sum(len(ids) for pair in train for ids, _ in side_ids(tokenizer, pair))
    # About PAIRS_PER_STEP pairs per packed row; 5% room for the bin packing's leftovers.
    pack_length = min(8 * math.ceil(PAIRS_PER_STEP * tokens / len(train) * 1.05 / 8), 2 * MAX_LENGTH)
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for round_ in range(args.rounds):
        order = SYSTEMS[round_ % len(SYSTEMS):] + SYSTEMS[:round_ % len(SYSTEMS)]
        for system in order:
            result = run_system(system, paths["train"], work / f"r{round_}-{system.replace(' ', '-')}",
                                pack_length, env)
            runs[system].append(result)
            print(f"round {round_ + 1}: {system}: {result['elapsed_s']:.1f} s, {result['steps']} steps, "
                  f"peak RSS {result['rss_mb']:,.0f} MB", file=sys.stderr, flush=True)
    scores = {s: [score(r["adapter"], heldout) for r in results] for s, results in runs.items()}
    base = score(None, heldout)
    summary = summarize(runs, len(train), tokens, scores)
    precision = "bf16 autocast" if _bf16() else "fp32"
    print(f"\n{len(train)} pairs ({tokens:,} tokens, both sides), {HELDOUT} held-out pairs, {MODEL}, {precision}, "
          f"{args.rounds} round(s) (median), packed rows of {pack_length} tokens, {os.cpu_count()} CPUs, "
          f"{time.perf_counter() - started:.0f} s in all")
    print(versions() + "\n")
    print_table(summary, base)
    if args.json:
        report = {**summary, "pairs": len(train), "tokens": tokens, "heldout": HELDOUT, "rounds": args.rounds,
                  "pack_length": pack_length, "precision": precision, "base_heldout": base,
                  "versions": versions(), "model": MODEL}
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
