"""Batched against one-by-one greedy generation on the real default model.

Usage (the default model must be cached, e.g. TUNESMITH_HOME=/tmp/tshome)::

    TUNESMITH_HOME=/tmp/tshome python bench/bench_generation.py [--prompts 32] [--batch-size 32]
        [--max-new-tokens 64] [--threads N] [--data examples/data/alpaca_en_demo.json]

Both passes use fp32 greedy decoding through tunesmith.inference.generate; the only
difference is the batch size. The outputs must be identical; the script prints the wall
times, generated tokens/s and the speed ratio, and exits non-zero when outputs differ.

On a CPU shared with other busy processes, pass ``--threads 1``: with more intra-op threads than
free cores, every matmul waits on a descheduled thread and timings swing by 3x or more
(measured here: batch 1 went from 14.6 to 3.5 tokens/s when going from 1 to 2 threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tunesmith.data.prompt import render_prompt
from tunesmith.inference import GenerationOptions, generate
from tunesmith.models.load import load

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "examples" / "data" / "alpaca_en_demo.json"


def read_prompts(path: Path, count: int) -> list[list[dict]]:
    """The first ``count`` alpaca rows as chat messages: real prompts of varied length."""
    rows = json.loads(path.read_text(encoding="utf-8"))[:count]
    messages = []
    for row in rows:
        text = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        messages.append([{"role": "user", "content": text}])
    return messages


def timed(model, tokenizer, prompts, options, batch_size):
    started = time.perf_counter()
    results = generate(model, tokenizer, prompts, options, batch_size=batch_size)
    return results, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load(args.model, dtype=torch.float32)
    prompts = [render_prompt(loaded.tokenizer, m, loaded.run_info) for m in read_prompts(Path(args.data), args.prompts)]
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    generate(loaded.model, loaded.tokenizer, prompts[:2], GenerationOptions(max_new_tokens=4))  # warm-up

    batched, batched_s = timed(loaded.model, loaded.tokenizer, prompts, options, args.batch_size)
    single, single_s = timed(loaded.model, loaded.tokenizer, prompts, options, 1)
    tokens = sum(g.completion_tokens for g in batched)
    mismatches = [i for i, (a, b) in enumerate(zip(batched, single, strict=True)) if a.text != b.text]
    print(f"model {loaded.path}  device {loaded.model.device}  threads {torch.get_num_threads()}")
    print(f"{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, {tokens} tokens generated")
    print(f"one by one       : {single_s:7.2f} s  {tokens / single_s:7.1f} tokens/s")
    print(f"batched (bs={args.batch_size:<3}): {batched_s:7.2f} s  {tokens / batched_s:7.1f} tokens/s")
    print(f"speed ratio      : {single_s / batched_s:.2f}x")
    print(f"identical outputs: {len(prompts) - len(mismatches)}/{len(prompts)}")
    for i in mismatches[:3]:
        print(f"  differs at {i}:\n    batched: {batched[i].text!r}\n    single : {single[i].text!r}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
