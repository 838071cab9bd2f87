"""A cache of tokenized data, so a second identical run tokenizes nothing.

The key is a SHA-256 over everything that changes the result: the data (file bytes, or the
conversations' content when they come in memory), the reading options, the chat template text,
the tokenizer (its serialized vocabulary, merges and special tokens), the encode options and a
format version. Entries live in $TUNESMITH_HOME/data-cache/<key>.npz, written to a temporary
file and renamed, so an interrupted run never leaves a half-written entry behind.

numpy's .npz (loaded with allow_pickle=False) rather than pickle: a cache file can never run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tunesmith.data.conversation import Conversation
from tunesmith.data.readers import load_conversations
from tunesmith.data.templates import apply_template
from tunesmith.data.tokenize import Encoded, EncodeOptions, EncodeResult, encode_all
from tunesmith.models.resolve import cache_root

CACHE_FORMAT = 1  # bump when encoding changes what it produces for the same inputs


def cache_dir() -> Path:
    return Path(cache_root()) / "data-cache"


def encode_cached(data: Sequence[Conversation] | str | os.PathLike | Sequence[str | os.PathLike], tokenizer,
                  options: EncodeOptions, template: str | None = None, *, progress: bool = True,
                  format: str | None = None, columns: str | dict | None = None) -> EncodeResult:
    """encode_all, through the cache. ``data`` is conversations or data paths (read with ``format``/``columns``).

    ``template`` is applied to ``tokenizer`` first (see templates.apply_template).
    """
    template_text = apply_template(tokenizer, template).text
    paths = _as_paths(data)
    data_digest = _files_digest(paths, format, columns) if paths is not None else conversations_digest(data)
    key = _digest(data_digest, template_text, tokenizer_digest(tokenizer), dataclasses.asdict(options), CACHE_FORMAT)
    entry = cache_dir() / f"{key}.npz"
    if entry.is_file():
        result = _load(entry)
        print(f"using cached tokenized data: {len(result.examples)} examples from {entry}", file=sys.stderr)
        return result
    if paths is not None:
        data = load_conversations(paths, format=format, columns=columns)
    result = encode_all(list(data), tokenizer, options, progress=progress)
    _save(entry, result)
    return result


def _as_paths(data) -> list[Path] | None:
    if isinstance(data, str | os.PathLike):
        return [Path(data)]
    if data and all(isinstance(item, str | os.PathLike) for item in data):
        return [Path(item) for item in data]
    return None


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Changes with the vocabulary, merges, normalization, added and special tokens."""
    return _digest(tokenizer.backend_tokenizer.to_str(), tokenizer.special_tokens_map,
                   type(tokenizer).__name__)


def conversations_digest(convs: Sequence[Conversation]) -> str:
    sha = hashlib.sha256()
    for conv in convs:
        sha.update(json.dumps(dataclasses.asdict(conv), ensure_ascii=False, sort_keys=True, default=str).encode())
    return sha.hexdigest()


def _files_digest(paths: list[Path], format: str | None, columns) -> str:
    sha = hashlib.sha256(json.dumps([format, columns], sort_keys=True, default=str).encode())
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            sha.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
            sha.update(hashlib.sha256(file.read_bytes()).digest())
    return sha.hexdigest()


def _save(entry: Path, result: EncodeResult) -> None:
    examples = result.examples
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    arrays = {
        "input_ids": np.array([i for e in examples for i in e.input_ids], dtype=np.int64),
        "labels": np.array([i for e in examples for i in e.labels], dtype=np.int64),
        "lengths": lengths,
        "truncated": np.array([e.truncated for e in examples], dtype=bool),
        "lines": np.array([e.line for e in examples], dtype=np.int64),
        "meta": np.array(json.dumps({"sources": [e.source for e in examples], "dropped": result.dropped,
                                     "truncated": result.truncated, "dropped_at": result.dropped_at})),
    }
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".partial-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **arrays)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, entry)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(entry: Path) -> EncodeResult:
    with np.load(entry, allow_pickle=False) as saved:
        meta = json.loads(str(saved["meta"]))
        ends = np.cumsum(saved["lengths"]).tolist()
        ids, labels = saved["input_ids"].tolist(), saved["labels"].tolist()
        truncated, lines = saved["truncated"].tolist(), saved["lines"].tolist()
    starts = [0, *ends[:-1]]
    examples = [Encoded(input_ids=ids[a:b], labels=labels[a:b], truncated=t, source=s, line=n)
                for a, b, t, s, n in zip(starts, ends, truncated, meta["sources"], lines, strict=True)]
    return EncodeResult(examples=examples, dropped=meta["dropped"], truncated=meta["truncated"],
                        dropped_at=meta["dropped_at"], from_cache=True)
