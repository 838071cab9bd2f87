"""A randomly initialised Llama-shaped model of about 1B parameters, for bench/gpu.sh.

Shaped like Llama 3.2 1B (hidden 2048, 16 layers, 32 heads, 8 key/value heads, MLP 8192) with the
default model's tokenizer (SmolLM2's, 49,152 tokens; tied embeddings), so it needs no download beyond
what tunesmith already has (or, with ``--tokenizer DIR``, a saved copy of it: a machine with no network
and no model cache gets one from bench/gpu_wheels.sh). Throughput does not depend on the weights, so
random ones (seeded) do; the held-out loss of such a run only says that nothing broke. Saved in bf16
safetensors.

    python bench/gpu_model.py --out DIR [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

TOKENIZER_FROM = "smollm2-135m-instruct"


def llama_1b_config(vocab_size: int, eos_token_id: int, pad_token_id: int | None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None)


def parameter_count(config) -> int:
    h, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h  # q, o; k, v; gate, up, down; two norms
    return config.vocab_size * h + layers * per_layer + h


def build(out: Path, seed: int = 0, tokenizer_from: str = TOKENIZER_FROM) -> int:
    """Write the random model and the tokenizer to ``out``; returns the parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tunesmith.models.resolve import resolve

    # A saved tokenizer alone is no model directory (no config.json), so only a name is resolved.
    source = tokenizer_from if Path(tokenizer_from).is_dir() else resolve(tokenizer_from)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = llama_1b_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", default=TOKENIZER_FROM,
                        help="the tokenizer's model alias or a directory holding a saved tokenizer")
    args = parser.parse_args()
    print(f"{build(args.out, tokenizer_from=args.tokenizer):,} parameters in {args.out}")


if __name__ == "__main__":
    main()
