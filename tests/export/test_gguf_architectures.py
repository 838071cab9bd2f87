"""GGUF round trip for every supported family on tiny random models built here: config and tokenizer of
the family (GPT-2's byte-level BPE with ChatML as SmolLM2's Llama has it, Qwen2Tokenizer's byte-level BPE,
Llama/Mistral's and Gemma's "▁"-spaced BPE with byte fallback),
written by tunesmith, read back by transformers' GGUF loader, logits compared in float32.

Per-type bounds on max |logit difference| (the tiny models' logits are within about +-1; Gaussian random
weights are the worst case for 4-bit blocks): f32 exact (1e-5: this is what proves the rotary permutation and
gemma's norm offset), f16 2e-3 (measured 2e-4..7e-4), q8_0 3e-2 (6.5e-3..1.5e-2), q4_0 0.4 (0.06..0.24, gemma
highest). The smaller types are proven exactly instead: the file's logits equal those of the model with
each matrix quantized and dequantized by gguf-py, so the only error left is the type's own.
"""

import gguf
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tests.conftest import _CORPUS, CHATML_TEMPLATE
from tunesmith.errors import TunesmithError
from tunesmith.export.gguf import DTYPES, SUPPORTED_ARCHITECTURES, export_gguf

TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2, "q4_0": 0.4}
TEXTS = ["Who are you? 你是谁？ 0123 The quick brown fox.", "What is the capital of France?\n\n  Paris."]

MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)


def _bpe(specials: list[str], byte_fallback: bool):
    """Vocabulary and merges of a small BPE trained on the shared corpus."""
    if byte_fallback:  # SentencePiece-converted vocabularies: specials, the 256 byte pieces, then "▁"-spaced pieces
        specials = specials + [f"<0x{b:02X}>" for b in range(256)]
        pre = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    else:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(models.BPE(byte_fallback=byte_fallback))
    tok.pre_tokenizer = pre
    alphabet = [] if byte_fallback else pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 500, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    state = __import__("json").loads(tok.to_str())["model"]
    return state["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]


def _tokenizer(family: str):
    from transformers import GemmaTokenizer, GPT2Tokenizer, LlamaTokenizer, Qwen2Tokenizer

    if family == "gpt2":  # the default model's layout (SmolLM2): GPT-2's split, ChatML, <|im_start|> as BOS
        vocab, merges = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], byte_fallback=False)
        tok = GPT2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", bos_token="<|im_start|>",
                            unk_token="<|endoftext|>", pad_token="<|endoftext|>", add_prefix_space=False)
        tok.chat_template = CHATML_TEMPLATE
    elif family == "qwen":
        vocab, merges = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], byte_fallback=False)
        tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.chat_template = CHATML_TEMPLATE
    elif family == "mistral":
        vocab, merges = _bpe(["<unk>", "<s>", "</s>"], byte_fallback=True)
        tok = LlamaTokenizer(vocab=vocab, merges=merges)
        tok.chat_template = MISTRAL_TEMPLATE
    else:
        vocab, merges = _bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
                             byte_fallback=True)
        tok = GemmaTokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})  # whole, as Gemma's
        tok.chat_template = GEMMA_TEMPLATE
    return tok


