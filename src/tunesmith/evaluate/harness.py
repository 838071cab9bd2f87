"""Benchmarks from lm-evaluation-harness (MMLU, CMMLU, C-Eval, GSM8K, your own task YAML) on a model or run.

tunesmith loads the model (models.load: the base with the run's adapter, the run's tokenizer and chat
template) and hands the loaded objects to lm-eval's ``HFLM``, so the benchmark scores the model that
chat and serve answer with, not a fresh download of its base. HFLM does the two kinds of request:
``loglikelihood`` (multiple-choice tasks: the choice with the highest log-likelihood is the answer)
and ``generate_until`` (greedy generation, cut at the task's stop strings).

- Tasks: lm-eval names (``mmlu,gsm8k``), a task YAML file or a directory of them (what it defines
  is run: its groups, and the tasks no group of it includes). Names are checked before any model
  is loaded; an unknown one is an error with the closest names.
- Chat template: applied when the tokenizer has one (a run always carries the template it trained
  with), with the run's system prompt as lm-eval's system instruction, so a question reaches the
  model as training rendered conversations; ``chat_template=False`` scores raw text prompts.
- ``compare``: the other model (the run's base for "base") answers the same tasks, few-shot count
  and limit, with the same template choice, the run's template when it has none, and the run's
  system prompt, as pipeline.evaluate does for --data.
- Metrics: ``harness/<task>/<metric>`` as lm-eval reports them (``acc``, ``acc_norm``; a metric
  after a named filter keeps it: ``exact_match,strict-match``), ``<metric>_stderr`` and ``n`` (the
  examples scored); they go into EvalResult.metrics and so into metrics.json and report.md.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunesmith.data.prompt import ensure_template
from tunesmith.data.templates import current_template
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.evaluate.pipeline import EvalResult, compare_target, metric_deltas, report_dir
from tunesmith.evaluate.report import write_report
from tunesmith.models.load import load
from tunesmith.models.resolve import resolve
from tunesmith.output import progress_bar, verbose
from tunesmith.run import read_run_info, run_system_prompt

INSTALL = "pip install 'tunesmith[harness]'"
LIST_TASKS = "`lm-eval ls tasks` (older lm-eval: `lm-eval --tasks list`)"


@dataclass
class HarnessTasks:
    """What --harness named, resolved: lm-eval task or group names and the task manager that knows them."""

    given: list[str]
    names: list[str]
    manager: object = field(repr=False)


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UsageError(f"--harness runs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return lm_eval


# ---------------------------------------------------------------- tasks

def resolve_tasks(tasks: str | Sequence[str] | HarnessTasks) -> HarnessTasks:
    """Names, task YAML files and directories (a comma list or a list) -> checked lm-eval task names."""
    if isinstance(tasks, HarnessTasks):
        return tasks
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    given = [s.strip() for s in tasks.split(",") if s.strip()] if isinstance(tasks, str) else list(tasks)
    if not given:
        raise UsageError(f"--harness: name at least one lm-eval task (e.g. mmlu); list them with {LIST_TASKS}")
    names, include, defined, members, from_file = [], [], set(), set(), {}
    for spec in given:
        path = Path(spec).expanduser()
        if not _is_path(spec, path):
            names.append(spec)
            continue
        configs = _task_configs(path)
        own = [_task_name(cfg) for cfg in configs]
        inside = set().union(*(_group_members(cfg) for cfg in configs))
        top = [name for name in own if name not in inside] if path.is_dir() else own
        names += top
        from_file.update(dict.fromkeys(top, spec))
        include.append(path if path.is_dir() else path.parent)
        defined.update(own)
        members |= inside
    names = list(dict.fromkeys(names))
    # lm-eval's own tasks take seconds to index: only when a name (or a local group's member) needs them.
    defaults = any(name not in from_file for name in names) or bool(members - defined)
    manager = TaskManager(include_path=[str(p) for p in dict.fromkeys(include)] or None, include_defaults=defaults)
    check_names(names, manager, from_file)
    return HarnessTasks(given=given, names=names, manager=manager)


def _is_path(spec: str, path: Path) -> bool:
    if path.is_file() and path.suffix != ".yaml":
        raise UsageError(f"--harness: {spec}: lm-eval reads task files named *.yaml; rename it")
    if path.exists():
        return True
    if spec.endswith((".yaml", ".yml")) or "/" in spec or "\\" in spec:
        raise UsageError(f"--harness: {spec}: no such task file or directory")
    return False


class _TaskYaml(yaml.SafeLoader):
    """Reads a task YAML for its names only: lm-eval's ``!function`` tags are left unresolved."""


