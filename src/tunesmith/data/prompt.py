"""The one prompt renderer: what a model sees before its answer, exactly as training rendered it.

Eval, generate, chat and serve render through ``render_prompt``; training renders whole
conversations with tokenize.render, on the same pieces (render_messages, the template) and with
the system prompt given by ``with_system_prompt``; export writes the template, and its verify
renders through here. This module owns three rules:

- the template: the tokenizer's own (a run's tokenizer carries the template it trained with); a
  tokenizer with none gets the built-in fallback training uses (templates.apply_template), or the
  template of the run it is compared with;
- the system prompt: the run's (``system_prompt`` in tunesmith.json, from data.system_prompt) is
  given to every conversation that has none, as training gave it;
- tools: the function schemas of the conversation or of the request reach the template when it
  reads ``tools``, and are otherwise appended to the system prompt (tokenize.render_messages).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from tunesmith.data.conversation import Conversation, Message, openai_tools
from tunesmith.data.templates import apply_template, current_template
from tunesmith.data.tokenize import generation_prompt
from tunesmith.errors import UsageError
from tunesmith.run import run_system_prompt


def with_system_prompt(conversations: Iterable[Conversation], system_prompt: str | None) -> list[Conversation]:
    """The conversations as training renders them: ``system_prompt`` for each one that has none.

    Plain text (continued pre-training) has no template and so no system prompt."""
    if not system_prompt:
        return list(conversations)
    return [conv if conv.system or conv.is_text or any(m.role == "system" for m in conv.messages)
            else replace(conv, system=system_prompt) for conv in conversations]


def from_messages(messages: Sequence[dict], tools: list[dict] | None = None) -> Conversation:
    """OpenAI-style message dicts as a Conversation; a leading, non-empty system message becomes its system."""
    messages = list(messages)
    system = None
    if messages and messages[0].get("role") == "system" and messages[0].get("content"):
        system, messages = messages[0]["content"], messages[1:]
    turns = [Message(m["role"], m.get("content") or "", tool_calls=m.get("tool_calls"), name=m.get("name"))
             for m in messages]
    return Conversation(turns, system=system, tools=tools or None)


def render_prompt(tokenizer, source: Conversation | Sequence[dict], run_info: dict | None = None, *,
                  tools: list[dict] | None = None) -> str:
    """The text the model sees before its answer: all of ``source`` and the template's generation prompt.

    ``source``: message dicts (a chat so far, a request) or a Conversation (for a dataset example,
    pass ``conv.prompt()``: the turns before the answer). ``run_info``: the run's tunesmith.json,
    whose system prompt is used when the conversation has none. ``tools``: function schemas in
    OpenAI's form, replacing the conversation's own."""
    conv = source if isinstance(source, Conversation) else from_messages(source)
    if tools:
        conv = replace(conv, tools=tools)
    conv = with_system_prompt([conv], run_system_prompt(run_info))[0]
    ensure_template(tokenizer)
    return generation_prompt(conv, tokenizer)


def ensure_template(tokenizer, fallback: str | None = None) -> None:
    """A tokenizer without a chat template gets ``fallback`` (the template of a compared run, which the
    caller reads from its tokenizer), else the built-in fallback training uses."""
    if current_template(tokenizer):
        return
    if fallback:
        tokenizer.chat_template = fallback
        return
    apply_template(tokenizer, None)


def read_tools(path: str | Path | None) -> list[dict] | None:
    """Function schemas from a JSON file (a list, in OpenAI's form or bare), for --tools."""
    if path is None:
        return None
    import json

    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read tools: {exc}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UsageError(f"{path}: tools: expected a JSON list of function schemas")
    return openai_tools(tools) or None
