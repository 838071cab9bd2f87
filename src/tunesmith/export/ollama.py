"""An Ollama Modelfile beside a GGUF export: ``ollama create NAME -f model.Modelfile`` then serves the run as
tunesmith does (the same prompt text, the same stops, the same system prompt).

``tunesmith export RUN --gguf --out model.gguf`` writes ``model.Modelfile`` next to it (named after the file,
so several exports can share a folder):

    FROM ./model.gguf
    TEMPLATE ...                   the run's chat template in Ollama's Go-template syntax
    PARAMETER stop "<|im_end|>"    every token tunesmith's generate stops at, training's end-of-turn first
    SYSTEM ...                     the run's system prompt, else the default the template inserts itself

The Jinja template is not translated as text but read off what it renders. Conversations of sentinel messages
are rendered and cut at the sentinels, which gives the text before the first message, each role's text
before and after its content, and the generation prompt: the template's layout. The layout must then
reproduce the Jinja template exactly on every probe conversation (with and without a system message, several
turns, content with surrounding spaces and newlines); a template it cannot reproduce (one that trims content,
folds the system prompt into the first user turn, or numbers turns) gets the fallback: the Modelfile is
written without TEMPLATE, Ollama then picks the closest of its own templates to the one embedded in the GGUF,
and a note says so (check ``ollama show NAME --template``).

Ollama gives SYSTEM to every conversation that starts without a system message, which is what training did
with the run's system prompt (merge.template_with_system), and what a template such as SmolLM2's does with
its own default: that default becomes SYSTEM when the run sets none. BOS text the template writes first is
left to llama.cpp when the GGUF tells it to add BOS itself. Not carried: tool schemas and tool calls
(tunesmith writes them as text into the system prompt and the assistant turns; Ollama hands them to the
template separately); an assistant message last in a request is left open for Ollama to continue.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from tunesmith import atomic
from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.prompt import with_system_prompt
from tunesmith.data.tokenize import IGNORE, EncodeOptions, encode
from tunesmith.errors import TunesmithError
from tunesmith.inference import stop_token_ids

ROLES = ("system", "user", "assistant", "tool")
# Plain letters: no template escapes, trims or splits them.
SENTINEL = {"system": "QzxSYSTEMxzQ", "user": "QzxUSERxzQ", "assistant": "QzxASSISTANTxzQ",
            "user2": "QzxUSER2xzQ", "tool": "QzxTOOLxzQ"}
# Conversations the layout must render exactly as the Jinja template does (content as users write it).
PROBES = [
    [("user", "Hello")],
    [("system", "Be brief."), ("user", "  Who are you?\n")],
    [("user", "Hi"), ("assistant", "Hello!"), ("user", "What is 2 + 2?")],
    [("system", "You answer in French.\nAlways."), ("user", "Good morning"), ("assistant", " Bonjour. \n"),
     ("user", "你好，你是谁？"), ("assistant", "Je suis un assistant."), ("user", "Merci")],
]
TOOL_PROBE = [("system", "Use tools."), ("user", "Weather in Paris?"), ("assistant", '{"name": "weather"}'),
              ("tool", '{"temp": 21}')]


def modelfile_path(gguf_path) -> Path:
    """``model.gguf`` -> ``model.Modelfile``, beside it."""
    return Path(gguf_path).with_suffix(".Modelfile")


class NotExpressible(Exception):
    """The chat template does not reduce to a per-message layout; the message says why."""


@dataclass
class Layout:
    """A chat template as text around each message: ``header``, then per message ``prefix[role]`` + content +
    ``suffix[role]``, then ``generation`` (the answer's opening). ``default_system``: the system prompt the
    template inserts when a conversation has none."""

    header: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None = None

    def render(self, messages: list[dict], generation: bool = True) -> str:
        if self.default_system is not None and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return self.header + body + (self.generation if generation else "")


# ------------------------------------------------------------------------------------------ layout

def chat_layout(tokenizer) -> Layout:
    """The layout of ``tokenizer``'s chat template, checked against it on PROBES; NotExpressible if none fits."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise NotExpressible("the model has no chat template")
    try:
        layout = _derive(tokenizer)
        for probe in PROBES:
            _check(tokenizer, layout, probe, generation=True)
        _check(tokenizer, layout, PROBES[-1][:3], generation=False)  # a closed assistant turn
    except TemplateError as exc:  # its own raise_exception, e.g. no system role
        raise NotExpressible(f"the template refuses a plain system/user/assistant conversation ({exc})") from None
    # A template that cannot place a tool turn gets no branch for it in the Go template.
    with contextlib.suppress(NotExpressible, TemplateError):
        _add_tool_role(tokenizer, layout)
    return layout


def _render(tokenizer, messages: list[tuple[str, str]], generation: bool) -> str:
    dicts = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation)


