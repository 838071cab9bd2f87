"""Conversation -> token ids and labels, with the loss mask taken from the rendered template.

How the mask is found (no searching for marker strings):

1. The conversation is rendered in full with the chat template.
2. For each assistant turn i, ``messages[:i]`` rendered with the generation prompt marks where
   the turn's content starts, and ``messages[:i+1]`` marks where the turn ends. Both must be
   prefixes of the full rendering, or the template cannot yield a mask and we fail loudly.
3. The turn's span runs from that start to the end with trailing whitespace removed, so it
   covers the content and the end-of-turn token that closes it, and not the newline after it.
4. The full text is tokenized once (no special tokens added: the template carries BOS if the
   model wants one), and a token is supervised when it overlaps a supervised span: a token that
   joins the prompt's last space to the answer's first word (" Hello" after "输出: ") belongs to
   the answer. Masks never compare ids with the pad id, so pad == eos never hides EOS.

Whitespace the template writes after the last assistant turn is dropped: it is never predicted
at inference (generation stops at the end token) and would otherwise be the last label.

Tools: when the template reads ``tools`` they are passed to it; otherwise their JSON schemas are
appended to the system prompt (replacing a template's default system prompt), because a model
cannot call tools it was never shown. Tool calls likewise become JSON text in the assistant
content when the template does not read ``tool_calls``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tunesmith.config import choices
from tunesmith.data.conversation import Conversation
from tunesmith.data.templates import END_OF_TURN_TOKENS, current_template, find_control_token, template_label
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.output import progress_bar

IGNORE = -100  # the label cross-entropy skips (PyTorch's ignore_index)
TRUNCATION_POLICIES = choices("data.truncation")
TOOLS_PREAMBLE = "You can call the following tools (JSON schemas):\n"


@dataclass
class EncodeOptions:
    max_length: int | None = None
    """Longest example in tokens; None keeps every example whole."""
    truncation: str = "truncate_prompt"
    """What to do with longer examples: "drop" them, "truncate_prompt" (drop the oldest prompt tokens first,
    keep the response and its end token; a response longer on its own is cut but keeps its end token last),
    or "error"."""
    train_on_prompt: bool = False
    """Supervise the prompt text too (system, user, tool turns and the template around them)."""
    last_turn_only: bool = False
    """Supervise only the final assistant turn (turns marked train=True still count)."""

    def __post_init__(self):
        if self.truncation not in TRUNCATION_POLICIES:
            raise UsageError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, not '{self.truncation}'")
        # The encoder's own limit (a label needs a token before it); training asks more (data.max_length's minimum).
        if self.max_length is not None and self.max_length < 2:
            raise UsageError(f"max_length must be at least 2, not {self.max_length}")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (HF convention); IGNORE where not supervised, always at 0
    truncated: bool = False
    source: str = ""
    line: int = 0

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class EncodeResult:
    examples: list[Encoded]
    dropped: int = 0
    truncated: int = 0
    dropped_at: list[str] = field(default_factory=list)  # "file:line" of each dropped conversation
    from_cache: bool = False


@dataclass
class Rendered:
    """A conversation as text, with its assistant turns as character spans."""

    text: str
    spans: list[tuple[int, int, bool]]  # (start, end, supervised) per assistant turn, in order
    is_text: bool = False


# ---------------------------------------------------------------------------- rendering

def render_messages(conv: Conversation, template: str) -> tuple[list[dict], list[dict] | None]:
    """The message dicts and tools to hand to ``template``, shaped for what it can read."""
    fold = _fold_tool_calls if "tool_calls" not in template else _calls_only_in_tool_calls
    messages = [fold(m) for m in conv.to_messages()]
    if not conv.tools or re.search(r"\btools\b", template):
        return messages, conv.tools or None
    schemas = TOOLS_PREAMBLE + json.dumps(conv.tools, ensure_ascii=False)
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + schemas}
    else:
        messages.insert(0, {"role": "system", "content": schemas})
    return messages, None


def _fold_tool_calls(message: dict) -> dict:
    calls = message.pop("tool_calls", None)
    if not calls or _is_call_text(message.get("content")):  # readers put a call-only turn's JSON in content
        return message
    texts = [json.dumps({"name": c["function"]["name"], "arguments": _json_or_text(c["function"].get("arguments"))},
                        ensure_ascii=False) for c in calls]
    content = "\n".join(([message["content"]] if message.get("content") else []) + texts)
    return {**message, "content": content}


def _calls_only_in_tool_calls(message: dict) -> dict:
    """For templates that render tool_calls: drop the call JSON readers also put in content, or it shows twice."""
    if message.get("tool_calls") and _is_call_text(message.get("content")):
        return {**message, "content": ""}
    return message


def _is_call_text(content: str | None) -> bool:
    try:
        parsed = json.loads(content or "")
    except json.JSONDecodeError:
        return False
    calls = parsed if isinstance(parsed, list) else [parsed]
    return bool(calls) and all(isinstance(c, dict) and "name" in c for c in calls)


def _json_or_text(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def render(conv: Conversation, tokenizer, options: EncodeOptions | None = None) -> Rendered:
    """Render ``conv`` with the tokenizer's chat template and locate its assistant turns."""
    options = options or EncodeOptions()
    refuse_control_tokens(conv, tokenizer)
    if conv.is_text:
        return Rendered(text="\n\n".join(m.content for m in conv.messages), spans=[], is_text=True)
    template = current_template(tokenizer)
    if not template:
        raise UsageError("the tokenizer has no chat template; call templates.apply_template first")
    messages, tools = render_messages(conv, template)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise TunesmithError(f"{conv.where}: messages: the conversation has no assistant turn")
    if turns[0] == 0:
        raise TunesmithError(f"{conv.where}: messages: the conversation starts with an assistant turn")
    full = _apply(tokenizer, messages, tools, False, conv)
    flags = _supervision_flags(conv, len(turns), options)
    spans = [_turn_span(tokenizer, messages, tools, i, full, conv) + (flag,)
             for i, flag in zip(turns, flags, strict=True)]
    tail = full[spans[-1][1]:]
    return Rendered(text=full[:spans[-1][1]] if tail.isspace() else full, spans=spans)


