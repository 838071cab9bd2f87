"""Golden tests for the text metrics: hand-computed values and the reference implementations."""

import json

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from tunesmith.errors import UsageError
from tunesmith.evaluate.metrics import (
    ALL_METRICS,
    INVALID,
    bleu,
    chrf,
    classification,
    closer_to_chosen,
    exact_match,
    extract_label,
    lengths,
    repetition,
    rouge,
    rouge_per_example,
    score,
    token_f1,
)

# The seed tutorial's own evaluation example.
SEED_PREDICTIONS = ["机器学习是人工智能的一个重要分支。", "深度学习使用神经网络进行学习。", "自然语言处理处理人类语言。"]
SEED_REFERENCES = ["机器学习是AI的核心技术之一。", "深度学习基于多层神经网络。", "NLP技术用于理解和生成人类语言。"]

ENGLISH_PREDICTIONS = [
    "The cat was sitting on the mat when the dog came running in.",
    "Machine learning models learn patterns from data to make predictions.",
    "Paris is the capital city of France.",
    "I am a helpful assistant, trained to answer questions about cooking!",
    "The quick brown foxes jumped over the lazy dogs repeatedly.",
    "The dog wagged its tail because it was happy.",
    "",
]
ENGLISH_REFERENCES = [
    "The cat sat on the mat and the dog ran in.",
    "Machine learning learns patterns in data and uses them to predict outcomes.",
    "The capital of France is Paris.",
    "I'm an assistant that answers cooking questions.",
    "A quick brown fox jumps over the lazy dog.",
    "It was happy, so the dog wagged it's tail.",
    "Something the model failed to say.",
]
LABELS = ["entailment", "not_entailment"]


# --- ROUGE ---------------------------------------------------------------------------------


def test_seed_chinese_pairs_score_non_zero_where_rouge_score_gives_zero():
    ours = rouge_per_example(SEED_PREDICTIONS, SEED_REFERENCES)
    assert all(row[k] > 0 for row in ours for k in ("rouge1", "rouge2", "rougeL"))
    plain = RougeScorer(["rouge1"], use_stemmer=True)  # the seed's scorer: Chinese vanishes
    assert [plain.score(r, p)["rouge1"].fmeasure for p, r in zip(SEED_PREDICTIONS, SEED_REFERENCES, strict=True)] == [0, 0, 0]


def test_seed_pair_rouge1_by_hand():
    # prediction: 16 characters; reference: 机器学习是 + "ai" + 的核心技术之一 = 13 tokens.
    # Shared (with multiplicity): 机 器 学 习 是 的 一 = 7. F1 = 2 * 7 / (16 + 13).
    row = rouge_per_example(SEED_PREDICTIONS[:1], SEED_REFERENCES[:1])[0]
    assert row["rouge1"] == pytest.approx(14 / 29, abs=1e-12)
    # The longest common subsequence is 机器学习是 ... 的 ... 一 as well: same 7 tokens.
    assert row["rougeL"] == pytest.approx(14 / 29, abs=1e-12)
    # Bigrams: 机器 器学 学习 习是 are shared: 4 of 15 predicted and 12 reference bigrams.
    assert row["rouge2"] == pytest.approx(2 * 4 / (15 + 12), abs=1e-12)


