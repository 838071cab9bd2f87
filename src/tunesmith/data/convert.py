"""Write conversations in another layout: `tunesmith data convert FILE --to FORMAT --out OUT.jsonl`.

Targets: alpaca, openai (messages), sharegpt, prompt-completion, and the seed's two layouts:
seed-instruction ``{"prompt": "指令: ...\\n输入: ...\\n输出: ", "completion": ...}`` and seed-chat
(messages with the seed's system prompt). A conversation that a target cannot hold (several
turns in a single-turn layout, tool calls where there is no place for them, a weight-0 turn) is
an error naming its row; nothing is dropped or flattened silently.

Preference pairs (see pairs.py) convert between their own layouts: alpaca and sharegpt (LLaMA-Factory's
ranking data), trl (prompt, chosen and rejected as message lists) and openai-preference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tunesmith import atomic
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.pairs import Pair, is_preference_data, read_pairs
from tunesmith.data.readers import ALPACA_FIELDS, DataError, DataIssue, call_text, read_dataset
from tunesmith.errors import TunesmithError, UsageError

SEED_LABELS = ("指令", "输入", "输出")
SEED_SYSTEM_PROMPT = "你是一个有用的AI助手。"
SHAREGPT_NAMES = {"user": "human", "assistant": "gpt", "tool": "observation", "system": "system"}
MAX_LISTED = 20


class ConversionError(TunesmithError):
    def __init__(self, target: str, problems: list[str]):
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        super().__init__(f"{len(problems)} example(s) cannot be written as {target}:\n{listed}{more}")


class _CannotHold(Exception):
    """This conversation does not fit the target layout (the reason is the message)."""


# ---------------------------------------------------------------- shared pieces


def _no_tools(conv: Conversation, target: str) -> None:
    if conv.tools or any(m.tool_calls or m.role == "tool" for m in conv.messages):
        raise _CannotHold(f"has tool calls or tool results, which {target} cannot hold (use openai or sharegpt)")


def _no_weights(conv: Conversation, target: str) -> None:
    if any(m.train is False for m in conv.messages):
        raise _CannotHold(f"has assistant turns with weight 0, which {target} cannot hold (use openai)")


def _not_text(conv: Conversation, target: str) -> None:
    if conv.is_text:
        raise _CannotHold(f"is plain text (no prompt and response), which {target} cannot hold")


def _pairs(conv: Conversation, target: str) -> list[tuple[Message, Message]]:
    """(user, assistant) turns, strictly alternating, as alpaca's history and the flat layouts need."""
    _not_text(conv, target)
    _no_tools(conv, target)
    _no_weights(conv, target)
    roles = [m.role for m in conv.messages]
    if len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        raise _CannotHold(f"its turns ({', '.join(roles)}) are not user/assistant pairs, which {target} needs")
    return list(zip(conv.messages[::2], conv.messages[1::2], strict=True))


def _single_turn(conv: Conversation, target: str) -> tuple[Message, Message]:
    pairs = _pairs(conv, target)
    if len(pairs) > 1:
        raise _CannotHold(f"has {len(pairs)} rounds; {target} holds one prompt and one response (use openai)")
    if conv.system:
        raise _CannotHold(f"has a system prompt, which {target} cannot hold (use openai, sharegpt or alpaca)")
    return pairs[0]


def instruction_and_input(conv: Conversation, user: Message) -> tuple[str, str]:
    """Alpaca's two fields: as read (when the user turn is still theirs), else the whole turn."""
    fields = conv.metadata.get(ALPACA_FIELDS) or {}
    instruction, query = fields.get("instruction", ""), fields.get("input", "")
    if query and instruction + "\n" + query == user.content:
        return instruction, query
    return user.content, ""


def _user_metadata(conv: Conversation) -> dict:
    return {k: v for k, v in conv.metadata.items() if k != ALPACA_FIELDS}


