"""The data doctor: `tunesmith data check FILE... [--model M] [--max-length N] [--eval FILE] [--json]`.

It reports, for one or more files: every schema error with file, line and field (never just the
first); counts; prompt and response lengths in characters and in tokens of the chosen model's
tokenizer and chat template; what a max length would truncate or drop; the share of supervised
tokens (examples with none are errors); exact and near duplicates; train/eval overlap; and one
example rendered through the real template with its loss mask. Only the tokenizer is loaded,
never the weights. Exit code 0 when clean, 1 on errors (warnings alone do not fail), 2 on usage
errors.

Preference pairs (chosen/rejected, see pairs.py) get the same report with ``kind: "pairs"``: lengths
of the prompt, the chosen and the rejected response (the total is the longer side, prompt included,
which is what max length cuts), what truncation would cut on each side, pairs that contradict each
other, prompts shared by several pairs (listed, not warned about: several pairs per prompt is
common), and how many pairs have answers sharing a long prefix (counted; one warning when they are
most of the data).
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from jinja2 import TemplateError

from tunesmith.config import minimum
from tunesmith.data.conversation import Conversation
from tunesmith.data.pairs import (
    SIDES,
    Pair,
    is_preference_data,
    mostly_long_prefix,
    read_pairs,
    shares_long_prefix,
)
from tunesmith.data.readers import DataIssue, read_dataset
from tunesmith.data.templates import TemplateChoice, apply_template
from tunesmith.data.tokenize import IGNORE, EncodeOptions, encode, encode_all
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.models import DEFAULT_MODEL, resolve
from tunesmith.models.load import load_tokenizer
from tunesmith.output import finish_report, json_stdout, print_table, progress_bar, stdout_console

NEAR_DUPLICATE_JACCARD = 0.8  # of character 5-gram sets; rewordings of one example score well above it
SHINGLE = 5
SIGNATURE_BANDS, BAND_ROWS = 16, 4  # MinHash LSH: pairs with Jaccard >= ~0.5 meet in some band
SHINGLE_CHARS = 4000  # texts are compared on their first characters only, to bound the cost
LONG_CHARS = 4000  # the seed's "long example" threshold, kept as a count
PREVIEW_CHARS = 2000
ENCODE_CHUNK = 64


@dataclass
class DataReport:
    files: list[str]
    num_examples: int
    num_valid: int
    num_turns: int
    errors: list[DataIssue]
    warnings: list[DataIssue]
    duplicates: list[dict]  # {"kind": "exact" | "near", "rows": ["file:line", ...]}
    overlap: list[dict]  # {"eval": "file:line", "train": ["file:line", ...]}
    char_lengths: dict  # p50, p90, p99, max, mean of the whole example, plus "prompt" and "response"
    token_lengths: dict | None  # the same in tokens; None with tokens=False
    truncated: int = 0
    dropped: int = 0
    supervised_token_share: float | None = None
    zero_supervised: int = 0
    long_examples: int = 0  # over LONG_CHARS characters, as the seed counted them
    preview: dict | None = None  # {"source", "segments": [{"text", "supervised"}], "marked": "..[[..]].."}
    formats: dict = field(default_factory=dict)
    model: str | None = None
    template: str | None = None  # the template applied: a built-in's name, "own" (the tokenizer's) or a .jinja path
    template_reason: str | None = None  # why that one (the model has its own, --data.template, the model's family)
    max_length: int | None = None
    truncation: str = "truncate_prompt"
    elapsed_s: float = 0.0
    kind: str = "sft"  # "sft", or "pairs" for preference data (lengths then have prompt, chosen, rejected)
    pairs: dict | None = None  # pairs only: prompt_duplicates [{kind, rows}], long_shared_prefix {pairs, share},
    # and with a max length, truncation
    # {over_max_length, prompt_tokens_cut, response_tokens_cut, responses_cut} (each {chosen, rejected})

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        out = {"ok": self.ok, **asdict(self)}
        out["errors"] = [e.to_dict() for e in self.errors]
        out["warnings"] = [w.to_dict() for w in self.warnings]
        return out


# ---------------------------------------------------------------- lengths


def length_stats(values) -> dict:
    if len(values) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    array = np.asarray(values)
    p50, p90, p99 = np.percentile(array, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(array.max()),
            "mean": round(float(array.mean()), 1)}


def char_lengths(convs: list[Conversation]) -> tuple[dict, int]:
    """Prompt (system, user and tool text) and response (assistant text) lengths in characters."""
    prompt = [len(c.system or "") + sum(len(m.content) for m in c.messages if m.role != "assistant") for c in convs]
    response = [sum(len(m.content) for m in c.messages if m.role == "assistant") for c in convs]
    total = [p + r for p, r in zip(prompt, response, strict=True)]
    stats = {**length_stats(total), "prompt": length_stats(prompt), "response": length_stats(response)}
    return stats, sum(t > LONG_CHARS for t in total)


# ---------------------------------------------------------------- placeholders

PLACEHOLDER = re.compile(r"\{\{\s*[\w.]+\s*\}\}")


def placeholder_warnings(convs: list[Conversation]) -> list[DataIssue]:
    """Answers with a literal ``{{name}}``: a template file used before its blanks were filled in, which would
    teach the model to answer with the placeholder itself. One warning per answer, at its file and line."""
    return [issue for conv in convs for i, m in enumerate(conv.messages) if m.role == "assistant"
            for issue in _placeholder(conv.source, conv.line, f"messages[{i}].content", m.content)]


def pair_placeholder_warnings(pairs: list[Pair]) -> list[DataIssue]:
    """placeholder_warnings for both answers of each preference pair."""
    return [issue for pair in pairs for side in SIDES for i, m in enumerate(getattr(pair, side))
            if m.role == "assistant"
            for issue in _placeholder(pair.source, pair.line, side if len(getattr(pair, side)) == 1
                                      else f"{side}[{i}]", m.content)]


def _placeholder(source: str, line: int, where: str, text: str) -> list[DataIssue]:
    found = PLACEHOLDER.search(text or "")
    return [DataIssue(source, line, where, f"the answer contains the placeholder {found.group(0)}, which would be "
                      "learned literally; fill it in (or keep it on purpose)", "warning")] if found else []


# ---------------------------------------------------------------- duplicates and overlap


def conversation_text(conv: Conversation) -> str:
    return "\n".join([conv.system or ""] + [f"{m.role}: {m.content}" for m in conv.messages])


def normalize(text: str) -> str:
    """Lowercase, punctuation and whitespace collapsed: what 'the same text' means to a reader."""
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


class _Groups:
    """Union-find over example indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def _shingles(text: str) -> np.ndarray:
    text = text[:SHINGLE_CHARS]
    grams = {text[i:i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}
    return np.unique(np.array([hash(g) for g in grams], dtype=np.int64).view(np.uint64))


def _minhash(shingles: list[np.ndarray]) -> np.ndarray:
    """MinHash signatures by multiply-shift hashing; hand-written with numpy (a few lines) rather than
    adding a dependency such as datasketch."""
    rng = np.random.default_rng(0)
    multipliers = rng.integers(1, 2**63, size=SIGNATURE_BANDS * BAND_ROWS, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        return np.stack([((multipliers[:, None] * s[None, :]) >> np.uint64(32)).min(axis=1) for s in shingles])


def _near_pairs(texts: list[str]) -> list[tuple[int, int]]:
    """Pairs whose shingle sets have Jaccard similarity >= NEAR_DUPLICATE_JACCARD (LSH candidates, then exact)."""
    if len(texts) < 2:  # no pair to compare (and numpy cannot stack zero signatures)
        return []
    shingles = [_shingles(t) for t in texts]
    signatures = _minhash(shingles)
    candidates = set()
    for band in range(SIGNATURE_BANDS):
        buckets = defaultdict(list)
        for i, row in enumerate(signatures[:, band * BAND_ROWS:(band + 1) * BAND_ROWS]):
            buckets[row.tobytes()].append(i)
        for members in buckets.values():
            candidates.update((a, b) for k, a in enumerate(members) for b in members[k + 1:])
    return [(a, b) for a, b in sorted(candidates) if _jaccard(shingles[a], shingles[b]) >= NEAR_DUPLICATE_JACCARD]


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def find_duplicates(convs: list[Conversation]) -> list[dict]:
    """Groups of exact duplicates (identical text) and near duplicates (normalized text identical or
    nearly so), each naming its rows."""
    return group_duplicates([conversation_text(c) for c in convs], convs)


def group_duplicates(texts: list[str], items: list) -> list[dict]:
    """Duplicate groups among ``texts``; ``items`` (conversations or pairs, one per text) name the rows."""
    raw = [t.strip() for t in texts]
    normalized = [normalize(t) for t in raw]
    groups = _Groups(len(items))
    first_seen: dict[str, int] = {}
    for i, text in enumerate(normalized):
        groups.union(i, first_seen.setdefault(text, i))
    for a, b in _near_pairs(normalized):
        groups.union(a, b)
    members = defaultdict(list)
    for i in range(len(items)):
        members[groups.find(i)].append(i)
    found = []
    for rows in (m for m in members.values() if len(m) > 1):
        kind = "exact" if len({raw[i] for i in rows}) == 1 else "near"
        found.append({"kind": kind, "rows": [items[i].where for i in rows]})
    return sorted(found, key=lambda g: g["rows"][0])


def duplicate_warnings(groups: list[dict], convs: list) -> list[DataIssue]:
    by_where = {c.where: c for c in convs}
    issues = []
    for group in groups:
        first, *others = group["rows"]
        for where in others:
            conv = by_where[where]
            issues.append(DataIssue(conv.source, conv.line, "(duplicate)",
                                    f"{group['kind']} duplicate of {first}", "warning"))
    return issues


def find_overlap(train: list[Conversation], evals: list[Conversation]) -> list[dict]:
    """Eval examples whose prompt (or whole text) also appears in training, after normalization."""
    seen = defaultdict(list)
    for conv in train:
        for key in _overlap_keys(conv):
            seen[key].append(conv.where)
    found = []
    for conv in evals:
        hits = sorted({w for key in _overlap_keys(conv) for w in seen.get(key, [])})
        if hits:
            found.append({"eval": conv.where, "train": hits})
    return found


def _overlap_keys(conv: Conversation) -> set[str]:
    keys = {"all:" + normalize(conversation_text(conv))}
    if not conv.is_text:
        prompt = conv.prompt_messages()
        keys.add("prompt:" + normalize("\n".join(f"{m['role']}: {m['content']}" for m in prompt)))
    return keys


# ---------------------------------------------------------------- tokens


@dataclass
class TokenTally:
    prompt: list[int] = field(default_factory=list)
    response: list[int] = field(default_factory=list)
    supervised: int = 0
    total: int = 0
    truncated: int = 0
    dropped: int = 0
    zero_supervised: int = 0
    issues: list[DataIssue] = field(default_factory=list)
    first: tuple | None = None  # (conv, encoded) for the mask preview


def load_check_tokenizer(model: str | None, template: str | None) -> tuple[object, TemplateChoice]:
    """The tokenizer (never the weights) with the chat template training would use, and that template."""
    tokenizer = load_tokenizer(resolve(model or DEFAULT_MODEL))
    return tokenizer, apply_template(tokenizer, template)


def _use_template(report: DataReport, model: str | None):
    """The check's tokenizer; the report names the template applied, which ``report.template`` asked for."""
    tokenizer, choice = load_check_tokenizer(model, report.template)
    report.template, report.template_reason = choice.name, choice.reason
    return tokenizer


def encode_each(convs: list[Conversation], tokenizer, options, on_chunk=None):
    """(conv, Encoded or DataIssue) for every conversation, in chunks; a conversation the template
    refuses becomes an error at its row instead of stopping the check."""
    for begin in range(0, len(convs), ENCODE_CHUNK):
        chunk = convs[begin:begin + ENCODE_CHUNK]
        try:
            yield from zip(chunk, encode_all(chunk, tokenizer, options, progress=False).examples, strict=True)
        except UsageError:
            raise
        except TunesmithError:
            for conv in chunk:
                yield conv, _encode_or_issue(encode, conv, tokenizer, options)
        if on_chunk:
            on_chunk(len(chunk))


def _encode_or_issue(encode, conv: Conversation, tokenizer, options):
    try:
        return encode(conv, tokenizer, options)
    except UsageError:
        raise
    except TunesmithError as exc:
        message = str(exc).removeprefix(f"{conv.where}: ").removeprefix("messages: ")
        return DataIssue(conv.source, conv.line, "messages", message)


def tally_tokens(convs: list[Conversation], tokenizer, max_length: int | None, truncation: str,
                 on_chunk=None) -> TokenTally:
    whole = EncodeOptions()
    policy = EncodeOptions(max_length=max_length, truncation=truncation) if max_length else None
    tally = TokenTally()
    for conv, encoded in encode_each(convs, tokenizer, whole, on_chunk):
        if isinstance(encoded, DataIssue):
            tally.issues.append(encoded)
            continue
        tally.first = tally.first or _preview_candidate(conv, encoded)
        tally.prompt.append(len(encoded.input_ids) - encoded.num_supervised)
        tally.response.append(encoded.num_supervised)
        if policy and len(encoded.input_ids) > max_length:
            encoded = _apply_policy(conv, encoded, tokenizer, policy, tally, encode)
            if encoded is None:
                continue
        _count_supervision(conv, encoded, tally)
    return tally


def _preview_candidate(conv: Conversation, encoded) -> tuple | None:
    return (conv, encoded) if len(encoded.input_ids) * 4 <= PREVIEW_CHARS * 2 else None


def _apply_policy(conv, encoded, tokenizer, policy, tally: TokenTally, encode):
    """What training will see of an example longer than max_length."""
    if policy.truncation == "error":
        tally.issues.append(DataIssue(conv.source, conv.line, "(length)", f"{len(encoded.input_ids)} tokens is "
                                      f"longer than max_length {policy.max_length} (truncation policy 'error')"))
        return None
    limited = encode(conv, tokenizer, policy)
    if limited is None:
        tally.dropped += 1
    else:
        tally.truncated += 1
    return limited


def _count_supervision(conv: Conversation, encoded, tally: TokenTally) -> None:
    tally.supervised += encoded.num_supervised
    tally.total += len(encoded.input_ids)
    if encoded.num_supervised == 0:
        tally.zero_supervised += 1
        tally.issues.append(DataIssue(conv.source, conv.line, "messages",
                                      "no supervised tokens: this example teaches the model nothing"))


def mask_preview(conv: Conversation, encoded, tokenizer) -> dict:
    """The rendered example as runs of tokens that are / are not in the loss."""
    segments: list[dict] = []
    run: list[int] = []
    flags = [label != IGNORE for label in encoded.labels]
    for i, token in enumerate(encoded.input_ids):
        run.append(token)
        if i + 1 == len(flags) or flags[i + 1] != flags[i]:
            segments.append({"text": tokenizer.decode(run, skip_special_tokens=False), "supervised": flags[i]})
            run = []
    marked = "".join(f"[[{s['text']}]]" if s["supervised"] else s["text"] for s in segments)
    return {"source": conv.where, "segments": segments, "marked": marked}


def system_prompt_warning(convs: list[Conversation], tokenizer) -> DataIssue | None:
    """Templates such as SmolLM2's insert their own system prompt when an example has none."""
    missing = [c for c in convs if not c.is_text and not c.system]
    if not missing or not tokenizer.chat_template:
        return None
    try:
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "ping"}], tokenize=False)
    except TemplateError as exc:  # the template's sandbox refusal or its raise_exception: a finding, not a bug
        return DataIssue(missing[0].source, -1, "template", f"the chat template refused to render a lone user "
                         f"turn: {exc}", "warning")
    if "system" not in probe.lower():
        return None
    return DataIssue(missing[0].source, -1, "system", f"{len(missing)} example(s) have no system prompt, so the "
                     "chat template inserts its default one; set a system prompt to decide it explicitly",
                     "warning")