_TaskYaml.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_configs(path: Path) -> list[dict]:
    """The task and group configs in a YAML file, or in every *.yaml under a directory (as lm-eval reads them)."""
    files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
    configs = []
    for file in files:
        try:
            cfg = yaml.load(file.read_text(encoding="utf-8"), Loader=_TaskYaml)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise UsageError(f"--harness: {file}: not a readable task YAML: {first}") from None
        if isinstance(cfg, dict) and isinstance(cfg.get("group", cfg.get("task")), str):
            configs.append(cfg)
    if not configs:
        raise UsageError(f"--harness: {path}: defines no lm-eval task (a YAML with `task: NAME` or `group: NAME`)")
    return configs


def _task_name(cfg: dict) -> str:
    return cfg["group"] if "group" in cfg and "class" not in cfg else cfg["task"]


def _group_members(cfg: dict) -> set[str]:
    if "group" not in cfg or not isinstance(cfg.get("task"), list):
        return set()
    return {item if isinstance(item, str) else item.get("group", item.get("task")) for item in cfg["task"]
            if isinstance(item, str | dict)}


def check_names(names: list[str], manager, from_file: dict[str, str]) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name in known:
            continue
        if name in from_file:
            raise UsageError(f"--harness: lm-eval could not read the task '{name}' in {from_file[name]} (it skips a "
                             "task YAML it cannot parse or whose `include:` is missing); check the file")
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"--harness: unknown lm-eval task '{name}'.{hint} List the names with {LIST_TASKS}, or "
                         "give the path of a task YAML file or of a directory of them")


# ---------------------------------------------------------------- one model

