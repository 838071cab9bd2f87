import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.errors import UsageError
from tunesmith.export.merge import merge_to_dir
from tunesmith.models.load import load

TEXT = "Who are you? 你是谁？ The quick brown fox."


def _logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_merged_dir_matches_the_adapter_model(lora_run_dir, tiny_model_dir, tmp_path):
    out = merge_to_dir(lora_run_dir, tmp_path / "merged")

    adapter = load(lora_run_dir, dtype=torch.float32, device="cpu")  # unmerged peft model
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)

    expected = _logits(adapter.model, adapter.tokenizer)
    assert (_logits(base, tokenizer) - expected).abs().max() > 1e-2, "the adapter should change the logits"
    assert torch.allclose(_logits(merged, tokenizer), expected, atol=1e-4)
    assert not any("lora" in name for name in merged.state_dict())


def test_merged_dir_is_a_plain_model_with_the_runs_template(lora_run_dir, tmp_path):
    out = merge_to_dir(lora_run_dir, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    run_tokenizer = AutoTokenizer.from_pretrained(lora_run_dir)
    assert tokenizer.chat_template == run_tokenizer.chat_template
    assert tokenizer.pad_token == run_tokenizer.pad_token
    assert tokenizer(TEXT)["input_ids"] == run_tokenizer(TEXT)["input_ids"]


def test_merge_refuses_a_non_empty_output(lora_run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("keep me")
    with pytest.raises(UsageError, match="already exists"):
        merge_to_dir(lora_run_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "file.txt").read_text() == "keep me"


def test_export_merge_command(lora_run_dir, tmp_path, capsys):
    from tunesmith.cli import main

    assert main(["export", str(lora_run_dir), "--merge", "--out", str(tmp_path / "m")]) == 0
    assert "merged model written to" in capsys.readouterr().out
    assert (tmp_path / "m" / "config.json").is_file()


def test_merge_overwrite_replaces_the_old_directory_whole(lora_run_dir, tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    assert main(["export", str(lora_run_dir), "--merge", "--out", str(out)]) == 2
    assert main(["export", str(lora_run_dir), "--merge", "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the old copy and the staging dir are gone
