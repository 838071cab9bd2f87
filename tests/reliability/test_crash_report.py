"""A bug reaches the user as one line naming a saved traceback; user errors never look like bugs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tunesmith.cli import main


def _crash(args):
    {}["missing"]  # a real bug: a KeyError from deep inside a command


def test_unexpected_error_saves_its_traceback(tmp_path, monkeypatch, capfd):
    # The one fault injected in this suite: there is no known bug left to trigger for real.
    import tunesmith.data.doctor as doctor

    monkeypatch.setattr(doctor, "run_check_command", _crash)
    source = tmp_path / "a.jsonl"
    source.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    code = main(["data", "check", str(source)])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected KeyError: 'missing'\n")
    saved = next(iter((tmp_path / "tunesmith-home" / "crash-reports").glob("traceback-*.txt")))
    assert str(saved) in err
    text = saved.read_text(encoding="utf-8")
    assert f"command: tunesmith data check {source}" in text
    assert "Traceback (most recent call last)" in text and "in _crash" in text and "KeyError: 'missing'" in text


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    import tunesmith.data.doctor as doctor

    monkeypatch.setattr(doctor, "run_check_command", _crash)
    monkeypatch.setenv("TUNESMITH_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["data", "check", str(tmp_path)])


def test_a_file_the_system_refuses_to_read_is_a_message_not_a_bug(tmp_path):
    """A data file the system cannot read (an I/O error, even for root): the reason and the path."""
    source = tmp_path / "mem.jsonl"
    source.symlink_to("/proc/self/mem")  # reading it from offset 0 fails with EIO on Linux
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "data", "check", str(source), "--no-tokens"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert f"{source} (file): cannot read: Input/output error" in done.stdout


def test_a_system_error_is_a_message_not_a_bug(tmp_path):
    """Reading a file without permission: the system's reason and the path, no crash report."""
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    source = tmp_path / "secret.jsonl"
    source.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    source.chmod(0)
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "data", "check", str(source), "--no-tokens"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert f"{source} (file): cannot read: Permission denied" in done.stdout


def test_an_output_path_through_a_file_is_a_usage_error(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    (tmp_path / "notes.txt").write_text("a file", encoding="utf-8")
    out = tmp_path / "notes.txt" / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "data", "convert", str(source), "--to", "openai",
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == f"error: cannot create {out}: {tmp_path / 'notes.txt'} is a file, not a directory\n"


def test_an_eval_report_path_taken_by_a_file_is_a_usage_error(tmp_path, capfd):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"prediction": "a", "reference": "a"}\n', encoding="utf-8")
    taken = tmp_path / "report"
    taken.write_text("not a directory", encoding="utf-8")
    assert main(["eval", "--predictions", str(predictions), "--out", str(taken)]) == 2
    assert capfd.readouterr().err == f"error: {taken} is a file; give a directory to write into\n"
    assert taken.read_text(encoding="utf-8") == "not a directory"


@pytest.mark.parametrize("flag, value, says", [
    ("--max-new-tokens", "0", "must be at least 1, not 0"), ("--max-new-tokens", "x", "invalid int value: 'x'"),
    ("--temperature", "-1", "must be at least 0, not -1"), ("--top-p", "0", "must be above 0 and at most 1, not 0"),
    ("--top-p", "1.5", "must be above 0 and at most 1, not 1.5")])
def test_generation_flags_out_of_range_are_usage_errors(flag, value, says, tmp_path, capfd):
    """Refused before a model is loaded (transformers would raise mid-generation)."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(tmp_path / "no-model"), "--prompt", "hi", flag, value])
    assert exit_.value.code == 2 and f"argument {flag}: {says}" in capfd.readouterr().err