# ---------------------------------------------------------------- the check


def check_data(files, *, model: str | None = None, max_length: int | None = None,
               truncation: str = "truncate_prompt", template: str | None = None, eval_files=(),
               format: str | None = None, columns: str | dict | None = None, tokens: bool = True,
               progress: bool = False, encoding: str | None = None) -> DataReport:
    """Check ``files`` (and optionally ``eval_files``) and return the full report."""
    started = time.perf_counter()
    files = [str(f) for f in ([files] if isinstance(files, str | os.PathLike) else files)]
    if max_length is not None and max_length < minimum("data.max_length"):  # what training accepts
        raise UsageError(f"--max-length must be at least {minimum('data.max_length')}, not {max_length}")
    if is_preference_data(files, format=format, columns=columns, encoding=encoding):
        report, pairs = _read_pairs(files, format, columns, encoding)
        convs = [p.chosen_conversation() for p in pairs]  # for the overlap: the prompt and the chosen answer
    else:
        report, convs = _read_conversations(files, format, columns, encoding)
    report.max_length, report.truncation, report.template = max_length, truncation, template
    if eval_files:
        _check_overlap(report, convs, list(eval_files), format, columns, encoding)
    if tokens and report.kind == "pairs":
        _add_pair_token_stats(report, pairs, model, progress)
    elif tokens:
        _add_token_stats(report, convs, model, progress)
    report.elapsed_s = round(time.perf_counter() - started, 2)
    return report


