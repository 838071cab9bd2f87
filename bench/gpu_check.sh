#!/usr/bin/env bash
# The GPU check: one run on a CUDA machine with no network that tests and measures tunesmith's CUDA
# path, in under 9 minutes, and leaves everything it found in one folder.
#
#   bash bench/gpu_wheels.sh              # once, where PyPI is reachable: bench/gpu_carry (~13 MiB)
#   OUT=results bash bench/gpu_check.sh [bench/gpu_carry]    # on the GPU machine
#
# Steps, each under a time limit so that the whole stays inside GPU_CHECK_BUDGET_S (default 480 s; the
# tests get what is left less 270 s, the benchmark the rest):
#   1. installs the carried wheels (bitsandbytes, liger-kernel, trl, datasets, ...) into a folder of
#      its own, on PYTHONPATH, without touching the machine's packages;
#   2. versions.txt: nvidia-smi, the card, torch/CUDA and every package the check uses;
#   3. cuda-tests.xml and .log: the tests marked cuda (CUDA_TESTS below; tests/cuda/);
#   4. gpu-bench.json and .log: bench/gpu.sh --rounds 1 --systems tunesmith,trl_best,plain on the
#      random 1B Llama, capped at GPU_CHECK_TRAIN examples (default 400 of the 900 gpu.sh uses);
#   5. gpu-table.md: each test's result, then tokens/s, the ratio to tunesmith, peak GPU memory and
#      MFU against the card's dense bf16 peak (bench/gpu_report.py).
# GPU_CHECK_STEPS="tests" or "bench" reruns one of steps 3 and 4 alone (default: both).
# Exit status: 0 when every test passed or skipped and the benchmark finished (or the step was not asked
# for), else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
STEPS=" ${GPU_CHECK_STEPS:-tests bench} "
TRAIN=${GPU_CHECK_TRAIN:-400}
carry=${1:-bench/gpu_carry}
out=${OUT:-gpu-check-out}
site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
export PYTHON=${PYTHON:-python3}
# No network there: the hub is never asked; Python's output goes straight to the logs.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"

# The quick ones first: should the time limit stop pytest, the most tests have a result.
CUDA_TESTS=(
    tests/cuda/test_cuda_packing.py::test_packed_losses_equal_unpacked_on_cuda
    tests/cuda/test_cuda_packing.py::test_without_example_boundaries_packed_losses_differ_on_cuda
    tests/cuda/test_cuda_generation.py::test_batched_greedy_equals_one_by_one_on_cuda
    tests/cuda/test_cuda_generation.py::test_batched_greedy_equals_one_by_one_when_rows_stop_at_different_steps_on_cuda
    tests/cuda/test_cuda_training.py::test_bf16_training_loss_within_1_percent_of_fp32
    tests/cuda/test_cuda_training.py::test_qlora_4bit_trains_and_its_adapter_loads_in_plain_peft
    tests/cuda/test_cuda_training.py::test_sigkill_after_a_checkpoint_then_resume_on_cuda_matches_a_straight_run
    tests/cuda/test_cuda_training.py::test_liger_kernel_on_and_off_give_the_same_loss
)

left() {  # seconds left of the budget, less a reserve for the steps after this one; 10 at least
    local s=$((BUDGET_S - (SECONDS - started) - $1))  # (timeout 0 would mean no limit at all)
    echo $((s > 10 ? s : 10))
}

echo "== installing the carried wheels from $carry/wheels into $site"
if compgen -G "$carry/wheels/*.whl" >/dev/null; then
    for wheel in "$carry"/wheels/*.whl; do  # one at a time: a wheel this Python cannot take stops no other
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$wheel" || echo "installing $wheel failed: the checks that need it will say so"
    done
else
    echo "no wheels in $carry/wheels (run bench/gpu_wheels.sh where PyPI is reachable): bitsandbytes, liger-kernel and trl may be missing"
fi
export PYTHONPATH=$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}

echo "== versions"
{
    date -u '+%Y-%m-%d %H:%M UTC'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "nvidia-smi failed"
    "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"card: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs, bf16: {torch.cuda.is_bf16_supported()}")
for name in ("transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel", "flash-attn",
             "triton", "tokenizers", "safetensors", "huggingface-hub", "pyarrow", "numpy", "pytest"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
    # What the carried wheels (installed without their dependencies) need and the machine lacks.
    problems=$("$PYTHON" -m pip check 2>&1 | grep -E -i "bitsandbytes|liger|trl|datasets|dill|multiprocess" || true)
    echo "${problems:-pip check: nothing missing for the carried packages}"
} 2>&1 | tee "$out/versions.txt"

tests_status="not run" bench_status="not run"
if [[ $STEPS == *" tests "* ]]; then
    echo "== cuda tests ($(left 270) s at most)"
    per_test=()
    if "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then
        per_test=(--timeout 150)  # one test that hangs must not take the benchmark's time
    fi
    # SIGINT at the limit: pytest stops as on Ctrl-C and still writes its report of the tests that ran.
    timeout -s INT -k 20 "$(left 270)" "$PYTHON" -m pytest -m cuda -p no:cacheprovider -v -rA \
        ${per_test[@]+"${per_test[@]}"} \
        --junitxml "$out/cuda-tests.xml" "${CUDA_TESTS[@]}" 2>&1 | tee "$out/cuda-tests.log"
    tests_status=${PIPESTATUS[0]}
fi

if [[ $STEPS == *" bench "* ]]; then
    echo "== bench/gpu.sh (${TRAIN} examples; $(left 15) s at most)"
    GPU_TOKENIZER=$carry/tokenizer timeout -k 10 "$(left 15)" bash bench/gpu.sh --rounds 1 \
        --systems tunesmith,trl_best,plain --train "$TRAIN" --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.log"
    bench_status=${PIPESTATUS[0]}
fi

"$PYTHON" bench/gpu_report.py --junit "$out/cuda-tests.xml" --bench "$out/gpu-bench.json" \
    --title "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')" | tee "$out/gpu-table.md"
echo "cuda tests: exit $tests_status; bench/gpu.sh: exit $bench_status; $((SECONDS - started)) s in all; results in $out"
[[ $tests_status == 0 || $tests_status == "not run" ]] && [[ $bench_status == 0 || $bench_status == "not run" ]]
