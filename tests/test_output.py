"""output.py: the progress bar (drawn on a terminal's stderr; timed plain lines in a pipe) and the number formats."""

from __future__ import annotations

import io
import sys

from tunesmith.output import progress_bar, stdout_console


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


def test_a_pipe_gets_timed_plain_lines_with_an_eta(monkeypatch):
    from tunesmith import output

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(output, "PIPE_REPORT_S", 0.0)
    with progress_bar("generating", 4, unit="answers") as bar:
        bar.update(0.5)
        bar.update(2)
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["generating: 0/4 answers (12%)", "generating: 2/4 answers (62%)"]
    assert all("\r" not in line and "left" in line for line in lines)


def test_a_fraction_moves_the_terminal_bar_and_the_count_stays_whole(monkeypatch):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress_bar("generating", 4, unit="answers", keep=True) as bar:
        bar.update(2.5)
        bar.refresh()
        assert "62%" in stream.getvalue() and " 2/4 answers" in stream.getvalue()


def test_resumed_work_counts(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar("generating", 10, done=3) as bar:
        assert bar.n == 3


def test_numbers_and_deltas():
    from tunesmith.output import fmt_delta, fmt_number

    assert (fmt_number(0.12345), fmt_number(7), fmt_number(None, missing="n/a")) == ("0.1235", "7", "n/a")
    assert (fmt_delta(0.5, 3), fmt_delta(-2), fmt_delta(None)) == ("+0.500", "-2", "")


def test_a_long_command_printed_to_a_file_stays_on_one_line(monkeypatch):
    """A file or a pipe gets no 80-column wrap: a suggested command is copied whole."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    command = "tunesmith train --data " + "/a/long/path" * 20 + "/train.jsonl --output-dir runs/x"
    stdout_console().print(command)
    assert stream.getvalue() == command + "\n"
