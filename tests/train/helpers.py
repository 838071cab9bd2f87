"""Helpers for the training tests: a small chat dataset and a fast config for the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = ["What is the capital of France?", "Who are you?", "Explain machine learning in one sentence.",
             "你是谁？", "Translate the following text into English."]
ANSWERS = ["The capital of France is Paris.", "I am a helpful assistant.", "Machine learning lets computers learn.",
           "我是一个有用的AI助手。", "Hello, World!"]


def chat_rows(n: int = 40, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{QUESTIONS[i % 5]} {i + offset}"},
                          {"role": "assistant", "content": ANSWERS[i % 5]}]} for i in range(n)]


def write_chat(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_overrides(model_dir: Path, data: Path, out: Path, **extra) -> list[str]:
    """A fast, deterministic fp32 setup: 40 examples packed into rows of 64 tokens, 2 per micro-batch."""
    values = {"model.name": model_dir, "data.path": data, "output.output_dir": out, "data.max_length": 64,
              "train.batch_size": 2, "train.grad_accum": 2, "train.precision": "fp32", "train.lr": 5e-3,
              "train.max_steps": 10, "train.log_every": 1, "train.warmup_steps": 2}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(model_dir: Path, data: Path, out: Path, **extra):
    from tunesmith.config import load_config

    return load_config(None, tiny_overrides(model_dir, data, out, **extra))


def read_losses(run_dir: Path) -> list[float]:
    from tunesmith.run import read_metrics

    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]  # step 0: eval only