def score_model(name: str, tasks: HarnessTasks, *, chat_template: bool | None, limit: int | None,
                fewshot: int | None, batch_size: int, like_run: dict | None = None,
                fallback_template: Path | None = None) -> tuple[dict, dict]:
    """lm-eval's scores for one model as harness/... metrics, and how they were produced; the model is
    freed afterwards. ``chat_template`` None: apply the tokenizer's when it has one."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    loaded = load(name)
    chat = bool(current_template(loaded.tokenizer)) if chat_template is None else chat_template
    if chat:
        ensure_template(loaded.tokenizer, fallback_template)
    run_info = like_run if like_run is not None else loaded.run_info
    system = run_system_prompt(run_info) if chat else None
    with _quiet("lm_eval.models.huggingface"):  # its warnings about a model passed as an object are ours to know
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    try:
        with _lm_eval_bars(name):
            output = simple_evaluate(model=lm, tasks=tasks.names, task_manager=tasks.manager, num_fewshot=fewshot,
                                     limit=limit, apply_chat_template=chat, fewshot_as_multiturn=chat,
                                     system_instruction=system, log_samples=False)
    except (OSError, ImportError) as exc:
        raise TunesmithError(_load_failure(tasks, exc)) from exc
    finally:
        del lm, loaded
        gc.collect()  # two models of a comparison are never in memory together
    return harness_metrics(output), {"chat_template": chat, "system_prompt": system}


# lm-eval's modules that draw tqdm bars: building each task's contexts, tokenizing, and the requests themselves.
_LM_EVAL_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _lm_eval_bars(model_name: str):
    """Unless --verbose, lm-eval's bars become one of ours: the requests it runs ("Running loglikelihood
    requests", "Running generate_until requests") show as tunesmith's progress bar (a line with an ETA in a
    log), and its short bookkeeping bars (building contexts, tokenizing) show nothing. lm-eval has no switch
    for this (simple_evaluate passes no disable_tqdm on, a task's context bar has none), so its modules'
    ``tqdm`` name is replaced for the duration of the call, and put back after."""
    if verbose():
        yield
        return
    import importlib

    modules = [importlib.import_module(m) for m in _LM_EVAL_BAR_MODULES]
    label = Path(model_name).name or model_name

    def bar(iterable=None, *args, total=None, desc=None, disable=False, **kwargs):
        if iterable is not None:
            return iterable  # a bookkeeping pass over the requests: seconds, not worth a bar
        what = (desc or "requests").removeprefix("Running ").removesuffix(" requests")
        return progress_bar(f"harness {label} ({what})", total or 0, enabled=not disable, unit="requests")

    saved = [module.tqdm for module in modules]
    for module in modules:
        module.tqdm = bar
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.tqdm = original


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_failure(tasks: HarnessTasks, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if isinstance(exc, ImportError):
        return (f"lm-eval task {', '.join(tasks.names)}: needs a package that is not installed: {first}. Install "
                "it (lm-eval's extras name them, e.g. pip install 'lm-eval[math]')")
    return (f"lm-eval could not load the data of {', '.join(tasks.names)}: {first}. lm-eval's own tasks download "
            "their datasets from the Hugging Face Hub: run once with a network (they are cached after that; "
            "HF_HUB_OFFLINE and HF_DATASETS_OFFLINE must be unset), or write a task YAML over local files "
            "(dataset_path: json with dataset_kwargs: data_files)")


def harness_metrics(output: dict) -> dict:
    """lm-eval's results table as flat metrics: harness/<task>/<metric>[,<filter>], its _stderr, and n."""
    metrics = {}
    samples = output.get("n-samples") or {}
    for task, row in output["results"].items():
        for key, value in row.items():
            metric, _, filtered = key.partition(",")
            if not filtered or not _finite(value):  # alias, name, sample_len; "N/A" stderr of a group
                continue
            metrics[f"harness/{task}/{metric if filtered == 'none' else key}"] = value
        n = (samples.get(task) or {}).get("effective")
        if isinstance(n, int):
            metrics[f"harness/{task}/n"] = n
    return metrics


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def harness_deltas(model: dict, compared: dict) -> dict:
    """Model minus compared for the scores themselves (not their standard errors or example counts)."""
    return {key: delta for key, delta in metric_deltas(model, compared).items()
            if not key.endswith(("_stderr", "/n"))}


# ---------------------------------------------------------------- the library function

def evaluate_harness(model: str, tasks: str | Sequence[str] | HarnessTasks, *, compare: str | None = None,
                     out: str | None = None, limit: int | None = None, fewshot: int | None = None,
                     batch_size: int = 8, chat_template: bool | None = None, into=None):
    """Run lm-eval ``tasks`` on ``model`` (alias, model dir or run dir), optionally against ``compare``
    ("base" or another model); return a pipeline.EvalResult and, with ``out``, write its report.

    ``limit``: the first N examples of each task. ``fewshot``: examples in each prompt (default: each
    task's own). ``into``: an EvalResult of pipeline.evaluate on the same model and ``compare``; the
    harness scores join its metrics, and its report (when it wrote one) is written again with them.
    """
    if batch_size < 1 or (limit is not None and limit < 1) or (fewshot is not None and fewshot < 0):
        raise UsageError(f"batch size and limit must be at least 1 and few-shot at least 0, not {batch_size}, "
                         f"{limit} and {fewshot}")
    out_dir = report_dir(out)
    tasks = resolve_tasks(tasks)
    compare_name = compare_target(model, compare) if compare else None  # fail before any model is loaded
    options = {"limit": limit, "fewshot": fewshot, "batch_size": batch_size}
    metrics, how = score_model(model, tasks, chat_template=chat_template, **options)
    result = into if into is not None else EvalResult(model=model, data=None, metrics={}, predictions=[])
    result.metrics.update(metrics)
    if compare_name:
        # The base answers exactly what the run answered: the run's system prompt and template choice, and its
        # template when the base has none. Another run keeps its own system prompt, as it was trained.
        loaded_run = _run_info(model) if compare == "base" else None
        other, _ = score_model(compare_name, tasks, chat_template=how["chat_template"], like_run=loaded_run,
                               fallback_template=_resolved(model), **options)
        result.compare = result.compare or (compare if compare != "base" else f"base ({compare_name})")
        result.compare_metrics = {**(result.compare_metrics or {}), **other}
        result.deltas = {**result.deltas, **harness_deltas(metrics, other)}
    result.options["harness"] = {"tasks": tasks.given, "task_names": tasks.names, **options, **how,
                                 "lm_eval_version": _lm_eval_version()}
    if out_dir:
        result.paths = write_report(result, out_dir)
    return result


def _resolved(model: str) -> Path:
    return resolve(model)


def _run_info(model: str) -> dict:
    return read_run_info(_resolved(model))


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None
