"""Prompts without answers: what GRPO samples completions for and ``eval --reward`` scores.

Layouts, detected per row from its keys:

    prompt              a string, or a list of messages {role, content} ending with a user turn (TRL's layout)
    messages            OpenAI messages ending with a user turn (sharegpt ``conversations`` too)
    instruction         alpaca: instruction, [input], [system], [history]; no ``output`` needed

Files are read as every other dataset (readers.py: JSON, JSONL, CSV, Parquet, directories, saved
datasets). Every other column of a row (``answer``, ``solution``, ``tests``, ...) is kept in
``PromptRow.fields`` for the reward functions, which get each such column as a list. A row whose
prompt cannot be read is a ``DataIssue`` naming the file, line and field; none is silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from tunesmith.config import DEFAULT_MODEL
from tunesmith.data import textfiles
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.readers import (
    OPENAI,
    SHAREGPT,
    DataError,
    DataIssue,
    Dialect,
    Row,
    _history,
    _role_order_problem,
    _string,
    _structured,
    _tools,
    _turn,
    _type,
    file_rows,
    input_files,
    parse_columns,
)
from tunesmith.data.templates import apply_template
from tunesmith.data.tokenize import generation_prompt
from tunesmith.errors import UsageError
from tunesmith.models.load import load_tokenizer
from tunesmith.models.resolve import resolve

# The keys that make up the prompt in each layout; everything else in a row is a field for the rewards.
PROMPT_KEYS = {"prompt": {"prompt", "system", "tools"}, "messages": {"messages", "system", "tools"},
               "conversations": {"conversations", "system", "tools"},
               "instruction": {"instruction", "input", "system", "history"}}


@dataclass
class PromptRow:
    """One prompt (a conversation ending with the user's turn) and the row's other fields."""

    conversation: Conversation
    fields: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return self.conversation.where

    @property
    def text(self) -> str:
        """The prompt as reward functions get it: the last user turn's text."""
        return next(m.content for m in reversed(self.conversation.messages) if m.role == "user")


@dataclass
class PromptResult:
    prompts: list[PromptRow]
    issues: list[DataIssue]
    formats: dict[str, str]
    num_rows: int = 0

    @property
    def errors(self) -> list[DataIssue]:
        return [i for i in self.issues if i.severity == "error"]


def prompt_layout(keys) -> str | None:
    keys = set(keys)
    return next((layout for layout in ("prompt", "messages", "conversations", "instruction") if layout in keys), None)


def _from_messages(row: Row, turns, key: str, dialect: Dialect) -> Conversation | None:
    if not isinstance(turns, list) or not turns:
        row.error(key, "missing" if turns is None else f"expected a non-empty list of messages, got {_type(turns)}")
        return None
    messages = [_turn(row, turn, f"{key}[{i}]", dialect) for i, turn in enumerate(turns)]
    system = _string(row, "system", required=False) or None
    tools = _tools(row)
    if row.failed:
        return None
    offset = 0
    if messages[0].role == "system" and system is None:
        system, messages, offset = messages[0].content, messages[1:], 1
    problem = _role_order_problem(messages) if messages else (0, "only a system message: nothing to answer")
    if problem:
        row.error(f"{key}[{problem[0] + offset}].{dialect.role_key}", problem[1])
    elif messages[-1].role != "user":
        row.error(f"{key}[{len(messages) - 1 + offset}].{dialect.role_key}",
                  f"the prompt's last turn is the {messages[-1].role}'s; a prompt to sample answers for must end with "
                  "the user's turn (drop the answer, or keep it in another column such as `answer` for the reward)")
    for i, message in enumerate(messages):
        if message.role == "user" and not message.content.strip():
            row.error(f"{key}[{i + offset}].{dialect.content_key}", "empty user message")
    if row.failed:
        return None
    return Conversation(messages, system=system, tools=tools, source=row.file, line=row.line)


def _prompt_conversation(row: Row, layout: str) -> Conversation | None:
    if layout == "prompt":
        raw = row.data.get("prompt")
        # A table (CSV) holds a list of messages as its JSON text.
        value = _structured(row, "prompt") if isinstance(raw, str) and raw.lstrip().startswith("[") else raw
        if isinstance(value, list):
            return _from_messages(row, value, "prompt", OPENAI)
        text = _string(row, "prompt", required=True)
        system = _string(row, "system", required=False) or None
        return None if row.failed else Conversation([Message("user", text)], system=system, source=row.file,
                                                    line=row.line)
    if layout in ("messages", "conversations"):
        dialect = OPENAI if layout == "messages" else SHAREGPT
        return _from_messages(row, _structured(row, layout), layout, dialect)
    instruction = _string(row, "instruction", required=True)
    query = _string(row, "input", required=False)
    system = _string(row, "system", required=False) or None
    history = _history(row)
    if row.failed:
        return None
    user = instruction + ("\n" + query if query else "")
    return Conversation([*history, Message("user", user)], system=system, source=row.file, line=row.line)


def _parse_row(row: Row) -> PromptRow | None:
    if row.failed:
        return None
    layout = prompt_layout(row.data)
    if layout is None:
        row.error("(columns)", f"no prompt among the columns {sorted(row.data)}: expected `prompt` (a string or "
                  "messages), `messages` ending with a user turn, or alpaca's `instruction`; rename with "
                  "--columns prompt=COLUMN")
        return None
    conv = _prompt_conversation(row, layout)
    if conv is None:
        return None
    fields = {k: v for k, v in row.data.items() if k not in PROMPT_KEYS[layout]}
    return PromptRow(conv, fields)


def read_prompts(paths, *, columns: str | dict | None = None, encoding: str | None = None) -> PromptResult:
    """Every row of every file as a prompt; collect every problem instead of stopping at the first."""
    mapping = parse_columns(columns)
    encoding = textfiles.check_encoding(encoding)
    result = PromptResult([], [], {})
    for path in input_files(paths):
        rows = file_rows(path, mapping, result, encoding)
        result.num_rows += len(rows)
        layouts = {layout for r in rows if (layout := prompt_layout(r.data))}
        result.formats[str(path)] = "+".join(sorted(layouts)) or "unknown"
        for row in rows:
            parsed = _parse_row(row)
            result.issues += row.issues
            if parsed is not None:
                result.prompts.append(parsed)
    _check_fields(result)
    return result


def _check_fields(result: PromptResult) -> None:
    """Reward functions get each field as a list over the batch: a row missing a field the others have would
    hand them a None, so it is named here instead."""
    if not result.prompts:
        return
    every = set().union(*(p.fields for p in result.prompts))
    for p in result.prompts:
        for name in sorted(every - set(p.fields)):
            result.issues.append(DataIssue(p.conversation.source, p.conversation.line, name,
                                           "missing here but present in other rows (reward functions get every "
                                           "field for every row)"))


def load_prompts(paths, *, columns: str | dict | None = None, encoding: str | None = None) -> list[PromptRow]:
    """Prompts for GRPO training or reward evaluation: any error in the data raises DataError listing them all."""
    result = read_prompts(paths, columns=columns, encoding=encoding)
    if result.errors:
        raise DataError(result.errors)
    if not result.prompts:
        raise DataError([DataIssue(str(paths), -1, "(rows)", "no prompts found")])
    return result.prompts



# ---------------------------------------------------------------- `tunesmith data check` on prompts

ANSWER_KEYS = {"completion", "output", "chosen", "rejected", "preferred_output", "non_preferred_output"}


def is_prompt_data(paths, *, columns: str | dict | None = None, encoding: str | None = None) -> bool:
    """Whether every row is a prompt without an answer to imitate (GRPO's data), so the check reports prompts.
    Paths that name no data files are not prompt data: the data doctor reports them."""
    result = PromptResult([], [], {})
    try:
        files = input_files(paths)
    except UsageError:
        return False
    rows = [row for path in files for row in file_rows(path, parse_columns(columns), result, encoding)]
    return bool(rows) and all(_unanswered(row.data) for row in rows)


def _unanswered(data: dict) -> bool:
    layout = prompt_layout(data)
    if layout is None or ANSWER_KEYS & set(data):
        return False
    turns = data.get(layout) if layout in ("messages", "conversations") else None
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
        role = turns[-1].get("role", turns[-1].get("from"))
        return role in ("user", "human")
    return True


def check_prompts(paths, *, model: str | None = None, template: str | None = None, max_length: int | None = None,
                  columns: str | dict | None = None, encoding: str | None = None, tokens: bool = True) -> dict:
    """The prompt data's report: rows and errors, fields, exact duplicates, prompt token lengths (rendered with the
    template's generation prompt, as GRPO trains) and the prompts over ``max_length``."""
    result = read_prompts(paths, columns=columns, encoding=encoding)
    seen: dict[str, list[str]] = {}
    for row in result.prompts:
        seen.setdefault(json.dumps(row.conversation.to_messages(), ensure_ascii=False), []).append(row.where)
    report = {"kind": "prompts", "ok": not result.errors, "files": [str(p) for p in input_files(paths)],
              "formats": result.formats, "num_examples": result.num_rows, "num_valid": len(result.prompts),
              "errors": [i.to_dict() for i in result.errors], "fields": sorted({k for r in result.prompts
                                                                                for k in r.fields}),
              "duplicates": [{"kind": "exact", "rows": rows} for rows in seen.values() if len(rows) > 1],
              "token_lengths": None, "over_max_length": None, "max_length": max_length}
    if tokens and result.prompts:
        tokenizer = _tokenizer(model, template)
        lengths = np.array([len(tokenizer(generation_prompt(r.conversation, tokenizer),
                                          add_special_tokens=False)["input_ids"]) for r in result.prompts])
        report["token_lengths"] = {"p50": int(np.percentile(lengths, 50)), "p90": int(np.percentile(lengths, 90)),
                                   "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}
        if max_length:
            report["over_max_length"] = [r.where for r, n in zip(result.prompts, lengths, strict=True)
                                         if n > max_length]
    return report


def _tokenizer(model: str | None, template: str | None):
    tokenizer = load_tokenizer(resolve(model or DEFAULT_MODEL))
    apply_template(tokenizer, template)
    return tokenizer


def prompt_report_lines(report: dict) -> list[str]:
    lines = [f"data check (prompts) {', '.join(f'{p} ({f})' for p, f in report['formats'].items())}",
             f"prompts {report['num_examples']}, valid {report['num_valid']}; fields for the rewards: "
             f"{', '.join(report['fields']) or 'none'}"]
    if report["errors"]:
        lines.append(f"errors ({len(report['errors'])})")
        lines += [f"  {DataIssue(**e)}" for e in report["errors"][:50]]
    lengths = report["token_lengths"]
    if lengths:
        lines.append(f"prompt tokens: p50 {lengths['p50']}, p90 {lengths['p90']}, max {lengths['max']}, "
                     f"mean {lengths['mean']}")
    if report["over_max_length"] is not None:
        over = report["over_max_length"]
        lines.append(f"over --max-length {report['max_length']}: {len(over)} prompt(s)"
                     + (f" ({', '.join(over[:5])}{', ...' if len(over) > 5 else ''}); data.truncation decides "
                        "whether they are cut or dropped" if over else ""))
    for group in report["duplicates"][:10]:
        lines.append(f"duplicate prompts: {', '.join(group['rows'])}")
    lines.append("clean" if report["ok"] else f"{len(report['errors'])} error(s)")
    return lines
