"""Training fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import chat_rows, write_chat


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_chat(tmp_path / "train.jsonl", chat_rows())


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are far too small to gain from threads; on a busy 2-core machine
    two spinning threads make each step several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