def _read_conversations(files: list[str], format, columns, encoding) -> tuple[DataReport, list[Conversation]]:
    read = read_dataset(files, format=format, columns=columns, encoding=encoding)
    convs = read.conversations
    report = DataReport(files=files, num_examples=read.num_rows, num_valid=len(convs),
                        num_turns=sum(len(c.messages) for c in convs), errors=read.errors, warnings=read.warnings,
                        duplicates=find_duplicates(convs), overlap=[], char_lengths={}, token_lengths=None,
                        formats=read.formats)
    report.char_lengths, report.long_examples = char_lengths(convs)
    report.warnings += duplicate_warnings(report.duplicates, convs) + placeholder_warnings(convs)
    return report, convs


def _check_overlap(report: DataReport, convs, eval_files: list[str], format, columns, encoding) -> None:
    if is_preference_data(eval_files, format=format, columns=columns, encoding=encoding):
        evals = read_pairs(eval_files, format=format, columns=columns, encoding=encoding)
        eval_convs = [p.chosen_conversation() for p in evals.pairs]
    else:
        evals = read_dataset(eval_files, format=format, columns=columns, encoding=encoding)
        eval_convs = evals.conversations
    report.errors += evals.errors
    report.warnings += evals.warnings
    report.overlap = find_overlap(convs, eval_convs)
    for hit in report.overlap:
        conv = next(c for c in eval_convs if c.where == hit["eval"])
        report.warnings.append(DataIssue(conv.source, conv.line, "(overlap)",
                                         f"also in the training data at {', '.join(hit['train'][:3])}", "warning"))


