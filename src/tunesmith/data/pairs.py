"""Preference pairs: one prompt, a chosen and a rejected response (DPO, ORPO, SimPO data).

Layouts, detected per row from its keys (``format=`` forces one for every row):

    alpaca             instruction, [input], chosen, rejected (strings), [system], [history [[q, a], ...]]
                       (LLaMA-Factory's ranking data)
    sharegpt           conversations [{from, value}] (the prompt), chosen {from, value}, rejected {from, value},
                       [system], [tools] (LLaMA-Factory's ranking data; role/content keys are read too)
    trl                prompt, chosen, rejected (TRL): plain strings, or lists of messages {role, content};
                       without a prompt ("implicit prompt") chosen and rejected are whole conversations and
                       the turns they share are the prompt; [tools]
    openai-preference  input {messages, [tools]}, preferred_output [messages], non_preferred_output [messages]
                       (OpenAI's preference fine-tuning)

Files are read as for supervised data (readers.py: JSON, JSONL, CSV, Parquet, directories, saved
datasets; in tables a list or an object may be stored as its JSON text). Every problem is a `DataIssue`
naming the file, the line or row index and the field; rows with errors are left out, never silently.

A pair is valid when its prompt ends with a user (or tool) turn, each response is assistant turns
(tool results may sit between them) with something in them, and the two responses differ.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tunesmith.data import textfiles
from tunesmith.data.conversation import Conversation, Message, location, openai_tools
from tunesmith.data.prompt import with_system_prompt
from tunesmith.data.readers import (
    ALPACA_FIELDS,
    FORMATS,
    OPENAI,
    SHAREGPT,
    DataError,
    DataIssue,
    Dialect,
    Row,
    _content_problems,
    _history,
    _metadata,
    _name_tool_results,
    _role_order_problem,
    _string,
    _structured,
    _tools,
    _turn,
    _type,
    detect_format,
    file_formats,
    file_rows,
    input_files,
    is_pair_row,
    parse_columns,
    raw_rows,
    rename_columns,
)
from tunesmith.data.tokenize import IGNORE, Encoded, encode
from tunesmith.errors import UsageError
from tunesmith.output import progress_bar

PAIR_FORMATS = ("alpaca", "sharegpt", "trl", "openai-preference")
SIDES = ("chosen", "rejected")
# Answers that begin with the same more-than-half of the shorter one: DPO's gradient on the shared tokens cancels,
# so only the first differing token carries the preference (see shares_long_prefix).
LONG_PREFIX_SHARE = 0.5
SHARED_PREFIX_MAJORITY = 0.5  # above this share of such pairs, the data doctor and the run plan warn


@dataclass
class Pair:
    prompt: Conversation  # system, tools and the turns before the answer, ending with a user or tool turn
    chosen: list[Message]  # the preferred response: usually one assistant message
    rejected: list[Message]  # the dispreferred response to the same prompt
    source: str = ""  # file the pair came from
    line: int = 0  # JSONL/CSV line (1-based) or row index, for error messages

    @property
    def where(self) -> str:
        return location(self.source, self.line)

    def chosen_conversation(self) -> Conversation:
        """The prompt followed by the chosen response, ready for `tokenize.encode`: see `_answered`."""
        return self._answered(self.chosen)

    def rejected_conversation(self) -> Conversation:
        """The prompt followed by the rejected response, supervised like `chosen_conversation`."""
        return self._answered(self.rejected)

    def prompt_messages(self) -> list[dict]:
        """The prompt's message dicts (system first): what a model is asked at evaluation."""
        return self.prompt.to_messages()

    def answers(self) -> tuple[str, str]:
        """The chosen and the rejected answer as text, whitespace collapsed. The data doctor compares answers
        here, in characters: it runs without a tokenizer too (--no-tokens), and a prefix shared in characters
        is shared in tokens up to the token where the texts meet. Collapsing whitespace keeps a reflowed line
        or a trailing newline from hiding a shared prefix."""
        return tuple(" ".join("\n".join(m.content for m in getattr(self, side)).split()) for side in SIDES)

    def _answered(self, response: list[Message]) -> Conversation:
        # Assistant turns of the prompt are context (train=False) and the response's are supervised
        # (train=True), so any EncodeOptions (last_turn_only or not) labels exactly the response.
        context = [replace(m, train=False) if m.role == "assistant" else m for m in self.prompt.messages]
        answer = [replace(m, train=True) if m.role == "assistant" else m for m in response]
        return replace(self.prompt, messages=context + answer)


