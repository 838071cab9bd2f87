"""The OpenAI-compatible server under load: 1, 4 and 8 concurrent clients on the real default model.

Usage (the model must be cached, e.g. `tunesmith models pull smollm2-135m-instruct`)::

    python bench/serve_load.py [--model smollm2-135m-instruct] [--levels 1,4,8] [--requests 16]
        [--max-tokens 64] [--rounds 3] [--threads N] [--max-batch 16] [--json OUT]

Starts `tunesmith serve` on 127.0.0.1 (a subprocess; the model found by tunesmith's resolver) and,
for each level, sends the same ``--requests`` greedy chat requests (alpaca_en_demo prompts) from
that many concurrent openai clients. Levels run interleaved, ``--rounds`` times; a level's figures
are the median over rounds. Prints aggregate completion tokens/s (wall clock) and completion
tokens per CPU second of the server process (steadier when other jobs share the CPU), each with
its ratio to 1 client, p50/p95 request latency, and how many requests shared each decode step
(server /stats); exits non-zero when a greedy text differs between levels or rounds (batching
must not change answers).

``--threads`` sets the server's torch threads (OMP_NUM_THREADS): on a CPU shared with other busy
processes, 1 thread gives steadier figures (see eval_throughput.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from tunesmith.models.resolve import resolve

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "examples" / "data" / "alpaca_en_demo.json"


def read_prompts(path: Path, count: int) -> list[str]:
    """The first ``count`` alpaca rows as user messages: real prompts of varied length."""
    rows = json.loads(path.read_text(encoding="utf-8"))[:count]
    return [row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "") for row in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, threads: int | None, max_batch: int) -> subprocess.Popen:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    command = [sys.executable, "-m", "tunesmith.cli", "serve", str(model), "--port", str(port),
               "--max-batch", str(max_batch)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the server at {url} was not up after {timeout}s")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def ask(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    started = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content, reply.usage.completion_tokens, time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): the server's work, whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(url: str, model: str, prompts: list[str], clients: int, max_tokens: int, pid: int) -> dict:
    """All prompts through ``clients`` concurrent clients (each its own connection): texts and timings."""
    pool = [openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600) for _ in range(clients)]
    cpu, started = cpu_seconds(pid), time.perf_counter()
    with ThreadPoolExecutor(clients) as executor:
        results = list(executor.map(lambda i: ask(pool[i % clients], model, prompts[i], max_tokens),
                                    range(len(prompts))))
    wall, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    latencies = sorted(r[2] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "server_cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu,
            "p50_s": statistics.median(latencies), "p95_s": latencies[math.ceil(0.95 * len(latencies)) - 1],
            "texts": [r[0] for r in results]}


def summarize(runs: list[dict]) -> dict:
    """A level's rounds as one row: the median of each figure."""
    return {key: statistics.median(r[key] for r in runs)
            for key in ("wall_s", "completion_tokens", "tokens_per_s", "server_cpu_s", "tokens_per_cpu_s", "p50_s",
                        "p95_s", "mean_batch")}


def mean_batch(before: dict, after: dict) -> float:
    """Rows per decode step between two /stats readings: how many requests shared each forward pass."""
    return (after["rows_decoded"] - before["rows_decoded"]) / max(1, after["decode_steps"] - before["decode_steps"])


def text_mismatches(runs: dict[int, list[dict]]) -> list[str]:
    reference = next(iter(runs.values()))[0]["texts"]
    return [f"{clients} clients, round {i + 1}, prompt {j}: {text!r} != {reference[j]!r}"
            for clients, level_runs in runs.items() for i, run in enumerate(level_runs)
            for j, text in enumerate(run["texts"]) if text != reference[j]]


def print_table(rows: dict[int, dict], header: str) -> None:
    print(header)
    print("| clients | completion tokens/s | vs 1 client | tokens per server CPU s | vs 1 client "
          "| p50 latency s | p95 latency s | rows per decode step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base, base_cpu = rows[min(rows)]["tokens_per_s"], rows[min(rows)]["tokens_per_cpu_s"]
    for clients, row in rows.items():
        print(f"| {clients} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base:.2f}x "
              f"| {row['tokens_per_cpu_s']:.1f} | {row['tokens_per_cpu_s'] / base_cpu:.2f}x | {row['p50_s']:.2f} "
              f"| {row['p95_s']:.2f} | {row['mean_batch']:.1f} |")


def print_rounds(runs: dict[int, list[dict]]) -> None:
    """Every round's wall-clock tokens/s: on a shared machine one slow round shows here, not in the medians."""
    for i in range(len(next(iter(runs.values())))):
        line = ", ".join(f"{clients} clients {level[i]['tokens_per_s']:.1f}" for clients, level in runs.items())
        print(f"round {i + 1}: {line} tokens/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--levels", default="1,4,8", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (the same prompts at each)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="times the levels are run, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    model_dir = resolve(args.model)
    levels = [int(n) for n in args.levels.split(",")]
    prompts = read_prompts(Path(args.data), args.requests)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model_dir, port, args.threads, args.max_batch)
    try:
        wait_healthy(url, server)
        served = get_json(url + "/v1/models")["data"][0]["id"]
        run_level(url, served, prompts[:1], 1, 4, server.pid)  # warm-up
        runs: dict[int, list[dict]] = {n: [] for n in levels}
        for _ in range(args.rounds):
            for clients in levels:
                before = get_json(url + "/stats")
                runs[clients].append(run_level(url, served, prompts, clients, args.max_tokens, server.pid))
                runs[clients][-1]["mean_batch"] = mean_batch(before, get_json(url + "/stats"))
    finally:
        server.terminate()
        server.wait(timeout=60)

    rows = {n: summarize(r) for n, r in runs.items()}
    threads = args.threads or "torch default"
    print_table(rows, f"model {model_dir}  server threads {threads}  {args.requests} requests per level, "
                      f"max_tokens {args.max_tokens}, greedy, median of {args.rounds} rounds")
    print_rounds(runs)
    mismatches = text_mismatches(runs)
    print(f"identical greedy texts across levels and rounds: {'yes' if not mismatches else 'NO'}")
    for line in mismatches[:5]:
        print("  " + line)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "args": vars(args), "levels": rows,
                                               "runs": runs, "mismatches": mismatches}, indent=2))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