def _add_token_stats(report: DataReport, convs: list[Conversation], model: str | None, progress: bool) -> None:
    tokenizer = _use_template(report, model)
    report.model = str(model or _default_model())
    with progress_bar("tokenizing", len(convs), enabled=progress) as bar:
        tally = tally_tokens(convs, tokenizer, report.max_length, report.truncation, bar.update)
    total = [p + r for p, r in zip(tally.prompt, tally.response, strict=True)]
    report.token_lengths = {**length_stats(total), "prompt": length_stats(tally.prompt),
                            "response": length_stats(tally.response)}
    report.truncated, report.dropped, report.zero_supervised = tally.truncated, tally.dropped, tally.zero_supervised
    report.supervised_token_share = round(tally.supervised / tally.total, 4) if tally.total else None
    report.errors += tally.issues
    first = tally.first or next(((c, e) for c, e in encode_each(convs[:1], tokenizer, _whole_options())
                                 if not isinstance(e, DataIssue)), None)
    report.preview = mask_preview(*first, tokenizer) if first else None
    warning = system_prompt_warning(convs, tokenizer)
    report.warnings += [warning] if warning else []


def _whole_options():
    return EncodeOptions()


def _default_model() -> str:
    return DEFAULT_MODEL


# ---------------------------------------------------------------- preference pairs


