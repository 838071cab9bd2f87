"""Helpers for the CUDA tests: `tunesmith train` in a subprocess, after a few lines of set-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False here (bench/gpu_check.sh runs these on one)"

# bench/train_throughput.py's own liger-kernel set-up (what bench/gpu.sh --liger gives every system), then the CLI.
LIGER = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); "
         "from train_throughput import Workload, prepare_child; prepare_child(Workload(device='cuda', liger=True)); "
         "from transformers.models.llama import modeling_llama; "
         "print('LlamaRMSNorm from', modeling_llama.LlamaRMSNorm.__module__, file=sys.stderr)")
# Bit-for-bit CUDA runs: PyTorch's deterministic kernels (efficient attention's backward is not one by
# default); CUBLAS_WORKSPACE_CONFIG goes with it (see train_cli's env).
DETERMINISTIC = "import torch; torch.use_deterministic_algorithms(True, warn_only=True)"
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def train_cli(flags: list[str], setup: str = "", **env) -> subprocess.CompletedProcess:
    """``tunesmith train FLAGS`` in a fresh process that first runs ``setup`` (Python source)."""
    code = f"{setup}\nimport sys\nfrom tunesmith.cli import main\nsys.exit(main(['train', *sys.argv[1:]]))"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code, *flags], env=full_env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
