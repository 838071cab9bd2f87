"""`tunesmith eval`: evaluate a model or run (optionally against its base), or score a predictions file."""

from __future__ import annotations

from tunesmith.errors import UsageError
from tunesmith.output import fmt_number, json_stdout, print_json, print_table, stdout_console


def run_eval_command(args) -> int:
    from tunesmith.evaluate.report import metrics_document

    if args.predictions:
        _refuse(args, "model", "data", "compare")
    elif not args.model or not args.data:
        raise UsageError("give MODEL_OR_RUN and --data FILE (or --predictions FILE to score existing outputs)")
    with json_stdout(args.json):
        result = _run(args)
    if args.json:
        print_json({**metrics_document(result), "paths": result.paths})
    else:
        print_summary(result)
    return 0


def _run(args):
    from tunesmith.evaluate.pipeline import evaluate, score_file

    if args.predictions:
        return score_file(args.predictions, metrics=args.metrics, labels=args.labels, out=args.out,
                          jieba=args.jieba, bertscore_model=args.bertscore_model, encoding=args.encoding)
    return evaluate(args.model, args.data, metrics=args.metrics, labels=args.labels, compare=args.compare,
                    out=args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, limit=args.limit, jieba=args.jieba,
                    bertscore_model=args.bertscore_model, encoding=args.encoding)


def _refuse(args, *names: str) -> None:
    given = [name for name in names if getattr(args, name, None)]
    if given:
        flags = ", ".join("MODEL" if n == "model" else f"--{n}" for n in given)
        raise UsageError(f"--predictions scores an existing file with no model: drop {flags}")


def print_summary(result) -> None:
    """The metrics table (with the compared model and deltas) and where the report went."""
    from tunesmith.evaluate.report import LOWER_IS_BETTER, SETTINGS, fmt_delta

    compared = result.compare_metrics is not None
    columns = ["metric", "model"] + ([result.compare, "delta"] if compared else [])
    rows = []
    for key, value in result.metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or key in SETTINGS:
            continue
        row = [key + (" ↓" if key in LOWER_IS_BETTER else ""), fmt_number(value)]
        if compared:
            row += [fmt_number(result.compare_metrics.get(key)), fmt_delta(result.deltas.get(key))]
        rows.append(row)
    console = stdout_console()
    title = f"{result.model} on {result.data} ({len(result.predictions)} examples)"
    print_table(title, columns, rows, console, right=tuple(columns[1:]))
    if result.paths.get("report"):
        console.print(f"report: {result.paths['report']}", markup=False)
    elif result.paths.get("predictions") is None:
        console.print("(pass --out DIR for predictions.jsonl, report.md and charts)")


