"""``tunesmith eval MODEL --data PROMPTS --reward FILE.py:FUNCTION [--compare base] [--samples K]``.

Any model or run, tuned by any objective, on prompt data (data/prompts.py: prompts with any other
columns, which the reward functions get): each prompt is rendered as the run renders it (its
template and system prompt) and answered in batches (inference.generate), greedily by default. Each
reward function (rewards.py) scores every answer; the metrics are, per function, the mean reward
(``reward/NAME``) and the pass rate, the share of prompts whose answer scores above 0
(``pass_rate/NAME``). With ``samples`` K > 1, K answers are sampled per prompt (temperature 1.0
unless given) and the pass rate becomes pass@K (``pass@K/NAME``: at least one of the K scores
above 0) beside the mean over all samples. With ``compare``, the other model answers the same
prompts the same way; the deltas are model minus compared.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from tunesmith.data.prompt import ensure_template, render_prompt, with_system_prompt
from tunesmith.data.prompts import PromptRow, load_prompts
from tunesmith.errors import UsageError
from tunesmith.evaluate.pipeline import (
    GENERATION_BATCH_SIZE,
    EvalResult,
    compare_target,
    generation_stats,
    metric_deltas,
    report_dir,
    write_predictions,
)
from tunesmith.evaluate.report import write_report
from tunesmith.inference import GenerationOptions, for_generation, generate, generation_dtype, precision_name
from tunesmith.models.load import load
from tunesmith.rewards import Reward, load_rewards, score
from tunesmith.run import run_system_prompt

SAMPLING_TEMPERATURE = 1.0  # --samples without --temperature: the model's own distribution


def evaluate_rewards(model: str, data, rewards: Sequence[str], *, compare: str | None = None, out: str | None = None,
                     samples: int = 1, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                     batch_size: int | None = None, limit: int | None = None, encoding: str | None = None,
                     precision: str = "auto", seed: int = 0, progress: bool = True) -> EvalResult:
    """Mean reward and pass rate (or pass@K) of ``model`` on the prompts of ``data``; see the module docstring."""
    if samples < 1 or max_new_tokens < 1:
        raise UsageError(f"samples and max_new_tokens must be at least 1, not {samples} and {max_new_tokens}")
    dtype = generation_dtype(precision)
    functions = load_rewards(list(rewards))  # a bad spec fails before any model is loaded
    rows = load_prompts(data, encoding=encoding)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"limit must be at least 1, not {limit}")
        rows = rows[:limit]
    if samples > 1 and not temperature:
        temperature = SAMPLING_TEMPERATURE
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    compare_name = compare_target(model, compare) if compare else None
    out_dir = report_dir(out)
    settings = {"samples": samples, "batch_size": batch_size or GENERATION_BATCH_SIZE, "precision": precision,
                "seed": seed, "progress": progress}
    main, main_info, main_path = _evaluate_one(model, rows, functions, options, settings)
    result = EvalResult(model=model, data=str(data), metrics=main[0], predictions=main[1],
                        options={"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                 "samples": samples, "rewards": list(rewards), "limit": limit,
                                 "precision": precision_name(dtype)})
    if compare_name:
        other, _, _ = _evaluate_one(compare_name, rows, functions, options, settings,
                                    like_run=main_info if compare == "base" else None, fallback_template=main_path)
        result.compare = compare if compare != "base" else f"base ({compare_name})"
        result.compare_metrics, result.compare_predictions = other
        result.deltas = metric_deltas(result.metrics, result.compare_metrics)
    if out_dir:
        written = {"predictions": (out_dir / "predictions.jsonl", result.predictions),
                   "compare_predictions": (out_dir / "predictions.base.jsonl" if compare == "base" else
                                           out_dir / "predictions.compare.jsonl", result.compare_predictions)}
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, (path, records) in written.items():
            if records is not None:
                write_predictions(path, records)
                result.paths[name] = str(path)
        result.paths = write_report(result, out_dir)
    return result


def _evaluate_one(name: str, rows: list[PromptRow], functions: list[Reward], options: GenerationOptions,
                  settings: dict, *, like_run: dict | None = None, fallback_template=None):
    """((metrics, records), the model's run info, its path): generation and rewards for one model."""
    import torch  # heavy: only when a model is evaluated

    loaded = load(name, dtype=torch.float32 if settings["precision"] == "fp32" else None)
    ensure_template(loaded.tokenizer, fallback_template)
    run_info = like_run if like_run is not None else loaded.run_info
    system = run_system_prompt(run_info)
    prompts = [render_prompt(loaded.tokenizer, with_system_prompt([row.conversation], system)[0]) for row in rows]
    loaded.model = for_generation(loaded.model, settings["precision"])
    k = settings["samples"]
    torch.manual_seed(settings["seed"])  # sampled answers (--samples) repeat from run to run
    generations = generate(loaded.model, loaded.tokenizer, [p for p in prompts for _ in range(k)], options,
                           batch_size=settings["batch_size"])
    records = _records(rows, generations, functions, k)
    metrics = {**reward_metrics(records, functions, k), **generation_stats(records)}
    path = loaded.path
    del loaded
    gc.collect()  # two models of a comparison are never in memory together
    return (metrics, records), run_info, path


def _records(rows: list[PromptRow], generations: list, functions: list[Reward], k: int) -> list[dict]:
    expanded = [row for row in rows for _ in range(k)]
    texts = [g.text for g in generations]
    fields = {key: [row.fields[key] for row in expanded] for key in expanded[0].fields}
    table = score(functions, [row.text for row in expanded], texts, fields, [row.where for row in expanded])
    return [{"index": i, "prompt": row.conversation.to_messages(), "prediction": text,
             "reference": str(row.fields.get("answer", "")), "rewards": dict(zip([f.key for f in functions], values,
                                                                                  strict=True)),
             "sample": i % k, "latency_s": g.latency_s, "completion_tokens": g.completion_tokens,
             "prompt_tokens": g.prompt_tokens, "finish_reason": g.finish_reason, "source": row.where}
            for i, (row, text, values, g) in enumerate(zip(expanded, texts, table, generations, strict=True))]


def reward_metrics(records: list[dict], functions: list[Reward], k: int) -> dict:
    """Per function: the mean reward over every answer, and the pass rate (k = 1) or pass@k over the prompts."""
    out = {}
    for f in functions:
        values = [r["rewards"][f.key] for r in records]
        passed = [any(v > 0 for v in values[i:i + k]) for i in range(0, len(values), k)]
        out[f"reward/{f.key}"] = sum(values) / len(values)
        out[f"pass_rate/{f.key}" if k == 1 else f"pass@{k}/{f.key}"] = sum(passed) / len(passed)
    return out

