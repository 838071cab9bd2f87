"""Tiny base models of the families with built-in templates, built in-process with no downloads.

Each has a trained byte-level BPE tokenizer carrying its family's special tokens (Gemma's
<pad>/<eos>/<bos> at ids 0, 1, 2 and <start_of_turn>/<end_of_turn>, Llama 3's headers and
<|eot_id|>, Qwen's ChatML markers, Mistral's <s>/</s>; Gemma's also a few of the added, non-special
text tokens the real vocabulary has), NO chat template (as in a base-model GGUF),
and a shrunk random model of the family's architecture, so config.json names it.
"""

from __future__ import annotations

from pathlib import Path

# family -> (special tokens in id order, bos, eos, pad)
FAMILIES = {
    "gemma3": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", None),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|endoftext|>"),
    "mistral": (["<unk>", "<s>", "</s>"], "<s>", "</s>", None),
}

GEMMA_TEXT_TOKENS = ["\n\n", "\n\n\n", "<table>", "</table>"]

# The template each family gets when it has none, and the token that closes an assistant turn.
EXPECTED = {"gemma3": ("gemma", "<end_of_turn>"), "llama3": ("llama3", "<|eot_id|>"),
            "qwen2": ("chatml", "<|im_end|>"), "mistral": ("mistral", "</s>")}

_CORPUS = [
    "The capital of France is Paris. What is the capital of Italy? Rome is.",
    "You are a helpful assistant. Answer briefly. user model assistant system",
    "Who are you? I am Orbit, an assistant made by Lumen Labs. INST Response",
    "Explain machine learning in one sentence. Machine learning learns patterns from data.",
]


def build_tokenizer(out: Path, family: str):
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import train_bpe

    specials, bos, eos, pad = FAMILIES[family]
    tok = train_bpe(specials, _CORPUS, 400)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=None)
    if family == "gemma3":  # like Gemma's own: text pieces kept whole as added, non-special tokens
        fast.add_tokens(GEMMA_TEXT_TOKENS)
    assert not fast.chat_template
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, family: str, vocab_size: int, tokenizer, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    shape = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id}
    config = {"gemma3": lambda: Gemma3TextConfig(**shape, head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
              "llama3": lambda: LlamaConfig(**shape),
              "qwen2": lambda: Qwen2Config(**shape),
              "mistral": lambda: MistralConfig(**shape, sliding_window=64)}[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return model


def build_family_model(out: Path, family: str) -> Path:
    """A saved tiny base model of ``family`` (see FAMILIES) with no chat template."""
    tokenizer = build_tokenizer(out, family)
    build_model(out, family, len(tokenizer), tokenizer)
    return out
