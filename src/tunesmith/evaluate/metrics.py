"""Text metrics over prediction/reference strings, correct for Chinese and for English.

``score(predictions, references)`` runs the default set and returns one JSON-serialisable dict.
Each metric is also a function of its own:

- ``rouge``: ROUGE-1/2/L F1 (means) by rouge_score with language-aware tokens (see ``text``):
  on ASCII English it equals rouge_score's own scorer; identical Chinese strings score 1.0.
- ``bleu`` / ``chrf``: sacrebleu corpus scores with their signatures; BLEU tokenizes with
  ``zh`` when the references contain Chinese (``13a`` makes a Chinese sentence one token).
- ``exact_match``, ``lengths`` (language-aware units), ``repetition`` (empty, duplicate and
  self-repeating predictions).
- ``bertscore``: bert-score with a local encoder, named in the result with its layer.
- ``classification``: labels extracted by whole-word match, longest label first; anything
  else is ``invalid`` and counts as wrong.
- ``closer_to_chosen``: on preference pairs, the share of predictions nearer their chosen answer
  than their rejected one by ``token_f1`` (what the model says, where preference_accuracy
  measures what it finds likely).
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

from tunesmith.errors import TunesmithError, UsageError
from tunesmith.evaluate.text import (
    contains_han,
    is_cjk_token,
    kana_share,
    length,
    normalize,
    term_pattern,
    tokens,
)
from tunesmith.models.resolve import ALIASES, DEFAULT_ENCODER, resolve
from tunesmith.output import progress_bar, verbose

DEFAULT_METRICS = ["rouge", "bleu", "chrf", "exact_match", "length", "repetition"]
ALL_METRICS = [*DEFAULT_METRICS, "bertscore", "classification"]
INVALID = "invalid"


def _check_pairs(predictions, references) -> tuple[list[str], list[str]]:
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise UsageError(f"{len(predictions)} predictions but {len(references)} references: they must pair up")
    if not predictions:
        raise UsageError("nothing to score: no predictions")
    for field, texts in (("prediction", predictions), ("reference", references)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise UsageError(f"{field} {index} is {type(text).__name__}, not a string: {text!r:.80}")
    return predictions, references


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# --- ROUGE ----------------------------------------------------------------------------------


class _RougeTokenizer:
    """The object rouge_score's ``RougeScorer(tokenizer=...)`` calls.

    Stemming follows rouge_score's DefaultTokenizer (Porter, words longer than 3 characters)
    and is never applied to CJK tokens.
    """

    def __init__(self, *, jieba: bool, use_stemmer: bool):
        self.jieba = jieba
        self.stem = _porter_stem if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        words = tokens(text, jieba=self.jieba)
        if self.stem is None:
            return words
        return [self.stem(w) if len(w) > 3 and not is_cjk_token(w) else w for w in words]


@lru_cache(maxsize=100_000)
def _porter_stem(word: str) -> str:
    return _porter().stem(word)


@lru_cache(maxsize=1)
def _porter():
    from nltk.stem import porter

    return porter.PorterStemmer()  # the stemmer rouge_score's DefaultTokenizer uses


def rouge_per_example(predictions, references, *, jieba=False, use_stemmer=True) -> list[dict]:
    """ROUGE-1/2/L F1 of each pair; an empty prediction scores 0."""
    from rouge_score.rouge_scorer import RougeScorer

    predictions, references = _check_pairs(predictions, references)
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_RougeTokenizer(jieba=jieba, use_stemmer=use_stemmer))
    rows = []
    pairs = zip(predictions, references, strict=True)
    # ROUGE-L's LCS is quadratic per pair in pure Python: about 10 s per 1000 Chinese paragraphs.
    with progress_bar("ROUGE", len(predictions), enabled=len(predictions) >= 200, unit="pair") as bar:
        for prediction, reference in pairs:
            scores = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
            rows.append({name: s.fmeasure for name, s in scores.items()})
            bar.update(1)
    return rows


def rouge(predictions, references, *, jieba=False, use_stemmer=True) -> dict:
    """Mean ROUGE-1/2/L F1 over pairs, with language-aware tokens."""
    return _rouge_means(rouge_per_example(predictions, references, jieba=jieba, use_stemmer=use_stemmer))


def _rouge_means(rows: list[dict]) -> dict:
    return {name: _mean(row[name] for row in rows) for name in ("rouge1", "rouge2", "rougeL")}


# --- BLEU and chrF --------------------------------------------------------------------------


def bleu_tokenizer(references, lang: str | None = None) -> str:
    """sacrebleu tokenizer for the language: ``zh`` for Chinese, ``char`` for Japanese, else ``13a``.

    Without ``lang`` the references decide: Japanese (kana are at least a fifth of the CJK
    characters) picks ``char`` (``ja-mecab`` needs MeCab); otherwise any Chinese character picks
    ``zh``, which on text without Chinese characters is the same as ``13a``.
    """
    if lang is not None:
        lang = lang.lower()
        return "zh" if lang.startswith("zh") else "char" if lang.startswith("ja") else "13a"
    if kana_share(references) >= 0.2:
        return "char"
    return "zh" if any(contains_han(r) for r in references) else "13a"


def bleu(predictions, references, *, lang=None, tokenize=None) -> dict:
    """sacrebleu corpus BLEU (0-100), its tokenizer and signature."""
    from sacrebleu.metrics import BLEU

    predictions, references = _check_pairs(predictions, references)
    tokenize = tokenize or bleu_tokenizer(references, lang)
    metric = BLEU(tokenize=tokenize)
    result = metric.corpus_score(predictions, [references])
    return {"bleu": result.score, "bleu_tokenize": tokenize, "bleu_signature": str(metric.get_signature())}


def chrf(predictions, references) -> dict:
    """sacrebleu corpus chrF (0-100, character 6-grams, no word n-grams) and its signature.

    Characters need no word segmentation, so chrF means the same for Chinese and English.
    """
    from sacrebleu.metrics import CHRF

    predictions, references = _check_pairs(predictions, references)
    metric = CHRF()
    result = metric.corpus_score(predictions, [references])
    return {"chrf": result.score, "chrf_signature": str(metric.get_signature())}


# --- exact match, lengths, repetition --------------------------------------------------------


def _normalize_answer(text: str) -> str:
    return " ".join(normalize(text).split())


def exact_match(predictions, references) -> float:
    """Share of pairs equal after NFKC, lowercasing and collapsing whitespace (punctuation counts)."""
    predictions, references = _check_pairs(predictions, references)
    return _mean(_normalize_answer(p) == _normalize_answer(r) for p, r in zip(predictions, references, strict=True))


def lengths(predictions, references) -> dict:
    """Mean lengths in language-aware units (CJK characters, words) and their ratio (pred/ref)."""
    predictions, references = _check_pairs(predictions, references)
    pred_mean = _mean(map(length, predictions))
    ref_mean = _mean(map(length, references))
    return {"avg_pred_length": pred_mean, "avg_ref_length": ref_mean,
            "length_ratio": pred_mean / ref_mean if ref_mean else None}


def repeated_ngram_ratio(text: str, n: int = 4) -> float:
    """Share of the text's n-grams (language-aware tokens) that repeat an earlier one."""
    words = tokens(text)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def repetition(predictions, n: int = 4) -> dict:
    """Degenerate outputs: empty ones, ones identical to another, and ones repeating n-grams inside.

    Predictions are compared after stripping whitespace; empty ones are counted only as empty.
    ``repeated_ngram_ratio`` is the mean over all predictions (shorter than n tokens: 0).
    """
    predictions = list(predictions)
    if not predictions:
        raise UsageError("nothing to score: no predictions")
    stripped = [p.strip() for p in predictions]
    counts = Counter(p for p in stripped if p)
    ratios = [repeated_ngram_ratio(p, n) for p in stripped]
    looping = sum(r > 0 for r in ratios)
    total = len(predictions)
    return {
        "empty_predictions": total - sum(counts.values()),
        "duplicate_predictions": sum(c for c in counts.values() if c > 1),
        "distinct_predictions": len(counts),
        "repetitive_predictions": looping,
        "repetitive_rate": looping / total,
        "repeated_ngram_ratio": _mean(ratios),
        "repetition_n": n,
    }


