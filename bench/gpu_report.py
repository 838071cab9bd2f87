"""The GPU check's table (bench/gpu_check.sh): each cuda test's result, then bench/gpu.sh's figures.

    python bench/gpu_report.py --junit cuda-tests.xml [--bench gpu-bench.json] [--title TEXT]

Tests come from pytest's JUnit XML (passed, failed, error or skipped, with the reason); the benchmark from
train_throughput.py's --json summary: non-padding tokens/s, tunesmith's tokens/s over each system's,
peak GPU memory, MFU against the card's dense bf16 peak, training seconds, tokens and held-out loss.
A missing or unreadable input is said in the table, never left out.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def read_test_results(junit: Path) -> list[dict]:
    """One row per test case: node id, outcome, seconds, and the first line of the reason when not passed."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.get("name") is None:  # the test that was running when pytest was interrupted
            rows.append({"test": "(the test running at the time limit)", "outcome": "interrupted", "seconds": 0.0,
                         "reason": "pytest stopped by the time limit; the tests after it did not run"})
            continue
        module = case.get("classname", "").replace(".", "/") + ".py"
        outcome, reason = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                reason = (found.get("message") or found.text or "").strip().splitlines()[0:1]
                reason = reason[0] if reason else ""
                break
        rows.append({"test": f"{module}::{case.get('name')}", "outcome": outcome,
                     "seconds": float(case.get("time") or 0), "reason": reason})
    return rows


def tests_table(junit: Path) -> list[str]:
    if not junit.is_file():
        return [f"No test results: {junit} was not written (the tests were not run, or pytest did not finish)."]
    rows = read_test_results(junit)
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "error", "skipped", "interrupted")}
    lines = [", ".join(f"{n} {o}" for o, n in counts.items() if n) + f" of {len(rows)} cuda tests", "",
             "| test | result | s | reason |", "| --- | --- | ---: | --- |"]
    lines += [f"| `{r['test']}` | {r['outcome']} | {r['seconds']:.1f} | {r['reason'].replace('|', '/')[:160]} |"
              for r in rows]
    return lines


def bench_table(bench: Path | None) -> list[str]:
    if bench is None or not bench.is_file():
        return [f"No benchmark result: {bench} was not written (bench/gpu.sh was not run, or did not finish: see its log)."]
    data = json.loads(bench.read_text())
    w, gpu = data["workload"], data.get("gpu", {})
    peak = gpu.get("peak_bf16_tflops")
    lines = [f"bench/gpu.sh on {gpu.get('name', '?')}: {w['train']} examples, rows of {w['batch']} x up to "
             f"{w['max_length']} tokens, attention {w['attn'] or 'sdpa'}, liger-kernel {'on' if w['liger'] else 'off'}, "
             f"{data['rounds']} round(s); MFU against {f'{peak:g} TFLOP/s' if peak else 'an unknown peak'} "
             "(dense bf16); x = tunesmith's tokens/s over the system's", "",
             "| system | tokens/s | x | peak GPU MiB | MFU | train s | tokens | held-out loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s, speed in data["tokens_per_s"].items():
        ratio, mfu = data["ratios"].get(s), data.get("mfu", {}).get(s)
        memory = data.get("peak_gpu_mb", {}).get(s)
        lines.append(f"| {s} | {speed:,.0f} | {f'{ratio:.2f}x' if ratio else ''} | "
                     f"{f'{memory:,.0f}' if memory is not None else '?'} | {f'{100 * mfu:.1f}%' if mfu else '?'} | "
                     f"{data['train_s'][s]:.1f} | {data['tokens'][s]:,.0f} | {data['eval_loss'][s]:.4f} |")
    lines += ["", "versions: " + ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, required=True, help="pytest's --junitxml file of the cuda tests")
    parser.add_argument("--bench", type=Path, help="bench/gpu.sh's --json file")
    parser.add_argument("--title", default="GPU check", help="the table's heading")
    args = parser.parse_args()
    print("\n".join([f"## {args.title}", "", *tests_table(args.junit), "", *bench_table(args.bench)]))


if __name__ == "__main__":
    main()