def _read_pairs(files: list[str], format, columns, encoding) -> tuple[DataReport, list[Pair]]:
    read = read_pairs(files, format=format, columns=columns, encoding=encoding)
    pairs = read.pairs
    report = DataReport(files=files, num_examples=read.num_rows, num_valid=len(pairs),
                        num_turns=sum(len(p.prompt.messages) + len(p.chosen) + len(p.rejected) for p in pairs),
                        errors=read.errors, warnings=read.warnings, overlap=[], token_lengths=None,
                        duplicates=group_duplicates([pair_text(p) for p in pairs], pairs), char_lengths={},
                        formats=read.formats, kind="pairs")
    report.char_lengths, report.long_examples = pair_char_lengths(pairs)
    report.pairs = {"prompt_duplicates": group_duplicates([conversation_text(p.prompt) for p in pairs], pairs),
                    "long_shared_prefix": shared_prefix_count(pairs)}
    report.warnings += duplicate_warnings(report.duplicates, pairs) + contradiction_warnings(pairs)
    report.warnings += pair_placeholder_warnings(pairs) + shared_prefix_warning(files, report.pairs, len(pairs))
    return report, pairs


def pair_text(pair: Pair) -> str:
    responses = [f"{side} {m.role}: {m.content}" for side in SIDES for m in getattr(pair, side)]
    return "\n".join([conversation_text(pair.prompt), *responses])


def pair_char_lengths(pairs: list[Pair]) -> tuple[dict, int]:
    """Prompt (system and every prompt turn), chosen and rejected lengths in characters; the total is the
    prompt with the longer response."""
    prompt = [len(p.prompt.system or "") + sum(len(m.content) for m in p.prompt.messages) for p in pairs]
    sides = {side: [sum(len(m.content) for m in getattr(p, side)) for p in pairs] for side in SIDES}
    total = [n + max(c, r) for n, c, r in zip(prompt, sides["chosen"], sides["rejected"], strict=True)]
    stats = {**length_stats(total), "prompt": length_stats(prompt), **{k: length_stats(v) for k, v in sides.items()}}
    return stats, sum(t > LONG_CHARS for t in total)


def shared_prefix_count(pairs: list[Pair]) -> dict:
    """Pairs whose answers share a long prefix (pairs.shares_long_prefix), and their share of all pairs."""
    count = sum(shares_long_prefix(p) for p in pairs)
    return {"pairs": count, "share": round(count / len(pairs), 4) if pairs else 0.0}


