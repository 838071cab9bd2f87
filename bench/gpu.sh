#!/usr/bin/env bash
# Training throughput on CUDA: tunesmith against TRL, the seed's recipe and a plain loop, on a
# randomly initialised Llama-shaped model of ~1.07B parameters.
#
# bench/gpu_model.py writes the model (Llama 3.2 1B's shape: hidden 2048, 16 layers, 32 heads,
# 8 key/value heads, MLP 8192; the default model's tokenizer, tied embeddings) to a temporary
# directory. bench/train_throughput.py then trains LoRA r=16 on q/k/v/o with every system, one pass
# over 900 alpaca_en_demo examples, rows or batches of 8 x up to 2048 tokens, bf16 (the seed's
# recipe: its fp16), with flash-attention 2 (varlen: packed rows go by cumulative sequence lengths,
# no mask) when flash_attn is installed and liger-kernel's RMSNorm/RoPE/SwiGLU when liger_kernel
# is. It prints non-padding tokens/s, peak GPU memory (torch.cuda.max_memory_allocated in each
# child), peak RSS, held-out loss (only a sanity check on random weights) and MFU: tokens/s x 4N
# FLOPs (LoRA: forward and input gradients; no weight gradients for frozen weights) over the card's
# dense bf16 peak (a table in train_throughput.py; GPU_PEAK_TFLOPS=... overrides it).
#
#   bash bench/gpu.sh [--rounds 3] [--json gpu.json] [--systems tunesmith,trl_best,plain]
#
# Arguments are passed on to train_throughput.py (later ones win): --train N caps the examples.
# GPU_TOKENIZER=DIR gives gpu_model.py a saved tokenizer (bench/gpu_wheels.sh makes one) where the
# default model's is not in the cache and cannot be fetched. Written and syntax-checked on a
# CPU-only machine (bash -n, the Python parts imported there); see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False here)" >&2
    exit 1
fi
kernels=()
if "$PYTHON" -c 'import flash_attn' 2>/dev/null; then
    kernels+=(--attn flash_attention_2)
else
    echo "flash_attn is not installed: every system runs sdpa" >&2
fi
if "$PYTHON" -c 'import liger_kernel' 2>/dev/null; then
    kernels+=(--liger)
else
    echo "liger_kernel is not installed: plain transformers layers" >&2
fi
"$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" bench/gpu_model.py --out "$work/llama-1b" ${GPU_TOKENIZER:+--tokenizer "$GPU_TOKENIZER"}
"$PYTHON" bench/train_throughput.py --device cuda --model "$work/llama-1b" --train 900 --heldout 64 \
    --max-length 2048 --batch 8 ${kernels[@]+"${kernels[@]}"} "$@"
