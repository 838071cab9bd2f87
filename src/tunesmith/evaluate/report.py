"""The evaluation report: metrics.json, report.md and PNG charts in one directory.

report.md has the metrics table (model | compared | delta), the settings that make the numbers
reproducible (BLEU/chrF signatures, ROUGE tokenization, the BERTScore encoder and layer), the
classification breakdown when there is one, the worst examples by ROUGE-L and a few samples.
lm-eval scores (harness.py) are metrics like the others, named harness/TASK/METRIC; with them
alone there are no predictions, so no examples and no length chart.
Charts: the quality metrics (their deltas when comparing) and the language-aware length
histograms of predictions and references. predictions.jsonl is written by the pipeline as it
generates; this module only points to it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from tunesmith import atomic
from tunesmith.evaluate.text import length
from tunesmith.output import fmt_delta, fmt_number

# Metrics on a 0..1 scale (BLEU and chrF are 0..100 and are divided by 100 in the chart).
QUALITY = ["rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "bertscore_f1", "accuracy", "macro_f1",
           "closer_to_chosen"]
PERCENT_SCALE = {"bleu", "chrf"}
# Lower is better for these: the report marks the direction so a negative delta is not misread.
LOWER_IS_BETTER = {"eval_loss", "perplexity", "empty_predictions", "duplicate_predictions", "repetitive_predictions",
                   "repetitive_rate", "repeated_ngram_ratio", "invalid_rate", "invalid_predictions",
                   "latency_mean_s", "latency_p50_s", "latency_p90_s", "generation_time_s", "truncated_predictions"}
# lm-eval metrics (harness/<task>/<metric>) where lower is better, as its metric registry marks them.
HARNESS_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter", "brier_score"}
# Numbers that describe how a metric was computed; they stay in metrics.json but out of the table.
SETTINGS = {"n", "repetition_n", "bertscore_layer"}
WORST_EXAMPLES = 5
# Training on pairs raised preference_accuracy by this much over the compared model while closer_to_chosen rose
# by less than BEHAVIOUR_RISE: the chosen answers became likelier, but the answers the model gives did not follow.
LIKELIHOOD_RISE, BEHAVIOUR_RISE = 0.3, 0.1
SAMPLES = 5


def write_report(result, out: Path) -> dict[str, str]:
    """Write metrics.json, the charts and report.md into ``out``; return name -> path (with result.paths)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {**{name: Path(p) for name, p in result.paths.items()},
             "metrics": out / "metrics.json", "report": out / "report.md"}
    paths["metrics_chart"] = plot_metrics(result, out / ("metric_deltas.png" if result.compare else "metrics.png"))
    paths["lengths_chart"] = plot_lengths(result, out / "lengths.png") if result.predictions else None
    atomic.write_text(paths["metrics"], json.dumps(metrics_document(result), indent=2, ensure_ascii=False) + "\n")
    atomic.write_text(paths["report"], render_markdown(result, paths))
    return {name: str(path) for name, path in paths.items() if path is not None}


def metrics_document(result) -> dict:
    return {"model": result.model, "data": result.data, "options": result.options, "metrics": result.metrics,
            "compare": result.compare, "compare_metrics": result.compare_metrics, "deltas": result.deltas}


# ---------------------------------------------------------------- markdown

