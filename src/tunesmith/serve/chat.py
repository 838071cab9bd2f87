"""`tunesmith chat`: talk to a model or run in the terminal, tokens printed as they are generated.

The conversation is kept and rendered with the run's own chat template every turn, so what the
model sees is what it was trained on. Commands:

    /reset         forget the conversation (the system prompt stays)
    /system TEXT   set the system prompt (no TEXT: remove it); the conversation is kept
    /history       the conversation so far, one message a line, and its length
    /prompt        the exact text the model will see next, with … for your next message
    /exit          leave (so does end of input, Ctrl-D)
"""

from __future__ import annotations

import sys

from tunesmith.inference import GenerationOptions, render_prompt, stream

HELP = "commands: /reset, /system TEXT, /history, /prompt, /exit"


class Session:
    """One conversation: the system prompt and the user/assistant turns."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict] = []

    def messages(self, next_user: str | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": next_user}] if next_user is not None else []
        return head + self.turns + tail


def chat_repl(model, *, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0) -> int:
    """Run the interactive chat on ``model`` (alias, model dir or run dir) until /exit or end of input."""
    from tunesmith.models.load import load

    loaded = load(model)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature)
    session = Session(system or loaded.system_prompt)
    print(f"chatting with {loaded.path} ({HELP})", flush=True)
    while (line := _read(interactive)) is not None:
        if line.startswith("/"):
            if not _command(line, session, loaded.tokenizer):
                break
        elif line.strip():
            _answer(line, session, loaded, options)
    return 0


def _read(interactive: bool) -> str | None:
    try:
        return input("you> " if interactive else "")
    except EOFError:
        return None


def _command(line: str, session: Session, tokenizer) -> bool:
    """Apply one /command; False means leave."""
    name, _, argument = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.turns.clear()
        print("(conversation cleared)")
    elif name == "/system":
        session.system = argument.strip() or None
        print(f"(system prompt {'set' if session.system else 'removed'})")
    elif name == "/history":
        for message in session.messages():
            print(f"[{message['role']}] {message['content']}")
        print(f"({len(session.turns)} messages{', plus the system prompt' if session.system else ''})")
    elif name == "/prompt":
        print(render_prompt(tokenizer, session.messages("…")))
    else:
        print(f"unknown command {name}; {HELP}")
    return True


def _answer(text: str, session: Session, loaded, options: GenerationOptions) -> None:
    prompt = render_prompt(loaded.tokenizer, session.messages(text))
    print("assistant> ", end="", flush=True)
    pieces = []
    for piece in stream(loaded.model, loaded.tokenizer, prompt, options):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    session.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]