def refuse_control_tokens(conv: Conversation, tokenizer) -> None:
    """Refuse content that spells out one of the tokenizer's control tokens, naming file, line and field.

    The rendered text is tokenized whole, so a ``<|im_end|>`` inside content would be trained as a
    real turn boundary, and a ``<|im_start|>system`` after it as a system turn; the server refuses
    the same text at inference, so the model would learn a structure it is never shown. Encoding
    such content as plain text instead would need per-field tokenization and give the model
    look-alike tokens it never otherwise sees. Such text is nearly always a data bug (a conversation
    pasted in already rendered, a scraped transcript): the doctor lists every row, the user fixes them.
    """
    fields = [("system", conv.system)] + [(f"messages[{i}].content", m.content) for i, m in enumerate(conv.messages)]
    fields += [(f"messages[{i}].tool_calls", json.dumps(m.tool_calls, ensure_ascii=False))
               for i, m in enumerate(conv.messages) if m.tool_calls]
    fields += [("tools", json.dumps(conv.tools, ensure_ascii=False))] if conv.tools else []
    for name, text in fields:
        if token := find_control_token(text, tokenizer):
            raise TunesmithError(f"{conv.where}: {name}: contains the control token {token!r}, which would be "
                                 "trained as template structure (a turn boundary), not as text; remove it or "
                                 "spell it differently")


def prompt_text(conv: Conversation, tokenizer) -> str:
    """What the model sees before the last assistant turn, rendered exactly as in training (tools included)."""
    return generation_prompt(conv.prompt(), tokenizer)


def generation_prompt(conv: Conversation, tokenizer) -> str:
    """All of ``conv`` rendered as in training, followed by the template's generation prompt."""
    messages, tools = render_messages(conv, current_template(tokenizer) or "")
    return _apply(tokenizer, messages, tools, True, conv)