# --- closer to chosen (preference pairs) -------------------------------------------------------


def token_f1(prediction: str, reference: str, *, jieba: bool = False) -> float:
    """SQuAD-style F1 of the two bags of language-aware tokens (``text.tokens``: NFKC, lowercased words and
    numbers, Chinese characters or jieba words, kana; punctuation stripped). Two empty texts score 1, one 0."""
    pred, ref = tokens(prediction, jieba=jieba), tokens(reference, jieba=jieba)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    # 2c / (|pred| + |ref|) is 2PR / (P + R) as one division: equal F1s are then equal floats, so ties are exact.
    return 2 * common / (len(pred) + len(ref))


def closer_to_chosen(predictions, chosen, rejected, *, jieba: bool = False) -> dict:
    """How often each prediction is closer to its chosen answer than to its rejected one, by ``token_f1``.

    ``closer_to_chosen``: the mean of 1 (closer to chosen), 0.5 (equal F1, an empty prediction included)
    and 0 (closer to rejected); ``f1_chosen_minus_rejected``: the mean of F1(chosen) - F1(rejected).
    """
    predictions, chosen = _check_pairs(predictions, chosen)
    _, rejected = _check_pairs(predictions, rejected)
    margins = [token_f1(p, c, jieba=jieba) - token_f1(p, r, jieba=jieba)
               for p, c, r in zip(predictions, chosen, rejected, strict=True)]
    return {"closer_to_chosen": _mean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins),
            "f1_chosen_minus_rejected": _mean(margins)}