# ---------------------------------------------------------------- one writer per target


def to_alpaca(conv: Conversation) -> dict:
    *history, (user, answer) = _pairs(conv, "alpaca")
    instruction, query = instruction_and_input(conv, user)
    row = {"instruction": instruction, "input": query, "output": answer.content}
    if conv.system:
        row["system"] = conv.system
    if history:
        row["history"] = [[q.content, a.content] for q, a in history]
    if _user_metadata(conv):
        row["metadata"] = _user_metadata(conv)
    return row


def to_openai(conv: Conversation) -> dict:
    _not_text(conv, "openai")
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    pending_ids: list[str] = []
    for index, message in enumerate(conv.messages):
        out: dict = {"role": message.role, "content": message.content}
        if message.tool_calls:
            calls = [_openai_call(call, f"call_{index}_{k}") for k, call in enumerate(message.tool_calls)]
            pending_ids = [c["id"] for c in calls]
            out["tool_calls"] = calls
            if message.content == call_text(message.tool_calls):
                out["content"] = None  # the call text was only there for templates that read content
        if message.role == "tool":
            out["tool_call_id"] = pending_ids.pop(0) if pending_ids else f"call_{index}"
        if message.name and message.role == "tool":
            out["name"] = message.name
        if message.train is not None and message.role == "assistant":
            out["weight"] = int(message.train)
        messages.append(out)
    return _with_extras({"messages": messages}, conv, conv.tools)


def _openai_call(call: dict, default_id: str) -> dict:
    function = call["function"]
    arguments = function.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call.get("id") or default_id, "type": "function",
            "function": {"name": function["name"], "arguments": text}}


def _with_extras(row: dict, conv: Conversation, tools) -> dict:
    if tools:
        row["tools"] = tools
    if conv.metadata:
        row["metadata"] = conv.metadata
    return row


def to_sharegpt(conv: Conversation) -> dict:
    _not_text(conv, "sharegpt")
    turns = [{"from": "system", "value": conv.system}] if conv.system else []
    for message in conv.messages:
        turn = {"from": SHAREGPT_NAMES[message.role], "value": message.content}
        if message.tool_calls:
            if message.content and message.content != call_text(message.tool_calls):
                raise _CannotHold("has an assistant turn with both text and tool calls, which sharegpt's "
                                  "function_call turn cannot hold (use openai)")
            turn = {"from": "function_call", "value": call_text(message.tool_calls)}
        if message.train is not None and message.role == "assistant":
            turn["weight"] = int(message.train)
        turns.append(turn)
    # Tools as a JSON string of bare schemas: the layout glaive and LLaMA-Factory use.
    tools = json.dumps([t.get("function", t) for t in conv.tools], ensure_ascii=False) if conv.tools else None
    return _with_extras({"conversations": turns}, conv, tools)


def to_prompt_completion(conv: Conversation) -> dict:
    user, answer = _single_turn(conv, "prompt-completion")
    return {"prompt": user.content, "completion": answer.content}


def to_seed_instruction(conv: Conversation, labels: tuple[str, str, str] = SEED_LABELS) -> dict:
    """The seed's layout: an input line only when there is an input."""
    user, answer = _single_turn(conv, "seed-instruction")
    instruction, query = instruction_and_input(conv, user)
    head, middle, tail = labels
    prompt = f"{head}: {instruction}\n" + (f"{middle}: {query}\n" if query else "") + f"{tail}: "
    return {"prompt": prompt, "completion": answer.content}


def to_seed_chat(conv: Conversation) -> dict:
    """Messages with a system prompt always present (the seed's by default)."""
    return to_openai(dataclasses.replace(conv, system=conv.system or SEED_SYSTEM_PROMPT))


TARGETS = ("alpaca", "openai", "sharegpt", "prompt-completion", "seed-instruction", "seed-chat")
NO_SYSTEM_TARGETS = ("prompt-completion", "seed-instruction")


