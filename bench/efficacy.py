"""Does a fine-tune teach? tunesmith's defaults against a plain transformers + peft loop, same data.

The data is bench/facts.py: 50 invented people, each profession in 3 training phrasings (150
examples), asked in a 4th phrasing for evaluation. Both systems start from the same base model;
accuracy is the share of held-out questions whose greedy answer names the right profession
(and no other), scored by the same function for both.

- tunesmith: `tunesmith train --data train.jsonl --output-dir RUN` with no other option, then
  `tunesmith eval RUN --data heldout.jsonl`. Its CPU seconds are the train subprocess's (model
  load and tokenization included).
- plain loop: what a user writes from the peft docs (below, ~60 lines): LoRA r=16 alpha=32 on all
  linear layers, AdamW lr 1e-3, padded batches of 4 examples, assistant-only loss, bf16 autocast
  where the CPU has it, 4 epochs. It is scored after every epoch; its CPU seconds to reach the
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


def run_tunesmith(paths: dict, work: Path, heldout: list[dict]) -> dict:
    run = work / "tunesmith-run"
    before = _children_cpu()
    _cli("train", "--data", str(paths["train"]), "--output-dir", str(run))
    cpu = _children_cpu() - before
    _cli("eval", str(run), "--data", str(paths["heldout"]), "--out", str(run / "eval"), "--metrics", "exact_match",
         "--max-new-tokens", "24")
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    plan = json.loads((run / "plan.json").read_text())
    acc = accuracy([r["prediction"] for r in rows], heldout)
    return {"system": "tunesmith defaults", "accuracy": acc, "cpu_s": cpu,
            "detail": f"{plan['total_steps']} steps, {plan['epochs']:g} epochs, lr {plan['lr']:g}"}


# ---------------------------------------------------------------- the plain loop a user would write


def run_plain_loop(model_path: str, train: list[dict], heldout: list[dict], epochs: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    args = parser.parse_args()
    from tunesmith.models.resolve import resolve

    torch.set_num_threads(args.threads)
    model_path = str(resolve(args.model))
    work = Path(args.work or tempfile.mkdtemp(prefix="efficacy-"))
    paths = write_facts(work / "data")
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    heldout = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    started = time.perf_counter()
    rows = [run_tunesmith(paths, work, heldout), *run_plain_loop(model_path, train, heldout, args.epochs)]
    print(f"\n{len(train)} training examples, {len(heldout)} held-out questions, model {args.model}, "
          f"{args.threads} thread(s), {time.perf_counter() - started:.0f} s in all\n")
    print("| system | held-out accuracy | CPU s | |\n| --- | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row['system']} | {row['accuracy']:.0%} | {row['cpu_s']:.0f} | {row['detail']} |")
    ours = rows[0]
    plain = next((r for r in rows[1:] if r["accuracy"] >= TARGET), None)
    plain_time = f"{plain['cpu_s']:.0f} CPU s" if plain else f"not reached in {args.epochs} epochs"
    ours_time = f"{ours['cpu_s']:.0f} CPU s" if ours["accuracy"] >= TARGET else "not reached"
    print(f"\nto reach {TARGET:.0%}: tunesmith {ours_time}, plain loop {plain_time}"
          + (f" ({plain['cpu_s'] / ours['cpu_s']:.2f}x)" if plain and ours["accuracy"] >= TARGET else ""))


if __name__ == "__main__":
    main()