def test_identical_chinese_scores_one_on_every_variant():
    text = "深度学习基于多层神经网络，它在图像识别中表现出色。"
    assert rouge([text], [text]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge([text], [text], jieba=True) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_mixed_text_is_not_over_scored():
    scores = rouge(["GPT-4 很好"], ["GPT-4 很差"])
    assert scores["rouge1"] == pytest.approx(0.75)  # gpt 4 很 shared of 4 tokens each
    assert scores["rouge2"] == pytest.approx(2 / 3)
    plain = RougeScorer(["rouge1"]).score("GPT-4 很差", "GPT-4 很好")["rouge1"].fmeasure
    assert plain == 1.0  # what rouge_score alone reports: the Chinese words vanish


def test_empty_prediction_scores_zero():
    assert rouge([""], ["机器学习很有趣"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge(["   "], ["Machine learning is fun"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_jieba_tokens_score_words():
    chars = rouge(["我爱自然语言处理"], ["自然语言处理很有趣"])
    words = rouge(["我爱自然语言处理"], ["自然语言处理很有趣"], jieba=True)
    assert words["rouge1"] > 0 and words["rouge1"] != chars["rouge1"]


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_english_equals_rouge_score(use_stemmer):
    reference = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    ours = rouge_per_example(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, use_stemmer=use_stemmer)
    for row, pred, ref in zip(ours, ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, strict=True):
        expected = reference.score(ref, pred)
        for name in ("rouge1", "rouge2", "rougeL"):
            assert row[name] == pytest.approx(expected[name].fmeasure, abs=1e-6), (name, pred)
    means = rouge(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, use_stemmer=use_stemmer)
    assert means["rouge1"] == pytest.approx(
        sum(reference.score(r, p)["rouge1"].fmeasure for p, r in zip(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, strict=True))
        / len(ENGLISH_PREDICTIONS), abs=1e-6)


def test_stemming_changes_english_scores():
    stemmed = rouge(["The foxes jumped"], ["The fox jumps"], use_stemmer=True)["rouge1"]
    plain = rouge(["The foxes jumped"], ["The fox jumps"], use_stemmer=False)["rouge1"]
    assert stemmed > plain


# --- BLEU and chrF -------------------------------------------------------------------------------


def test_bleu_chinese_uses_zh_and_equals_sacrebleu():
    result = bleu(SEED_PREDICTIONS, SEED_REFERENCES)
    expected = sacrebleu.corpus_bleu(SEED_PREDICTIONS, [SEED_REFERENCES], tokenize="zh").score
    assert result["bleu_tokenize"] == "zh" and "tok:zh" in result["bleu_signature"]
    assert result["bleu"] == pytest.approx(expected, abs=1e-9) and result["bleu"] > 0


def test_identical_chinese_bleu_is_100_with_zh_and_0_with_13a():
    text = ["深度学习基于多层神经网络。"]
    assert bleu(text, text)["bleu"] == pytest.approx(100.0)
    assert bleu(text, text, tokenize="13a")["bleu"] == pytest.approx(0.0)  # one "word" per sentence


def test_bleu_english_uses_13a_and_equals_sacrebleu():
    result = bleu(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES)
    expected = sacrebleu.corpus_bleu(ENGLISH_PREDICTIONS, [ENGLISH_REFERENCES], tokenize="13a").score
    assert result["bleu_tokenize"] == "13a" and "tok:13a" in result["bleu_signature"]
    assert result["bleu"] == pytest.approx(expected, abs=1e-9)


def test_bleu_lang_option_overrides_detection():
    assert bleu(["hello"], ["hello"], lang="zh")["bleu_tokenize"] == "zh"
    assert bleu(["コーヒーを飲みます"], ["コーヒーを飲みます"])["bleu_tokenize"] == "char"
    # A Chinese corpus quoting one Japanese name stays Chinese.
    quoted = ["日本流行的音乐艺术家有椎名林檎和宇多田ヒカル。", "深度学习基于多层神经网络。"]
    assert bleu(quoted, quoted)["bleu_tokenize"] == "zh"


@pytest.mark.parametrize("preds,refs", [(SEED_PREDICTIONS, SEED_REFERENCES), (ENGLISH_PREDICTIONS, ENGLISH_REFERENCES)])
def test_chrf_equals_sacrebleu(preds, refs):
    result = chrf(preds, refs)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score, abs=1e-9)
    assert "nc:6" in result["chrf_signature"] and "nw:0" in result["chrf_signature"]


# --- exact match, lengths, repetition -----------------------------------------------------------


def test_exact_match_normalises_case_and_whitespace_only():
    assert exact_match(["  Paris ", "NEW  york", "Paris."], ["paris", "New York", "Paris"]) == pytest.approx(2 / 3)
    assert exact_match(["ＧＰＴ－４"], ["gpt-4"]) == 1.0
    assert exact_match(["机器学习"], ["机器 学习"]) == 0.0


def test_lengths_in_language_aware_units():
    result = lengths(["机器学习很有趣"], ["Machine learning is fun"])
    assert result == {"avg_pred_length": 7.0, "avg_ref_length": 4.0, "length_ratio": 1.75}
    mixed = lengths(["我喜欢 Python 编程", "GPT-4 很好"], ["Python", "好"])
    assert mixed["avg_pred_length"] == (6 + 4) / 2 and mixed["avg_ref_length"] == 1.0
    assert mixed["length_ratio"] == 5.0
    assert lengths(["x"], [""])["length_ratio"] is None


def test_repetition_counts():
    preds = ["", "  ", "a b c d a b c d", "hello", "hello ", "机器学习机器学习", "no repeats here at all"]
    result = repetition(preds, n=4)
    assert result["empty_predictions"] == 2
    assert result["duplicate_predictions"] == 2  # both "hello"s (compared after stripping)
    assert result["distinct_predictions"] == 4
    # "a b c d a b c d": 5 four-grams, 4 distinct; "机器学习机器学习": 5 character four-grams, 4 distinct.
    assert result["repetitive_predictions"] == 2
    assert result["repeated_ngram_ratio"] == pytest.approx((0.2 + 0.2) / 7)


# --- classification ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,label", [
    ("not_entailment", "not_entailment"),
    ("NOT_ENTAILMENT\n", "not_entailment"),
    ("entailment", "entailment"),
    ("The answer is entailment.", "entailment"),
    ("Answer: not_entailment", "not_entailment"),
    ("maybe", INVALID),
    ("", INVALID),
    ("It could be entailment or not_entailment.", INVALID),
    ("entailment. Yes, entailment.", "entailment"),
])
def test_extract_label_entailment(text, label):
    assert extract_label(text, LABELS) == label


def test_extract_label_longest_first_and_word_boundaries():
    assert extract_label("not entailment", ["entailment", "not entailment"]) == "not entailment"
    assert extract_label("The answer is not entailment.", ["entailment", "not entailment"]) == "not entailment"
    # A removed match leaves a gap, so the text around it cannot join into another label.
    assert extract_label("正非常负面面", ["正面", "非常负面"]) == "非常负面"
    assert extract_label("150", ["50", "150"]) == "150"
    assert extract_label("The total is 150", ["50", "15"]) == INVALID
    assert extract_label("yesterday it was no", ["yes", "no"]) == "no"
    assert extract_label("这是一条正面的评价", ["正面", "负面"]) == "正面"


def test_extract_label_rejects_bad_label_lists():
    with pytest.raises(UsageError, match="invalid"):
        extract_label("x", ["yes", "invalid"])
    with pytest.raises(UsageError, match="differ"):
        extract_label("x", ["Yes", "yes"])


REFS = ["entailment", "not_entailment", "not_entailment", "entailment", "not_entailment", "not_entailment",
        "entailment", "not_entailment"]
PREDS = ["entailment", "The answer is not_entailment.", "maybe", "not_entailment", "not_entailment",
         "entailment and not_entailment", "Entailment", "entailment"]


def test_classification_equals_scikit_learn():
    result = classification(PREDS, REFS, LABELS)
    extracted = [extract_label(p, LABELS) for p in PREDS]
    assert extracted.count(INVALID) == 2
    assert result["accuracy"] == pytest.approx(accuracy_score(REFS, extracted))
    for average in ("macro", "micro"):
        expected = f1_score(REFS, extracted, labels=LABELS, average=average, zero_division=0)
        assert result[f"{average}_f1"] == pytest.approx(expected)
    precision, recall, f1, support = precision_recall_fscore_support(REFS, extracted, labels=LABELS, zero_division=0)
    for i, label in enumerate(LABELS):
        assert result["per_class"][label] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]})