SHARED_PREFIX_WHY = ("DPO's signal is then only the first differing token; keep the SFT term on "
                     "(--method.sft_weight, 1 by default) or use --objective orpo")


def shared_prefix_warning(files: list[str], pairs_report: dict, total: int) -> list[DataIssue]:
    """One warning for the data, not one per pair, when most pairs share a long prefix."""
    shared = pairs_report["long_shared_prefix"]
    if not mostly_long_prefix(shared["pairs"], total):
        return []
    return [DataIssue(files[0], -1, "(answers)", f"{shared['pairs']} pairs ({shared['share']:.0%}) have chosen and "
                      f"rejected answers sharing a long prefix: {SHARED_PREFIX_WHY}", "warning")]


def contradiction_warnings(pairs: list[Pair]) -> list[DataIssue]:
    """A pair that prefers what another pair rejects for the same prompt: the two cancel out in training."""
    seen: dict[tuple, str] = {}
    issues = []
    for pair in pairs:
        prompt = normalize(conversation_text(pair.prompt))
        chosen, rejected = (normalize("\n".join(m.content for m in getattr(pair, s))) for s in SIDES)
        if (prompt, rejected, chosen) in seen:
            issues.append(DataIssue(pair.source, pair.line, "(contradiction)", "prefers the response that "
                                    f"{seen[(prompt, rejected, chosen)]} rejects for the same prompt", "warning"))
        seen.setdefault((prompt, chosen, rejected), pair.where)
    return issues


@dataclass
class PairTally:
    prompt: list[int] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    longest: list[int] = field(default_factory=list)  # the longer side, prompt included
    supervised: int = 0
    total: int = 0
    truncated: int = 0
    dropped: int = 0
    zero_supervised: int = 0
    cut: dict = field(default_factory=lambda: {"over_max_length": 0, **{key: dict.fromkeys(SIDES, 0) for key in (
        "prompt_tokens_cut", "response_tokens_cut", "responses_cut")}})
    issues: list[DataIssue] = field(default_factory=list)
    first: tuple | None = None


def tally_pair_tokens(pairs: list[Pair], tokenizer, max_length: int | None, truncation: str,
                      on_chunk=None) -> PairTally:
    """Token lengths of both sides of every pair, and what ``max_length`` would cut on each side."""
    policy = EncodeOptions(max_length=max_length, truncation=truncation) if max_length else None
    sides = [c for p in pairs for c in (p.chosen_conversation(), p.rejected_conversation())]
    encoded = encode_each(sides, tokenizer, EncodeOptions(), on_chunk)
    tally = PairTally()
    for pair in pairs:
        both = dict(zip(SIDES, (next(encoded), next(encoded)), strict=True))
        problems = [replace(e, field=side) for side, (_, e) in both.items() if isinstance(e, DataIssue)]
        if problems:
            tally.issues += problems
            continue
        (chosen_conv, chosen), (_, rejected) = both["chosen"], both["rejected"]
        tally.first = tally.first or _preview_candidate(chosen_conv, chosen)
        tally.prompt.append(len(chosen.input_ids) - chosen.num_supervised)
        tally.chosen.append(chosen.num_supervised)
        tally.rejected.append(rejected.num_supervised)
        tally.longest.append(max(len(chosen.input_ids), len(rejected.input_ids)))
        if policy and tally.longest[-1] > max_length:
            both = _apply_pair_policy(pair, both, tokenizer, policy, tally, encode)
        for side, (_, kept) in (both or {}).items():
            _count_pair_supervision(pair, side, kept, tally)
    return tally


def _apply_pair_policy(pair: Pair, both: dict, tokenizer, policy, tally: PairTally, encode) -> dict | None:
    """What training will see of a pair with a side longer than max_length (a pair is kept or dropped whole)."""
    tally.cut["over_max_length"] += 1
    if policy.truncation == "error":
        tally.issues.append(DataIssue(pair.source, pair.line, "(length)", f"{tally.longest[-1]} tokens (the longer "
                                      f"side) is longer than max_length {policy.max_length} (truncation policy "
                                      "'error')"))
        return None
    if policy.truncation == "drop":
        tally.dropped += 1
        return None
    tally.truncated += 1
    kept = {}
    for side, (conv, whole) in both.items():
        limited = encode(conv, tokenizer, policy) if len(whole.input_ids) > policy.max_length else whole
        response_cut = whole.num_supervised - limited.num_supervised
        prompt_cut = len(whole.input_ids) - len(limited.input_ids) - response_cut
        tally.cut["prompt_tokens_cut"][side] += prompt_cut
        tally.cut["response_tokens_cut"][side] += response_cut
        tally.cut["responses_cut"][side] += response_cut > 0
        kept[side] = (conv, limited)
    return kept


