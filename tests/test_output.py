"""output.py: the progress bar (drawn on a terminal's stderr and nowhere else) and the number formats."""

from __future__ import annotations

import io
import sys

from tunesmith.output import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drawn(monkeypatch, stream: io.StringIO, **kwargs) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    with progress_bar("tokenizing", 4, **kwargs) as bar:
        bar.update(4)
    return stream.getvalue()


def test_drawn_on_a_terminal(monkeypatch):
    assert "tokenizing: 100%" in _drawn(monkeypatch, _Terminal(), keep=True)


def test_not_drawn_in_a_pipe_or_when_disabled(monkeypatch):
    assert _drawn(monkeypatch, io.StringIO()) == ""
    assert _drawn(monkeypatch, _Terminal(), enabled=False) == ""


def test_resumed_work_counts(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar("generating", 10, done=3) as bar:
        assert bar.n == 3


def test_numbers_and_deltas():
    from tunesmith.output import fmt_delta, fmt_number

    assert (fmt_number(0.12345), fmt_number(7), fmt_number(None, missing="n/a")) == ("0.1235", "7", "n/a")
    assert (fmt_delta(0.5, 3), fmt_delta(-2), fmt_delta(None)) == ("+0.500", "-2", "")