@dataclass
class PairResult:
    pairs: list[Pair]
    issues: list[DataIssue]
    formats: dict[str, str]  # file -> detected layout
    num_rows: int = 0  # rows seen, valid or not

    @property
    def errors(self) -> list[DataIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[DataIssue]:
        return [i for i in self.issues if i.severity != "error"]


Named = list[tuple[str, Message]]  # messages with the field each came from, for the error messages


# ---------------------------------------------------------------- detection


def detect_pair_format(keys) -> str | None:
    keys = set(keys)
    if keys & {"preferred_output", "non_preferred_output"}:
        return "openai-preference"
    if not keys & set(SIDES):
        return None
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    return "trl"


def check_pair_format(format: str | None) -> str | None:
    if format is not None and format not in PAIR_FORMATS:
        raise UsageError(f"unknown preference-pair format {format!r}: choose one of {', '.join(PAIR_FORMATS)}")
    return format


def is_preference_data(paths, *, format: str | None = None, columns: str | dict | None = None,
                       encoding: str | None = None) -> bool:
    """Whether ``paths`` hold preference pairs (read them with `load_pairs`) rather than supervised examples
    (`load_conversations`): a pair-only ``format``, or a file whose first row has chosen and rejected
    (or preferred_output and non_preferred_output)."""
    if format in PAIR_FORMATS and format not in FORMATS:
        return True
    if format in FORMATS and format not in PAIR_FORMATS:
        return False
    mapping, encoding = parse_columns(columns), textfiles.check_encoding(encoding)
    for path in input_files(paths):
        first = next((raw for _, _, raw in raw_rows(path, encoding) if isinstance(raw, dict)), None)
        if first is not None and is_pair_row(rename_columns(first, mapping)):
            return True
    return False


# ---------------------------------------------------------------- messages


def _messages_text(value):
    """A list or an object of messages stored as JSON text (tables do this), else None: plain text stays text."""
    if not isinstance(value, str) or value.lstrip()[:1] not in ("[", "{"):
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    items = parsed if isinstance(parsed, list) else [parsed]
    is_message = all(isinstance(m, dict) and ("role" in m or "from" in m) for m in items)
    return parsed if items and is_message else None


def _turns(row: Row, turns: list, key: str, dialect: Dialect) -> Named:
    named = [(f"{key}[{i}]", _turn(row, turn, f"{key}[{i}]", dialect)) for i, turn in enumerate(turns)]
    messages = [m for _, m in named]
    if None not in messages:
        _name_tool_results(messages, [t.get("tool_call_id") if isinstance(t, dict) else None for t in turns])
    return named


def _side(row: Row, key: str, dialect: Dialect) -> Named:
    """One response: a message object, a list of messages, or plain text (the assistant's answer)."""
    value = row.data.get(key)
    value = _messages_text(value) or value
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from tables
        row.error(key, "missing")
        return []
    if isinstance(value, str):
        return [(key, Message("assistant", value))]
    if isinstance(value, dict):
        return [(key, _turn(row, value, key, dialect))]
    if isinstance(value, list):
        return _turns(row, value, key, dialect)
    row.error(key, f"expected a message, a list of messages or a string, got {_type(value)}")
    return []


def _leading_system(system: str | None, prompt: Named) -> tuple[str | None, Named]:
    """A first system message becomes the prompt's system prompt (unless a `system` field gave one)."""
    if prompt and prompt[0][1].role == "system" and system is None:
        return prompt[0][1].content, prompt[1:]
    return system, prompt


def _split_shared(row: Row, chosen: Named, rejected: Named) -> tuple[Named, Named, Named]:
    """TRL's implicit prompt: the turns both sides begin with are the prompt, the rest the responses.

    Assistant turns at the end of the shared part belong to the responses (a response may start with
    the same tool call). A user or system turn left in a response means the prompts differ.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _same(chosen[shared][1], rejected[shared][1]):
        shared += 1
    first_difference = shared
    while shared > 0 and chosen[shared - 1][1].role == "assistant":
        shared -= 1
    for side in (chosen[shared:], rejected[shared:]):
        stray = next((name for name, m in side if m.role in ("user", "system")), None)
        if stray is not None:
            row.error(stray, f"the prompt differs between chosen and rejected: both must begin with the same "
                      f"turns and differ only in the assistant's response (they first differ at turn "
                      f"{first_difference})")
            break
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _same(a: Message, b: Message) -> bool:
    return a.to_dict() == b.to_dict()


# ---------------------------------------------------------------- validation


def _check_prompt(row: Row, prompt: Named, key: str) -> None:
    if not prompt:
        row.error(key, "no prompt: a pair needs the user's turn that the two responses answer")
        return
    messages = [m for _, m in prompt]
    order = _role_order_problem(messages)
    if order:
        row.error(prompt[order[0]][0], order[1])
    for name, message in prompt:
        _content_problems(message, lambda text, severity="error", name=name: row.error(name, text, severity))
    last_name, last = prompt[-1]
    if last.role not in ("user", "tool") and not order:
        row.error(last_name, f"the prompt ends with an {last.role} turn; it must end with the user's turn (or a "
                  "tool result) that the responses answer")


def _check_response(row: Row, response: Named, key: str) -> None:
    if not response:
        row.error(key, "empty: no response")
        return
    for name, message in response:
        if message.role not in ("assistant", "tool"):
            row.error(name, f"expected an assistant message, got a {message.role} turn")
            return
        _content_problems(message, lambda text, severity="error", name=name: row.error(name, text, severity))
    if response[0][1].role != "assistant":
        row.error(response[0][0], "the response starts with a tool result; it must start with the assistant's turn")
    elif response[-1][1].role != "assistant":
        row.error(response[-1][0], "the response ends with a tool result; it must end with the assistant's turn")


def _no_weights(row: Row, named: Named) -> None:
    """OpenAI's weight (train flag) means nothing in a pair: warn and drop it."""
    for name, message in named:
        if message.train is not None:
            row.warn(f"{name}.weight", "weight is used by supervised fine-tuning only; ignored in a preference pair")
            message.train = None


def _pair(row: Row, prompt: Named, chosen: Named, rejected: Named, *, keys: tuple[str, str, str],
          system: str | None = None, tools: list[dict] | None = None, metadata: dict | None = None) -> Pair | None:
    """Validate the parts (``keys``: the prompt's, chosen's and rejected's field names) into one Pair."""
    if row.failed:
        return None
    prompt_key, chosen_key, rejected_key = keys
    _check_prompt(row, prompt, prompt_key)
    _check_response(row, chosen, chosen_key)
    _check_response(row, rejected, rejected_key)
    _no_weights(row, prompt + chosen + rejected)
    if chosen and [m.to_dict() for _, m in chosen] == [m.to_dict() for _, m in rejected]:
        row.error(rejected_key, f"identical to {chosen_key}: a pair needs two different responses to compare")
    if row.failed:
        return None
    conv = Conversation([m for _, m in prompt], system=system, tools=tools, source=row.file, line=row.line,
                        metadata=metadata or {})
    return Pair(conv, [m for _, m in chosen], [m for _, m in rejected], row.file, row.line)


# ---------------------------------------------------------------- rows -> pairs, per layout


def parse_alpaca_pair(row: Row) -> Pair | None:
    instruction = _string(row, "instruction", required=True)
    query = _string(row, "input", required=False)
    chosen = _string(row, "chosen", required=True)
    rejected = _string(row, "rejected", required=True)
    system = _string(row, "system", required=False)
    history = _history(row)
    metadata = _metadata(row)
    if row.failed:
        return None
    if query:
        metadata[ALPACA_FIELDS] = {"instruction": instruction, "input": query}
    prompt = [*(("history", m) for m in history), ("instruction", Message("user", instruction + ("\n" + query
                                                                                                  if query else "")))]
    return _pair(row, prompt, [("chosen", Message("assistant", chosen))], [("rejected", Message("assistant", rejected))],
                 keys=("instruction", "chosen", "rejected"), system=system or None, metadata=metadata)


def parse_sharegpt_pair(row: Row) -> Pair | None:
    turns = _structured(row, "conversations")
    if not row.failed and (not isinstance(turns, list) or not turns):
        row.error("conversations", "missing" if turns is None else "expected a non-empty list of messages, got "
                  f"{_type(turns) if turns != [] else 'an empty list'}")
    prompt = _turns(row, turns, "conversations", SHAREGPT) if isinstance(turns, list) else []
    chosen, rejected = _side(row, "chosen", SHAREGPT), _side(row, "rejected", SHAREGPT)
    tools, metadata = _tools(row), _metadata(row)
    system, prompt = _leading_system(_string(row, "system", required=False) or None, prompt)
    return _pair(row, prompt, chosen, rejected, keys=("conversations", "chosen", "rejected"), system=system,
                 tools=tools, metadata=metadata)


def parse_trl_pair(row: Row) -> Pair | None:
    chosen, rejected = _side(row, "chosen", OPENAI), _side(row, "rejected", OPENAI)
    tools, metadata = _tools(row), _metadata(row)
    prompt_value = row.data.get("prompt")
    prompt_value = _messages_text(prompt_value) or prompt_value
    if row.failed:
        return None
    whole = chosen and chosen[0][1].role in ("user", "system")  # sides that repeat the prompt
    if prompt_value is None or prompt_value == "":
        if not whole:
            row.error("prompt", f"{'missing' if prompt_value is None else 'empty'}: without a prompt, chosen and "
                      "rejected must be whole conversations (lists of messages) that begin with the same turns")
            return None
        prompt, chosen, rejected = _split_shared(row, chosen, rejected)
    else:
        prompt = _prompt(row, prompt_value)
        if whole and not row.failed:
            shared, chosen, rejected = _split_shared(row, chosen, rejected)
            _check_same_prompt(row, prompt, shared)
    system, prompt = _leading_system(None, prompt)
    return _pair(row, prompt, chosen, rejected, keys=("prompt", "chosen", "rejected"), system=system, tools=tools,
                 metadata=metadata)


def _prompt(row: Row, value) -> Named:
    if isinstance(value, str):
        return [("prompt", Message("user", value))]
    if isinstance(value, dict):
        return [("prompt", _turn(row, value, "prompt", OPENAI))]
    if isinstance(value, list):
        return _turns(row, value, "prompt", OPENAI)
    row.error("prompt", f"expected a string or a list of messages, got {_type(value)}")
    return []


def _check_same_prompt(row: Row, prompt: Named, shared: Named) -> None:
    """A prompt field beside whole conversations (as in UltraFeedback) must be what they begin with."""
    if row.failed:
        return
    given = [m.to_dict() for _, m in prompt]
    shared_messages = [m.to_dict() for _, m in shared]
    last_user = next((m for m in reversed(shared_messages) if m["role"] == "user"), None)
    as_text = len(given) == 1 and given[0]["role"] == "user" and last_user is not None \
        and last_user["content"] == given[0]["content"]
    if given != shared_messages and not as_text:
        row.error("prompt", "differs from the turns that chosen and rejected begin with")


def parse_openai_preference(row: Row) -> Pair | None:
    data = _structured(row, "input")
    prompt: Named = []
    tools = None
    if not row.failed and not isinstance(data, dict):
        row.error("input", "missing" if data is None else f'expected an object {{"messages": [...]}}, got {_type(data)}')
    elif isinstance(data, dict):
        turns = data.get("messages")
        if not isinstance(turns, list) or not turns:
            row.error("input.messages", "missing" if turns is None else "expected a non-empty list of messages")
        else:
            prompt = _turns(row, turns, "input.messages", OPENAI)
        tools = _input_tools(row, data.get("tools"))
    chosen = _side(row, "preferred_output", OPENAI)
    rejected = _side(row, "non_preferred_output", OPENAI)
    metadata = _metadata(row)
    system, prompt = _leading_system(None, prompt)
    return _pair(row, prompt, chosen, rejected, keys=("input.messages", "preferred_output", "non_preferred_output"),
                 system=system, tools=tools, metadata=metadata)


def _input_tools(row: Row, tools) -> list[dict] | None:
    if tools in (None, []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        row.error("input.tools", f"expected a list of function schemas, got {_type(tools)}")
        return None
    return openai_tools(tools)


PARSERS = {
    "alpaca": parse_alpaca_pair,
    "sharegpt": parse_sharegpt_pair,
    "trl": parse_trl_pair,
    "openai-preference": parse_openai_preference,
}


# ---------------------------------------------------------------- reading


def read_pairs(paths, *, format: str | None = None, columns: str | dict | None = None,
               encoding: str | None = None) -> PairResult:
    """Read every row of every file as a preference pair; collect every problem instead of stopping."""
    format = check_pair_format(format)
    mapping = parse_columns(columns)
    encoding = textfiles.check_encoding(encoding)
    result = PairResult([], [], {})
    for path in input_files(paths):
        rows = file_rows(path, mapping, result, encoding)
        result.num_rows += len(rows)
        detected = file_formats(path, rows, format, detect_pair_format, result)
        if not detected and _refuse_supervised(path, rows, format, result):
            continue
        for row in rows:
            result.pairs += _parse_row(row, format, detected)
            result.issues += row.issues
    return result


def _refuse_supervised(path, rows: list[Row], format: str | None, result: PairResult) -> bool:
    """One error for a file of supervised examples, instead of 'chosen: missing' on every row."""
    kinds = Counter(f for r in rows if r.data and (f := detect_format(r.data)))
    if format or not kinds:
        return False
    result.issues.append(DataIssue(str(path), -1, "(format)", f"holds supervised examples ({'+'.join(kinds)}), "
                                   "not preference pairs: dpo, orpo and simpo need a chosen and a rejected response "
                                   "per prompt; train on this file with --method.objective sft"))
    result.formats[str(path)] = "+".join(kinds)
    return True


def _parse_row(row: Row, format: str | None, detected: Counter) -> list[Pair]:
    if row.failed:
        return []
    row_format = format or detect_pair_format(row.data) or (detected.most_common(1)[0][0] if detected else None)
    if row_format is None:
        row.error("(columns)", f"not a preference pair: no chosen and rejected among the columns {sorted(row.data)}; "
                  f"pass --format ({', '.join(PAIR_FORMATS)}) or --columns FIELD=COLUMN,...")
        return []
    pair = PARSERS[row_format](row)
    return [pair] if pair is not None else []


def load_pairs(paths, *, format: str | None = None, columns: str | dict | None = None,
               encoding: str | None = None) -> list[Pair]:
    """Preference pairs for training: any error in the data raises DataError listing them all."""
    result = read_pairs(paths, format=format, columns=columns, encoding=encoding)
    if result.errors:
        raise DataError(result.errors)
    if not result.pairs:
        raise DataError([DataIssue(str(paths), -1, "(rows)", "no preference pairs found")])
    return result.pairs


def encode_pair(pair: Pair, tokenizer, options):
    """(chosen, rejected) `tokenize.Encoded`, each labelled on its response only; None when the "drop" policy
    drops either side (a pair is kept or dropped whole). Each side is cut as `tokenize.encode` cuts it, so
    with truncate_prompt the two sides may keep different amounts of a long prompt."""
    chosen = encode(pair.chosen_conversation(), tokenizer, options)
    rejected = encode(pair.rejected_conversation(), tokenizer, options)
    return None if chosen is None or rejected is None else (chosen, rejected)


# ---------------------------------------------------------------- pairs as the loop sees them


@dataclass
class EncodedPair:
    """Both sides of a preference pair, tokenized; the loop lays pairs out like SFT examples."""

    chosen: Encoded
    rejected: Encoded
    source: str = ""
    line: int = 0
    reference: tuple[float, float] | None = None  # (chosen, rejected) log-probabilities under the reference (DPO)

    @property
    def sides(self) -> tuple[Encoded, Encoded]:
        return self.chosen, self.rejected

    @property
    def input_ids(self) -> list[int]:  # both sides: what the pair takes in a packed row
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels

    @property
    def num_supervised(self) -> int:
        return self.chosen.num_supervised + self.rejected.num_supervised

    def answers(self) -> tuple[list[int], list[int]]:
        """The supervised tokens of each side: the answers exactly as the loss sees them."""
        return tuple([label for label in side.labels if label != IGNORE] for side in self.sides)


def prefix_share(a: Sequence, b: Sequence) -> float:
    """The length of the common prefix of ``a`` and ``b`` (strings or token lists) over the shorter one's: 1.0
    when one begins the other, 0.0 when they differ from the start or one is empty."""
    shorter = min(len(a), len(b))
    if shorter == 0:
        return 0.0
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), shorter)
    return same / shorter


