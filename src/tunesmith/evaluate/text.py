"""Language-aware tokens and lengths for metrics.

Chinese and Japanese are written without spaces, so splitting on whitespace turns a whole
Chinese sentence into one "word", and rouge_score's tokenizer (which keeps only ``[a-z0-9]+``)
drops it entirely: an identical Chinese pair scores 0.0. Here a text is split into:

- Chinese characters (Han), one token each, or jieba words when asked;
- Japanese kana, one token each;
- runs of other letters, combining marks and digits (Latin, Cyrillic, Hangul, ...), one word each.

Everything else (punctuation, symbols, whitespace, ``_``) separates tokens and is dropped. Text
is NFKC-normalised first (full-width ``ＧＰＴ－４`` becomes ``GPT-4``) and lowercased. For ASCII
text this is exactly rouge_score's tokenization (lowercase, ``[a-z0-9]+`` runs), so English
scores equal rouge_score's own; unlike it, accented letters stay inside their word ("café").
Scripts written without spaces other than Chinese and Japanese (Thai, Lao, Khmer, Burmese) are
not segmented.
"""

from __future__ import annotations

import logging
import unicodedata
from functools import lru_cache

import regex  # the `regex` module: Unicode script classes (\p{Han}) that `re` lacks

_HAN = r"\p{Han}"
_KANA = r"\p{Hiragana}\p{Katakana}\u30fc"  # U+30FC (the long-vowel mark) is script Common
_TOKEN_RE = regex.compile(
    rf"(?P<han>[{_HAN}]+)"
    rf"|(?P<kana>[{_KANA}])"
    rf"|(?P<word>(?:(?![{_HAN}{_KANA}])[\p{{L}}\p{{M}}\p{{N}}])+)"
)
_HAN_RE = regex.compile(rf"[{_HAN}]")
_KANA_RE = regex.compile(rf"[{_KANA}]")


def normalize(text: str) -> str:
    """NFKC (full-width letters, digits and punctuation to their plain forms) and lowercase."""
    return unicodedata.normalize("NFKC", text).lower()


def tokens(text: str, *, jieba: bool = False) -> list[str]:
    """Metric tokens: Chinese characters (or jieba words), kana, and lowercased words and numbers.

    >>> tokens("GPT-4 很好")
    ['gpt', '4', '很', '好']
    """
    out: list[str] = []
    for match in _TOKEN_RE.finditer(normalize(text)):
        han = match.group("han")
        if han is None:
            out.append(match.group())
        elif jieba:
            out.extend(_jieba_words(han))
        else:
            out.extend(han)
    return out


def length(text: str) -> int:
    """Length in language-aware units: CJK characters plus words and numbers of other scripts."""
    return len(tokens(text))


def is_cjk_token(token: str) -> bool:
    return bool(_HAN_RE.match(token) or _KANA_RE.match(token))


def contains_han(text: str) -> bool:
    return _HAN_RE.search(text) is not None


def kana_share(texts) -> float:
    """Kana among the CJK characters of ``texts``: high for Japanese, near zero for Chinese
    (a Chinese corpus may still quote a Japanese name or two)."""
    kana = sum(len(_KANA_RE.findall(t)) for t in texts)
    han = sum(len(_HAN_RE.findall(t)) for t in texts)
    return kana / (kana + han) if kana + han else 0.0


def term_pattern(term: str) -> regex.Pattern:
    """A case-insensitive pattern for ``term`` as a whole word, on normalised text.

    The term may not be glued to a letter, digit or ``_`` of a spaced script ("50" is not
    found in "150", "entailment" not in "not_entailment"), while a CJK neighbour is allowed:
    Chinese has no spaces, so "正面" must be found in "这是正面的评价".
    """
    spaced_word_char = rf"(?:(?![{_HAN}{_KANA}])[\p{{L}}\p{{M}}\p{{N}}_])"
    escaped = regex.escape(normalize(term).strip())
    return regex.compile(rf"(?<!{spaced_word_char}){escaped}(?!{spaced_word_char})")


def _jieba_words(han_run: str) -> list[str]:
    # Only runs of Han characters reach jieba, so its handling of Latin text and punctuation
    # never differs from the character mode. Its segmentation depends on its version and dictionary.
    return _jieba().lcut(han_run)


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it logs "Building prefix dict..." on first use
    return jieba
