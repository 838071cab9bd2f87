"""`tunesmith eval`: evaluate a model or run (optionally against its base), or score a predictions file."""

from __future__ import annotations

import json

from tunesmith.errors import UsageError


def run_eval_command(args) -> int:
    from tunesmith.evaluate.pipeline import evaluate, score_file
    from tunesmith.evaluate.report import metrics_document

    if args.predictions:
        _refuse(args, "model", "data", "compare")
        result = score_file(args.predictions, metrics=args.metrics, labels=args.labels, out=args.out,
                            jieba=args.jieba, bertscore_model=args.bertscore_model)
    else:
        if not args.model or not args.data:
            raise UsageError("give MODEL_OR_RUN and --data FILE (or --predictions FILE to score existing outputs)")
        result = evaluate(args.model, args.data, metrics=args.metrics, labels=args.labels, compare=args.compare,
                          out=args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, limit=args.limit, jieba=args.jieba,
                          bertscore_model=args.bertscore_model)
    if args.json:
        print(json.dumps({**metrics_document(result), "paths": result.paths}, indent=2, ensure_ascii=False))
    else:
        print_summary(result)
    return 0


def _refuse(args, *names: str) -> None:
    given = [name for name in names if getattr(args, name, None)]
    if given:
        flags = ", ".join("MODEL" if n == "model" else f"--{n}" for n in given)
        raise UsageError(f"--predictions scores an existing file with no model: drop {flags}")


def print_summary(result) -> None:
    """The metrics table (with the compared model and deltas) and where the report went."""
    from rich.console import Console
    from rich.table import Table

    from tunesmith.evaluate.report import LOWER_IS_BETTER, SETTINGS, fmt_delta

    console = Console()
    table = Table(title=f"{result.model} on {result.data} ({len(result.predictions)} examples)")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if result.compare_metrics is not None:
        table.add_column(result.compare, justify="right")
        table.add_column("delta", justify="right")
    for key, value in result.metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or key in SETTINGS:
            continue
        row = [key + (" ↓" if key in LOWER_IS_BETTER else ""), _fmt(value)]
        if result.compare_metrics is not None:
            row += [_fmt(result.compare_metrics.get(key)), fmt_delta(result.deltas.get(key))]
        table.add_row(*row)
    console.print(table)
    if result.paths.get("report"):
        console.print(f"report: {result.paths['report']}")
    elif result.paths.get("predictions") is None:
        console.print("(pass --out DIR for predictions.jsonl, report.md and charts)")


def _fmt(value) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.4f}"
