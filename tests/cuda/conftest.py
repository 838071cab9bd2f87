"""The CUDA tests (marker ``cuda``): skipped, with the reason, where torch sees no CUDA GPU.

bench/gpu_check.sh runs them on a GPU machine; on CPU they are collected and skipped, so they stay
importable and their names stay checked (test_gpu_check_script.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cuda.helpers import NO_CUDA
from tests.train.helpers import chat_rows, write_chat


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_chat(tmp_path / "train.jsonl", chat_rows())