# --- BERTScore -------------------------------------------------------------------------------

# Layers for encoders bert-score's own table (bert_score.utils.model2layers) does not list.
# bert-score picks an intermediate layer for masked-LM encoders (their last layer is shaped for
# predicting tokens); all-MiniLM-L6-v2's last layer (6) is instead trained contrastively for
# semantic similarity of its mean-pooled tokens. Measured on 12 hand-written paraphrase pairs
# against shifted (unrelated) pairs, layer 6 separates them best: mean F1 0.81 vs 0.11, where
# layer 5 gives 0.86 vs 0.38 (tests/evaluate/test_bertscore.py::test_minilm_layer_choice).
ENCODER_LAYERS = {"all-minilm-l6-v2": 6, "sentence-transformers/all-minilm-l6-v2": 6}


def bertscore_layer(model: str, num_layers: int | None, model_path: Path) -> int:
    """The layer used: explicit, else the known tuned layer for the model; checked against its depth."""
    from bert_score.utils import model2layers

    layer = num_layers
    for name in _catalog_names(model) if layer is None else []:
        layer = ENCODER_LAYERS.get(name.lower(), model2layers.get(name))
        if layer is not None:
            break
    if layer is None:
        raise UsageError(f"no known BERTScore layer for {model}: pass num_layers (e.g. about 3/4 of its depth)")
    depth = json.loads((model_path / "config.json").read_text()).get("num_hidden_layers")
    if depth is not None and not 0 <= layer <= depth:
        raise UsageError(f"num_layers={layer} is out of range for {model}: it has {depth} layers (0 = embeddings)")
    return layer


def _catalog_names(model: str) -> list[str]:
    # bert-score's tables use the old hub ids ("roberta-large"); the hub now prefixes an
    # organisation ("FacebookAI/roberta-large"), so look up both.
    return [model, model.rsplit("/", 1)[-1]] if "/" in model else [model]


