"""Chat templates: the tokenizer's own, or a built-in one for base models.

A template is the jinja text transformers renders with ``apply_chat_template``. Every built-in
closes each assistant turn with a single end token (``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>`` or EOS) so the model learns to stop; tokenize.py supervises exactly that token.

A model without a template (most base-model GGUF files, many base checkpoints) gets its family's
layout, chosen by architecture (config.json's model_type) and vocabulary (the family's turn markers
as single tokens): Gemma's ``<start_of_turn>``, Llama 3's headers, Qwen's ChatML; Mistral's
``[INST]`` layout for a Mistral architecture; alpaca when none fits. ``choose_template`` says which and why; the doctor, the run plan
and the run's files report it.

Built-ins only use ``message['content']``: tool calls and tool schemas reach them as text
(see tokenize.render_messages). A built-in whose special tokens are missing from the
vocabulary is refused rather than silently spelled out as several ordinary tokens: the end of
turn would then not be one token that generation can stop on, and adding tokens would need new,
untrained embedding rows. Use ``alpaca``, ``mistral`` or ``seed`` (EOS only) with such a tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import dataclass
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

# Gemma 2 and 3: the assistant is "model"; there is no system turn, so a system prompt opens the first
# user turn (as Gemma 3's own template does).
_GEMMA = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set preamble = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set preamble = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (preamble if loop.first else '') + message['content']"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Mistral's instruct layout (v0.1's template): the answer follows [/INST] and ends with EOS; a system
# prompt opens the first instruction. [INST] is plain text in v0.1's vocabulary, a control token in later ones.
_MISTRAL = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set preamble = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set preamble = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ '[INST] ' + (preamble if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% endif %}"
    "{% endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": _CHATML, "llama3": _LLAMA3, "gemma": _GEMMA, "mistral": _MISTRAL,
                                     "alpaca": _ALPACA, "seed": _SEED}

# Tokens each built-in writes literally; "eos" means the tokenizer's own EOS token.
_REQUIRED_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "mistral": ("eos",),
    "alpaca": ("eos",),
    "seed": ("eos",),
}

# The built-in of each family export supports, by config.json's model_type. A family's template is used only
# when the vocabulary has its turn markers (a llama-architecture model may speak Llama 3, ChatML or neither).
FAMILY_TEMPLATES = {"llama": "llama3", "qwen2": "chatml", "qwen2_moe": "chatml", "qwen3": "chatml",
                    "qwen3_moe": "chatml", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma",
                    "gemma3_text": "gemma", "mistral": "mistral", "mixtral": "mistral"}
# Built-ins recognised by their turn markers alone, whatever the architecture says.
_MARKED = ("gemma", "llama3", "chatml")


@dataclass(frozen=True)
class TemplateChoice:
    """The template put on a tokenizer: ``name`` is a built-in's, "own" (the tokenizer's) or a .jinja path."""

    name: str
    reason: str
    text: str

    @property
    def label(self) -> str:
        if self.name == "own":
            return "the tokenizer's own"
        return f"built-in '{self.name}'" if self.name in BUILTIN_TEMPLATES else self.name

    def describe(self) -> str:
        return f"{self.label} ({self.reason})"


def apply_template(tokenizer, template: str | None, model_type: str | None = None) -> TemplateChoice:
    """Put the chat template to use on ``tokenizer`` and say which it is and why.

    ``None`` keeps the tokenizer's own template; without one, the family's built-in (``choose_template``)
    with a note on stderr. A built-in name or a path to a .jinja file replaces it. ``model_type``: the
    model's architecture (config.json's model_type), read from the tokenizer's folder when not given.
    """
    choice = choose_template(tokenizer, template, model_type)
    if choice.name != "own":
        tokenizer.chat_template = choice.text
    if template is None and choice.name != "own":
        print(f"note: {tokenizer.name_or_path or 'the tokenizer'} has no chat template; using the "
              f"{choice.describe()}; another with --data.template NAME (data check: --template NAME)",
              file=sys.stderr)
    return choice


def choose_template(tokenizer, template: str | None, model_type: str | None = None) -> TemplateChoice:
    """The template ``apply_template`` would put on ``tokenizer``, without putting it there."""
    if template is None:
        own = current_template(tokenizer)
        if own:
            return TemplateChoice("own", "the tokenizer has a chat template", own)
        name, reason = family_template(tokenizer, model_type or model_type_of(tokenizer.name_or_path))
        return TemplateChoice(name, f"no chat template in the model; {reason}", BUILTIN_TEMPLATES[name])
    if template in BUILTIN_TEMPLATES:
        missing = missing_tokens(tokenizer, template)
        if missing:
            raise UsageError(f"the '{template}' template needs the tokens {', '.join(missing)}, which "
                             f"{tokenizer.name_or_path or 'this tokenizer'} does not have as single tokens; "
                             "choose 'alpaca', 'mistral' or 'seed' (they only need EOS) or the tokenizer's own "
                             "template")
        return TemplateChoice(template, "named by the user", BUILTIN_TEMPLATES[template])
    if template.endswith(".jinja") and Path(template).is_file():
        return TemplateChoice(template, "named by the user", Path(template).read_text(encoding="utf-8"))
    raise UsageError(f"unknown template '{template}': choose one of {', '.join(BUILTIN_TEMPLATES)}, "
                     "a .jinja file, or leave it unset to use the tokenizer's own")


def family_template(tokenizer, model_type: str | None) -> tuple[str, str]:
    """(built-in name, why) for a model without a template: its architecture's template when the vocabulary
    has that family's turn markers, else any family whose markers it has, else Mistral's layout for a
    Mistral architecture, else alpaca (EOS only)."""
    family = FAMILY_TEMPLATES.get(model_type or "")
    arch = f"a {model_type} architecture"
    if family in _MARKED and not missing_tokens(tokenizer, family):
        return family, f"{arch} with {_markers(family)} in its vocabulary"
    for name in _MARKED:
        if not missing_tokens(tokenizer, name):
            return name, f"{_markers(name)} in the vocabulary ({arch if model_type else 'architecture unknown'})"
    if family == "mistral" and not missing_tokens(tokenizer, family):
        return family, f"{arch}; its turns end with EOS"
    known = arch if model_type else "architecture unknown"
    return "alpaca", f"no family's turn markers in the vocabulary ({known}); alpaca's layout closed by EOS"


def _markers(name: str) -> str:
    return "/".join(_REQUIRED_TOKENS[name])


def model_type_of(folder: str | Path | None) -> str | None:
    """config.json's model_type in ``folder`` (a multimodal model's text config when it nests one), or None."""
    path = Path(folder or "") / "config.json"
    if not folder or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # loading the model names the damaged file; the template falls back to the vocabulary
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    return config.get("model_type") if isinstance(config.get("model_type"), str) else None


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
    """Every string that would act as template structure when typed in content, longest first: the special
    tokens (turn markers, EOS, padding) and the other added tokens the chat template writes itself (Qwen's
    ``<tool_call>``, ``<think>``). Added tokens that are only text the vocabulary keeps whole are not
    (Gemma's runs of newlines and its HTML tags such as ``<table>``): refusing them would refuse every
    multi-line answer."""
    template = current_template(tokenizer) or ""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
             if t.special or (t.content.strip() and t.content in template)]
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
