"""Language-aware tokens and lengths: Chinese by character, English by word, mixed text, rouge_score parity."""

import pytest
from rouge_score.tokenizers import DefaultTokenizer

from tunesmith.evaluate.text import contains_han, length, normalize, term_pattern, tokens

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Don't panic: it's only 42 (forty-two) U.S. dollars & 7 cents!",
    "LoRA fine-tuning updates low-rank matrices; the base weights stay frozen.",
    "  multiple   spaces\tand\nnewlines, snake_case_words and CamelCase  ",
    "Version 2.5.1 released on 2024-01-15 at 10:30am -- see http://example.com/a_b?c=d",
]


def test_chinese_is_split_by_character():
    assert tokens("机器学习很有趣") == ["机", "器", "学", "习", "很", "有", "趣"]


def test_mixed_text_keeps_latin_words_and_digits():
    assert tokens("GPT-4 很好") == ["gpt", "4", "很", "好"]
    assert tokens("机器学习是AI的核心技术之一。") == ["机", "器", "学", "习", "是", "ai", "的", "核", "心", "技", "术", "之", "一"]
    assert tokens("2023年发布了v2版本") == ["2023", "年", "发", "布", "了", "v2", "版", "本"]


def test_punctuation_is_dropped_in_both_scripts():
    assert tokens("你好，世界！「测试」。") == ["你", "好", "世", "界", "测", "试"]
    assert tokens("Hello, World!!! ...") == ["hello", "world"]
    assert tokens("。，！？") == [] and tokens("") == []


def test_full_width_forms_are_normalised():
    assert tokens("ＧＰＴ－４，很好！") == ["gpt", "4", "很", "好"]
    assert normalize("ＡＢＣ１２３") == "abc123"


@pytest.mark.parametrize("text", ENGLISH)
def test_english_tokens_equal_rouge_score_tokenizer(text):
    assert tokens(text) == DefaultTokenizer(use_stemmer=False).tokenize(text)


def test_accented_latin_words_stay_whole():
    # rouge_score would cut "café" into "caf"; language-aware tokens keep the word.
    assert tokens("Café naïve Straße") == ["café", "naïve", "straße"]


def test_kana_by_character_and_hangul_by_word():
    assert tokens("コーヒーを飲む") == ["コ", "ー", "ヒ", "ー", "を", "飲", "む"]
    assert tokens("한국어 문장입니다") == ["한국어", "문장입니다"]


def test_jieba_segments_only_chinese_runs():
    words = tokens("我爱自然语言处理, NLP rocks!", jieba=True)
    assert words[-2:] == ["nlp", "rocks"]
    assert "".join(words[:-2]) == "我爱自然语言处理"
    assert any(len(w) > 1 for w in words[:-2])  # real words, not characters


def test_lengths_in_language_aware_units():
    assert length("机器学习很有趣") == 7
    assert length("Machine learning is fun") == 4
    assert length("我喜欢 Python 编程") == 6  # 我 喜 欢 python 编 程
    seed_length = len("机器学习很有趣".split())  # noqa: SIM905 -- the seed's way: one "word"
    assert seed_length == 1 and length("机器学习很有趣") == 7


def test_contains_han():
    assert contains_han("GPT-4 很好") and not contains_han("GPT-4 is good") and not contains_han("コーヒー")


@pytest.mark.parametrize("term,text,found", [
    ("50", "150", False),
    ("50", "It costs 50.", True),
    ("entailment", "not_entailment", False),
    ("entailment", "Entailment!", True),
    ("正面", "这是正面的评价", True),
    ("positive", "非常positive!", True),
    ("yes", "yesterday", False),
])
def test_term_pattern_whole_words(term, text, found):
    assert bool(term_pattern(term).search(normalize(text))) is found
