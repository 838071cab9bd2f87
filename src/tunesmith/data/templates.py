"""Chat templates: the tokenizer's own, or a built-in one for base models.

A template is the jinja text transformers renders with ``apply_chat_template``. Every built-in
closes each assistant turn with a single end token (``<|im_end|>``, ``<|eot_id|>`` or EOS) so
the model learns to stop; tokenize.py supervises exactly that token.

Built-ins only use ``message['content']``: tool calls and tool schemas reach them as text
(see tokenize.render_messages). A built-in whose special tokens are missing from the
vocabulary is refused rather than silently spelled out as several ordinary tokens: the end of
turn would then not be one token that generation can stop on, and adding tokens would need new,
untrained embedding rows. Use ``alpaca`` or ``seed`` (EOS only) with such a tokenizer.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

from tunesmith.errors import UsageError

# Tokens that close a turn in common chat templates; whichever the vocabulary has stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "</s>")

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA3 = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Stanford Alpaca's layout; its preamble stands in for a missing system prompt.
_ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{% set turns = messages[1:] %}"
    "{% else %}"
    "{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n' }}{% set turns = messages %}"
    "{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ '### Observation:\n' + message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

# The seed tutorial's prompt, "指令: {instruction}\n输出: {answer}", closed by EOS. Its optional
# "输入:" line has no place in a Conversation: readers fold the input into the user turn.
_SEED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '指令: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '输出: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '观察: ' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '输出: ' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": _CHATML, "llama3": _LLAMA3, "alpaca": _ALPACA, "seed": _SEED}

# Tokens each built-in writes literally; "eos" means the tokenizer's own EOS token.
_REQUIRED_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "alpaca": ("eos",),
    "seed": ("eos",),
}


def apply_template(tokenizer, template: str | None) -> str:
    """Put the chat template to use on ``tokenizer`` and return its jinja text.

    ``None`` keeps the tokenizer's own template (falling back to chatml, or alpaca when the
    vocabulary lacks ChatML's tokens); a built-in name or a path to a .jinja file replaces it.
    """
    if template is None:
        own = current_template(tokenizer)
        if own:
            return own
        fallback = "chatml" if not missing_tokens(tokenizer, "chatml") else "alpaca"
        print(f"note: {tokenizer.name_or_path or 'the tokenizer'} has no chat template; using the built-in "
              f"'{fallback}' template", file=sys.stderr)
        template = fallback
    if template in BUILTIN_TEMPLATES:
        missing = missing_tokens(tokenizer, template)
        if missing:
            raise UsageError(f"the '{template}' template needs the tokens {', '.join(missing)}, which "
                             f"{tokenizer.name_or_path or 'this tokenizer'} does not have as single tokens; "
                             "choose 'alpaca' or 'seed' (they only need EOS) or the tokenizer's own template")
        tokenizer.chat_template = BUILTIN_TEMPLATES[template]
        return tokenizer.chat_template
    if template.endswith(".jinja") and Path(template).is_file():
        tokenizer.chat_template = Path(template).read_text(encoding="utf-8")
        return tokenizer.chat_template
    raise UsageError(f"unknown template '{template}': choose one of {', '.join(BUILTIN_TEMPLATES)}, "
                     "a .jinja file, or leave it unset to use the tokenizer's own")


def current_template(tokenizer) -> str | None:
    """The jinja text on ``tokenizer`` (the conversation one when it has several), or None."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the unnamed conversation one is "default"
        own = own.get("default")
    return own or None


def missing_tokens(tokenizer, name: str) -> list[str]:
    """The tokens built-in ``name`` writes that do not encode to exactly one token."""
    missing = []
    for token in _REQUIRED_TOKENS[name]:
        if token == "eos":
            if tokenizer.eos_token is None:
                missing.append("an EOS token")
        elif len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
            missing.append(token)
    return missing


def template_label(tokenizer) -> str:
    """How error messages name the template on ``tokenizer``."""
    text = current_template(tokenizer)
    for name, builtin in BUILTIN_TEMPLATES.items():
        if text == builtin:
            return f"the built-in '{name}' template"
    return f"the chat template of {tokenizer.name_or_path or 'this tokenizer'}"


# ---------------------------------------------------------------- control tokens

def control_tokens(tokenizer) -> tuple[str, ...]:
    """Every string the tokenizer turns into a special or added token wherever it appears in text
    (turn markers, EOS, padding, tool tags...), longest first."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return tuple(sorted({t for t in [*added, *tokenizer.all_special_tokens] if t}, key=lambda t: (-len(t), t)))


@functools.lru_cache(maxsize=32)
def _control_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def find_control_token(text: str | None, tokenizer) -> str | None:
    """The first control token spelled out in ``text``, or None.

    Message content is pasted into the rendered prompt, and the whole prompt is tokenized at once:
    a ``<|im_end|>`` typed by a user would become the real end-of-turn token, and what follows it
    could pose as a system turn. Callers refuse such content (the server with a 400, training
    with the file and line) rather than let it be read as template structure."""
    pattern = _control_pattern(control_tokens(tokenizer))
    found = pattern.search(text) if pattern and text else None
    return found.group(0) if found else None