def test_classification_by_hand():
    result = classification(PREDS, REFS, LABELS)
    # correct: 1 (entailment), 2, 5, 7 -> 4 of 8; invalid: 3 and 6.
    assert result["accuracy"] == 0.5
    assert result["invalid_rate"] == 0.25 and result["invalid_predictions"] == 2
    # entailment: predicted 3 times (1, 7 right; 8 wrong) of 3 references -> P 2/3, R 2/3.
    # not_entailment: predicted 3 times (2, 5 right; 4 wrong) of 5 references -> P 2/3, R 2/5.
    assert result["per_class"]["entailment"]["precision"] == pytest.approx(2 / 3)
    assert result["per_class"]["not_entailment"]["recall"] == pytest.approx(2 / 5)
    # Invalid predictions are no label's false positive: micro P = 4/6, micro R = 4/8.
    assert result["micro_f1"] == pytest.approx(2 * (4 / 6) * (4 / 8) / (4 / 6 + 4 / 8))
    assert result["majority_class"] == "not_entailment" and result["majority_baseline"] == 5 / 8
    assert result["confusion_matrix"] == {"rows": LABELS, "columns": [*LABELS, INVALID],
                                          "matrix": [[2, 1, 0], [1, 2, 2]]}


def test_classification_references_must_name_one_label():
    with pytest.raises(UsageError, match="reference 1"):
        classification(["entailment", "entailment"], ["entailment", "unsure"], LABELS)
    # A reference sentence naming one label is accepted.
    assert classification(["entailment"], ["The answer is entailment."], LABELS)["accuracy"] == 1.0


# --- score -------------------------------------------------------------------------------------


def test_score_default_set_is_json_serialisable():
    result = score(SEED_PREDICTIONS, SEED_REFERENCES)
    json.dumps(result, allow_nan=False)
    for key in ("rouge1", "rouge2", "rougeL", "bleu", "bleu_signature", "chrf", "exact_match",
                "avg_pred_length", "length_ratio", "empty_predictions", "repeated_ngram_ratio"):
        assert key in result
    assert result["n"] == 3 and "accuracy" not in result and "bertscore_f1" not in result
    assert result["rouge1"] == pytest.approx(rouge(SEED_PREDICTIONS, SEED_REFERENCES)["rouge1"])


