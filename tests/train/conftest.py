"""Training fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import chat_rows, write_chat


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_chat(tmp_path / "train.jsonl", chat_rows())