def bertscore_baseline(model: str, lang: str, baseline_path=None) -> Path:
    """The rescaling baseline file: given, or shipped with bert-score for (lang, hub id); else an error."""
    import bert_score

    if baseline_path is not None:
        path = Path(baseline_path)
    else:
        hub_id = ALIASES[model.lower()].hub_id if model.lower() in ALIASES else model
        shipped = Path(bert_score.__file__).parent / "rescale_baseline" / lang
        candidates = [shipped / f"{name}.tsv" for name in _catalog_names(hub_id)]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise TunesmithError(
            f"BERTScore rescaling was asked for, but there is no baseline for {model} ({lang}) at {path}; "
            "pass a baseline file (bert-score's LAYER,P,R,F format) or score without rescaling")
    return path


def _read_baseline(path: Path, layer: int) -> tuple[float, float, float]:
    # bert-score reads this file with pandas (its .tsv files are comma-separated): row = layer.
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    body = rows[1:]
    if not 0 <= layer < len(body) or len(body[layer]) < 4:
        raise TunesmithError(f"{path}: no baseline row for layer {layer} (rows 0..{len(body) - 1})")
    p, r, f = (float(x) for x in body[layer][1:4])
    return p, r, f


def bertscore(predictions, references, *, model: str | None = None, num_layers: int | None = None,
              rescale: bool = False, baseline_path=None, lang: str | None = None, batch_size: int = 32) -> dict:
    """Mean BERTScore precision/recall/F1 with a local encoder (default: the embedded MiniLM).

    Pairs where either side is empty score 0, as bert-score itself scores them (its own
    empty-string path does not run under transformers 5). With ``rescale`` the scores are
    rescaled with bert-score's formula, (x - baseline) / (1 - baseline), and a missing baseline
    is an error, never silently unrescaled numbers.
    """
    predictions, references = _check_pairs(predictions, references)
    model = model or DEFAULT_ENCODER
    lang = lang or ("zh" if any(contains_han(r) for r in references) else "en")
    baseline = bertscore_baseline(model, lang, baseline_path) if rescale else None  # fail before loading
    model_path = resolve(model)
    layer = bertscore_layer(model, num_layers, model_path)
    tokenizer = _encoder_tokenizer(model_path)
    scores = _raw_bertscore(predictions, references, model_path, layer, batch_size)
    if baseline is not None:
        base = _read_baseline(baseline, layer)
        scores = [tuple((x - b) / (1 - b) for x, b in zip(row, base, strict=True)) for row in scores]
    unknown = unknown_token_rate(predictions + references, tokenizer)
    warning = unreadable_warning(model, lang, unknown)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return {
        "bertscore_precision": _mean(s[0] for s in scores),
        "bertscore_recall": _mean(s[1] for s in scores),
        "bertscore_f1": _mean(s[2] for s in scores),
        "bertscore_model": model, "bertscore_model_path": str(model_path), "bertscore_layer": layer,
        "bertscore_rescaled": baseline is not None, "bertscore_baseline": str(baseline) if baseline else None,
        "bertscore_unknown_token_rate": unknown,
        **({"bertscore_warning": warning} if warning else {}),
    }


def _raw_bertscore(predictions, references, model_path: Path, layer: int, batch_size: int) -> list[tuple]:
    """(P, R, F) per pair from bert_score.score on the non-empty pairs; empty pairs get zeros."""
    import bert_score

    scores = [(0.0, 0.0, 0.0)] * len(predictions)
    keep = [i for i, (p, r) in enumerate(zip(predictions, references, strict=True)) if p.strip() and r.strip()]
    if not keep:
        return scores
    cands, refs = [predictions[i] for i in keep], [references[i] for i in keep]
    # bert-score prints its progress to stdout; keep stdout clean for --json output.
    with contextlib.redirect_stdout(sys.stderr):
        p, r, f = bert_score.score(cands, refs, model_type=str(model_path), num_layers=layer,
                                   batch_size=batch_size, verbose=verbose() and len(keep) > batch_size)
    for j, i in enumerate(keep):
        scores[i] = (p[j].item(), r[j].item(), f[j].item())
    return scores