def _pieces(tokenizer, keys: list[str], generation: bool) -> list[str]:
    """The rendering of sentinel messages (``keys`` into SENTINEL) cut at the sentinels: len(keys) + 1 pieces."""
    text = _render(tokenizer, [(k.rstrip("2"), SENTINEL[k]) for k in keys], generation)
    pieces = []
    for key in keys:
        before, found, text = text.partition(SENTINEL[key])
        if not found or SENTINEL[key] in text:
            raise NotExpressible("the template does not write each message's content once, unchanged")
        pieces.append(before)
    return [*pieces, text]


def _derive(tokenizer) -> Layout:
    full = _pieces(tokenizer, ["system", "user", "assistant", "user2"], generation=True)
    closed = _pieces(tokenizer, ["system", "user", "assistant", "user2"], generation=False)
    answered = _pieces(tokenizer, ["system", "user", "assistant"], generation=False)
    alone = _pieces(tokenizer, ["user"], generation=False)
    suffix = {"user": closed[4], "assistant": answered[3]}
    prefix = {"assistant": _after(full[2], suffix["user"]), "user": _after(full[3], suffix["assistant"])}
    suffix["system"] = _before(full[1], prefix["user"])
    generation = _after(full[4], suffix["user"])
    header = alone[0][:len(alone[0]) - len(prefix["user"])] if alone[0].endswith(prefix["user"]) else None
    if header is not None and full[0].startswith(header):
        return Layout(header, {**prefix, "system": full[0][len(header):]}, suffix, generation)
    # No header fits: the lone user message was preceded by a system turn the template inserted itself.
    between = full[1]
    if not (alone[0].startswith(full[0]) and alone[0].endswith(between)
            and len(alone[0]) >= len(full[0]) + len(between)):
        raise NotExpressible("the text before the first message depends on the conversation")
    default = alone[0][len(full[0]):len(alone[0]) - len(between)]
    return Layout("", {**prefix, "system": full[0]}, suffix, generation, default_system=default)


def _after(text: str, head: str) -> str:
    if not text.startswith(head):
        raise NotExpressible("a role's closing text depends on the message that follows")
    return text[len(head):]


def _before(text: str, tail: str) -> str:
    if not text.endswith(tail):
        raise NotExpressible("a role's opening text depends on the message before it")
    return text[:len(text) - len(tail)]


def _check(tokenizer, layout: Layout, messages: list[tuple[str, str]], generation: bool) -> None:
    expected = _render(tokenizer, messages, generation)
    if layout.render([{"role": r, "content": c} for r, c in messages], generation) != expected:
        raise NotExpressible("the template renders some conversations differently from a fixed text around each "
                             "message (it may trim content, merge the system prompt into a turn, or number turns)")


def _add_tool_role(tokenizer, layout: Layout) -> None:
    keys = ["system", "user", "assistant", "tool"]
    pieces = _pieces(tokenizer, keys, generation=True)
    prefix = _after(pieces[3], layout.suffix["assistant"])
    suffix = _before(pieces[4], layout.generation)
    candidate = Layout(layout.header, {**layout.prefix, "tool": prefix}, {**layout.suffix, "tool": suffix},
                       layout.generation, layout.default_system)
    _check(tokenizer, candidate, TOOL_PROBE, generation=True)
    layout.prefix, layout.suffix = candidate.prefix, candidate.suffix


# ------------------------------------------------------------------------------------- Go template

