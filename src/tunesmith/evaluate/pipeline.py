"""Evaluate a model or a run on a dataset, optionally against another model (its base by default).

For each model:

1. Prompts are the conversations' turns before their last assistant turn, rendered with the
   model's chat template (a run's saved template; the run's system prompt for conversations
   without one, as in training). References are those last assistant turns.
2. Predictions come from batched greedy generation (inference.generate, 64 prompts a batch unless
   ``batch_size`` says otherwise, in bf16 where the hardware has it unless ``precision="fp32"``)
   and are appended to ``predictions.jsonl`` as each batch finishes. A ``.meta.json`` beside it
   holds a fingerprint of the model weights and their dtype, prompts, references and generation
   options; a later run with the same fingerprint skips the indices already there, so an
   interrupted eval resumes where it stopped.
3. Text metrics (metrics.score), on pair data ``closer_to_chosen`` (metrics.closer_to_chosen: the answers'
   behaviour, beside preference.py's likelihoods; each record keeps its pair's ``rejected`` answer),
   generation speed (per-example time, tokens/s, outputs cut at max_new_tokens) and, unless left out, eval
   loss and perplexity over the assistant tokens. Perplexity is computed first, on the model as loaded (fp32 on a CPU, as before), so the eval loss does not
   depend on the generation precision; the model is then cast for generation.

With ``compare``, the second model sees the same conversations; its numbers, the deltas
(model minus compared) and both sets of predictions go into the report (report.py).
``score_file`` scores an existing predictions file with no model at all.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith import atomic
from tunesmith.atomic import refuse_existing
from tunesmith.data import textfiles
from tunesmith.data.conversation import Conversation
from tunesmith.data.pairs import is_preference_data, load_pairs
from tunesmith.data.prompt import ensure_template, render_prompt, with_system_prompt
from tunesmith.data.readers import load_conversations
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.evaluate.metrics import closer_to_chosen, metric_names, score
from tunesmith.evaluate.perplexity import perplexity
from tunesmith.evaluate.preference import preference_metrics
from tunesmith.evaluate.report import write_report
from tunesmith.inference import GenerationOptions, for_generation, generate, generation_dtype, precision_name
from tunesmith.models.load import load
from tunesmith.models.resolve import resolve
from tunesmith.output import progress_bar
from tunesmith.run import base_model, run_system_prompt

PERPLEXITY = "perplexity"
# Prompts generated together when batch_size is not given. With the default model on an AVX512-BF16 CPU (64 alpaca
# prompts, 128 new tokens, bf16, CPU time) 64 rows gave 2.4x the tokens/s of 8 and 1.17x that of 32; finished rows
# leave the batch, so long answers do not hold the short ones. Perplexity keeps 8: its rows are whole conversations.
GENERATION_BATCH_SIZE = 64
PERPLEXITY_BATCH_SIZE = 8
# Keys that describe a setting rather than measure the model: never in the deltas.
_NOT_MEASURES = {"n", "repetition_n", "bertscore_layer", "supervised_tokens", "examples", "pairs"}


@dataclass
class EvalSettings:
    """Everything about scoring that is the same for both models of a comparison."""

    metrics: list[str]  # text metrics for metrics.score (classification included when asked)
    perplexity: bool
    labels: list[str] | None = None
    jieba: bool = False
    bertscore_model: str | None = None
    batch_size: int = PERPLEXITY_BATCH_SIZE  # perplexity's
    generation_batch_size: int = GENERATION_BATCH_SIZE
    precision: str = "auto"  # inference.PRECISIONS
    progress: bool = True


@dataclass
class ModelEval:
    name: str  # as asked for
    path: str  # resolved directory
    metrics: dict
    predictions: list[dict]
    run_info: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    model: str
    data: str
    metrics: dict
    predictions: list[dict]
    compare: str | None = None
    compare_metrics: dict | None = None
    compare_predictions: list[dict] | None = None
    deltas: dict = field(default_factory=dict)  # metric -> model minus compared
    options: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)  # name -> written file


def evaluate(model: str, data: str | Sequence, *, metrics: Sequence[str] | str | None = None,
             labels: Sequence[str] | str | None = None, compare: str | None = None, out: str | None = None,
             batch_size: int | None = None, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             limit: int | None = None, jieba: bool = False, bertscore_model: str | None = None,
             progress: bool = True, encoding: str | None = None, precision: str = "auto") -> EvalResult:
    """Evaluate ``model`` (alias, model dir or run dir) on ``data``; see the module docstring.

    ``data``: a file or directory, a list of them, or a list of Conversation objects (files read in
    ``encoding``, default UTF-8).
    ``compare``: "base" (the run's base model) or another model or run.
    ``metrics``: names from metrics.ALL_METRICS plus "perplexity" (default: the text defaults,
    classification when labels are given, and perplexity).
    ``batch_size``: of generation and perplexity (default: GENERATION_BATCH_SIZE and PERPLEXITY_BATCH_SIZE).
    ``precision``: of generation, "auto" (bf16 where the CPU or GPU has it natively), "bf16" or "fp32".
    """
    if (batch_size is not None and batch_size < 1) or max_new_tokens < 1:
        raise UsageError(f"batch_size and max_new_tokens must be at least 1, not {batch_size} and {max_new_tokens}")
    dtype = generation_dtype(precision)  # an unknown precision fails here, before any loading
    sizes = {"batch_size": batch_size, "generation_batch_size": batch_size} if batch_size else {}
    settings = make_settings(metrics, labels, jieba=jieba, bertscore_model=bertscore_model, precision=precision,
                             progress=progress, **sizes)
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    out_dir = report_dir(out)
    pairs = read_eval_pairs(data, limit, encoding)
    # Pair data: generation is scored against the chosen answers, and preference_metrics scores both sides.
    conversations = [p.chosen_conversation() for p in pairs] if pairs else read_eval_data(data, limit, encoding)
    compare_name = compare_target(model, compare) if compare else None  # fail before any generation

    paths = {"predictions": _predictions_path(out_dir, None),
             "compare_predictions": _predictions_path(out_dir, compare) if compare else None}
    main = evaluate_model(model, conversations, options, settings, paths["predictions"], pairs=pairs)
    result = EvalResult(model=model, data=_describe_data(data), metrics=main.metrics, predictions=main.predictions,
                        options={"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                 "batch_size": settings.generation_batch_size, "limit": limit,
                                 "precision": precision_name(dtype)})
    if compare_name:
        # The base answers exactly what the run answered: the run's system prompt and max_length, and its
        # template when the base has none. Another run keeps its own, as it was trained.
        other = evaluate_model(compare_name, conversations, options, settings, paths["compare_predictions"],
                               like_run=main.run_info if compare == "base" else None, fallback_template=main.path,
                               pairs=pairs)
        result.compare = compare if compare != "base" else f"base ({compare_name})"
        result.compare_metrics, result.compare_predictions = other.metrics, other.predictions
        result.deltas = metric_deltas(main.metrics, other.metrics)
    if out_dir:
        result.paths = {name: str(path) for name, path in paths.items() if path}
        result.paths = write_report(result, out_dir)
    return result


# ---------------------------------------------------------------- settings and data

def make_settings(metrics, labels, **kwargs) -> EvalSettings:
    """Check metric and label names up front, so a typo fails before minutes of generation."""
    labels = [s.strip() for s in labels.split(",") if s.strip()] if isinstance(labels, str) else labels
    names = [s.strip() for s in metrics.split(",") if s.strip()] if isinstance(metrics, str) else metrics
    names = metric_names(names, labels, extra=(PERPLEXITY,))
    return EvalSettings(metrics=[m for m in names if m != PERPLEXITY], perplexity=PERPLEXITY in names,
                        labels=list(labels) if labels else None, **kwargs)


def read_eval_data(data, limit: int | None, encoding: str | None = None) -> list[Conversation]:
    if isinstance(data, Sequence) and not isinstance(data, str) and not data:
        raise UsageError("no evaluation data: pass a file, a list of files or a list of conversations")
    if isinstance(data, Sequence) and not isinstance(data, str) and isinstance(data[0], Conversation):
        conversations = list(data)
    else:
        conversations = load_conversations(data, encoding=encoding)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"limit must be at least 1, not {limit}")
        conversations = conversations[:limit]
    for conv in conversations:
        if conv.is_text or not any(m.role == "assistant" for m in conv.messages):
            raise TunesmithError(f"{conv.where}: messages: no assistant turn to use as the reference "
                                 "(evaluation needs prompt/answer pairs, not plain text)")
    return conversations


def read_eval_pairs(data, limit: int | None, encoding: str | None = None) -> list | None:
    """Preference pairs when ``data`` names pair files, else None (read as conversations)."""
    if isinstance(data, Sequence) and not isinstance(data, str) and not all(isinstance(d, str | os.PathLike)
                                                                             for d in data):
        return None  # conversations given directly
    if not is_preference_data(data, encoding=encoding):
        return None
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")
    pairs = load_pairs(data, encoding=encoding)
    return pairs[:limit] if limit is not None else pairs


def report_dir(out: str | os.PathLike | None) -> Path | None:
    """The report directory, refused up front when the path is taken by a file (or runs through one)."""
    if out is None:
        return None

    refuse_existing(out, overwrite=True, directory=True)  # an existing report directory is resumed, not refused
    return Path(out)


def _describe_data(data) -> str:
    if isinstance(data, str | os.PathLike):
        return str(data)
    if data and isinstance(data[0], Conversation):
        return f"{len(data)} conversations" + (f" from {data[0].source}" if data[0].source else "")
    return ", ".join(map(str, data))


def compare_target(model: str, compare: str) -> str:
    """The model to compare against: ``compare`` itself, or for "base" the base model of the run ``model``."""
    if compare != "base":
        return compare

    base = base_model(resolve(model))
    if not base:
        raise UsageError(f"--compare base needs a run directory (tunesmith.json naming its base_model) or a peft "
                         f"adapter; {model} is a plain model: name the model to compare with instead")
    return str(base)


def _predictions_path(out: Path | None, compare: str | None) -> Path | None:
    if out is None:
        return None
    name = "predictions.jsonl" if compare is None else \
        "predictions.base.jsonl" if compare == "base" else "predictions.compare.jsonl"
    return out / name


# ---------------------------------------------------------------- one model

def evaluate_model(name: str, conversations: list[Conversation], options: GenerationOptions, settings: EvalSettings,
                   predictions_path: Path | None, *, like_run: dict | None = None,
                   fallback_template: Path | None = None, pairs: list | None = None) -> ModelEval:
    """Measure perplexity (when asked) and preference metrics (with pairs) on the model as loaded, then generate
    in the settings' precision and score; the model is freed afterwards.

    ``like_run``: the tunesmith.json whose system prompt and max_length to use (default: the model's own)."""
    import torch

    loaded = load(name, dtype=torch.float32 if settings.precision == "fp32" else None)
    ensure_template(loaded.tokenizer, fallback_template)
    run_info = like_run if like_run is not None else loaded.run_info
    conversations = with_system_prompt(conversations, run_system_prompt(run_info))
    metrics = {}
    if settings.perplexity:
        # Cut as training cut (the run's max_length, else the model's context; the prompt first): the eval loss
        # is then the one training validated with. The report counts what was cut.
        result = perplexity(loaded.model, loaded.tokenizer, conversations, batch_size=settings.batch_size,
                            max_length=run_info.get("max_length") or context_length(loaded.model),
                            progress=settings.progress)
        metrics.update(eval_loss=result.eval_loss, perplexity=result.perplexity,
                       supervised_tokens=result.supervised_tokens)
    if pairs:
        metrics.update(preference_metrics(loaded, pairs, system_prompt=run_system_prompt(run_info),
                                          max_length=run_info.get("max_length") or context_length(loaded.model),
                                          batch_size=settings.batch_size, progress=settings.progress))
    loaded.model = for_generation(loaded.model, settings.precision)  # freed afterwards: changed in place
    predictions = generate_predictions(loaded, conversations, options, settings, predictions_path, name)
    for record, pair in zip(predictions, pairs, strict=True) if pairs else ():  # the conversations' order
        record["rejected"] = pair.rejected_conversation().reference()
    metrics = {**score_predictions(predictions, settings), **generation_stats(predictions), **metrics,
               **behaviour_metrics(predictions, settings)}
    if predictions_path:
        write_predictions(predictions_path, predictions)  # again, now in order and with per-example ROUGE-L
    model_eval = ModelEval(name, str(loaded.path), metrics, predictions, loaded.run_info)
    del loaded
    gc.collect()  # two models of a comparison are never in memory together
    return model_eval


# ---------------------------------------------------------------- generation with resume

def generate_predictions(loaded, conversations: list[Conversation], options: GenerationOptions,
                         settings: EvalSettings, path: Path | None, label: str) -> list[dict]:
    """One record per conversation; streamed to ``path`` and resumed from it when its fingerprint matches."""
    # The system prompt is already in the conversations (the run's, or the compared run's for its base).
    prompts = [render_prompt(loaded.tokenizer, conv.prompt()) for conv in conversations]
    check_context(loaded, conversations, prompts, options)
    references = [conv.reference() for conv in conversations]
    done = _open_predictions(path, model_fingerprint(loaded, prompts, references, options)) if path else {}
    todo = [i for i in range(len(conversations)) if i not in done]
    sink = path.open("a", encoding="utf-8") if path else None
    try:
        with progress_bar(f"generating ({label})", len(conversations), enabled=settings.progress, done=len(done),
                          unit="answers", keep=True) as bar:

            def on_result(k: int, generation) -> None:
                i = todo[k]
                done[i] = _record(i, conversations[i], prompts[i], generation)
                if sink:
                    sink.write(json.dumps(done[i], ensure_ascii=False) + "\n")
                    sink.flush()  # an interruption loses at most the batch in flight

            generate(loaded.model, loaded.tokenizer, [prompts[i] for i in todo], options,
                     batch_size=settings.generation_batch_size, on_result=on_result, progress=bar.update)
    finally:
        if sink:
            sink.close()
    return [done[i] for i in range(len(conversations))]


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_context(loaded, conversations: list[Conversation], prompts: list[str], options: GenerationOptions) -> None:
    """Every prompt must leave room for the answer in the model's context: a longer one would fail deep in
    the model (or ask for terabytes of attention), so it is named here, before any generation."""
    context = context_length(loaded.model)
    if not context:
        return
    too_long = []
    for conv, prompt in zip(conversations, prompts, strict=True):
        n = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n + options.max_new_tokens > context:
            too_long.append(f"{conv.where}: messages: the prompt is {n} tokens; with --max-new-tokens "
                            f"{options.max_new_tokens} that exceeds the model's context of {context} tokens")
    if too_long:
        listed = "\n  ".join(too_long[:20]) + (f"\n  ... and {len(too_long) - 20} more" if len(too_long) > 20 else "")
        raise TunesmithError(f"{len(too_long)} example(s) do not fit the model's context:\n  {listed}\n"
                             "Shorten them, leave them out of the evaluation data, or lower --max-new-tokens.")


def _record(index: int, conv: Conversation, prompt: str, generation) -> dict:
    return {"index": index, "prompt": conv.prompt_messages(), "prediction": generation.text,
            "reference": conv.reference(), "latency_s": generation.latency_s,
            "completion_tokens": generation.completion_tokens, "prompt_tokens": generation.prompt_tokens,
            "finish_reason": generation.finish_reason, "source": conv.where, "rendered_prompt": prompt}


def model_fingerprint(loaded, prompts: list[str], references: list[str], options: GenerationOptions) -> str:
    """A hash of what decides the predictions: weights (by name, size, mtime), the dtype they run in, prompts,
    references, options."""
    digest = hashlib.sha256()
    for folder in dict.fromkeys([Path(loaded.path), Path(loaded.base_path)]):
        for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            stat = file.stat()
            digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    digest.update(json.dumps([prompts, references, options.max_new_tokens, options.temperature, options.top_p,
                              list(options.stop), precision_name(loaded.model.dtype)], ensure_ascii=False).encode())
    return digest.hexdigest()


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")


def _open_predictions(path: Path, fingerprint: str) -> dict[int, dict]:
    """Records already in ``path`` when it was written with ``fingerprint``; otherwise start it afresh."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = _meta_path(path)
    same = meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint
    done = _read_records(path) if same and path.is_file() else {}
    if path.is_file() and not same:
        print(f"note: {path} was written for another model, data or generation options; starting it again",
              file=sys.stderr)
    elif done:
        print(f"resuming: {len(done)} predictions already in {path}", file=sys.stderr)
    write_predictions(path, list(done.values()))  # drops a line cut short by the interruption
    atomic.write_text(meta, json.dumps({"fingerprint": fingerprint}) + "\n")
    return done


def _read_records(path: Path) -> dict[int, dict]:
    done = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of an interrupted write; it is generated again
            continue
        if isinstance(record, dict) and isinstance(record.get("index"), int):
            done[record["index"]] = record
    return done


def write_predictions(path: Path, records: list[dict]) -> None:
    """Atomically (temp file, rename): a crash never leaves a half-written predictions file."""
    ordered = sorted(records, key=lambda r: r.get("index", 0))
    atomic.write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in ordered))


# ---------------------------------------------------------------- scoring

def score_predictions(records: list[dict], settings: EvalSettings) -> dict:
    """Text metrics over the records; adds each record's ROUGE-L for the report's worst examples.

    Classification compares against a record's ``label`` when it has one, else its reference text.
    """
    predictions = [r["prediction"] for r in records]
    references = [r["reference"] for r in records]
    result = score(predictions, references, metrics=settings.metrics, labels=settings.labels,
                   gold=[r.get("label", r["reference"]) for r in records], jieba=settings.jieba,
                   bertscore_model=settings.bertscore_model, per_example=True)
    rows = result.pop("rouge_per_example", None)  # ROUGE is the slowest metric: computed once
    if rows is not None:
        for record, row in zip(records, rows, strict=True):
            record["rougeL"] = row["rougeL"]
    return result


def behaviour_metrics(records: list[dict], settings: EvalSettings) -> dict:
    """closer_to_chosen when every record holds its pair's rejected answer (its reference is the chosen one)."""
    if not all(isinstance(r.get("rejected"), str) for r in records):
        return {}
    return closer_to_chosen([r["prediction"] for r in records], [r["reference"] for r in records],
                            [r["rejected"] for r in records], jieba=settings.jieba)


def generation_stats(records: list[dict]) -> dict:
    """Speed from the measured per-example times (each one's share of its batch's wall time)."""
    latencies = [r["latency_s"] for r in records]
    tokens = sum(r["completion_tokens"] for r in records)
    total = sum(latencies)
    return {
        "generated_tokens": tokens,
        "generation_time_s": total,
        "tokens_per_s": tokens / total if total > 0 else None,
        "latency_mean_s": statistics.fmean(latencies),
        "latency_p50_s": statistics.median(latencies),
        "latency_p90_s": _percentile(latencies, 0.9),
        "truncated_predictions": sum(r.get("finish_reason") == "length" for r in records),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def metric_deltas(model: dict, compared: dict) -> dict:
    """Model minus compared, for every number both have (settings such as n are left out)."""
    def numeric(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return {key: model[key] - compared[key] for key in model
            if key not in _NOT_MEASURES and numeric(model[key]) and numeric(compared.get(key))}


# ---------------------------------------------------------------- existing predictions

def read_predictions_file(path: str | Path, encoding: str | None = None) -> list[dict]:
    """Records from a JSONL of ``prediction`` and ``reference`` strings (``label`` optional)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a predictions .jsonl file")
    if not path.is_file():
        raise UsageError(f"predictions file not found: {path}")
    records = []
    for number, line in enumerate(textfiles.lines(textfiles.read_text(path, encoding)), start=1):
        if not line.strip():
            continue
        records.append(_parse_prediction_line(path, number, line, len(records)))
    if not records:
        raise TunesmithError(f"{path}: no predictions (expected one JSON object per line)")
    return records


def _parse_prediction_line(path: Path, number: int, line: str, index: int) -> dict:
    try:
        record = textfiles.loads(line)
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise TunesmithError(f"{path}:{number}: not valid JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise TunesmithError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    repeated = textfiles.duplicate_keys(record)
    if repeated:
        raise TunesmithError(f"{path}:{number}: field '{repeated[0]}': appears twice in one object; JSON keeps "
                             "only the last value. Remove one")
    for name, required in (("prediction", True), ("reference", True), ("label", False)):
        if name not in record:
            if required:
                raise TunesmithError(f"{path}:{number}: field '{name}': missing")
        elif not isinstance(record[name], str):
            raise TunesmithError(f"{path}:{number}: field '{name}': expected a string, got "
                                 f"{type(record[name]).__name__}")
    return {"index": index, **{k: v for k, v in record.items() if k != "index"}, "line": number}


def score_file(path: str | Path, *, metrics=None, labels=None, out: str | None = None, jieba: bool = False,
               bertscore_model: str | None = None, encoding: str | None = None) -> EvalResult:
    """Score an existing predictions file (from tunesmith or any other system); no model is loaded."""
    settings = make_settings(metrics, labels, jieba=jieba, bertscore_model=bertscore_model)
    report_dir(out)
    if settings.perplexity and metrics is not None:
        raise UsageError("perplexity needs a model: it cannot be computed from a predictions file")
    settings.perplexity = False
    records = read_predictions_file(path, encoding)
    metrics_out = {**score_predictions(records, settings), **behaviour_metrics(records, settings)}
    if all(isinstance(r.get("latency_s"), int | float) and isinstance(r.get("completion_tokens"), int)
           for r in records):
        metrics_out.update(generation_stats(records))
    result = EvalResult(model=str(path), data=str(path), metrics=metrics_out, predictions=records)
    if out:
        result.paths = write_report(result, Path(out))
    return result
