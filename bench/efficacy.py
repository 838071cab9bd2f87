"""Does a fine-tune teach? tunesmith's defaults against a plain transformers + peft loop, same data.

The data is bench/facts.py: 50 invented people, each profession in 3 training phrasings (150
examples), asked in a 4th phrasing for evaluation. Both systems start from the same base model;
accuracy is the share of held-out questions whose greedy answer names the right profession
(and no other), scored by the same function for both.

- tunesmith: `tunesmith train --data train.jsonl --output-dir RUN` with no training option (output
  options only: a checkpoint at the end of each epoch, kept), then `tunesmith eval` of each epoch's
  checkpoint on heldout.jsonl. Its CPU seconds are the train subprocess's (model load and
  tokenization included), less the training time after that epoch.
- plain loop: what a user writes from the peft docs (below, ~60 lines): LoRA r=16 alpha=32 on all
  linear layers, AdamW lr 1e-3, padded batches of 4 examples, assistant-only loss, bf16 autocast
  where the CPU has it, 4 epochs, torch seeded (``--seed``). It is scored after every epoch; its CPU seconds to reach the
  accuracy count model load and training up to that epoch, not the scoring.

CPU seconds (user + system, all threads) rather than wall time: they do not depend on what else the
machine is doing. Run: ``python bench/efficacy.py [--model smollm2-135m-instruct] [--epochs 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from facts import correct, write_facts  # noqa: E402

TARGET = 0.9


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as the plain loop
    subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], check=True, stdout=subprocess.DEVNULL, env=env)


def accuracy(predictions: list[str], rows: list[dict]) -> float:
    jobs = [row["messages"][-1]["content"].rstrip(".").split()[-1] for row in rows]
    return sum(correct(p, job) for p, job in zip(predictions, jobs, strict=True)) / len(rows)


def run_tunesmith(paths: dict, work: Path, heldout: list[dict]) -> list[dict]:
    """The defaults, scored after every epoch like the plain loop: the run writes a checkpoint at each
    epoch's end (output options only; training is the same) and each is evaluated as an adapter."""
    run = work / "tunesmith-run"
    plan_path = work / "plan.json"
    with plan_path.open("w") as out:
        subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--data", str(paths["train"]), "--output-dir",
                        str(run), "--plan", "--json"], check=True, stdout=out)
    per_epoch = json.loads(plan_path.read_text())["steps_per_epoch"]
    before = _children_cpu()
    _cli("train", "--data", str(paths["train"]), "--output-dir", str(run), "--output.save_every", str(per_epoch),
         "--output.save_total_limit", "0", "--train.log_every", "1")
    cpu = _children_cpu() - before
    plan = json.loads((run / "plan.json").read_text())
    elapsed = {row["step"]: row["elapsed_s"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "elapsed_s" in row}
    last = max(elapsed)
    results = []
    for epoch, step in enumerate(range(per_epoch, plan["total_steps"] + 1, per_epoch), start=1):
        adapter = _checkpoint_as_run(run, step, work / f"tunesmith-epoch-{epoch}")
        _cli("eval", str(adapter), "--data", str(paths["heldout"]), "--out", str(adapter / "eval"), "--metrics",
             "exact_match", "--max-new-tokens", "24")
        rows = [json.loads(line) for line in (adapter / "eval" / "predictions.jsonl").read_text().splitlines()]
        # CPU seconds up to this epoch: the whole run's, less the training time that came after it
        # (one thread on a quiet machine, where wall time is CPU time).
        results.append({"system": f"tunesmith defaults, epoch {epoch}", "cpu_s": cpu - (elapsed[last] - elapsed[step]),
                        "accuracy": accuracy([r["prediction"] for r in rows], heldout),
                        "detail": f"{step} of {plan['total_steps']} steps ({plan['epochs']:g} epochs), lr {plan['lr']:g}"})
    return results


def _checkpoint_as_run(run: Path, step: int, out: Path) -> Path:
    """A copy of the run directory whose adapter holds the weights of checkpoint ``step``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    weights = load_file(str(run / "checkpoints" / f"step-{step}" / "weights.safetensors"))
    save_file({key.replace(".default.", "."): value for key, value in weights.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------- the plain loop a user would write


def run_plain_loop(model_path: str, train: list[dict], heldout: list[dict], epochs: int, seed: int = 0) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)  # the LoRA initialisation and dropout: repeatable, as tunesmith's train.seed makes its run
    start = _own_cpu()
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    examples = []
    for row in train:
        prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(row["messages"], tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        examples.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    bf16 = torch.cpu._is_avx512_bf16_supported()
    rng, results, spent = random.Random(0), [], 0.0
    for epoch in range(1, epochs + 1):
        epoch_start = _own_cpu()
        model.train()
        rng.shuffle(examples)
        for i in range(0, len(examples), 4):
            batch = examples[i:i + 4]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        spent += _own_cpu() - epoch_start + (epoch_start - start if epoch == 1 else 0.0)
        acc = accuracy(_plain_generate(model, tok, heldout), heldout)
        results.append({"system": f"plain loop, epoch {epoch}", "accuracy": acc, "cpu_s": spent,
                        "detail": f"{epoch * -(-len(examples) // 4)} steps, lr 0.001"})
    return results


@torch.no_grad()
def _plain_generate(model, tok, rows: list[dict]) -> list[str]:
    model.eval()
    out = []
    for row in rows:
        prompt = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
        ids = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


# ---------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the plain loop (scored after each)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for both systems (1 keeps CPU seconds honest on a busy machine)")
    parser.add_argument("--seed", type=int, default=0, help="the plain loop's torch seed (tunesmith: train.seed)")
    args = parser.parse_args()
    from tunesmith.models.resolve import resolve

    torch.set_num_threads(args.threads)
    model_path = str(resolve(args.model))
    work = Path(args.work or tempfile.mkdtemp(prefix="efficacy-"))
    paths = write_facts(work / "data")
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    heldout = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    started = time.perf_counter()
    ours = run_tunesmith(paths, work, heldout)
    theirs = run_plain_loop(model_path, train, heldout, args.epochs, args.seed)
    rows = [*ours, *theirs]
    print(f"\n{len(train)} training examples, {len(heldout)} held-out questions, model {args.model}, "
          f"{args.threads} thread(s), {time.perf_counter() - started:.0f} s in all\n")
    print("| system | held-out accuracy | CPU s | |\n| --- | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row['system']} | {row['accuracy']:.0%} | {row['cpu_s']:.0f} | {row['detail']} |")
    reached = [next((r for r in system if r["accuracy"] >= TARGET), None) for system in (ours, theirs)]
    shown = [f"{r['cpu_s']:.0f} CPU s ({r['system'].split(', ')[-1]})" if r else "not reached" for r in reached]
    ratio = f" ({reached[1]['cpu_s'] / reached[0]['cpu_s']:.2f}x)" if all(reached) else ""
    print(f"\nto reach {TARGET:.0%}: tunesmith {shown[0]}, plain loop {shown[1]}{ratio}")


if __name__ == "__main__":
    main()
