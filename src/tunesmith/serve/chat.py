"""`tunesmith chat`: talk to a model or run in the terminal, tokens printed as they are generated.

The conversation is kept and rendered every turn by data.prompt.render_prompt, with the run's own
chat template, system prompt and the tools given with --tools, so what the model sees is what it
was trained on. Commands:

    /reset         forget the conversation (the system prompt stays)
    /system TEXT   set the system prompt (no TEXT: remove it); the conversation is kept
    /history       the conversation so far, one message a line, and its length
    /prompt        the exact text the model will see next, with … for your next message
    /exit          leave (so does end of input, Ctrl-D)
"""

from __future__ import annotations

import sys

from tunesmith.data.prompt import read_tools, render_prompt
from tunesmith.inference import GenerationOptions, load_for_generation, stream
from tunesmith.run import run_system_prompt

HELP = "commands: /reset, /system TEXT, /history, /prompt, /exit"


class Session:
    """One conversation: the system prompt, the tools offered and the user/assistant turns."""

    def __init__(self, system: str | None = None, tools: list[dict] | None = None):
        self.system = system
        self.tools = tools
        self.turns: list[dict] = []

    def messages(self, next_user: str | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": next_user}] if next_user is not None else []
        return head + self.turns + tail

    def prompt(self, tokenizer, next_user: str) -> str:
        """What the model sees when ``next_user`` is asked next (the system prompt here is already the run's
        unless /system changed it, so no run info is passed: a removed system prompt stays removed)."""
        return render_prompt(tokenizer, self.messages(next_user), tools=self.tools)


def chat_repl(model, *, system: str | None = None, tools: str | None = None, max_new_tokens: int = 512,
              temperature: float = 0.0, precision: str | None = None) -> int:
    """Run the interactive chat on ``model`` (alias, model dir or run dir) until /exit or end of input.

    ``tools``: a JSON file of function schemas offered to the model; ``precision``: see
    ``inference.load_for_generation``."""
    schemas = read_tools(tools)
    loaded = load_for_generation(model, precision)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature)
    session = Session(system or run_system_prompt(loaded.run_info), schemas)
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
        print(session.prompt(tokenizer, "…"))
    else:
        print(f"unknown command {name}; {HELP}")
    return True


def _answer(text: str, session: Session, loaded, options: GenerationOptions) -> None:
    prompt = session.prompt(loaded.tokenizer, text)
    print("assistant> ", end="", flush=True)
    pieces = []
    for piece in stream(loaded.model, loaded.tokenizer, prompt, options):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    session.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]