def convert(conversations, to: str, *, system_prompt: str | None = None,
            labels: tuple[str, str, str] | None = None) -> list[dict]:
    """Rows in layout ``to``; every conversation that does not fit is named in one ConversionError.

    ``system_prompt`` replaces each conversation's system prompt; ``labels`` are seed-instruction's
    three labels (default 指令, 输入, 输出).
    """
    if to not in TARGETS:
        raise UsageError(f"unknown target format {to!r}: choose one of {', '.join(TARGETS)}")
    if system_prompt and to in NO_SYSTEM_TARGETS:
        raise UsageError(f"{to} has no place for a system prompt; use seed-chat, openai, sharegpt or alpaca")
    if labels is not None and (to != "seed-instruction" or len(labels) != 3):
        raise UsageError("labels are three strings (instruction, input, output) for seed-instruction only")
    writer = {"alpaca": to_alpaca, "openai": to_openai, "sharegpt": to_sharegpt,
              "prompt-completion": to_prompt_completion, "seed-chat": to_seed_chat,
              "seed-instruction": lambda c: to_seed_instruction(c, labels or SEED_LABELS)}[to]
    rows, problems = [], []
    for conv in conversations:
        if system_prompt:
            conv = dataclasses.replace(conv, system=system_prompt)
        try:
            rows.append(writer(conv))
        except _CannotHold as exc:
            problems.append(f"{conv.where}: {exc}")
    if problems:
        raise ConversionError(to, problems)
    return rows


# ---------------------------------------------------------------- preference pairs


def _joined(pair: Pair, response: list[Message]) -> Conversation:
    """The prompt and one response as read (no train flags), for the conversation writers above."""
    return dataclasses.replace(pair.prompt, messages=[*pair.prompt.messages, *response])


def _one_message(pair: Pair, target: str) -> tuple[Message, Message]:
    if len(pair.chosen) != 1 or len(pair.rejected) != 1:
        raise _CannotHold(f"has a response of several messages, which {target} (one message per side) cannot hold "
                          "(use trl or openai-preference)")
    return pair.chosen[0], pair.rejected[0]


def pair_to_alpaca(pair: Pair) -> dict:
    chosen, rejected = _one_message(pair, "alpaca")
    _no_tools(_joined(pair, [chosen, rejected]), "alpaca")
    row = to_alpaca(_joined(pair, [chosen]))
    del row["output"]
    return {**row, "chosen": chosen.content, "rejected": rejected.content}


def pair_to_sharegpt(pair: Pair) -> dict:
    chosen, rejected = _one_message(pair, "sharegpt")
    row = to_sharegpt(_joined(pair, [chosen]))
    row["chosen"] = row["conversations"].pop()
    row["rejected"] = to_sharegpt(_joined(pair, [rejected]))["conversations"][-1]
    return row


def _openai_parts(pair: Pair) -> tuple[list[dict], list[dict], list[dict]]:
    """The prompt's, the chosen and the rejected OpenAI message dicts (tool call ids kept consistent)."""
    chosen = to_openai(_joined(pair, pair.chosen))["messages"]
    rejected = to_openai(_joined(pair, pair.rejected))["messages"]
    start = len(pair.prompt.messages) + bool(pair.prompt.system)
    return chosen[:start], chosen[start:], rejected[start:]


def pair_to_trl(pair: Pair) -> dict:
    prompt, chosen, rejected = _openai_parts(pair)
    return _with_extras({"prompt": prompt, "chosen": chosen, "rejected": rejected}, pair.prompt, pair.prompt.tools)


def pair_to_openai_preference(pair: Pair) -> dict:
    prompt, chosen, rejected = _openai_parts(pair)
    request = {"messages": prompt, **({"tools": pair.prompt.tools} if pair.prompt.tools else {})}
    row = {"input": request, "preferred_output": chosen, "non_preferred_output": rejected}
    return _with_extras(row, pair.prompt, None)


