"""The one data type every reader produces and everything downstream consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

ROLES = ("system", "user", "assistant", "tool")

# Files whose rows are numbered by line; in the others (JSON arrays, Parquet, saved datasets)
# the number is the row's 0-based index, shown as file[index].
LINE_NUMBERED = (".jsonl", ".csv")


def openai_tools(tools: list[dict]) -> list[dict]:
    """Function schemas in OpenAI's form {"type": "function", "function": {...}}, as training shows them."""
    return [t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
            for t in tools]


def location(source: str, line: int) -> str:
    """Where a row lives, as a person looks for it: ``data.jsonl:12`` or ``data.json[11]``."""
    if source.endswith(LINE_NUMBERED):
        return f"{source}:{line}"
    return f"{source}[{line}]"


@dataclass
class Message:
    role: str  # one of ROLES
    content: str
    # Per-message training flag for assistant turns: None follows the masking policy,
    # False never supervises this turn, True always does (OpenAI `weight` 0/1).
    train: bool | None = None
    tool_calls: list[dict] | None = None  # OpenAI style: [{"type": "function", "function": {"name", "arguments"}}]
    name: str | None = None  # tool name, on tool messages

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.name:
            out["name"] = self.name
        return out


@dataclass
class Conversation:
    messages: list[Message]  # user/assistant/tool turns; the system prompt lives in `system`
    system: str | None = None
    tools: list[dict] | None = None  # function schemas offered to the model
    source: str = ""  # file the example came from
    line: int = 0  # JSONL line (1-based) or JSON array index, for error messages
    metadata: dict = field(default_factory=dict)
    is_text: bool = False  # plain text for continued pre-training: no template, every token supervised

    def to_messages(self) -> list[dict]:
        """OpenAI-style message dicts with the system prompt first, as chat templates expect."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m.to_dict() for m in self.messages]

    @property
    def where(self) -> str:
        return location(self.source, self.line)

    def prompt(self) -> Conversation:
        """Everything before the last assistant turn (system prompt and tools kept): what a model is asked."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return replace(self, messages=self.messages[:last])

    def prompt_messages(self) -> list[dict]:
        """The prompt's message dicts: what a model is asked at evaluation."""
        return self.prompt().to_messages()

    def reference(self) -> str:
        """The last assistant turn: the reference answer at evaluation."""
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")