def _count_pair_supervision(pair: Pair, side: str, encoded, tally: PairTally) -> None:
    tally.supervised += encoded.num_supervised
    tally.total += len(encoded.input_ids)
    if encoded.num_supervised == 0:
        tally.zero_supervised += 1
        tally.issues.append(DataIssue(pair.source, pair.line, side, "no supervised tokens: this response is "
                                      "cut away or empty after the template, so the pair compares nothing"))


def _add_pair_token_stats(report: DataReport, pairs: list[Pair], model: str | None, progress: bool) -> None:
    tokenizer = _use_template(report, model)
    report.model = str(model or _default_model())
    with progress_bar("tokenizing", 2 * len(pairs), enabled=progress) as bar:
        tally = tally_pair_tokens(pairs, tokenizer, report.max_length, report.truncation, bar.update)
    report.token_lengths = {**length_stats(tally.longest), "prompt": length_stats(tally.prompt),
                            "chosen": length_stats(tally.chosen), "rejected": length_stats(tally.rejected)}
    report.truncated, report.dropped, report.zero_supervised = tally.truncated, tally.dropped, tally.zero_supervised
    report.supervised_token_share = round(tally.supervised / tally.total, 4) if tally.total else None
    report.errors += tally.issues
    if report.max_length:
        report.pairs["truncation"] = tally.cut
    chosen = [p.chosen_conversation() for p in pairs]
    first = tally.first or next(((c, e) for c, e in encode_each(chosen[:1], tokenizer, _whole_options())
                                 if not isinstance(e, DataIssue)), None)
    report.preview = mask_preview(*first, tokenizer) if first else None
    warning = system_prompt_warning([p.prompt for p in pairs], tokenizer)
    report.warnings += [warning] if warning else []


# ---------------------------------------------------------------- the command


def run_check_command(args) -> int:
    with json_stdout(args.json):
        report = check_data(args.files, model=args.model, max_length=args.max_length, truncation=args.truncation,
                            template=args.template, eval_files=args.eval_files, format=args.format,
                            columns=args.columns, tokens=not args.no_tokens, progress=not args.json,
                            encoding=args.encoding)
    return finish_report(report, args.json, print_report)


# ---------------------------------------------------------------- the terminal view

LISTED_ERRORS, LISTED_WARNINGS, LISTED_GROUPS, PREVIEW_SEGMENT_CHARS = 50, 20, 10, 600


def print_report(report: DataReport, console=None) -> None:
    from rich.markup import escape

    # Lines that name files are soft-wrapped: rich never breaks them, so a path stays whole in a pipe.
    console = console or stdout_console()
    formats = ", ".join(f"{path} ({fmt})" for path, fmt in report.formats.items())
    kind = " (preference pairs)" if report.kind == "pairs" else ""
    console.print(f"[bold]data check{kind}[/bold] {escape(formats)}", soft_wrap=True)
    console.print(f"examples {report.num_examples}, valid {report.num_valid}, turns {report.num_turns}")
    _print_issues(console, "errors", report.errors, LISTED_ERRORS, "red")
    # Duplicates and overlap are listed as groups below rather than once per row.
    grouped = ("(duplicate)", "(overlap)", "(contradiction)")
    _print_issues(console, "warnings", [w for w in report.warnings if w.field not in grouped], LISTED_WARNINGS, "yellow")
    _print_lengths(console, report)
    _print_tokens(console, report)
    _print_duplicates(console, report)
    _print_shared_prefix(console, report)
    _print_preview(console, report.preview, " (chosen side)" if report.kind == "pairs" else "")
    verdict = "[green]clean[/green]" if report.ok else f"[red]{_count(len(report.errors), 'error')}[/red]"
    console.print(f"{verdict}, {_warning_count(report.warnings, grouped)}, checked in {report.elapsed_s:.1f} s")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _warning_count(warnings: list[DataIssue], grouped: tuple[str, ...]) -> str:
    """"3 warnings", or, where duplicates are shown as groups rather than under "warnings (N)", how many are which."""
    in_groups = sum(w.field in grouped for w in warnings)
    if not in_groups:
        return _count(len(warnings), "warning")
    listed = len(warnings) - in_groups
    where = "in the duplicate, overlap and contradiction groups"
    return f"{_count(len(warnings), 'warning')} ({f'{listed} listed, {in_groups} ' if listed else ''}{where})"


def _print_issues(console, title: str, issues: list[DataIssue], limit: int, color: str) -> None:
    from rich.markup import escape

    if not issues:
        return
    console.print(f"[{color}]{title} ({len(issues)})[/{color}]")
    for issue in issues[:limit]:
        console.print(f"  {escape(str(issue))}", soft_wrap=True)
    if len(issues) > limit:
        console.print(f"  ... and {len(issues) - limit} more (--json lists them all)")


