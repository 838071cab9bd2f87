"""`data check` and `data convert` on every hostile input, through the real CLI in a fresh interpreter.

Each invalid case must end with its exit code, a message naming the file and line, no traceback and
no output file; each valid oddity must be read in full.
"""

from __future__ import annotations

import json
import resource
import signal

import pytest

from tests.reliability.conftest import Outcome, cli, files_under
from tests.reliability.corpus import CASES, INVALID, VALID, alpaca, alpaca_lines, build

ids = [c.name for c in INVALID]


@pytest.mark.parametrize("case", VALID, ids=[c.name for c in VALID])
def test_check_reads_valid_oddities(case, tmp_path):
    result = cli("data", "check", build(case, tmp_path), "--no-tokens")
    assert result.code == 0 and "Traceback" not in result.out, result.out
    assert f"valid {case.examples}," in result.out


@pytest.mark.parametrize("case", INVALID, ids=ids)
def test_check_names_file_and_line(case, tmp_path):
    cli("data", "check", build(case, tmp_path), "--no-tokens").check(case, tmp_path)


@pytest.mark.parametrize("case", VALID, ids=[c.name for c in VALID])
def test_convert_reads_valid_oddities(case, tmp_path):
    out = tmp_path / "out" / "converted.jsonl"
    result = cli("data", "convert", build(case, tmp_path), "--to", "openai", "--out", out)
    assert result.code == 0 and "Traceback" not in result.out, result.out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == case.examples
    assert files_under(out.parent) == [out]  # no temporary file left beside it


@pytest.mark.parametrize("case", INVALID, ids=ids)
def test_convert_writes_nothing_on_bad_input(case, tmp_path):
    out = tmp_path / "out" / "converted.jsonl"
    cli("data", "convert", build(case, tmp_path), "--to", "alpaca", "--out", out).check(case, tmp_path)
    assert files_under(tmp_path / "out") == []


def test_csv_quotes_and_line_breaks_survive_conversion(tmp_path):
    case = next(c for c in VALID if c.name == "csv_quotes_newlines")
    out = tmp_path / "quotes.jsonl"
    assert cli("data", "convert", build(case, tmp_path), "--to", "alpaca", "--out", out).code == 0
    outputs = [json.loads(line)["output"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert outputs == ["line one\r\nline two", 'He said "hi", then left.', "one\nwith a break"]


def test_bom_and_crlf_are_not_part_of_the_text(tmp_path):
    case = next(c for c in VALID if c.name == "bom_crlf_json")
    out = tmp_path / "plain.jsonl"
    assert cli("data", "convert", build(case, tmp_path), "--to", "alpaca", "--out", out).code == 0
    assert out.read_text(encoding="utf-8").splitlines() == alpaca_lines()


def test_encoding_option_reads_latin1(tmp_path):
    source = tmp_path / "latin1.csv"
    source.write_bytes("instruction,output\nCafé ou thé ?,Un café.\n".encode("latin-1"))
    refused = cli("data", "check", source, "--no-tokens")
    assert refused.code == 1 and f"{source}:2 (encoding): byte 0xe9 at byte offset 22" in refused.out
    assert "--encoding" in refused.out
    assert cli("data", "check", source, "--no-tokens", "--encoding", "latin-1").code == 0
    out = tmp_path / "utf8.jsonl"
    assert cli("data", "convert", source, "--to", "alpaca", "--out", out, "--encoding", "cp1252").code == 0
    assert json.loads(out.read_text(encoding="utf-8"))["instruction"] == "Café ou thé ?"


def test_unknown_encoding_is_a_usage_error(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text(alpaca("q", "a") + "\n", encoding="utf-8")
    result = cli("data", "check", source, "--no-tokens", "--encoding", "klingon")
    assert result.code == 2 and "unknown encoding 'klingon'" in result.out and "Traceback" not in result.out


def test_convert_keeps_an_existing_output_unless_told(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text("\n".join(alpaca_lines(2)) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    refused = cli("data", "convert", source, "--to", "openai", "--out", out)
    assert refused.code == 2 and f"{out} already exists; pass --overwrite" in refused.out
    assert out.read_text(encoding="utf-8") == "precious\n"
    assert cli("data", "convert", source, "--to", "openai", "--out", out, "--overwrite").code == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def _limit_file_size(limit: int):
    def limit_in_child():
        # Writes past the limit fail with EFBIG instead of killing the process (SIGXFSZ ignored):
        # the same path through the code as a disk that fills up mid-write.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_in_child


def test_a_failed_write_leaves_the_old_output_whole(tmp_path):
    source = tmp_path / "big.jsonl"
    source.write_text("\n".join(alpaca_lines(3000)) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("old output\n", encoding="utf-8")
    result = cli("data", "convert", source, "--to", "openai", "--out", out, "--overwrite",
                 preexec_fn=_limit_file_size(64 * 1024))
    assert result.code == 1 and "Traceback" not in result.out, result.out
    assert f"cannot write {out}: File too large" in result.out and "the existing file is unchanged" in result.out
    assert out.read_text(encoding="utf-8") == "old output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "out.jsonl"]  # no temporary left


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_check_with_token_statistics(case, tiny_model_dir, tmp_path, capfd):
    """The full check (tokenizer, template, mask preview) on every case, in-process for speed."""
    from tunesmith.cli import main

    code = main(["data", "check", str(build(case, tmp_path)), "--model", str(tiny_model_dir)])
    captured = capfd.readouterr()
    Outcome(code, captured.out + captured.err).check(case, tmp_path)
    if case.code == 0:
        assert f"valid {case.examples}," in captured.out and "mask preview" in captured.out