PAIR_WRITERS = {"alpaca": pair_to_alpaca, "sharegpt": pair_to_sharegpt, "trl": pair_to_trl,
                "openai-preference": pair_to_openai_preference}
PAIR_TARGETS = tuple(PAIR_WRITERS)


def check_pair_target(to: str, where: str) -> None:
    """Refuse a supervised layout for preference pairs read from ``where``."""
    if to not in PAIR_WRITERS:
        raise UsageError(f"{where} holds preference pairs, and {to} is a layout for supervised examples; "
                         f"pairs convert to one of {', '.join(PAIR_TARGETS)}")


def convert_pairs(pairs: list[Pair], to: str, *, system_prompt: str | None = None) -> list[dict]:
    """Rows of preference layout ``to``; every pair that does not fit is named in one ConversionError."""
    check_pair_target(to, ", ".join(dict.fromkeys(pair.source for pair in pairs if pair.source)) or "the input")
    rows, problems = [], []
    for pair in pairs:
        if system_prompt:
            pair = dataclasses.replace(pair, prompt=dataclasses.replace(pair.prompt, system=system_prompt))
        try:
            rows.append(PAIR_WRITERS[to](pair))
        except _CannotHold as exc:
            problems.append(f"{pair.where}: {exc}")
    if problems:
        raise ConversionError(to, problems)
    return rows


# ---------------------------------------------------------------- the command


def parse_labels(text: str | None) -> tuple[str, str, str] | None:
    if text is None:
        return None
    labels = tuple(part.strip() for part in text.split(","))
    if len(labels) != 3 or not all(labels):
        raise UsageError(f"--labels takes three comma-separated labels (instruction,input,output), not {text!r}")
    return labels  # type: ignore[return-value]


def write_rows(rows: list[dict], out: Path) -> None:
    """JSON lines, or one JSON array when the name ends in .json; written whole or not at all."""
    if out.suffix.lower() == ".json":
        text = json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic.write_text(out, text)


def run_convert_command(args) -> int:
    labels = parse_labels(args.labels)
    out = Path(args.out)
    atomic.refuse_existing(out, args.overwrite)  # before reading: a long read must not end in this refusal
    if is_preference_data(args.file, format=args.format, columns=args.columns, encoding=args.encoding):
        rows, formats = _convert_pair_file(args, labels)
    else:
        rows, formats = _convert_file(args, labels)
    write_rows(rows, out)
    print(f"wrote {len(rows)} {args.to} rows (from {', '.join(sorted(set(formats.values())))}) to {args.out}")
    return 0


def _convert_file(args, labels) -> tuple[list[dict], dict]:
    if args.to in PAIR_TARGETS and args.to not in TARGETS:
        raise UsageError(f"{args.to} is a layout for preference pairs, and {args.file} holds supervised examples "
                         "(no rejected response)")
    result = read_dataset(args.file, format=args.format, columns=args.columns, encoding=args.encoding)
    if result.errors:
        raise DataError(result.errors)
    if not result.conversations:
        raise DataError([DataIssue(args.file, -1, "(rows)", "no examples to convert")])
    rows = convert(result.conversations, args.to, system_prompt=args.system_prompt, labels=labels)
    return rows, result.formats


def _convert_pair_file(args, labels) -> tuple[list[dict], dict]:
    if labels is not None:
        raise UsageError("--labels is for seed-instruction, a layout for supervised examples, not for pairs")
    check_pair_target(args.to, args.file)  # before reading
    result = read_pairs(args.file, format=args.format, columns=args.columns, encoding=args.encoding)
    if result.errors:
        raise DataError(result.errors)
    if not result.pairs:
        raise DataError([DataIssue(args.file, -1, "(rows)", "no pairs to convert")])
    return convert_pairs(result.pairs, args.to, system_prompt=args.system_prompt), result.formats
