"""Text files as people actually save them: decoding and strict JSON parsing for every reader.

Read as valid: UTF-8 with or without a byte-order mark (Excel and Notepad add one), UTF-16/32 with
their byte-order mark, CRLF line ends, trailing blank lines. Bytes that are not text in the chosen
encoding are an error naming the file, line and byte offset, with the option that reads them
(``--encoding``, or ``data.encoding`` in a config). JSON objects that hold a key twice are
reported: ``json.loads`` would keep the last value and silently drop the other.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from pathlib import Path

from tunesmith.errors import TunesmithError, UsageError

DEFAULT_ENCODING = "utf-8"
# An unambiguous byte-order mark decides the encoding; utf-8-sig also reads files without one.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class UndecodableFile(TunesmithError):
    """Bytes that are not text in the chosen encoding; ``line`` and ``offset`` say where."""

    def __init__(self, path: Path, line: int, offset: int, message: str):
        self.path, self.line, self.offset = path, line, offset
        super().__init__(f"{path}:{line}: {message}")
        self.detail = message


def check_encoding(encoding: str | None) -> str:
    name = encoding or DEFAULT_ENCODING
    try:
        codecs.lookup(name)
    except LookupError:
        raise UsageError(f"unknown encoding {name!r} (--encoding / data.encoding): use a Python codec name "
                         "such as utf-8, latin-1, cp1252 or utf-16") from None
    return name


def read_text(path: Path, encoding: str | None = None) -> str:
    """The whole file as text. With the default encoding a byte-order mark picks UTF-8/16/32."""
    raw = path.read_bytes()
    name = check_encoding(encoding)
    if codecs.lookup(name).name == "utf-8":
        name = next((codec for bom, codec in _BOMS if raw.startswith(bom)), "utf-8-sig")
    try:
        return raw.decode(name)
    except UnicodeDecodeError as exc:
        raise _undecodable(path, raw, exc, name) from None


def _undecodable(path: Path, raw: bytes, exc: UnicodeDecodeError, encoding: str) -> UndecodableFile:
    offset = exc.start
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    hint = " (the file looks binary: it holds NUL bytes)" if b"\0" in raw[:4096] else ""
    message = (f"byte 0x{raw[offset]:02x} at byte offset {offset} (line {line}, byte {column} of the line) is not "
               f"valid {encoding.removesuffix('-sig')}{hint}; save the file as UTF-8, or pass its encoding "
               "with --encoding (data.encoding in a config), e.g. --encoding latin-1 or cp1252")
    return UndecodableFile(path, line, offset, message)


def lines(text: str) -> list[str]:
    """Split on \\n only: str.splitlines would also split on characters such as U+2028 that are valid
    inside a JSON string. A CR left before the \\n is whitespace to JSON."""
    return text.split("\n")


class _Duplicated(dict):
    """An object that held some key more than once."""

    duplicates: tuple[str, ...] = ()


def _pairs(items: list[tuple[str, object]]) -> dict:
    out = dict(items)
    if len(out) == len(items):
        return out
    marked = _Duplicated(out)
    marked.duplicates = tuple(k for k, n in Counter(k for k, _ in items).items() if n > 1)
    return marked


def loads(text: str):
    """json.loads that marks objects with a repeated key (see duplicate_keys)."""
    return json.loads(text, object_pairs_hook=_pairs)


def duplicate_keys(value, where: str = "") -> list[str]:
    """Dotted paths (``messages[1].content``) of keys that an object in ``value`` held twice."""
    found = [f"{where}.{k}" if where else k for k in getattr(value, "duplicates", ())]
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list):
                found += duplicate_keys(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict | list):
                found += duplicate_keys(item, f"{where}[{i}]")
    return found