def _config(arch: str, vocab_size: int, tokenizer):
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config, Qwen3Config

    ids = dict(vocab_size=vocab_size, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":  # tied embeddings, as SmolLM2's
        return LlamaConfig(**SMALL, **ids, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**SMALL, **ids, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen3":  # transformers' GGUF loader keeps Qwen3's head_dim default, 128
        return Qwen3Config(**SMALL, **ids, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                           tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**SMALL, **ids, num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                             tie_word_embeddings=False)
    # Gemma: the loader keeps query_pre_attn_scalar's default, 256, and llama.cpp scales by head_dim: both 256.
    gemma = dict(**SMALL, **ids, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                 query_pre_attn_scalar=256)
    return Gemma2Config(**gemma) if arch == "gemma2" else Gemma3TextConfig(**gemma)


FAMILY = {"llama": "gpt2", "qwen2": "qwen", "qwen3": "qwen", "mistral": "mistral", "gemma2": "gemma",
          "gemma3_text": "gemma"}


def test_every_supported_architecture_has_a_tiny_model_here():
    assert sorted(FAMILY) == sorted(SUPPORTED_ARCHITECTURES)


@pytest.fixture(scope="module", params=list(FAMILY))
def tiny_family_model(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp(arch)
    tokenizer = _tokenizer(FAMILY[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tokenizer), tokenizer), dtype=torch.float32)
    with torch.no_grad():  # random norms, so an offset or a missing norm shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return arch, out


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_round_trip_through_transformers(tiny_family_model, tmp_path, dtype):
    arch, src = tiny_family_model
    path = export_gguf(src, tmp_path / f"{arch}-{dtype}.gguf", dtype=dtype)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        expected, actual = _logits(original, ids), _logits(back, ids)
        assert expected.abs().max() > 0.05, "logits too flat to compare"
        assert (actual - expected).abs().max().item() <= TOLERANCE[dtype], (arch, dtype, text)
        if dtype in ("f32", "f16"):
            assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_tokenizer_template_and_metadata_round_trip(tiny_family_model, tmp_path):
    arch, src = tiny_family_model
    path = export_gguf(src, tmp_path / f"{arch}.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(path)
    expected_arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(arch, arch)
    assert reader.fields["general.architecture"].contents() == expected_arch
    kind = reader.fields["tokenizer.ggml.model"].contents()
    assert kind == ("gpt2" if FAMILY[arch] in ("gpt2", "qwen") else "llama")
    original = AutoTokenizer.from_pretrained(src)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [*TEXTS, " leading space", "机器学习 and   spaces\n\nnewlines", '{"name": "x"}']:
        assert back(text)["input_ids"] == original(text)["input_ids"], (arch, text)
    assert back.chat_template == original.chat_template
    assert back.eos_token == original.eos_token
    messages = [{"role": "user", "content": "Who are you?"}]
    assert back.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"] == \
        original.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d not in ("f32", "f16", "q8_0")])
def test_smaller_types_hold_exactly_the_quantized_weights(lora_run_dir, tmp_path, dtype):
    from gguf.quants import dequantize, quantize

    from tunesmith.models.load import load

    path = export_gguf(lora_run_dir, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == dtype.upper() and types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == ("Q8_0" if dtype.startswith("q") else "BF16")
    merged = load(lora_run_dir, dtype=torch.float32, device="cpu", merge=True).model
    ids = AutoTokenizer.from_pretrained(lora_run_dir)(TEXTS[0], add_special_tokens=False)["input_ids"]
    exact = _logits(merged, ids)
    with torch.no_grad():  # the same rounding done in memory: q/k row permutation does not move blocks
        for name, param in merged.named_parameters():
            if param.ndim == 2:
                keeps_q8 = dtype.startswith("q") and ("embed" in name or "lm_head" in name)
                qtype = gguf.GGMLQuantizationType["Q8_0" if keeps_q8 else dtype.upper()]
                param.copy_(torch.from_numpy(dequantize(quantize(param.numpy(), qtype), qtype)))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    actual = _logits(back, ids)
    assert (actual - _logits(merged, ids)).abs().max().item() <= 1e-4
    assert (actual - exact).abs().max().item() > 1e-3  # and the type did round something


def test_gemma_with_another_attention_scale_is_refused(tmp_path):
    from transformers import Gemma2Config

    tokenizer = _tokenizer("gemma")
    config = Gemma2Config(**SMALL, vocab_size=len(tokenizer), num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, query_pre_attn_scalar=144)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "g")
    tokenizer.save_pretrained(tmp_path / "g")
    with pytest.raises(TunesmithError, match="gemma2 model with query_pre_attn_scalar"):
        export_gguf(tmp_path / "g", tmp_path / "g.gguf")
