"""On a larger dataset, do the data-aware defaults cost time or quality? Old fixed defaults against the plan's.

alpaca_en_demo (1,000 examples, examples/data), 100 held out by the same seeded split for both.
"old" is what `tunesmith train` did before the run plan, set by hand: 4 rows x 4 micro-batches of
1024 packed tokens per step, lr 2e-4, 3% warmup. "plan" is `tunesmith train` with no option.
Both run the same number of epochs (3 by default, the old default; --epochs 1 for a quicker check),
so both see the same tokens. Printed: optimizer steps, held-out loss before and after, CPU seconds
(user + system of the training process: independent of what else the machine runs).

Run: ``python bench/defaults_large.py [--epochs 1] [--limit N]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "alpaca_en_demo.json"
OLD_DEFAULTS = ["--batch-size", "4", "--grad-accum", "4", "--lr", "2e-4", "--train.warmup_ratio", "0.03",
                "--data.pack_length", "1024"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(name: str, extra: list[str], work: Path, data: Path, epochs: str) -> dict:
    run = work / name
    before = _children_cpu()
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--data", str(data), "--output-dir",
                           str(run), "--data.val_size", "100", "--epochs", epochs, "--json", *extra],
                          check=True, stdout=subprocess.PIPE, text=True)
    summary = json.loads(done.stdout)
    return {"name": name, "cpu_s": _children_cpu() - before, "steps": summary["steps"],
            "before": summary["initial_eval_loss"], "after": summary["final_eval_loss"], "lr": summary["plan"]["lr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", default="3")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N examples (0: all)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="defaults-large-"))
    data = DATA
    if args.limit:
        data = work / "data.json"
        data.write_text(json.dumps(json.loads(DATA.read_text(encoding="utf-8"))[:args.limit], ensure_ascii=False))
    rows = [train("old", OLD_DEFAULTS, work, data, args.epochs), train("plan", [], work, data, args.epochs)]
    print(f"\n{data.name}, {args.epochs} epoch(s), 100 held out\n")
    print("| defaults | steps | lr | held-out loss before -> after | CPU s |\n| --- | ---: | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['steps']} | {r['lr']:g} | {r['before']:.4f} -> {r['after']:.4f} | {r['cpu_s']:.0f} |")
    old, new = rows
    print(f"\nplan vs old: held-out loss {new['after'] - old['after']:+.4f}, CPU time x{new['cpu_s'] / old['cpu_s']:.2f}")


if __name__ == "__main__":
    main()