def _print_lengths(console, report: DataReport) -> None:
    """The length percentiles: a table on a terminal, tab-separated lines in a pipe (print_table)."""
    columns = ("p50", "p90", "p99", "max", "mean")
    parts = ("prompt", "chosen", "rejected") if report.kind == "pairs" else ("prompt", "response")
    total = "longer side" if report.kind == "pairs" else "total"  # the prompt with its longer response
    rows = []
    for unit, stats in (("chars", report.char_lengths), ("tokens", report.token_lengths)):
        for part in (*parts, None):
            if stats:
                row = stats[part] if part else stats
                rows.append([f"{unit} {part or total}", *(str(row[k]) for k in columns)])
    print_table("lengths", ["length", *columns], rows, console, right=columns)


def _print_tokens(console, report: DataReport) -> None:
    if report.token_lengths is None:
        console.print("token statistics skipped (--no-tokens)")
        return
    share = report.supervised_token_share
    template = TemplateChoice(report.template, report.template_reason, "").describe() if report.template else "?"
    console.print(f"tokenizer {report.model}, template {template}; supervised tokens "
                  f"{share:.1%} of all" if share is not None else "no tokens", soft_wrap=True, markup=False)
    if report.max_length and report.kind == "pairs":
        _print_pair_truncation(console, report)
    elif report.max_length:
        console.print(f"max length {report.max_length} ({report.truncation}): {report.truncated} truncated, "
                      f"{report.dropped} dropped")


def _print_pair_truncation(console, report: DataReport) -> None:
    cut = report.pairs["truncation"]
    console.print(f"max length {report.max_length} ({report.truncation}): {cut['over_max_length']} pair(s) longer, "
                  f"{report.truncated} truncated, {report.dropped} dropped")
    if report.truncated:
        for side in SIDES:
            console.print(f"  {side}: {cut['prompt_tokens_cut'][side]} prompt token(s) cut, "
                          f"{cut['response_tokens_cut'][side]} response token(s) cut in "
                          f"{cut['responses_cut'][side]} response(s)")


def _print_duplicates(console, report: DataReport) -> None:
    contradictions = [w for w in report.warnings if w.field == "(contradiction)"]
    _print_issues(console, "contradicting pairs", contradictions, LISTED_GROUPS, "yellow")
    listed = {frozenset(group["rows"]) for group in report.duplicates}  # a duplicate group already names these rows
    shared = [group for group in (report.pairs or {}).get("prompt_duplicates", []) if frozenset(group["rows"]) not in listed]
    for title, groups, color in (("duplicate groups", report.duplicates, "yellow"),
                                 ("train/eval overlap", report.overlap, "yellow"),
                                 ("prompts shared by several pairs", shared, "default")):
        if not groups:
            continue
        console.print(f"[{color}]{title} ({len(groups)})[/{color}]")
        for group in groups[:LISTED_GROUPS]:
            rows = group["rows"] if "rows" in group else [group["eval"], *group["train"]]
            console.print(f"  {group.get('kind', 'overlap')}: {', '.join(rows[:6])}" + (" ..." if len(rows) > 6 else ""),
                          soft_wrap=True, markup=False)


def _print_shared_prefix(console, report: DataReport) -> None:
    shared = (report.pairs or {}).get("long_shared_prefix")
    if shared and shared["pairs"]:
        # when most pairs share one, the warning below already gives the reason: say it once
        why = "" if mostly_long_prefix(shared["pairs"], report.num_valid) else f"; {SHARED_PREFIX_WHY}"
        console.print(f"answers sharing a long prefix: {shared['pairs']} of {report.num_valid} pairs "
                      f"({shared['share']:.0%}){why}", soft_wrap=True, markup=False)


def _print_preview(console, preview: dict | None, side: str = "") -> None:
    from rich.markup import escape
    from rich.text import Text

    if not preview:
        return
    console.print(f"[bold]mask preview{side}[/bold] {escape(preview['source'])}: [black on green]\\[\\[highlighted]][/black on green]"
                  " = supervised (in the loss); the rest is context", soft_wrap=True)
    text = Text()
    for segment in preview["segments"]:
        shown = _elide(segment["text"], PREVIEW_SEGMENT_CHARS)
        text.append(f"[[{shown}]]" if segment["supervised"] else shown,
                    style="black on green" if segment["supervised"] else "dim")
    console.print(text)


def _elide(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit // 2] + " ... " + text[-limit // 2:]
