"""`tunesmith eval`: evaluate a model or run on data and/or lm-eval tasks (optionally against its base), or
score a predictions file."""

from __future__ import annotations

from tunesmith.errors import UsageError
from tunesmith.evaluate.harness import evaluate_harness, resolve_tasks
from tunesmith.evaluate.pipeline import evaluate, score_file
from tunesmith.evaluate.report import SETTINGS, behaviour_warning, lower_is_better, metrics_document
from tunesmith.evaluate.rewards import evaluate_rewards
from tunesmith.output import fmt_delta, fmt_number, json_stdout, print_json, print_table, stdout_console


def run_eval_command(args) -> int:
    if args.predictions:
        _refuse(args, "model", "data", "compare", "harness")
    elif not args.model or not (args.data or args.harness):
        raise UsageError("give MODEL_OR_RUN and --data FILE and/or --harness TASKS (or --predictions FILE to score "
                         "existing outputs)")
    _check_harness_flags(args)
    with json_stdout(args.json):
        result = _run(args)
    if args.json:
        print_json({**metrics_document(result), "paths": result.paths})
    else:
        print_summary(result)
    return 0


def _run(args):
    if getattr(args, "reward", None):
        return _run_rewards(args)
    if getattr(args, "samples", 1) != 1:
        raise UsageError("--samples is for --reward (pass@K of a reward function)")
    if args.predictions:
        return score_file(args.predictions, metrics=args.metrics, labels=args.labels, out=args.out,
                          jieba=args.jieba, bertscore_model=args.bertscore_model, encoding=args.encoding)
    tasks = None
    if args.harness:
        tasks = resolve_tasks(args.harness)  # a task name's typo fails before minutes of generation
    result = None
    if args.data:
        result = evaluate(args.model, args.data, metrics=args.metrics, labels=args.labels, compare=args.compare,
                          out=args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, limit=args.limit, jieba=args.jieba,
                          bertscore_model=args.bertscore_model, encoding=args.encoding, precision=args.precision)
    if tasks:
        result = evaluate_harness(args.model, tasks, compare=args.compare, out=args.out, limit=args.harness_limit,
                                  fewshot=args.harness_fewshot, batch_size=args.batch_size or 8,
                                  chat_template=args.harness_chat_template, into=result)
    return result


def _run_rewards(args):
    if not args.data or args.predictions or args.harness or args.metrics:
        raise UsageError("--reward scores a model's answers to the prompts of --data: give MODEL_OR_RUN and --data "
                         "PROMPTS, without --predictions, --harness or --metrics")
    return evaluate_rewards(args.model, args.data, args.reward, compare=args.compare, out=args.out,
                            samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, batch_size=args.batch_size, limit=args.limit, encoding=args.encoding,
                            precision=args.precision)


def _refuse(args, *names: str) -> None:
    given = [name for name in names if getattr(args, name, None)]
    if given:
        flags = ", ".join("MODEL" if n == "model" else f"--{n}" for n in given)
        raise UsageError(f"--predictions scores an existing file with no model: drop {flags}")


def _check_harness_flags(args) -> None:
    """The lm-eval options need --harness; --data's own options need --data (--limit is not --harness-limit)."""
    harness_only = {"--harness-limit": args.harness_limit, "--harness-fewshot": args.harness_fewshot,
                    "--harness-chat-template": args.harness_chat_template}
    given = [flag for flag, value in harness_only.items() if value is not None]
    if given and not args.harness:
        raise UsageError(f"{', '.join(given)}: for lm-eval tasks only; add --harness TASKS")
    if args.harness and not args.data and not args.predictions:
        data_only = [flag for flag, value in (("--limit", args.limit), ("--metrics", args.metrics),
                                              ("--labels", args.labels)) if value is not None]
        if data_only:
            raise UsageError(f"{', '.join(data_only)}: for --data only; lm-eval tasks take --harness-limit "
                             "and have their own metrics")


def print_summary(result) -> None:
    """The metrics table (with the compared model and deltas) and where the report went."""
    compared = result.compare_metrics is not None
    columns = ["metric", "model"] + ([result.compare, "delta"] if compared else [])
    rows = []
    for key, value in result.metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or key in SETTINGS:
            continue
        row = [key + (" ↓" if lower_is_better(key) else ""), fmt_number(value)]
        if compared:
            row += [fmt_number(result.compare_metrics.get(key)), fmt_delta(result.deltas.get(key))]
        rows.append(row)
    console = stdout_console()
    sources = [f"{result.data} ({len(result.predictions)} examples)"] if result.data is not None else []
    if "harness" in result.options:
        sources.append("lm-eval " + ", ".join(result.options["harness"]["tasks"]))
    title = f"{result.model} on {' and '.join(sources)}"
    print_table(title, columns, rows, console, right=tuple(columns[1:]))
    warning = behaviour_warning(result.deltas)
    if warning:
        console.print(f"warning: {warning}", markup=False)
    if result.paths.get("report"):
        console.print(f"report: {result.paths['report']}", markup=False)
    elif result.paths.get("predictions") is None:
        console.print("(pass --out DIR for predictions.jsonl, report.md and charts)")