def _encoder_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    # bert-score truncates to model_max_length; a tokenizer that never set it reports ~1e30,
    # which overflows deep inside bert-score. Say what to fix instead.
    if tokenizer.model_max_length > 1_000_000:
        raise UsageError(f"{model_path}: the tokenizer sets no model_max_length; add it to tokenizer_config.json "
                         "(the encoder's maximum positions, e.g. 512)")
    return tokenizer


# Above this share of unknown tokens the encoder is comparing [UNK] with [UNK]: the scores mean little.
UNREADABLE_RATE = 0.05


def unreadable_warning(model: str, lang: str, unknown_rate: float) -> str | None:
    if unknown_rate <= UNREADABLE_RATE:
        return None
    return (f"BERTScore: {unknown_rate:.0%} of the tokens are unknown to the encoder {model}, which cannot read this "
            f"text ({lang}); its scores say little here. Pass an encoder that reads it (--bertscore-model)")


def unknown_token_rate(texts, tokenizer) -> float:
    """Share of the encoder's tokens that are its unknown token: a high rate means the encoder cannot
    read the language (all-MiniLM-L6-v2's English vocabulary lacks most Chinese characters)."""
    if tokenizer.unk_token_id is None:
        return 0.0
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return sum(i == tokenizer.unk_token_id for i in ids) / len(ids) if ids else 0.0


# --- classification -----------------------------------------------------------------------------


def _check_labels(labels) -> list[str]:
    labels = [str(label) for label in labels]
    keys = [normalize(label).strip() for label in labels]
    if not labels or any(not k for k in keys):
        raise UsageError(f"labels must be non-empty strings, got {labels!r}")
    if len(set(keys)) != len(keys):
        raise UsageError(f"labels must differ after lowercasing: {labels!r}")
    if INVALID in keys:
        raise UsageError(f"{INVALID!r} cannot be a label: it marks predictions that name no single label")
    return labels


def extract_label(text: str, labels) -> str:
    """The one label ``text`` names, else ``"invalid"``.

    An exact match (ignoring case and surrounding whitespace) wins. Otherwise labels are found
    as whole words, longest first, each match removed from the text before shorter labels are
    searched ("entailment" inside "not entailment" does not count). Exactly one distinct label
    must be found; none or several give ``"invalid"``, never a default label.
    """
    labels = _check_labels(labels)
    text = normalize(text).strip()
    for label in labels:
        if text == normalize(label).strip():
            return label
    found = set()
    for label in sorted(labels, key=lambda lab: len(normalize(lab).strip()), reverse=True):
        text, hits = term_pattern(label).subn(" ", text)
        if hits:
            found.add(label)
    return found.pop() if len(found) == 1 else INVALID


def _reference_labels(references, labels) -> list[str]:
    out = []
    for index, reference in enumerate(references):
        label = reference if reference in labels else extract_label(reference, labels)
        if label == INVALID:
            raise UsageError(f"reference {index} ({reference!r:.80}) does not name exactly one of the labels {labels}")
        out.append(label)
    return out


def classification(predictions, references, labels) -> dict:
    """Accuracy, macro/micro F1, per-class scores, confusion matrix, invalid rate, majority baseline.

    Invalid predictions are wrong: they lower accuracy and the recall of their reference class
    but are no label's false positive. The numbers are scikit-learn's with ``labels=labels``
    (so micro F1 exceeds accuracy when there are invalid predictions).
    """
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    predictions, references = _check_pairs(predictions, references)
    labels = _check_labels(labels)
    truth = _reference_labels(references, labels)
    predicted = [extract_label(p, labels) for p in predictions]
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0)
    # Rows: reference labels; columns: predicted labels and "invalid" (a reference is never invalid).
    matrix = confusion_matrix(truth, predicted, labels=[*labels, INVALID])[: len(labels)]
    majority, majority_count = max(((lab, truth.count(lab)) for lab in labels), key=lambda x: x[1])
    total = len(truth)
    return {
        "accuracy": _mean(t == p for t, p in zip(truth, predicted, strict=True)),
        "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(truth, predicted, labels=labels, average="micro", zero_division=0)),
        "invalid_rate": predicted.count(INVALID) / total,
        "invalid_predictions": predicted.count(INVALID),
        "majority_class": majority,
        "majority_baseline": majority_count / total,
        "per_class": {lab: {"precision": float(precision[i]), "recall": float(recall[i]),
                            "f1": float(f1[i]), "support": int(support[i])} for i, lab in enumerate(labels)},
        "confusion_matrix": {"rows": labels, "columns": [*labels, INVALID], "matrix": matrix.tolist()},
    }


