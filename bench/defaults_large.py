"""On a larger dataset, do the data-aware defaults cost time or quality? Old fixed defaults against the plan's.

alpaca_en_demo (1,000 examples, examples/data), 100 held out by the same seeded split for both.
"old" is what `tunesmith train` did before the run plan, set by hand: 4 rows x 4 micro-batches of
1024 packed tokens per step, lr 2e-4, 3% warmup. "plan" is `tunesmith train` with no option.
Both run the same number of epochs (3 by default, the old default; --epochs 1 for a quicker check),
so both see the same tokens. Each is also evaluated at a third and two thirds of its steps, to
show when it reaches the other's final loss. The two trainings run side by side (one thread each, so neither
waits for the other) and each is measured on its own. Printed: optimizer steps, held-out loss before
and after, CPU seconds (user + system of each training process: independent of what else the
machine runs).

Run: ``python bench/defaults_large.py [--epochs 1] [--limit N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tunesmith.run import METRICS, read_metrics

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "alpaca_en_demo.json"
OLD_DEFAULTS = ["--batch-size", "4", "--grad-accum", "4", "--lr", "2e-4", "--train.warmup_ratio", "0.03",
                "--data.pack_length", "1024"]


def _planned_steps(extra: list[str], data: Path, epochs: str, work: Path) -> int:
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--data", str(data), "--output-dir",
                           str(work / "plan-only"), "--data.val_size", "100", "--epochs", epochs, "--plan", "--json",
                           *extra], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return json.loads(done.stdout)["total_steps"]


def start(name: str, extra: list[str], work: Path, data: Path, epochs: str) -> tuple[str, subprocess.Popen]:
    run = work / name
    thirds = max(1, _planned_steps(extra, data, epochs, work) // 3)
    command = [sys.executable, "-m", "tunesmith.cli", "train", "--data", str(data), "--output-dir", str(run),
               "--data.val_size", "100", "--epochs", epochs, "--json", "--eval.eval_every", str(thirds),
               "--eval.load_best", "false", *extra]
    log = (work / f"{name}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return name, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def finish(name: str, proc: subprocess.Popen) -> dict:
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
    if status != 0:
        raise SystemExit(f"{name} failed; see its log")
    summary = json.loads(out)
    rows = read_metrics(Path(summary["run_dir"]) / METRICS)
    curve = [(r["step"] / summary["steps"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    return {"name": name, "cpu_s": usage.ru_utime + usage.ru_stime, "steps": summary["steps"],
            "before": summary["initial_eval_loss"], "after": summary["final_eval_loss"], "lr": summary["plan"]["lr"],
            "curve": ", ".join(f"{loss:.4f} at {fraction:.0%}" for fraction, loss in curve)}


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
    running = [start("old", OLD_DEFAULTS, work, data, args.epochs), start("plan", [], work, data, args.epochs)]
    rows = [finish(name, proc) for name, proc in running]
    print(f"\n{data.name}, {args.epochs} epoch(s), 100 held out\n")
    print("| defaults | steps | lr | held-out loss before -> after | held-out loss along the way | CPU s |\n"
          "| --- | ---: | ---: | --- | --- | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['steps']} | {r['lr']:g} | {r['before']:.4f} -> {r['after']:.4f} | {r['curve']} "
              f"| {r['cpu_s']:.0f} |")
    old, new = rows
    print(f"\nplan vs old: held-out loss {new['after'] - old['after']:+.4f}, CPU time x{new['cpu_s'] / old['cpu_s']:.2f}")


if __name__ == "__main__":
    main()
