#!/usr/bin/env bash
# The folder bench/gpu_check.sh needs on a CUDA machine that has no network: wheels of the packages
# its image lacks, and the default model's tokenizer (bench/gpu_model.py builds the 1B model around it).
#
#   bash bench/gpu_wheels.sh [DIR]        # default: bench/gpu_carry (ignored by git)
#
# The machine is expected to hold Python 3.12, torch (a CUDA build), transformers, peft, accelerate,
# pytest, numpy, pandas, pyarrow, pyyaml, rich, jinja2, safetensors, tokenizers, regex, tqdm,
# xxhash, fsspec and triton. What it lacks, and what is fetched here (pinned: the versions this
# project's CPU tests run with, and the newest bitsandbytes and liger-kernel):
#   bitsandbytes (method qlora), liger-kernel (bench/gpu.sh --liger), trl (bench/gpu.sh's trl_best)
#   and datasets with dill and multiprocess (trl's and the seed recipe's data).
# Left out: flash-attn (no wheel without a build for the exact torch and CUDA; hundreds of MB; every
# system then runs sdpa) and the project's evaluation-only dependencies (rouge-score, jieba,
# bert-score, gguf, fastapi, uvicorn), which neither the cuda tests nor the benchmark import.
#
# bitsandbytes ships one library per CUDA and ROCm release (the wheel is about 43 MB, 129 MB
# unpacked); the copy made here keeps only the CPU library and those of BNB_CUDA (default "130 132":
# the CUDA 13 builds; torch 2.11+cu130 loads libbitsandbytes_cuda130.so), about 4 MB. Everything
# that travels to the machine (the repository's files and this folder) must stay under 64 MiB;
# the script measures both and fails above that.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
dest=${1:-bench/gpu_carry}
BNB_CUDA=${BNB_CUDA:-"130 132"}
LIMIT_BYTES=$((64 * 1024 * 1024))
WHEELS=(bitsandbytes==0.50.2 liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

rm -rf "$dest"
mkdir -p "$dest/wheels"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 any; do
    platforms+=(--platform "$tag")
done
# --no-deps: the machine has every other requirement of these (see above); pip cannot check it from here.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest/wheels" "${WHEELS[@]}"

"$PYTHON" - "$dest/wheels" "$BNB_CUDA" <<'EOF'
"""Rewrite the bitsandbytes wheel without the libraries of other CUDA, ROCm and XPU releases."""
import re
import sys
import zipfile
from pathlib import Path

folder, keep = Path(sys.argv[1]), {f"cuda{v}" for v in sys.argv[2].split()} | {"cpu"}
(wheel,) = folder.glob("bitsandbytes-*.whl")
native = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")
stripped = wheel.with_suffix(".tmp")
dropped = []
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as out:
    for item in src.infolist():
        match = native.match(item.filename)
        if match and match.group(1) not in keep:
            dropped.append(item.filename)
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # the record lists exactly the files installed
            data = "".join(line + "\n" for line in data.decode().splitlines()
                           if line.split(",")[0] not in dropped).encode()
        out.writestr(item, data)
stripped.replace(wheel)
print(f"{wheel.name}: kept {', '.join(sorted(keep))}; dropped {len(dropped)} libraries of other releases")
EOF

PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" - "$dest/tokenizer" <<'EOF'
"""The default model's tokenizer (and chat template), for bench/gpu_model.py --tokenizer."""
import sys

from transformers import AutoTokenizer

from tunesmith.models.resolve import resolve

AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct")).save_pretrained(sys.argv[1])
EOF

folder_bytes=$(du -sb "$dest" | cut -f1)
# What a copy of the working tree holds: tracked files and untracked ones git does not ignore, plus this folder.
# (a file deleted but not yet committed is no longer there: du skips it and says so)
tree_bytes=$({ git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- || true; } | tail -1 | cut -f1)
total=$((folder_bytes + tree_bytes))
ls -l "$dest/wheels"
awk -v f="$folder_bytes" -v t="$tree_bytes" -v d="$dest" 'BEGIN { m = 1048576
    printf "%s: %.1f MiB; with the repository (%.1f MiB): %.1f MiB of the 64 MiB that may travel\n", d, f / m, t / m, (f + t) / m }'
if ((total > LIMIT_BYTES)); then
    echo "too large: more than 64 MiB would travel" >&2
    exit 1
fi