def go_template(layout: Layout, bos_token: str | None = None) -> str:
    """``layout`` in Ollama's Go-template syntax over ``.Messages``. ``bos_token``: BOS text to leave out of the
    template's start because llama.cpp adds BOS itself. Only ``range``, ``if``/``else if``, ``eq``/``ne``/
    ``and``/``not``, ``len``/``slice`` and ``.Role``/``.Content`` are used, with no whitespace trimming, so
    every character outside the actions is the template's own text."""
    header, prefix = layout.header, dict(layout.prefix)
    if bos_token:
        if header.startswith(bos_token):
            header = header[len(bos_token):]
        elif not header and layout.default_system is not None and prefix["system"].startswith(bos_token):
            prefix["system"] = prefix["system"][len(bos_token):]  # a system turn always comes first
    parts = [header, "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    for n, role in enumerate(r for r in ROLES if r in prefix):
        parts.append(f'{{{{ {"if" if n == 0 else "else if"} eq .Role "{role}" }}}}{prefix[role]}{{{{ .Content }}}}')
        closing = layout.suffix[role]
        if role == "assistant" and closing:  # left open when last: Ollama continues a given answer
            closing = f"{{{{ if not $last }}}}{closing}{{{{ end }}}}"
        parts.append(closing)
    parts.append('{{ end }}{{ if and $last (ne .Role "assistant") }}' + layout.generation + "{{ end }}{{ end }}")
    text = "".join(parts)
    pieces = [header, layout.generation, *prefix.values(), *layout.suffix.values()]
    literal = "".join(pieces)
    if "{{" in literal or any(piece.endswith("{") for piece in pieces):  # "{" + "{{ end }}" opens an action early
        raise NotExpressible("the template's own text contains '{{', which Go templates would read as an action")
    try:
        _checked(literal, "the template's text")
    except TunesmithError as exc:
        raise NotExpressible(str(exc)) from None
    return text


# --------------------------------------------------------------------------------------- Modelfile

@dataclass
class Modelfile:
    text: str | None  # None: no Modelfile can be written (see note)
    note: str | None = None  # why TEMPLATE is missing, or why there is no Modelfile


def modelfile_for(loaded, gguf_path, *, add_bos: bool) -> Modelfile:
    """The Modelfile for ``loaded`` (a models.load.Loaded, merged) exported to ``gguf_path``; ``add_bos``: the
    GGUF tells llama.cpp to add BOS itself."""
    tokenizer = loaded.tokenizer
    note, template, system = None, None, loaded.system_prompt
    try:
        layout = chat_layout(tokenizer)
        template = go_template(layout, tokenizer.bos_token if add_bos else None)
        system = system or layout.default_system
    except NotExpressible as exc:
        note = (f"{exc}; {modelfile_path(gguf_path).name} has no TEMPLATE, so Ollama picks the closest of its own "
                "templates to the one in the GGUF: check `ollama show NAME --template` against `tunesmith generate`")
    try:
        text = modelfile_text(Path(gguf_path).name, template, stop_tokens(loaded), system)
    except TunesmithError as exc:
        return Modelfile(None, f"no Ollama Modelfile written: {exc}")
    return Modelfile(text, note)


def modelfile_text(gguf_name: str, template: str | None, stops: list[str], system: str | None) -> str:
    source = f"./{gguf_name}"
    lines = ["# Written by tunesmith: ollama create NAME -f <this file>",
             f"FROM {_quoted(source, 'the file name') if ' ' in source else source}"]
    if template is not None:
        lines.append(f'TEMPLATE """{_checked(template, "the template")}"""')
    lines += [f"PARAMETER stop {_quoted(stop, 'the stop token')}" for stop in stops]
    if system:
        lines.append(f'SYSTEM """{_checked(system, "the system prompt")}"""')
    return "\n".join(lines) + "\n"


def _checked(value: str, what: str) -> str:
    """Ollama's parser ends a triple-quoted value at the first triple quote and drops unprintable characters."""
    bad = '"""' if '"""' in value else next((c for c in value if not (c.isprintable() or c in "\n\t")), None)
    if bad is not None:
        raise TunesmithError(f"{what} contains {bad!r}, which a Modelfile cannot hold")
    return value


def _quoted(value: str, what: str) -> str:
    value = _checked(value, what)
    return f'"""{value}"""' if '"' in value or "\n" in value else f'"{value}"'


def stop_tokens(loaded) -> list[str]:
    """What tunesmith's generate stops at, the end-of-turn token training supervised first."""
    ids = stop_token_ids(loaded.model, loaded.tokenizer)
    end = supervised_end(loaded.tokenizer, loaded.system_prompt)
    ordered = ([end] if end is not None else []) + [i for i in ids if i != end]
    return [loaded.tokenizer.convert_ids_to_tokens(i) for i in ordered]


def supervised_end(tokenizer, system_prompt: str | None) -> int | None:
    """The token that closes an assistant turn in training (its last supervised label), as verify finds it."""
    conv = with_system_prompt([Conversation([Message("user", "Hi"), Message("assistant", "Hello")])], system_prompt)
    try:
        encoded = encode(conv[0], tokenizer, EncodeOptions())
    except TunesmithError:
        return None  # a template training refuses: generate's own stops are all there is
    labels = [label for label in (encoded.labels if encoded else []) if label != IGNORE]
    return labels[-1] if labels else None


def write_modelfile(modelfile: Modelfile, gguf_path) -> Path | None:
    """Write ``modelfile`` beside ``gguf_path`` (atomically; the caller has refused an existing one unless told to
    overwrite); a note goes to stderr. Without text, an older Modelfile there is removed: it would describe
    another export."""
    path = modelfile_path(gguf_path)
    if modelfile.note:
        print(f"note: {modelfile.note}", file=sys.stderr)
    if modelfile.text is None:
        path.unlink(missing_ok=True)
        return None
    return atomic.write_text(path, modelfile.text)
