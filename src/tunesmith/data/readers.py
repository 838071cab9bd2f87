"""Readers: every common dataset layout in, one `Conversation` type out.

Formats, detected per row from its keys (``format=`` forces one for every row):

    alpaca             instruction, input, output, [system], [history [[q, a], ...]], [metadata]
    sharegpt           conversations [{from, value}], [system], [tools]; roles human/user, gpt/assistant,
                       system, function_call, observation/tool
    openai             messages [{role, content, [tool_calls], [weight]}], [tools]
    prompt-completion  prompt, completion (strings, or lists of messages)
    text               text (continued pre-training)

Files: .json (an array), .jsonl, .csv, .parquet, a directory of those, or a directory written by
``datasets.Dataset.save_to_disk``. Reading never stops at the first bad row: every problem becomes
a `DataIssue` naming the file, the line (JSONL/CSV) or row index (the others) and the field. Rows
with errors are left out of the conversations, never silently: the issues say which and why.

Text files are UTF-8 by default, with or without a byte-order mark, CRLF or LF (``encoding=`` reads
others); bytes that do not decode, an empty file, a key repeated in one JSON object, a CSV row with
more values than columns and a file that is not Parquet are issues too (see textfiles.py).

Preference pairs (a chosen and a rejected response) are refused here with PreferenceDataError, which
says how to train on them; pairs.py reads them, through the same file reading (``file_rows``).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunesmith.data import textfiles
from tunesmith.data.conversation import Conversation, Message, location, openai_tools
from tunesmith.data.textfiles import UndecodableFile, duplicate_keys
from tunesmith.errors import TunesmithError, UsageError

FORMATS = ("alpaca", "sharegpt", "openai", "prompt-completion", "text")
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# The alpaca reader records how the user turn was assembled (instruction + "\n" + input), so a
# conversion back to alpaca restores the two fields exactly instead of guessing where to split.
ALPACA_FIELDS = "alpaca_fields"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "function_call", "observation": "tool", "tool": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}
MAX_LISTED_ISSUES = 20


@dataclass
class DataIssue:
    file: str
    line: int  # JSONL/CSV line (1-based), or the row index in JSON arrays, Parquet and saved datasets;
    # -1 for a problem with the whole file
    field: str
    message: str
    severity: str = "error"  # "error" or "warning"

    @property
    def where(self) -> str:
        return location(self.file, self.line) if self.line >= 0 else self.file

    def __str__(self) -> str:
        return f"{self.where} {self.field}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReadResult:
    conversations: list[Conversation]
    issues: list[DataIssue]
    formats: dict[str, str]  # file -> detected format
    num_rows: int = 0  # rows seen, valid or not

    @property
    def errors(self) -> list[DataIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[DataIssue]:
        return [i for i in self.issues if i.severity != "error"]


class DataError(TunesmithError):
    """The data has errors; the message lists them with file, line and field."""

    def __init__(self, issues: list[DataIssue]):
        self.issues = issues
        listed = "\n".join(f"  {issue}" for issue in issues[:MAX_LISTED_ISSUES])
        more = len(issues) - MAX_LISTED_ISSUES
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(issues)} problem(s) in the data:\n{listed}{tail}\n"
                         "Run `tunesmith data check FILE` for the full report.")


class PreferenceDataError(TunesmithError):
    """Chosen/rejected pairs were given where supervised examples were expected."""


@dataclass
class Row:
    """One raw row on its way to a Conversation; collects the issues found in it."""

    file: str
    line: int
    data: dict
    columns: dict[str, str] = field(default_factory=dict)  # format field -> source column
    issues: list[DataIssue] = field(default_factory=list)

    def error(self, name: str, message: str, severity: str = "error") -> None:
        source = self.columns.get(name.split("[")[0].split(".")[0])
        shown = f"{name} (column {source!r})" if source and source != name else name
        self.issues.append(DataIssue(self.file, self.line, shown, message, severity))

    def warn(self, name: str, message: str) -> None:
        self.error(name, message, severity="warning")

    @property
    def failed(self) -> bool:
        return any(i.severity == "error" for i in self.issues)


# ---------------------------------------------------------------- files -> raw rows


def data_files(path: Path) -> list[Path]:
    """The files to read for one path: itself, or the data files inside a directory."""
    if not path.exists():
        raise UsageError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UsageError(f"cannot read {path}: expected one of {', '.join(SUFFIXES)}, a directory of those, "
                             "or a datasets.save_to_disk directory")
        return [path]
    if is_saved_dataset(path):
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not found:
        raise UsageError(f"no data files ({', '.join(SUFFIXES)}) in directory {path}")
    return found


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def raw_rows(path: Path, encoding: str | None = None) -> Iterator[tuple[str, int, object]]:
    """(file, line or index, parsed row or a DataIssue) for every row of one data file.

    A file that cannot be read at all (undecodable bytes, not a Parquet file, no permission) is one
    DataIssue for the whole file, so the other files are still checked.
    """
    try:
        yield from _rows_by_type(path, encoding)
    except UndecodableFile as exc:
        line = exc.line if path.suffix.lower() in (".jsonl", ".csv") else -1
        yield str(path), -1, DataIssue(str(path), line, "(encoding)", exc.detail)
    except OSError as exc:
        yield str(path), -1, DataIssue(str(path), -1, "(file)", f"cannot read: {exc.strerror or exc}")


def _rows_by_type(path: Path, encoding: str | None) -> Iterator[tuple[str, int, object]]:
    if is_saved_dataset(path):
        yield from _saved_dataset_rows(path)
    elif path.suffix.lower() == ".jsonl":
        yield from _jsonl_rows(textfiles.read_text(path, encoding), str(path))
    elif path.suffix.lower() == ".json":
        yield from _json_rows(path, encoding)
    elif path.suffix.lower() == ".csv":
        yield from _csv_rows(path, encoding)
    else:
        yield from _parquet_rows(path)


def _jsonl_rows(text: str, name: str, index_base: int | None = None) -> Iterator[tuple[str, int, object]]:
    for number, line in enumerate(textfiles.lines(text), 1):
        if not line.strip():
            continue
        where = number if index_base is None else number - 1 - index_base
        try:
            yield name, where, textfiles.loads(line)
        except json.JSONDecodeError as exc:
            yield name, where, DataIssue(name, where, "(json)", f"invalid JSON: {exc.msg} (column {exc.colno})")
        except RecursionError:
            yield name, where, DataIssue(name, where, "(json)", "invalid JSON: nested too deeply")


def _json_rows(path: Path, encoding: str | None) -> Iterator[tuple[str, int, object]]:
    name = str(path)
    text = textfiles.read_text(path, encoding)
    try:
        data = textfiles.loads(text)
    except RecursionError:
        yield name, -1, DataIssue(name, -1, "(json)", "invalid JSON: nested too deeply")
        return
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and exc.lineno > 1:
            # JSON lines saved with a .json name: read them as such, numbered by row index.
            yield from _jsonl_rows(text, name, index_base=0)
            return
        yield name, -1, DataIssue(name, -1, "(json)",
                                  f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
        return
    if isinstance(data, dict):
        yield name, -1, DataIssue(name, -1, "(json)", "expected a JSON array of examples, found an object "
                                  f"with keys {sorted(data)[:8]}")
        return
    if not isinstance(data, list):
        yield name, -1, DataIssue(name, -1, "(json)", f"expected a JSON array of examples, found {_type(data)}")
        return
    for index, row in enumerate(data):
        yield name, index, row


CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) refuses one long answer


def _csv_rows(path: Path, encoding: str | None) -> Iterator[tuple[str, int, object]]:
    name = str(path)
    csv.field_size_limit(CSV_FIELD_LIMIT)
    # newline="": quoted fields keep their own line breaks (CRLF included); the csv module splits rows.
    reader = csv.DictReader(io.StringIO(textfiles.read_text(path, encoding), newline=""))
    try:
        header = reader.fieldnames or []
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            yield name, -1, DataIssue(name, 1, "(header)", f"column(s) {repeated} appear more than once; only the "
                                      "last would be read. Rename or remove the others")
            return
        start = 2  # line 1 is the header
        for row in reader:
            yield name, start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        yield name, -1, DataIssue(name, reader.line_num, "(csv)", f"cannot parse CSV: {exc}")


def _parquet_rows(path: Path) -> Iterator[tuple[str, int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:
        yield str(path), -1, DataIssue(str(path), -1, "(parquet)", f"not a readable Parquet file: {exc}")
        return
    for index, row in enumerate(table.to_pylist()):
        yield str(path), index, row


def _saved_dataset_rows(path: Path) -> Iterator[tuple[str, int, object]]:
    import pyarrow as pa
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (ValueError, pa.ArrowException) as exc:  # OSError is handled by raw_rows
        yield str(path), -1, DataIssue(str(path), -1, "(dataset)", f"not a readable saved dataset: {exc}")
        return
    splits = loaded.items() if isinstance(loaded, DatasetDict) else [(None, loaded)]
    for split, dataset in splits:
        name = f"{path}/{split}" if split else str(path)
        for index, row in enumerate(dataset.to_list()):
            yield name, index, row


# ---------------------------------------------------------------- columns and format detection


def parse_columns(columns: str | dict | None) -> dict[str, str]:
    """``"instruction=question,output=answer"`` -> {"instruction": "question", "output": "answer"}."""
    if not columns:
        return {}
    if isinstance(columns, dict):
        return {str(k): str(v) for k, v in columns.items()}
    mapping = {}
    for part in columns.split(","):
        target, sep, source = (s.strip() for s in part.partition("="))
        if not sep or not target or not source:
            raise UsageError(f"bad --columns entry {part.strip()!r}: expected FIELD=COLUMN, e.g. instruction=question")
        mapping[target] = source
    return mapping


def rename_columns(data: dict, mapping: dict[str, str]) -> dict:
    sources = set(mapping.values())
    out = {k: v for k, v in data.items() if k not in sources}
    out.update({target: data[source] for target, source in mapping.items() if source in data})
    return out


def detect_format(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if keys & {"prompt", "completion"}:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    return None


# Question-and-answer columns under other names, read as alpaca when no layout's own keys are there:
# the first present of each list is used, and the file gets a note saying so.
QA_COLUMNS = {"instruction": ("instruction", "question", "query"), "output": ("output", "answer", "response")}


def qa_columns(keys: Iterable[str]) -> dict[str, str]:
    """``{"instruction": "question", "output": "answer"}`` for a row of such columns, else {}."""
    keys = set(keys)
    found = {target: next((name for name in names if name in keys), None) for target, names in QA_COLUMNS.items()}
    if None in found.values() or found == {"instruction": "instruction", "output": "output"}:
        return {}
    return found


def check_format_name(format: str | None) -> str | None:
    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    return format


PAIR_KEYS = ({"chosen", "rejected"}, {"preferred_output", "non_preferred_output"})


def is_pair_row(keys: Iterable[str]) -> bool:
    """A row holding a preferred and a dispreferred response (DPO/ORPO/SimPO data), in any pair layout."""
    keys = set(keys)
    return any(both <= keys for both in PAIR_KEYS)


def refuse_preference(rows: list[Row]) -> None:
    """Supervised fine-tuning reads one answer per prompt; pairs are read by `tunesmith.data.pairs`."""
    first = next((r for r in rows if is_pair_row(r.data)), None)
    if first is not None:
        raise PreferenceDataError(
            f"{first.file} is preference (DPO/ORPO) data, not supervised fine-tuning data: its rows (the first at "
            f"{location(first.file, first.line)}) hold a chosen and a rejected response to compare. To train on the "
            "pairs, pass --method.objective dpo (or orpo, simpo). Supervised fine-tuning (--method.objective sft) "
            "needs one reference answer per prompt (alpaca, sharegpt, openai messages, prompt/completion or text).")


# ---------------------------------------------------------------- value helpers


def _type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _string(row: Row, name: str, *, required: bool) -> str:
    """A text field; missing, empty and non-string values are reported (required) or read as ''."""
    value = row.data.get(name)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from tables
        if required:
            row.error(name, "missing")
        return ""
    if not isinstance(value, str):
        row.error(name, f"expected a string, got {_type(value)}")
        return ""
    if required and not value.strip():
        row.error(name, "empty")
    return value


def _structured(row: Row, name: str):
    """A list/object field; tables (CSV, glaive's `tools`) often hold it as a JSON string."""
    value = row.data.get(name)
    if isinstance(value, str):
        if not value.strip():
            return None
        if value.lstrip()[0] not in "[{":
            row.error(name, "expected a list or an object (or its JSON text), got a string")
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            row.error(name, f"not valid JSON: {exc.msg}")
            return None
    return value


def _tools(row: Row) -> list[dict] | None:
    """Function schemas, normalized to the OpenAI form {"type": "function", "function": {...}}."""
    tools = _structured(row, "tools")
    if tools in (None, []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        row.error("tools", f"expected a list of function schemas, got {_type(tools)}")
        return None
    return openai_tools(tools)


def _metadata(row: Row) -> dict:
    metadata = _structured(row, "metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        row.error("metadata", f"expected an object, got {_type(metadata)}")
        return {}
    return dict(metadata)


def _tool_calls_from_text(row: Row, name: str, text: str) -> list[dict] | None:
    """Parse a sharegpt function_call value: {"name", "arguments"} or a list of them."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        row.error(name, f"function call is not valid JSON: {exc.msg}")
        return None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        row.error(name, 'expected a function call {"name": ..., "arguments": {...}}')
        return None
    return [_tool_call(row, name, {"name": c["name"], "arguments": c.get("arguments", {})}) for c in calls]


def _tool_call(row: Row, name: str, function: dict, call_id: str | None = None) -> dict:
    """One OpenAI-style call with `arguments` as an object, which is what chat templates expect."""
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            row.error(f"{name}.arguments", f"arguments are not valid JSON: {exc.msg}")
    call = {"type": "function", "function": {"name": function.get("name"), "arguments": arguments}}
    return {"id": call_id, **call} if call_id else call


def call_text(tool_calls: list[dict]) -> str:
    """The calls as JSON text: the content of an assistant turn that only calls tools."""
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in tool_calls]
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


# ---------------------------------------------------------------- rows -> conversations, per format


def parse_alpaca(row: Row) -> Conversation | None:
    instruction = _string(row, "instruction", required=True)
    query = _string(row, "input", required=False)
    output = _string(row, "output", required=True)
    system = _string(row, "system", required=False)
    history = _history(row)
    metadata = _metadata(row)
    if row.failed:
        return None
    user = instruction + ("\n" + query if query else "")
    if query:
        metadata[ALPACA_FIELDS] = {"instruction": instruction, "input": query}
    messages = [*history, Message("user", user), Message("assistant", output)]
    return Conversation(messages, system=system or None, source=row.file, line=row.line, metadata=metadata)


def _history(row: Row) -> list[Message]:
    history = _structured(row, "history")
    if history in (None, []):
        return []
    if not isinstance(history, list):
        row.error("history", f"expected a list of [question, answer] pairs, got {_type(history)}")
        return []
    messages = []
    for i, pair in enumerate(history):
        ok = isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)
        if not ok:
            row.error(f"history[{i}]", "expected a [question, answer] pair of non-empty strings")
            continue
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    return messages


@dataclass(frozen=True)
class Dialect:
    """How a format names its message list and keys, so errors use the file's own field names."""

    list_key: str
    role_key: str
    content_key: str
    roles: dict


SHAREGPT = Dialect("conversations", "from", "value", SHAREGPT_ROLES)
OPENAI = Dialect("messages", "role", "content", OPENAI_ROLES)


def parse_messages(row: Row, dialect: Dialect) -> Conversation | None:
    turns = _structured(row, dialect.list_key)
    if row.failed:
        return None
    if not isinstance(turns, list) or not turns:
        row.error(dialect.list_key, "missing" if turns is None else f"expected a non-empty list of messages, "
                  f"got {_type(turns) if turns != [] else 'an empty list'}")
        return None
    messages = [_turn(row, turn, f"{dialect.list_key}[{i}]", dialect) for i, turn in enumerate(turns)]
    tools, metadata = _tools(row), _metadata(row)
    system = _string(row, "system", required=False) or None
    if row.failed:
        return None
    offset = 0
    if messages[0].role == "system" and system is None:
        system, messages, offset = messages[0].content, messages[1:], 1
    _name_tool_results(messages, [t.get("tool_call_id") if isinstance(t, dict) else None for t in turns][offset:])
    conv = Conversation(messages, system=system, tools=tools, source=row.file, line=row.line, metadata=metadata)
    row.issues += validate(conv, dialect=dialect, offset=offset)
    return None if row.failed else conv


def _turn(row: Row, turn, name: str, dialect: Dialect) -> Message | None:
    if not isinstance(turn, dict):
        row.error(name, f"expected a message object, got {_type(turn)}")
        return None
    raw_role = turn.get(dialect.role_key, turn.get("role"))
    role = dialect.roles.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        shown = "missing" if raw_role is None else f"unknown role {raw_role!r}"
        row.error(f"{name}.{dialect.role_key}", f"{shown} (expected one of {', '.join(dialect.roles)})")
        return None
    content_key = dialect.content_key if dialect.content_key in turn else "content"
    content = _content(row, turn.get(content_key), f"{name}.{content_key}")
    message = Message("assistant" if role == "function_call" else role, content, train=_weight(row, turn, name, role))
    if role == "function_call":
        message.tool_calls = _tool_calls_from_text(row, f"{name}.{content_key}", content)
    elif turn.get("tool_calls"):
        message.tool_calls = _openai_calls(row, turn["tool_calls"], f"{name}.tool_calls")
        if message.tool_calls and not message.content:
            # Templates that only read `content` still render the call.
            message.content = call_text(message.tool_calls)
    message.name = turn.get("name") if isinstance(turn.get("name"), str) else None
    return message


def _content(row: Row, value, name: str) -> str:
    """Message text; OpenAI content may also be null or a list of text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {str(p.get("type")) for p in value} - {"text"}  # str(): a type may be any JSON value
        if kinds:
            row.error(name, f"only text content is supported, found parts of type {sorted(kinds)}")
            return ""
        if not all(isinstance(p.get("text"), str) for p in value):
            row.error(name, "every text part needs a 'text' string")
            return ""
        return "".join(p["text"] for p in value)
    row.error(name, f"expected a string, got {_type(value)}")
    return ""


def _weight(row: Row, turn: dict, name: str, role: str) -> bool | None:
    if "weight" not in turn or turn["weight"] is None:
        return None
    weight = turn["weight"]
    if role not in ("assistant", "function_call"):
        row.warn(f"{name}.weight", "weight is only used on assistant messages; ignored here")
        return None
    if weight not in (0, 1):
        row.error(f"{name}.weight", f"expected 0 or 1, got {weight!r}")
        return None
    return bool(weight)


def _openai_calls(row: Row, calls, name: str) -> list[dict] | None:
    if not isinstance(calls, list):
        row.error(name, f"expected a list of tool calls, got {_type(calls)}")
        return None
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            row.error(f"{name}[{i}]", 'expected {"type": "function", "function": {"name": ..., "arguments": ...}}')
            continue
        out.append(_tool_call(row, f"{name}[{i}].function", function, call.get("id")))
    return out


def _name_tool_results(messages: list[Message], call_ids: list) -> None:
    """Give each tool result the name of the call it answers (by tool_call_id, else in call order)."""
    pending: list[dict] = []
    for message, wanted in zip(messages, call_ids, strict=False):
        if message.role == "assistant":
            pending = list(message.tool_calls or [])
        elif message.role == "tool":
            match = next((c for c in pending if wanted and c.get("id") == wanted), pending[0] if pending else None)
            if match is not None:
                pending.remove(match)
                message.name = message.name or match["function"]["name"]


def parse_prompt_completion(row: Row) -> Conversation | None:
    prompt, completion = row.data.get("prompt"), row.data.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        # The conversational prompt/completion layout: two lists of messages.
        turns = [*(prompt if isinstance(prompt, list) else []), *(completion if isinstance(completion, list) else [])]
        return parse_messages(Row(row.file, row.line, {**row.data, "messages": turns}, row.columns, row.issues),
                              OPENAI)
    prompt_text = _string(row, "prompt", required=True)
    completion_text = _string(row, "completion", required=True)
    system = _string(row, "system", required=False) or None
    if row.failed:
        return None
    messages = [Message("user", prompt_text), Message("assistant", completion_text)]
    return Conversation(messages, system=system, source=row.file, line=row.line, metadata=_metadata(row))


def parse_text(row: Row) -> Conversation | None:
    text = _string(row, "text", required=True)
    if row.failed:
        return None
    # One assistant message holds the text: every token of it is supervised.
    return Conversation([Message("assistant", text)], source=row.file, line=row.line, is_text=True,
                        metadata=_metadata(row))


PARSERS = {
    "alpaca": parse_alpaca,
    "sharegpt": lambda row: parse_messages(row, SHAREGPT),
    "openai": lambda row: parse_messages(row, OPENAI),
    "prompt-completion": parse_prompt_completion,
    "text": parse_text,
}


# ---------------------------------------------------------------- validation


def validate(conv: Conversation, *, dialect: Dialect = OPENAI, offset: int = 0) -> list[DataIssue]:
    """Role order and content problems of one conversation (at most one role-order error each).

    ``offset`` shifts message indices back to the file's own list (a leading system message
    read into `Conversation.system` counts as index 0).
    """
    if conv.is_text:
        return []
    issues: list[DataIssue] = []

    def add(i: int | None, key: str | None, message: str, severity: str = "error") -> None:
        name = dialect.list_key if i is None else f"{dialect.list_key}[{i + offset}]"
        issues.append(DataIssue(conv.source, conv.line, f"{name}.{key}" if key else name, message, severity))

    order = _role_order_problem(conv.messages)
    if order:
        add(order[0], dialect.role_key, order[1])
    for i, message in enumerate(conv.messages):
        _content_problems(message, lambda msg, sev="error", i=i: add(i, dialect.content_key, msg, sev))
        previous = conv.messages[i - 1] if i else None
        if message.role == "tool" and previous and previous.role == "assistant" and not previous.tool_calls:
            add(i, dialect.role_key, "a tool result follows an assistant message that calls no tool", "warning")
    assistants = [m for m in conv.messages if m.role == "assistant"]
    if not assistants:
        add(None, None, "no assistant turn: nothing to learn from this example")
    elif all(m.train is False for m in assistants):
        add(None, None, "every assistant turn has weight 0: nothing to learn from this example")
    elif conv.messages[-1].role != "assistant" and not order:
        add(len(conv.messages) - 1, dialect.role_key,
            f"the conversation ends with a {conv.messages[-1].role} turn that is never answered", "warning")
    return issues


def _role_order_problem(messages: list[Message]) -> tuple[int, str] | None:
    for i, message in enumerate(messages):
        previous = messages[i - 1] if i else None
        if message.role == "system":
            return i, "a system message must come first"
        if previous is None and message.role != "user":
            return i, f"the conversation starts with an {message.role} turn; the first turn must be the user's"
        if previous and message.role == previous.role and message.role in ("user", "assistant"):
            return i, f"two {message.role} turns in a row"
        if message.role == "tool" and previous and previous.role == "user":
            return i, "a tool result must follow an assistant tool call, not a user turn"
    return None


def _content_problems(message: Message, add) -> None:
    empty = not message.content.strip()
    if message.role == "user" and empty:
        add("empty user message")
    elif message.role == "assistant" and empty and not message.tool_calls:
        add("empty assistant content")
    elif message.role == "tool" and empty:
        add("empty tool result", "warning")


# ---------------------------------------------------------------- reading


def read_dataset(paths, *, format: str | None = None, columns: str | dict | None = None,
                 encoding: str | None = None) -> ReadResult:
    """Read every row of every file; collect every problem instead of stopping at the first.

    ``encoding``: of the text files (default UTF-8, with or without a byte-order mark).
    """
    format = check_format_name(format)
    mapping = parse_columns(columns)
    encoding = textfiles.check_encoding(encoding)
    result = ReadResult([], [], {})
    for path in input_files(paths):
        _read_file(path, format, mapping, result, encoding)
    return result


def input_files(paths) -> list[Path]:
    """Every data file behind one path or a list of them (directories expanded)."""
    return [f for p in ([paths] if isinstance(paths, str | Path) else paths) for f in data_files(Path(p))]


def file_rows(path: Path, mapping: dict[str, str], result, encoding: str | None = None) -> list[Row]:
    """The rows of one file. Problems with the file or with a row's syntax go to ``result.issues``, and
    rows that do not parse count in ``result.num_rows`` (the returned rows do not yet)."""
    rows: list[Row] = []
    file_issues = 0
    for file, line, raw in raw_rows(path, encoding):
        if isinstance(raw, DataIssue):
            result.issues.append(raw)
            file_issues += 1
            result.num_rows += line >= 0  # an unparsable row still counts; a file-level problem does not
            continue
        rows.append(_row(file, line, raw, mapping))
    if not rows and not file_issues:
        result.issues.append(DataIssue(str(path), -1, "(rows)", "no examples: the file is empty (or holds only "
                                       "whitespace or an empty list)"))
    return rows


def file_formats(path: Path, rows: list[Row], format: str | None, detect, result) -> Counter:
    """Each row's format (``format`` or detected from its keys), recorded in ``result.formats``; a file that
    mixes formats gets a warning."""
    detected = Counter(f for r in rows if r.data and (f := format or detect(r.data)))
    result.formats[str(path)] = "+".join(detected) or "unknown"
    if len(detected) > 1:
        counts = ", ".join(f"{name} ({n} row(s))" for name, n in detected.most_common())
        result.issues.append(DataIssue(str(path), -1, "(format)", f"the file mixes formats: {counts}", "warning"))
    return detected


def _read_file(path: Path, format: str | None, mapping: dict[str, str], result: ReadResult,
               encoding: str | None = None) -> None:
    rows = file_rows(path, mapping, result, encoding)
    refuse_preference(rows)
    result.num_rows += len(rows)
    if not format and not mapping:
        rows = _read_qa_columns(path, rows, result)
    detected = file_formats(path, rows, format, detect_format, result)
    if not format and not detected and any(r.data and not r.failed for r in rows):
        return _unknown_layout(path, rows, result)
    for row in rows:
        result.conversations += _convert_row(row, format, detected)
        result.issues += row.issues


def _read_qa_columns(path: Path, rows: list[Row], result: ReadResult) -> list[Row]:
    """Rows whose columns are a question and an answer under other names (question,answer), renamed."""
    if any(detect_format(r.data) for r in rows):
        return rows
    found = qa_columns(rows[0].data) if rows else {}
    if not found or not all(qa_columns(r.data) == found for r in rows if r.data):
        return rows
    named = ",".join(f"{target}={source}" for target, source in found.items())
    result.issues.append(DataIssue(str(path), -1, "(columns)", f"read as alpaca with --columns {named}", "warning"))
    for row in rows:
        row.data, row.columns = rename_columns(row.data, found), found
    return rows


def _unknown_layout(path: Path, rows: list[Row], result: ReadResult) -> None:
    """No row's columns name a layout: one error for the file (naming every column seen and how many rows
    it leaves unread), not one per row."""
    columns = sorted({key for row in rows for key in row.data})
    unread = sum(1 for row in rows if not row.failed)
    for row in rows:
        result.issues += row.issues
    result.issues.append(DataIssue(
        str(path), -1, "(columns)", f"cannot tell the format from the columns {columns}, so none of its {unread} "
        f"row(s) was read; pass --format ({', '.join(FORMATS)}) or --columns FIELD=COLUMN,... "
        "(e.g. --columns instruction=question,output=answer)"))


def _row(file: str, line: int, raw, mapping: dict[str, str]) -> Row:
    """A Row with the problems visible before its format is known: not an object, a repeated key,
    more CSV values than header columns (the csv module files them under the key None)."""
    row = Row(file, line, rename_columns(raw, mapping) if isinstance(raw, dict) else {}, mapping)
    if not isinstance(raw, dict):
        row.error("(row)", f"expected an object, got {_type(raw)}")
        return row
    if None in raw:
        row.error("(row)", f"{len(raw[None])} more value(s) than the header has columns (an unquoted comma "
                  "or quote?)")
        del row.data[None]
    for key in duplicate_keys(raw):
        row.error(key, "this key appears twice in one object; JSON keeps only the last value. Remove one")
    return row


def _convert_row(row: Row, format: str | None, detected: Counter) -> list[Conversation]:
    if row.failed:
        return []
    row_format = format or detect_format(row.data) or (detected.most_common(1)[0][0] if detected else None)
    if row_format is None:
        row.error("(columns)", f"cannot tell the format from the columns {sorted(row.data)}; "
                  f"pass --format ({', '.join(FORMATS)}) or --columns FIELD=COLUMN,...")
        return []
    conv = PARSERS[row_format](row)
    return [conv] if conv is not None else []


def load_conversations(paths, *, format: str | None = None, columns: str | dict | None = None,
                       encoding: str | None = None) -> list[Conversation]:
    """Conversations for training: any error in the data raises DataError listing them all."""
    result = read_dataset(paths, format=format, columns=columns, encoding=encoding)
    if result.errors:
        raise DataError(result.errors)
    if not result.conversations:
        raise DataError([DataIssue(str(paths), -1, "(rows)", "no examples found")])
    return result.conversations
