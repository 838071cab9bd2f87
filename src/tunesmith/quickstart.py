"""`tunesmith quickstart`: the whole journey on the embedded default model, in minutes on a CPU.

1. fetch the default model (once; later runs read the cache),
2. write a small identity dataset (English and Chinese) with the chosen name and author,
   holding some phrasings out for evaluation,
3. run the data doctor on it,
4. fine-tune with LoRA (printed as the equivalent `tunesmith train` command),
5. evaluate base against tuned on the held-out questions,
6. show both answers side by side, and where everything is.
"""

from __future__ import annotations

import json
import shlex
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunesmith.config import DEFAULT_MODEL, load_config
from tunesmith.data.doctor import check_data, print_report
from tunesmith.evaluate.pipeline import evaluate
from tunesmith.models.resolve import resolve
from tunesmith.output import fmt_delta, fmt_number, stdout_console
from tunesmith.train.loop import finetune, prepare_run


def write_identity_data(out_dir: Path, name: str, author: str) -> tuple[Path, Path]:
    """Fill the packaged identity questions with ``name`` and ``author``: train and held-out files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for asset in ("identity.jsonl", "identity_eval.jsonl"):
        text = resources.files("tunesmith.assets").joinpath(asset).read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        for row in rows:
            row["output"] = row["output"].format(name=name, author=author)
        path = out_dir / asset
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


# The quickstart decides its system prompt: left to the template, SmolLM2's inserts "You are a helpful AI
# assistant named SmolLM, trained by Hugging Face" into every training example, and the run would carry that
# name into chat, serve and the Ollama Modelfile against the identity it was taught. It names no identity, so
# the base model, asked with the same prompt, shows what it knew before.
SYSTEM_PROMPT = "You are a helpful AI assistant."


def train_overrides(model: str, train_file: Path, eval_file: Path, run_dir: Path,
                    max_steps: int | None) -> dict[str, str]:
    """The train flags (name -> value) that give both the printed command and the Config.

    No hyperparameter here: the quickstart trains with `tunesmith train`'s own defaults, which the
    run plan sizes to the data, so the main job proves the defaults a user gets with their own file. The
    system prompt is set (SYSTEM_PROMPT): it belongs to the data, as a user's own would."""
    overrides = {"model": model, "data": str(train_file), "output-dir": str(run_dir), "output.overwrite": "true",
                 "eval-data": str(eval_file), "data.system_prompt": SYSTEM_PROMPT}
    return {**overrides, "max-steps": str(max_steps)} if max_steps else overrides


def quickstart(name: str = "Aurora", author: str = "the tunesmith community", out: str | None = None,
               model: str | None = None, max_steps: int | None = None) -> Path:
    console = stdout_console()  # in a file or a pipe, a printed command stays one line
    started = time.perf_counter()
    model = model or DEFAULT_MODEL
    run_dir = Path(out or f"runs/quickstart-{name.lower()}").resolve()
    console.rule(f"[bold]tunesmith quickstart[/bold]: teach {model} that it is {name}, made by {author}")
    console.print(f"model: {resolve(model)}")

    train_file, eval_file = write_identity_data(run_dir.parent / f"{run_dir.name}-data", name, author)
    console.rule("1. data doctor")
    report = check_data([str(train_file)], model=model, eval_files=[str(eval_file)])
    print_report(report, console=console)
    if report.errors:
        raise SystemExit(1)

    console.rule("2. fine-tune (LoRA)")
    overrides = train_overrides(model, train_file, eval_file, run_dir, max_steps)
    args = [word for flag, value in overrides.items() for word in (f"--{flag}", value)]
    console.print("equivalent command:\n  [cyan]tunesmith train " + shlex.join(args) + "[/cyan]")
    config = load_config(None, [f"{flag}={value}" for flag, value in overrides.items()])
    run = prepare_run(config)
    console.print("run plan (chosen from the data; every value can be set by hand):")
    for line in run.plan.lines():
        console.print(f"  {line}", highlight=False, markup=False)
    result = finetune(config, run)
    train_loss, before, after = (fmt_number(v, 3, "n/a") for v in (result.final_train_loss, result.initial_eval_loss,
                                                                   result.final_eval_loss))
    console.print(f"trained {result.steps} steps in {result.elapsed_s:.0f} s: train loss {train_loss}, "
                  f"held-out eval loss {before} -> {after}")
    for warning in result.warnings:
        console.print(f"[yellow]WARNING: {warning}[/yellow]")

    console.rule("3. evaluate base against tuned on held-out questions")
    evaluation = evaluate(str(result.run_dir), str(eval_file), compare="base", out=str(run_dir / "eval"),
                          max_new_tokens=64, metrics=["rouge", "chrf", "exact_match", "perplexity"])
    _print_metrics(console, evaluation)
    _print_side_by_side(console, evaluation, name)
    _print_next_steps(console, result, run_dir, time.perf_counter() - started)
    return run_dir


def _print_metrics(console: Console, evaluation) -> None:
    table = Table(title="held-out metrics")
    for column in ("metric", "base", "tuned", "delta"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in ("rougeL", "chrf", "exact_match", "perplexity"):
        tuned, base = evaluation.metrics.get(key), evaluation.compare_metrics.get(key)
        if isinstance(tuned, (int, float)) and isinstance(base, (int, float)):
            table.add_row(key, fmt_number(base, 3), fmt_number(tuned, 3), fmt_delta(tuned - base, 3))
    console.print(table)


def _print_side_by_side(console: Console, evaluation, name: str) -> None:
    tuned, base = evaluation.predictions, evaluation.compare_predictions
    table = Table(title="held-out questions: base | tuned", show_lines=True)
    # fold: Chinese text has no spaces to wrap at, and would otherwise be cut off.
    table.add_column("question", ratio=2, overflow="fold")
    table.add_column("base model", ratio=3, overflow="fold")
    table.add_column("tuned model", ratio=3, overflow="fold")
    hits = {"base": 0, "tuned": 0}
    for t, b in zip(tuned, base, strict=True):
        hits["tuned"] += name.lower() in t["prediction"].lower()
        hits["base"] += name.lower() in b["prediction"].lower()
        table.add_row(_last_user(t["prompt"]), _clip(b["prediction"]), _clip(t["prediction"]))
    console.print(table)
    console.print(f"answers naming {name}: base {hits['base']}/{len(base)}, tuned {hits['tuned']}/{len(tuned)}")


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _last_user(prompt) -> str:
    if isinstance(prompt, list):
        return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    return str(prompt)


def _print_next_steps(console: Console, result, run_dir: Path, elapsed: float) -> None:
    console.rule("done")
    console.print(f"run:     {run_dir}")
    console.print(f"adapter: {run_dir / 'adapter_model.safetensors'}")
    console.print(f"report:  {run_dir / 'eval' / 'report.md'}")
    console.print(f"time:    {elapsed / 60:.1f} min")
    console.print("next:")
    for cmd in (f'tunesmith generate {run_dir} --prompt "Who are you?"', f"tunesmith chat {run_dir}",
                f"tunesmith serve {run_dir} --port 8000",
                f"tunesmith export {run_dir} --gguf --dtype q8_0 --out {run_dir.name}.gguf"):
        console.print(f"  [cyan]{cmd}[/cyan]")