class TemplateRefused(TunesmithError):
    """The chat template's own raise_exception (roles not alternating, ...); ``reason`` is its message."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _apply(tokenizer, messages, tools, generation_prompt: bool, conv: Conversation) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as exc:  # the template's own raise_exception: say which example upset it
        raise TemplateRefused(f"{conv.where}: messages: {template_label(tokenizer)} refused this "
                              f"conversation: {exc}", str(exc)) from exc


def _turn_span(tokenizer, messages, tools, i: int, full: str, conv: Conversation) -> tuple[int, int]:
    before = _apply(tokenizer, messages[:i], tools, True, conv)
    through = _apply(tokenizer, messages[:i + 1], tools, False, conv)
    for prefix, what in ((before, "with the generation prompt"), (through, "through this turn")):
        if not full.startswith(prefix):
            raise TunesmithError(
                f"{conv.where}: {template_label(tokenizer)} cannot yield an assistant mask: the conversation "
                f"rendered up to assistant turn {i} {what} is not a prefix of the full rendering "
                "(the template rewrites earlier turns); choose a built-in template with --template")
    end = len(through.rstrip())
    if not _ends_with_end_token(tokenizer, through[len(before):end]):
        raise TunesmithError(
            f"{conv.where}: {template_label(tokenizer)} does not close assistant turns with an end-of-turn or "
            "EOS token, so a fine-tuned model would never learn to stop; choose a built-in template")
    return len(before), end


def _ends_with_end_token(tokenizer, span_text: str) -> bool:
    ends = set(END_OF_TURN_TOKENS) | set(tokenizer.all_special_tokens)
    return any(token and span_text.endswith(token) for token in ends)


def _supervision_flags(conv: Conversation, count: int, options: EncodeOptions) -> list[bool]:
    """Whether each assistant turn is supervised: its train flag wins, then last_turn_only."""
    assistants = [m for m in conv.messages if m.role == "assistant"]
    flags = []
    for position, message in enumerate(assistants):
        default = position == count - 1 if options.last_turn_only else True
        flags.append(default if message.train is None else message.train)
    return flags


# ---------------------------------------------------------------------------- tokens and labels

def _labels(ids: list[int], offsets, rendered: Rendered, train_on_prompt: bool) -> list[int]:
    if rendered.is_text:
        return list(ids)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(len(ids), 2)
    supervised = np.zeros(len(ids), dtype=bool)
    in_turn = np.zeros(len(ids), dtype=bool)
    for start, end, on in rendered.spans:
        inside = (bounds[:, 1] > start) & (bounds[:, 0] < end)
        in_turn |= inside
        if on:
            supervised |= inside
    if train_on_prompt:
        supervised |= ~in_turn
    return np.where(supervised, np.asarray(ids), IGNORE).tolist()


def _last_turn_tokens(offsets, rendered: Rendered) -> int:
    """Index of the first token of the last assistant turn."""
    start = rendered.spans[-1][0]
    return next(i for i, (_, end) in enumerate(offsets) if end > start)


def _truncate(ids: list[int], labels: list[int], response_start: int, max_length: int,
              bos_id: int | None) -> tuple[list[int], list[int]]:
    """Drop the oldest prompt tokens first (keeping a leading BOS); cut an overlong response but keep its last token."""
    keep_bos = bos_id is not None and ids[0] == bos_id and response_start > 0
    head = [0] if keep_bos else []
    room = max_length - len(head) - (len(ids) - response_start)
    if room >= 0:
        keep = head + list(range(max(response_start - room, len(head)), response_start)) + \
            list(range(response_start, len(ids)))
    else:
        keep = list(range(response_start, response_start + max_length - 1)) + [len(ids) - 1]
    return [ids[i] for i in keep], [labels[i] for i in keep]


def _finish(conv: Conversation, rendered: Rendered, ids: list[int], offsets, tokenizer,
            options: EncodeOptions) -> Encoded | None:
    if rendered.is_text:
        ids = ids + [tokenizer.eos_token_id]
        offsets = list(offsets) + [(len(rendered.text), len(rendered.text))]
    labels = _labels(ids, offsets, rendered, options.train_on_prompt)
    encoded = Encoded(input_ids=ids, labels=labels, source=conv.source, line=conv.line)
    if options.max_length is not None and len(ids) > options.max_length:
        encoded = _apply_truncation(encoded, conv, rendered, offsets, tokenizer, options)
    if encoded is not None:
        # Nothing precedes the first token, so it is never predicted: every label left is one the loss uses.
        encoded.labels[0] = IGNORE
    return encoded


def _apply_truncation(encoded: Encoded, conv: Conversation, rendered: Rendered, offsets, tokenizer,
                      options: EncodeOptions) -> Encoded | None:
    ids, labels = encoded.input_ids, encoded.labels
    if options.truncation == "error":
        raise TunesmithError(f"{conv.where}: {len(ids)} tokens is longer than max_length {options.max_length} "
                             "(truncation policy 'error')")
    if options.truncation == "drop":
        return None
    if rendered.is_text:  # plain text keeps its beginning; it no longer ends where the document did
        encoded.input_ids, encoded.labels = ids[:options.max_length], labels[:options.max_length]
    else:
        encoded.input_ids, encoded.labels = _truncate(ids, labels, _last_turn_tokens(offsets, rendered),
                                                      options.max_length, tokenizer.bos_token_id)
    encoded.truncated = True
    return encoded


def encode(conv: Conversation, tokenizer, options: EncodeOptions) -> Encoded | None:
    """Token ids and labels for one conversation; None when the "drop" policy drops it."""
    return _encode_chunk([conv], tokenizer, options)[0]


def _encode_chunk(convs: Sequence[Conversation], tokenizer, options: EncodeOptions) -> list[Encoded | None]:
    _require_fast(tokenizer)
    rendered = [render(conv, tokenizer, options) for conv in convs]
    batch = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [_finish(conv, r, ids, offsets, tokenizer, options)
            for conv, r, ids, offsets in zip(convs, rendered, batch["input_ids"], batch["offset_mapping"], strict=True)]


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{tokenizer.name_or_path or 'the tokenizer'} is a slow (Python) tokenizer; loss masks "
                         "need the character offsets only a fast tokenizer gives")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{tokenizer.name_or_path or 'the tokenizer'} has no EOS token")


def encode_all(convs: Sequence[Conversation], tokenizer, options: EncodeOptions, progress: bool = True,
               chunk_size: int = 256) -> EncodeResult:
    """Encode every conversation (in batches, with a progress bar), counting drops and truncations."""
    result = EncodeResult(examples=[])
    with progress_bar("tokenizing", len(convs), enabled=progress) as bar:
        for begin in range(0, len(convs), chunk_size):
            chunk = convs[begin:begin + chunk_size]
            for conv, encoded in zip(chunk, _encode_chunk(chunk, tokenizer, options), strict=True):
                if encoded is None:
                    result.dropped += 1
                    result.dropped_at.append(conv.where)
                    continue
                result.truncated += encoded.truncated
                result.examples.append(encoded)
            bar.update(len(chunk))
    return result