def shares_long_prefix(pair: Pair | EncodedPair) -> bool:
    """Whether the pair's answers (text for a Pair, supervised tokens for an EncodedPair) share more than
    LONG_PREFIX_SHARE of the shorter one. On shared tokens DPO's gradient for chosen and rejected cancels, so
    the preference is learned from the first differing token only: likelihood moves, greedy answers may not."""
    return prefix_share(*pair.answers()) > LONG_PREFIX_SHARE


def mostly_long_prefix(long_prefix_pairs: int, pairs: int) -> bool:
    """Whether such pairs are most of the data: where the data doctor and the run plan warn."""
    return pairs > 0 and long_prefix_pairs / pairs > SHARED_PREFIX_MAJORITY


def encode_pairs(pairs: Sequence, tokenizer, options, system_prompt: str | None, what: str,
                 progress: bool = True) -> tuple[list[EncodedPair], list[str]]:
    """Both sides of each ``data.pairs.Pair`` encoded with only the answer supervised, and where the pairs that
    could not be kept are (a side dropped by truncation=drop, or left with no supervised token)."""
    options = replace(options, last_turn_only=True, train_on_prompt=False)
    kept, lost = [], []
    with progress_bar(f"tokenizing {what}", len(pairs), enabled=progress and len(pairs) >= 500, unit="pair",
                      keep=True) as bar:
        for pair in pairs:
            pair = replace(pair, prompt=with_system_prompt([pair.prompt], system_prompt)[0])
            sides = encode_pair(pair, tokenizer, options)
            bar.update(1)
            if sides is None or not all(side.num_supervised for side in sides):
                lost.append(pair.where)
                continue
            kept.append(EncodedPair(*sides, source=sides[0].source, line=sides[0].line))
    return kept, lost