def test_score_adds_classification_when_labels_given():
    result = score(PREDS, REFS, labels=LABELS)
    assert result["accuracy"] == 0.5 and result["confusion_matrix"]["columns"][-1] == INVALID
    json.dumps(result, allow_nan=False)


def test_score_per_example_rouge_matches_the_means():
    result = score(SEED_PREDICTIONS, SEED_REFERENCES, metrics=["rouge"], per_example=True)
    assert result["rouge_per_example"] == rouge_per_example(SEED_PREDICTIONS, SEED_REFERENCES)
    assert result["rougeL"] == pytest.approx(sum(r["rougeL"] for r in result["rouge_per_example"]) / 3)
    assert "rouge_per_example" not in score(SEED_PREDICTIONS, SEED_REFERENCES, metrics=["rouge"])


def test_score_selected_metrics_only():
    assert set(score(["a"], ["a"], metrics=["exact_match"])) == {"n", "exact_match"}
    assert "bertscore" in ALL_METRICS


@pytest.mark.parametrize("kwargs,message", [
    ({"predictions": ["a", "b"], "references": ["a"]}, "2 predictions but 1 references"),
    ({"predictions": [], "references": []}, "no predictions"),
    ({"predictions": ["a", None], "references": ["a", "b"]}, "prediction 1 is NoneType"),
    ({"predictions": ["a"], "references": ["a"], "metrics": ["rouge", "meteor"]}, "unknown metric"),
    ({"predictions": ["a"], "references": ["a"], "metrics": ["classification"]}, "needs labels"),
])
def test_score_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        score(**kwargs)


# --- closer to chosen ---------------------------------------------------------------------------


def test_token_f1_by_hand():
    # "the cat sat" vs "the cat ran away": 2 common tokens, 2 * 2 / (3 + 4)
    assert token_f1("The cat sat.", "the cat ran away") == pytest.approx(4 / 7)
    assert token_f1("Paris!", "paris") == 1.0  # lowercased, punctuation stripped
    assert token_f1("a a b", "a b b") == pytest.approx(2 * 2 / 6)  # bags: min counts, a once and b once
    assert token_f1("", "Paris") == 0.0 and token_f1("...", "") == 1.0  # no tokens on either side: equal
    assert token_f1("巴黎很美", "巴黎") == pytest.approx(2 * 2 / 6)  # Chinese by character


CHOSEN, REJECTED = "The capital is Paris.", "I forget the capital."


@pytest.mark.parametrize(("prediction", "expected"), [
    ("Paris is the capital.", 1.0),  # F1 1 with the chosen (the same bag), 2 * 2 / 8 with the rejected
    ("I forget it.", 0.0),  # 0 with the chosen, 2 * 2 / 7 with the rejected
    ("The capital.", 0.5),  # 2 * 2 / 6 with both: a tie counts half
    ("", 0.5),  # nothing said: F1 0 with both
])
def test_closer_to_chosen_one_pair(prediction, expected):
    result = closer_to_chosen([prediction], [CHOSEN], [REJECTED])
    assert result["closer_to_chosen"] == expected
    margin = token_f1(prediction, CHOSEN) - token_f1(prediction, REJECTED)
    assert result["f1_chosen_minus_rejected"] == pytest.approx(margin)
    assert (margin > 0) == (expected == 1.0) and (margin == 0) == (expected == 0.5)


def test_closer_to_chosen_is_the_mean_over_pairs_and_uses_jieba_when_asked():
    result = closer_to_chosen(["yes", "no", ""], ["yes", "yes", "yes"], ["no", "no", "no"])
    assert result == {"closer_to_chosen": pytest.approx(1.5 / 3), "f1_chosen_minus_rejected": pytest.approx(0)}
    # By character: 2 * 4 / 10 with 机器很好, 2 * 2 / 8 with 学习; by jieba's words (机器 学习 很 好):
    # 2 * 3 / 7 and 2 * 1 / 5
    by_char = closer_to_chosen(["机器学习很好"], ["机器很好"], ["学习"])
    by_word = closer_to_chosen(["机器学习很好"], ["机器很好"], ["学习"], jieba=True)
    assert by_char["f1_chosen_minus_rejected"] == pytest.approx(0.8 - 0.5)
    assert by_word["f1_chosen_minus_rejected"] == pytest.approx(6 / 7 - 2 / 5)


def test_closer_to_chosen_needs_one_rejected_answer_per_prediction():
    with pytest.raises(UsageError, match="must pair up"):
        closer_to_chosen(["a", "b"], ["a", "b"], ["c"])