def render_markdown(result, paths: dict) -> str:
    lines = [f"# Evaluation of `{result.model}`", ""]
    if result.data is not None:  # None: lm-eval tasks only
        lines.append(f"- data: `{result.data}` ({len(result.predictions)} examples)")
    lines.append(f"- generated: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    generation = {k: v for k, v in result.options.items() if k != "harness"}
    if generation:
        lines.append("- generation: " + ", ".join(f"{k} {v}" for k, v in generation.items()))
    if "harness" in result.options:
        lines.append("- lm-eval: " + harness_summary(result.options["harness"]))
    if result.compare:
        lines.append(f"- compared with: `{result.compare}`")
    warning = behaviour_warning(result.deltas)
    lines += ["", "## Metrics", "", *metrics_table(result), "", *([f"**{warning}**", ""] if warning else []),
              *metric_notes(result.metrics)]
    lines += classification_section(result.metrics)
    charts = [f"![{name}]({Path(paths[name]).name})" for name in ("metrics_chart", "lengths_chart") if paths.get(name)]
    lines += ["## Charts", "", *charts, ""] if charts else []
    lines += examples_section(result) if result.predictions else []
    return "\n".join(lines) + "\n"


def harness_summary(options: dict) -> str:
    fewshot = "each task's own" if options.get("fewshot") is None else options["fewshot"]
    limit = "all" if options.get("limit") is None else f"the first {options['limit']}"
    system = f", system prompt `{options['system_prompt']}`" if options.get("system_prompt") else ""
    return (f"tasks {', '.join(options['tasks'])}; few-shot {fewshot}; examples per task: {limit}; chat template "
            f"{'applied' if options.get('chat_template') else 'not applied'}{system}; "
            f"lm-eval {options.get('lm_eval_version')}")


def lower_is_better(key: str) -> bool:
    if key.startswith("harness/"):
        return key.rsplit("/", 1)[1].split(",")[0] in HARNESS_LOWER_IS_BETTER
    return key in LOWER_IS_BETTER


def metrics_table(result) -> list[str]:
    compared = result.compare_metrics
    header = ["metric", _short(result.model)] + ([_short(result.compare), "delta"] if compared is not None else [])
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, value in result.metrics.items():
        if not _is_number(value) or key in SETTINGS:
            continue
        name = f"{key} (lower is better)" if lower_is_better(key) else key
        cells = [name, fmt_number(value)]
        if compared is not None:
            cells += [fmt_number(compared.get(key)), fmt_delta(result.deltas.get(key))]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def behaviour_warning(deltas: dict) -> str | None:
    """A line when the likelihood of the chosen answers moved but the generated answers did not."""
    likelihood, behaviour = deltas.get("preference_accuracy"), deltas.get("closer_to_chosen")
    if likelihood is None or behaviour is None or likelihood < LIKELIHOOD_RISE or behaviour >= BEHAVIOUR_RISE:
        return None
    return (f"likelihood moved but behaviour did not: preference_accuracy {likelihood:+.2f}, closer_to_chosen "
            f"{behaviour:+.2f} (the chosen answers became likelier, the greedy answers did not move toward them)")


def metric_notes(metrics: dict) -> list[str]:
    """The settings behind the numbers: without them a BLEU or BERTScore value cannot be compared."""
    notes = []
    if "rouge_tokens" in metrics:
        notes.append(f"- ROUGE: F1 over {metrics['rouge_tokens']} tokens (CJK by character, other scripts by word), "
                     f"stemmer {'on' if metrics.get('rouge_stemmer') else 'off'}")
    for key in ("bleu_signature", "chrf_signature"):
        if key in metrics:
            notes.append(f"- {key.split('_')[0].upper()} signature (sacrebleu): `{metrics[key]}`")
    if "bertscore_model" in metrics:
        rescaled = f"rescaled with `{metrics['bertscore_baseline']}`" if metrics.get("bertscore_rescaled") \
            else "not rescaled"
        notes.append(f"- BERTScore: encoder `{metrics['bertscore_model']}` ({metrics['bertscore_model_path']}), "
                     f"layer {metrics['bertscore_layer']}, {rescaled}")
        if metrics.get("bertscore_warning"):
            notes.append(f"- **warning**: {metrics['bertscore_warning']}")
    if "closer_to_chosen" in metrics:
        notes.append("- closer_to_chosen: share of greedy answers whose token F1 with the chosen answer beats that "
                     "with the rejected one (a tie counts half); f1_chosen_minus_rejected: the mean F1 difference")
    if "tokens_per_s" in metrics:
        notes.append("- speed: each example's time is its share of its batch's wall time; tokens/s is generated "
                     "tokens over the total generation time")
    if "perplexity" in metrics:
        notes.append(f"- perplexity: exp(summed NLL / {metrics.get('supervised_tokens')} supervised assistant tokens)")
    if any(key.startswith("harness/") for key in metrics):
        notes.append("- harness/TASK/METRIC: lm-evaluation-harness's score (METRIC,FILTER after a named filter), "
                     "with its standard error (_stderr) and the examples scored (n)")
    return notes + ([""] if notes else [])


def classification_section(metrics: dict) -> list[str]:
    if "per_class" not in metrics:
        return []
    lines = ["## Classification", "",
             f"Majority-class baseline: {metrics['majority_baseline']:.4f} (always `{metrics['majority_class']}`); "
             f"invalid predictions (no single label found): {metrics['invalid_predictions']}.", "",
             "| label | precision | recall | f1 | support |", "| --- | --- | --- | --- | --- |"]
    for label, row in metrics["per_class"].items():
        lines.append(f"| {label} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    matrix = metrics["confusion_matrix"]
    lines += ["", "Confusion matrix (rows: reference, columns: predicted):", "",
              "| | " + " | ".join(matrix["columns"]) + " |", "|" + " --- |" * (len(matrix["columns"]) + 1)]
    for label, counts in zip(matrix["rows"], matrix["matrix"], strict=True):
        lines.append(f"| {label} | " + " | ".join(map(str, counts)) + " |")
    return lines + [""]


def examples_section(result) -> list[str]:
    records = result.predictions
    compared = {r["index"]: r for r in result.compare_predictions or []}
    lines = ["## Worst examples by ROUGE-L", ""]
    if records and "rougeL" in records[0]:
        worst = sorted(records, key=lambda r: (r["rougeL"], r["index"]))[:WORST_EXAMPLES]
        for record in worst:
            lines += _example(record, compared.get(record["index"]), result.compare)
    else:
        lines += ["(ROUGE was not computed.)", ""]
    lines += ["## Sample predictions", ""]
    for record in records[:SAMPLES]:
        lines += _example(record, compared.get(record["index"]), result.compare)
    return lines


def _example(record: dict, compared: dict | None, compare_name: str | None) -> list[str]:
    score = f" (ROUGE-L {record['rougeL']:.3f})" if "rougeL" in record else ""
    where = f" `{record['source']}`" if record.get("source") else ""
    lines = [f"### Example {record['index']}{where}{score}", ""]
    if record.get("prompt"):
        lines += ["**prompt**", "", _block(_prompt_text(record["prompt"]))]
    lines += ["**reference**", "", _block(record["reference"]), "**prediction**", "", _block(record["prediction"])]
    if compared is not None:
        lines += [f"**{compare_name}**", "", _block(compared["prediction"])]
    return lines


def _prompt_text(prompt) -> str:
    """The last user turn of a message list (the question), or the prompt text as given."""
    if isinstance(prompt, list):
        return next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
    return str(prompt)


def _block(text: str) -> str:
    return "~~~text\n" + (text.replace("~~~", "~ ~ ~") or "(empty)") + "\n~~~\n"


def _short(name: str) -> str:
    """A label for a chart or column: the last part of a path ("base (PATH)" keeps its prefix); the report's
    header gives the whole path. (A length threshold here made the label depend on where the run lives.)"""
    if name.startswith("base (") and name.endswith(")"):
        return f"base ({_short(name[6:-1])})"
    path = Path(name)
    return path.name if len(path.parts) > 1 and path.name else name


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------- charts

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(result, path: Path) -> Path | None:
    """Bars of the quality metrics, or of their deltas when comparing (BLEU and chrF divided by 100)."""
    source = result.deltas if result.compare else result.metrics
    keys = [k for k in QUALITY if _is_number(source.get(k))]
    if not keys:
        return None
    values = [source[k] / (100 if k in PERCENT_SCALE else 1) for k in keys]
    labels = [f"{k} / 100" if k in PERCENT_SCALE else k for k in keys]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(keys) + 1.5))
    colors = ["tab:green" if v >= 0 else "tab:red" for v in values] if result.compare else "tab:blue"
    ax.barh(labels, values, color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    title = f"{_short(result.model)} minus {_short(result.compare)}" if result.compare else _short(result.model)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("delta" if result.compare else "score")
    _save(plt, fig, path)
    return path


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_lengths(result, path: Path) -> Path:
    """Histograms of prediction and reference lengths (CJK characters, words of other scripts)."""
    series = {"reference": [length(r["reference"]) for r in result.predictions],
              _short(result.model): [length(r["prediction"]) for r in result.predictions]}
    if result.compare_predictions:
        series[_short(result.compare)] = [length(r["prediction"]) for r in result.compare_predictions]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(max(v, default=0) for v in series.values())
    bins = range(0, top + 2, max(1, (top + 1) // 30 + 1))
    for name, values in series.items():
        ax.hist(values, bins=bins, alpha=0.5, label=name)
    ax.set_xlabel("length (CJK characters + words)")
    ax.set_ylabel("examples")
    ax.legend()
    _save(plt, fig, path)
    return path
