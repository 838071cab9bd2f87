"""Evaluation generation against the one-by-one loop, on the real default model.

Usage (the default model must be cached; TUNESMITH_HOME unset uses ~/.cache/tunesmith)::

    python bench/eval_throughput.py [--prompts 64] [--max-new-tokens 128] [--rounds 1] [--threads 1]
        [--batch-size N] [--data examples/data/alpaca_en_demo.json] [--json OUT]

Three passes over the same prompts (the first ``--prompts`` rows of the data, rendered with the
model's chat template), interleaved round by round:

- one by one: a plain ``model.generate`` per prompt on the fp32 model, greedy, as a user would
  write it (the baseline);
- tunesmith fp32: ``inference.generate`` as ``tunesmith eval --precision fp32`` runs it;
- tunesmith default: the same in the precision ``--precision auto`` picks (bf16 where the
  hardware has it).

Each pass prints wall and CPU seconds, generated tokens per second of each and the ratio of its
tokens/s to the one-by-one loop's. Tokens are counted up to the first stop token, the same way
for every pass. Greedy agreement is reported, never asserted: tunesmith fp32 against the loop
(expected identical), and the default precision against fp32 (exact-match fraction of the texts
and mean common prefix in tokens).

On a CPU shared with other busy processes, pass ``--threads 1``: with more intra-op threads than
free cores every matmul waits on a descheduled thread and timings swing by 3x or more. The CPU
seconds (this process's, single-threaded) are then the steadier measure; wall time counts the
time other processes had the core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tunesmith.data.prompt import render_prompt
from tunesmith.evaluate.pipeline import GENERATION_BATCH_SIZE
from tunesmith.inference import GenerationOptions, generate, generation_dtype, precision_name, stop_token_ids
from tunesmith.models.load import load

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "examples" / "data" / "alpaca_en_demo.json"


def read_prompts(path: Path, count: int) -> list[list[dict]]:
    """The first ``count`` alpaca rows as chat messages: real prompts of varied length."""
    rows = json.loads(path.read_text(encoding="utf-8"))[:count]
    return [[{"role": "user", "content": row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")}]
            for row in rows]


def one_by_one(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The baseline: what a user writes without tunesmith."""
    stops = set(stop_token_ids(model, tokenizer))
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[0, inputs["input_ids"].shape[1]:].tolist()
            outputs.append(new[:next((i for i, t in enumerate(new) if t in stops), len(new))])
    return outputs


def timed(work):
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def agreement(tokenizer, texts: list[str], reference: list[str]) -> dict:
    """Exact-match fraction of the texts and mean common prefix in tokens (of the texts re-tokenized)."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefixes = [common_prefix(encode(a), encode(b)) for a, b in zip(texts, reference, strict=True)]
    return {"exact_match": sum(a == b for a, b in zip(texts, reference, strict=True)) / len(texts),
            "mean_common_prefix_tokens": statistics.fmean(prefixes),
            "mean_reference_tokens": statistics.fmean(len(encode(t)) for t in reference)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=GENERATION_BATCH_SIZE,
                        help="tunesmith's generation batch (default: tunesmith eval's)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median of each pass is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load(args.model, dtype=torch.float32)
    fp32, tokenizer = loaded.model, loaded.tokenizer
    default_dtype = generation_dtype("auto", str(fp32.device))
    low = fp32 if default_dtype == torch.float32 else load(args.model, dtype=default_dtype).model
    prompts = [render_prompt(tokenizer, m, loaded.run_info) for m in read_prompts(Path(args.data), args.prompts)]
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    for model in (fp32, low):  # warm-up
        generate(model, tokenizer, prompts[:2], GenerationOptions(max_new_tokens=4))

    default_name = f"tunesmith {precision_name(default_dtype)} (default)"
    passes = {
        "one by one fp32": lambda: one_by_one(fp32, tokenizer, prompts, args.max_new_tokens),
        "tunesmith fp32": lambda: generate(fp32, tokenizer, prompts, options, batch_size=args.batch_size),
        default_name: lambda: generate(low, tokenizer, prompts, options, batch_size=args.batch_size),
    }
    runs: dict[str, list[dict]] = {name: [] for name in passes}
    texts: dict[str, list[str]] = {}
    for round_ in range(args.rounds):
        for name, work in passes.items():
            result, wall, cpu = timed(work)
            if name.startswith("one by one"):
                tokens = sum(map(len, result))
                texts[name] = [tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip()
                               for ids in result]
            else:
                tokens = sum(g.completion_tokens for g in result)
                texts[name] = [g.text for g in result]
            runs[name].append({"wall_s": wall, "cpu_s": cpu, "tokens": tokens})
            print(f"round {round_ + 1} {name:28s} wall {wall:7.1f} s  cpu {cpu:7.1f} s  {tokens} tokens", flush=True)

    summary = summarize(runs)
    base = "one by one fp32"
    checks = {"tunesmith fp32 vs one by one": agreement(tokenizer, texts["tunesmith fp32"], texts[base]),
              f"{default_name} vs tunesmith fp32": agreement(tokenizer, texts[default_name], texts["tunesmith fp32"])}
    machine = describe_machine()
    print(f"\nmodel {loaded.path}  {machine}  threads {torch.get_num_threads()}")
    print(f"{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
          f"{args.rounds} round(s), medians\n")
    print("| pass | tokens | wall s | tok/s | x one-by-one | CPU s | tok/CPU-s | x one-by-one |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in summary.items():
        print(f"| {name} | {row['tokens']} | {row['wall_s']:.1f} | {row['tok_per_s']:.1f} | {row['speedup_wall']:.2f} "
              f"| {row['cpu_s']:.1f} | {row['tok_per_cpu_s']:.1f} | {row['speedup_cpu']:.2f} |")
    print()
    for name, check in checks.items():
        print(f"{name}: exact match {check['exact_match']:.1%}, mean common prefix "
              f"{check['mean_common_prefix_tokens']:.1f} of {check['mean_reference_tokens']:.1f} tokens")
    if args.json:
        document = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
                    "threads": torch.get_num_threads(), "model": str(loaded.path), "args": vars(args),
                    "summary": summary, "runs": runs, "agreement": checks}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Median wall and CPU time per pass; speed-ups are tokens/s over the one-by-one loop's."""
    summary = {}
    for name, rows in runs.items():
        wall, cpu = statistics.median(r["wall_s"] for r in rows), statistics.median(r["cpu_s"] for r in rows)
        tokens = rows[0]["tokens"]
        summary[name] = {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tok_per_s": tokens / wall,
                         "tok_per_cpu_s": tokens / cpu}
    base = next(iter(summary.values()))
    for row in summary.values():
        row["speedup_wall"] = row["tok_per_s"] / base["tok_per_s"]
        row["speedup_cpu"] = row["tok_per_cpu_s"] / base["tok_per_cpu_s"]
    return summary


def describe_machine() -> str:
    bf16 = "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else "no native bf16"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU ({bf16})"
    return f"{device}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
