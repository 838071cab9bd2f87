"""GGUF round trip: write with tunesmith, read back with transformers' GGUF loader, compare.

Tolerances on the tiny model (max |logit difference| against the merged HF model, float32):
f32 is exact (1e-5; this is what proves the q/k rotary permutation), f16 within 2e-3 (measured
2.5e-4), q8_0 within 3e-2 (measured 6.8e-3) with the same greedy token at every position.
"""

import shutil

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tunesmith.errors import TunesmithError
from tunesmith.export.gguf import export_gguf, permute_qk
from tunesmith.models.load import load

TEXTS = ["Who are you? 你是谁？ 0123 The quick brown fox.",
         "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}


def _read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _logits(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_logits(lora_run_dir, tmp_path, dtype):
    path = export_gguf(lora_run_dir, tmp_path / f"model-{dtype}.gguf", dtype=dtype)
    merged = load(lora_run_dir, dtype=torch.float32, device="cpu", merge=True)
    model, _ = _read_back(path)
    for text in TEXTS:
        expected = _logits(merged.model, merged.tokenizer, text)
        actual = _logits(model, merged.tokenizer, text)
        assert (actual - expected).abs().max().item() <= TOLERANCE[dtype], text
        assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_gguf_tokenizer_and_template_round_trip(lora_run_dir, tmp_path):
    path = export_gguf(lora_run_dir, tmp_path / "model.gguf", dtype="q8_0")
    _, tokenizer = _read_back(path)
    original = AutoTokenizer.from_pretrained(lora_run_dir)
    for text in [*TEXTS, " leading space", "机器学习 and   spaces\n\nnewlines", '{"name": "x"}']:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == original(text, add_special_tokens=False)[
            "input_ids"], text
    assert tokenizer.chat_template == original.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>"
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_gguf_metadata_and_tensor_types(tiny_model_dir, tmp_path):
    path = export_gguf(tiny_model_dir, tmp_path / "model.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == (
        2, 64, 128)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.eos_token_id") == 2
    assert field("tokenizer.ggml.pre") == "gpt-2"  # llama.cpp's name for GPT-2's split (it refuses "gpt2")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.1.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" in types  # the tiny model's head is not tied
    assert len(types) == 2 + 9 * 2 + 1


def test_tied_embeddings_write_no_output_tensor(tiny_model_dir, tmp_path):
    tied = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tied)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, tied / name)
    path = export_gguf(tied, tmp_path / "tied.gguf", dtype="f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    back, _ = _read_back(path)
    tokenizer = AutoTokenizer.from_pretrained(tied)
    expected = _logits(AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32).eval(), tokenizer, TEXTS[0])
    assert torch.allclose(_logits(back, tokenizer, TEXTS[0]), expected, atol=1e-5)


def test_permute_qk_matches_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = torch.randn(8 * 6, 5).numpy()
    processor = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    undone = processor.process(permute_qk(weights, 8), "blk.0.attn_q.weight").weights
    assert (undone == weights).all()
    assert not (permute_qk(weights, 8) == weights).all()


def test_other_architectures_are_refused_by_name(tiny_model_dir, tmp_path):
    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=600, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(gpt2_dir)
    with pytest.raises(TunesmithError, match="'gpt2' is not supported yet"):
        export_gguf(gpt2_dir, tmp_path / "gpt2.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_export_gguf_command(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", str(tiny_model_dir), "--gguf", "--dtype", "f16", "--out", str(out)]) == 0
    assert "GGUF (f16) written to" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == 1
    assert main(["export", str(tiny_model_dir), "--gguf", "--out", str(tmp_path / "wrong.bin")]) == 2


def test_gguf_export_keeps_an_existing_file_unless_told(lora_run_dir, tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "model.gguf"
    out.write_bytes(b"an older export")
    assert main(["export", str(lora_run_dir), "--gguf", "--out", str(out)]) == 2
    assert f"{out} already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"an older export"
    assert main(["export", str(lora_run_dir), "--gguf", "--out", str(out), "--overwrite", "--dtype", "f32"]) == 0
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.Modelfile", "model.gguf"]  # no temporary left