# --- everything at once ------------------------------------------------------------------------


def metric_names(names, labels, extra: tuple[str, ...] = ()) -> list[str]:
    """The metrics to run, checked up front so a typo fails before any work: ``names``, or the defaults
    (plus classification when there are labels). ``extra``: names the caller computes itself (perplexity)."""
    names = list(names) if names is not None else [*DEFAULT_METRICS, *(["classification"] if labels else []), *extra]
    unknown = [m for m in names if m not in ALL_METRICS and m not in extra]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join([*ALL_METRICS, *extra])}")
    if "classification" in names and not labels:
        raise UsageError("the classification metric needs labels (e.g. --labels yes,no)")
    return names


def score(predictions, references, *, metrics: list[str] | None = None, labels=None, gold=None, jieba=False,
          use_stemmer=True, lang=None, bertscore_model=None, bertscore_num_layers=None,
          bertscore_rescale=False, bertscore_baseline_path=None, per_example=False) -> dict:
    """Run the metrics named in ``metrics`` and merge their results into one flat-ish dict.

    Default: rouge, bleu, chrf, exact_match, length, repetition, plus classification when labels
    are given. Classification compares with ``gold`` (one label per pair) when given, else with the
    references. BERTScore loads an encoder, so it runs only when named. With ``per_example`` the
    result also holds ``rouge_per_example`` (one {rouge1, rouge2, rougeL} per pair), computed in
    the same pass as the means.
    """
    predictions, references = _check_pairs(predictions, references)
    metrics = metric_names(metrics, labels)
    result: dict = {"n": len(predictions)}
    for name in metrics:
        result.update(_run_metric(name, predictions, references, labels=labels, gold=gold, jieba=jieba,
                                  use_stemmer=use_stemmer, lang=lang, bertscore_model=bertscore_model,
                                  bertscore_num_layers=bertscore_num_layers, bertscore_rescale=bertscore_rescale,
                                  bertscore_baseline_path=bertscore_baseline_path))
    if not per_example:
        result.pop("rouge_per_example", None)
    return result


def _run_metric(name, predictions, references, **opts) -> dict:
    if name == "rouge":
        rows = rouge_per_example(predictions, references, jieba=opts["jieba"], use_stemmer=opts["use_stemmer"])
        return {**_rouge_means(rows), "rouge_tokens": "jieba" if opts["jieba"] else "cjk-char",
                "rouge_stemmer": opts["use_stemmer"], "rouge_per_example": rows}
    if name == "bleu":
        return bleu(predictions, references, lang=opts["lang"])
    if name == "chrf":
        return chrf(predictions, references)
    if name == "exact_match":
        return {"exact_match": exact_match(predictions, references)}
    if name == "length":
        return lengths(predictions, references)
    if name == "repetition":
        return repetition(predictions)
    if name == "classification":
        return classification(predictions, opts["gold"] if opts["gold"] is not None else references, opts["labels"])
    return bertscore(predictions, references, model=opts["bertscore_model"], num_layers=opts["bertscore_num_layers"],
                     rescale=opts["bertscore_rescale"], baseline_path=opts["bertscore_baseline_path"],
                     lang=opts["lang"])

