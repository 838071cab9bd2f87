"""The hostile-input corpus: files people really feed a fine-tuning tool, each with what must happen.

A case is either *valid* (an oddity that must be read: BOM, CRLF, trailing blank lines, CSV with
quoted line breaks, UTF-16, a mixed folder) with the number of examples it holds, or *invalid*
with the exit code and the places its message must name (``file:line`` for line-numbered files,
``file[index]`` for JSON arrays and Parquet, the file itself where the problem has no line).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("Who are you?", "I am a helpful assistant."),
      ("Translate 'hello' into French.", "Bonjour."),
      ("你是谁？", "我是一个有用的AI助手。"),
      ("Explain machine learning in one sentence.", "Computers learn patterns from data."),
      ("Name a primary colour.", "Red.")]
HUGE_BYTES = 5 * 1024 * 1024


def alpaca(q: str, a: str) -> str:
    return json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False)


def alpaca_lines(n: int = len(QA)) -> list[str]:
    return [alpaca(*QA[i % len(QA)]) for i in range(n)]


def messages(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}, ensure_ascii=False)


@dataclass
class Case:
    name: str
    build: Callable[[Path], Path]  # writes the input under a folder, returns the path to pass
    code: int = 0  # expected exit code of every command reading it
    where: list[str] = field(default_factory=list)  # places (relative to the input) the message must name
    says: str = ""  # a phrase the message must contain
    examples: int = 0  # valid cases: the examples that must be read


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _lines(path: Path, lines: list[str], end: str = "\n") -> Path:
    return _write(path, "".join(line + end for line in lines))


def _mixed_folder(root: Path) -> Path:
    folder = root / "mixed"
    _lines(folder / "a.jsonl", alpaca_lines(2))
    sharegpt = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA[2:4]]
    _write(folder / "b.json", json.dumps(sharegpt, ensure_ascii=False))
    _write(folder / "sub" / "c.csv", "prompt,completion\r\n" + "".join(f'"{q}","{a}"\r\n' for q, a in QA[4:6]))
    _write(folder / "README.md", "# not data: ignored\n")
    return folder


def _csv_quotes(root: Path) -> Path:
    # Quoted fields with line breaks (LF and CRLF), doubled quotes and commas: all valid CSV.
    rows = ['instruction,input,output',
            '"Write two lines.",,"line one\r\nline two"',
            '"Quote ""this"", please",,"He said ""hi"", then left."',
            '"A, B and C",,"one\nwith a break"']
    return _write(root / "quotes.csv", "\r\n".join(rows) + "\r\n")


def _csv_broken(root: Path) -> Path:
    rows = ["instruction,input,output", '"ok",,"fine"', '"extra",,"value","unexpected"', '"short"']
    return _write(root / "broken.csv", "\n".join(rows) + "\n")


def _parquet(root: Path, name: str, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / name
    pq.write_table(pa.table(columns), path)
    return path


def _binary(root: Path) -> Path:
    rng = random.Random(0)
    return _write(root / "binary.jsonl", b"\x89PNG\r\n\x1a\n\0\0" + bytes(rng.randrange(256) for _ in range(4000)))


def _huge(root: Path) -> Path:
    # One 5 MB example: a long document to summarise, a short answer.
    text = ("The quick brown fox jumps over the lazy dog. " * (HUGE_BYTES // 45 + 1))[:HUGE_BYTES]
    return _lines(root / "huge.jsonl", [alpaca("Summarise: " + text, "A fox jumps over a dog."), *alpaca_lines(3)])


CASES = [
    # ---- valid oddities: read, never rejected
    Case("bom", lambda d: _write(d / "bom.jsonl", b"\xef\xbb\xbf" + "\n".join(alpaca_lines()).encode() + b"\n"),
         examples=len(QA)),
    Case("crlf", lambda d: _lines(d / "crlf.jsonl", alpaca_lines(), end="\r\n"), examples=len(QA)),
    Case("trailing_blank_lines", lambda d: _write(d / "blank.jsonl", "\n".join(alpaca_lines()) + "\n\n\n  \n"),
         examples=len(QA)),
    Case("bom_crlf_json", lambda d: _write(d / "bom.json", b"\xef\xbb\xbf[" + ",\r\n".join(alpaca_lines()).encode()
                                           + b"]\r\n"), examples=len(QA)),
    Case("utf16_with_bom", lambda d: _write(d / "utf16.jsonl", "\n".join(alpaca_lines()).encode("utf-16")),
         examples=len(QA)),
    Case("csv_quotes_newlines", _csv_quotes, examples=3),
    Case("mixed_formats_folder", _mixed_folder, examples=6),
    # Past the csv module's default 128 KiB field limit.
    Case("csv_long_field", lambda d: _write(d / "long.csv", 'instruction,output\nq,"' + "word " * 60_000 + '"\nq2,a2\n'),
         examples=2),
    Case("huge_example", _huge, examples=4),
    # ---- invalid: a message naming the file (and line), exit 1 for bad data
    Case("empty", lambda d: _write(d / "empty.jsonl", b""), 1, ["empty.jsonl"], "no examples"),
    Case("whitespace_only", lambda d: _write(d / "ws.jsonl", " \n\t\n  \r\n"), 1, ["ws.jsonl"], "no examples"),
    Case("empty_array", lambda d: _write(d / "empty.json", "[]\n"), 1, ["empty.json"], "no examples"),
    Case("truncated_json", lambda d: _write(d / "cut.json", "[" + ",\n".join(alpaca_lines())[:-30]), 1,
         ["cut.json"], "invalid JSON at line 6"),
    Case("truncated_jsonl", lambda d: _write(d / "cut.jsonl", "\n".join(alpaca_lines())[:-30]), 1,
         ["cut.jsonl:6"], "invalid JSON"),
    Case("latin1_byte", lambda d: _write(d / "latin1.jsonl", ("\n".join(alpaca_lines(2)) + "\n").encode()
                                         + alpaca("Café?", "Oui.").encode("latin-1") + b"\n"), 1,
         ["latin1.jsonl:3"], "byte offset"),
    Case("binary", _binary, 1, ["binary.jsonl:1"], "not valid utf-8"),
    Case("nulls", lambda d: _lines(d / "nulls.jsonl", ["null", '{"instruction": null, "output": "x"}',
                                                       '{"instruction": "q", "output": null}']), 1,
         ["nulls.jsonl:1", "nulls.jsonl:2", "nulls.jsonl:3"], "missing"),
    Case("nul_bytes", lambda d: _write(d / "nul.jsonl", alpaca_lines(1)[0] + "\n\0\0\0\n"), 1, ["nul.jsonl:2"],
         "invalid JSON"),
    Case("wrong_types", lambda d: _lines(d / "types.jsonl", ['{"messages": "hello"}',
                                                             '{"instruction": 5, "output": ["a"]}']), 1,
         ["types.jsonl:1", "types.jsonl:2"], "expected"),
    Case("type_changes_mid_file", lambda d: _lines(d / "changes.jsonl", [*alpaca_lines(3), '["q", "a"]',
                                                                         '{"instruction": "q", "output": {"t": 1}}']),
         1, ["changes.jsonl:4", "changes.jsonl:5"], "expected"),
    Case("unknown_role", lambda d: _lines(d / "roles.jsonl", [messages(("user", "hi"), ("assistant", "hello")),
                                                              messages(("user", "hi"), ("robot", "beep"))]), 1,
         ["roles.jsonl:2"], "unknown role 'robot'"),
    Case("content_parts_wrong_types", lambda d: _lines(d / "parts.jsonl", [
        messages(("user", "hi"), ("assistant", "hello")),
        json.dumps({"messages": [{"role": "user", "content": [{"type": ["text"]}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": 5}]}]})]), 1,
         ["parts.jsonl:2"], "every text part needs a 'text' string"),
    Case("empty_answers", lambda d: _lines(d / "answers.jsonl", [alpaca("q", ""),
                                                                 messages(("user", "hi"), ("assistant", "  "))]), 1,
         ["answers.jsonl:1", "answers.jsonl:2"], "empty"),
    Case("duplicate_keys", lambda d: _lines(d / "dupes.jsonl", [alpaca("q", "a"),
                                                                '{"instruction": "q", "output": "a", "output": "b"}']),
         1, ["dupes.jsonl:2"], "appears twice"),
    Case("deep_nesting", lambda d: _lines(d / "deep.jsonl", [alpaca("q", "a"), "[" * 100_000 + "]" * 100_000]), 1,
         ["deep.jsonl:2"], "nested too deeply"),
    Case("json_object_not_array", lambda d: _write(d / "object.json", '{"instruction": "q", "output": "a"}'), 1,
         ["object.json"], "expected a JSON array"),
    Case("csv_broken_rows", _csv_broken, 1, ["broken.csv:3", "broken.csv:4"], "more value(s)"),
    Case("csv_unterminated_quote", lambda d: _write(d / "quote.csv", 'instruction,output\n"q","a"\n"q2,"a2\n'), 1,
         ["quote.csv:3"], "missing"),
    Case("parquet_wrong_columns", lambda d: _parquet(d, "wrong.parquet", {"q": ["q1", "q2"], "a": ["a1", "a2"]}), 1,
         ["wrong.parquet"], "cannot tell the format"),
    Case("not_parquet", lambda d: _write(d / "fake.parquet", "instruction,output\nq,a\n"), 1, ["fake.parquet"],
         "not a readable Parquet file"),
    Case("preference_identical_sides", lambda d: _lines(d / "dpo.jsonl", [
        json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}),
        json.dumps({"prompt": "q2", "chosen": "same", "rejected": "same"})]), 1, ["dpo.jsonl:2"], "identical"),
    # ---- usage errors: exit 2
    Case("folder_with_nothing_readable", lambda d: _write(d / "nothing" / "notes.txt", "hello").parent, 2,
         ["nothing"], "no data files"),
]

# Valid preference pairs: data check, data convert and eval read them, but supervised training cannot
# use them and must say which objective can (walked through train in test_model_commands.py).
PAIRS_FOR_SFT = Case("preference_pairs_for_sft", lambda d: _lines(d / "pairs.jsonl", [
    json.dumps({"prompt": q, "chosen": a, "rejected": "I don't know."}, ensure_ascii=False) for q, a in QA]), 1,
    ["pairs.jsonl:1"], "--method.objective dpo", examples=len(QA))

VALID = [c for c in CASES if c.code == 0]
INVALID = [c for c in CASES if c.code != 0]


def build(case: Case, root: Path) -> Path:
    folder = root / case.name
    folder.mkdir(parents=True, exist_ok=True)
    return case.build(folder)


# ---------------------------------------------------------------- predictions files for `eval --predictions`


def prediction(p: str, r: str) -> str:
    return json.dumps({"prediction": p, "reference": r}, ensure_ascii=False)


PREDICTION_LINES = [prediction("Paris.", "Paris."), prediction("Bonjour.", "Bonjour !"), prediction("红", "红色")]

PREDICTION_CASES = [
    Case("bom", lambda d: _write(d / "p.jsonl", b"\xef\xbb\xbf" + "\n".join(PREDICTION_LINES).encode()), examples=3),
    Case("crlf", lambda d: _lines(d / "p.jsonl", PREDICTION_LINES, end="\r\n"), examples=3),
    Case("trailing_blank_lines", lambda d: _write(d / "p.jsonl", "\n".join(PREDICTION_LINES) + "\n\n \n"),
         examples=3),
    Case("huge_prediction", lambda d: _lines(d / "p.jsonl", [*PREDICTION_LINES, prediction("word " * 1_000_000,
                                                                                           "word")]), examples=4),
    Case("empty", lambda d: _write(d / "p.jsonl", b""), 1, ["p.jsonl"], "no predictions"),
    Case("whitespace_only", lambda d: _write(d / "p.jsonl", "\n  \n"), 1, ["p.jsonl"], "no predictions"),
    Case("truncated", lambda d: _write(d / "p.jsonl", "\n".join(PREDICTION_LINES)[:-5]), 1, ["p.jsonl:3"],
         "not valid JSON"),
    Case("latin1_byte", lambda d: _write(d / "p.jsonl", PREDICTION_LINES[0].encode() + b"\n"
                                         + prediction("caf\u00e9", "cafe").encode("latin-1") + b"\n"), 1,
         ["p.jsonl:2"], "byte offset"),
    Case("binary", _binary, 1, ["binary.jsonl:1"], "not valid utf-8"),
    Case("nulls", lambda d: _lines(d / "p.jsonl", [PREDICTION_LINES[0], '{"prediction": null, "reference": "a"}']),
         1, ["p.jsonl:2"], "expected a string"),
    Case("wrong_type_row", lambda d: _lines(d / "p.jsonl", [PREDICTION_LINES[0], '["a", "b"]']), 1, ["p.jsonl:2"],
         "expected a JSON object"),
    Case("duplicate_keys", lambda d: _lines(d / "p.jsonl", ['{"prediction": "a", "prediction": "b", '
                                                            '"reference": "a"}']), 1, ["p.jsonl:1"], "appears twice"),
    Case("deep_nesting", lambda d: _lines(d / "p.jsonl", ["[" * 100_000 + "]" * 100_000]), 1, ["p.jsonl:1"],
         "nested too deeply"),
    Case("a_directory", lambda d: _write(d / "preds" / "p.jsonl", PREDICTION_LINES[0]).parent, 2, ["preds"],
         "is a directory"),
]
