"""`tunesmith verify` on a tiny LoRA run: passes as exported, and names the path and token when a template
or a stop id is broken."""

import json
import shutil

import pytest

from tunesmith.cli import main
from tunesmith.export.gguf import export_gguf
from tunesmith.export.verify import verify


@pytest.fixture(scope="module")
def run_gguf(lora_run_dir, tmp_path_factory):
    return export_gguf(lora_run_dir, tmp_path_factory.mktemp("gguf") / "run.gguf", dtype="f16")


def _lines(report):
    return {(c.name, c.path): c for c in report.checks}


def test_verify_passes_on_the_run_and_its_exports(lora_run_dir, run_gguf):
    report = verify(lora_run_dir, gguf=run_gguf, prompts=3, max_new_tokens=8)
    assert report.ok, [c for c in report.checks if not c.ok]
    lines = _lines(report)
    for path in ("generate", "serve", "merged", "gguf (F16)"):
        assert lines[("prompt ids", path)].ok and lines[("stop ids", path)].ok
    assert lines[("answers", "gguf (F16)")].required and lines[("answers", "merged")].ok
    assert "'<|im_end|>'" in lines[("stop ids", "merged")].detail


def _run_with_template(lora_run_dir, out, edit):
    from transformers import AutoTokenizer

    shutil.copytree(lora_run_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = edit(tokenizer.chat_template)
    tokenizer.save_pretrained(out)
    return out


def test_a_template_without_the_end_of_turn_token_fails(lora_run_dir, tmp_path, capsys):
    broken = _run_with_template(lora_run_dir, tmp_path / "run", lambda t: t.replace("'<|im_end|>'", "''"))
    assert main(["verify", str(broken), "--prompts", "2", "--max-new-tokens", "4"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "prompt ids\ttraining\tFAIL" in out and "'<|im_end|>'" in out
    assert "verify: FAILED" in out and "stop ids [generate]" in out


def test_an_end_of_turn_token_generation_does_not_stop_at_fails(lora_run_dir, tmp_path, capsys):
    # Turns closed by <pad>: training supervises it, but no path stops there.
    broken = _run_with_template(lora_run_dir, tmp_path / "run", lambda t: t.replace("'<|im_end|>'", "'<pad>'"))
    assert main(["verify", str(broken), "--prompts", "2", "--max-new-tokens", "4", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    failed = {(c["name"], c["path"]) for c in report["checks"] if not c["ok"]}
    assert {("stop ids", "generate"), ("stop ids", "serve"), ("stop ids", "merged")} <= failed
    assert all(c["ok"] for c in report["checks"] if c["name"] == "prompt ids")
    assert "'<pad>' supervised in training is not a stop id" in next(
        c["detail"] for c in report["checks"] if (c["name"], c["path"]) == ("stop ids", "serve"))


def test_a_gguf_with_another_template_fails_on_its_path(lora_run_dir, tmp_path):
    other = _run_with_template(lora_run_dir, tmp_path / "run", lambda t: t.replace("assistant\n'", "assistant\n\n'"))
    gguf_file = export_gguf(other, tmp_path / "other.gguf", dtype="q8_0")
    report = verify(lora_run_dir, gguf=gguf_file, prompts=2, max_new_tokens=4)
    lines = _lines(report)
    assert not report.ok and not lines[("prompt ids", "gguf (Q8_0)")].ok
    assert lines[("prompt ids", "merged")].ok and not lines[("answers", "gguf (Q8_0)")].required
    assert [c.path for c in report.failed] == ["gguf (Q8_0)"]
    # A quantized file is compared as reported; the exact comparison is made on an f16 file verify writes.
    assert lines[("answers", "gguf (F16)")].required and lines[("answers", "gguf (F16)")].ok


def test_export_verifies_what_it_wrote(lora_run_dir, tmp_path, capsys):
    assert main(["export", str(lora_run_dir), "--gguf", "--dtype", "f16", "--out", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "verify: all" in out and "ran automatically" in out
    assert main(["export", str(lora_run_dir), "--merge", "--out", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verify"]["ok"] is True


def test_export_and_its_verify_report_progress_to_a_log(lora_run_dir, tmp_path, capsys, monkeypatch):
    """stderr to a file (as here): the GGUF conversion and each verify step print a progress line (every time,
    with the reporting interval at 0), the counts climbing to the end."""
    import re

    from tunesmith import output

    monkeypatch.setattr(output, "PIPE_REPORT_S", 0.0)
    assert main(["export", str(lora_run_dir), "--gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    err = capsys.readouterr().err
    converted = [tuple(map(int, m)) for m in re.findall(r"converting to GGUF f16: (\d+)/(\d+) tensors", err)]
    assert len(converted) > 3 and converted == sorted(converted) and converted[-1][0] == converted[-1][1]
    steps = re.findall(r"verify: (answers of [a-zA-Z ]+|comparing): (\d+)/(\d+) steps", err)
    assert [s[0] for s in steps] == ["answers of generate", "answers of serve", "answers of the merged model",
                                     "answers of the GGUF", "comparing"]
    assert [int(s[1]) for s in steps] == [1, 2, 3, 4, 5] and {s[2] for s in steps} == {"5"}


def test_the_runs_system_prompt_travels_into_both_exports(lora_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run_dir, run)
    info = json.loads((run / "tunesmith.json").read_text())
    (run / "tunesmith.json").write_text(json.dumps({**info, "system_prompt": 'You are "Tuney", 一个助手.\nBe brief.'}))
    report = verify(run, gguf=export_gguf(run, tmp_path / "run.gguf", dtype="f16"), prompts=2, max_new_tokens=4)
    assert report.ok, report.failed
    assert _lines(report)[("system prompt", "all")].detail.startswith("training's system prompt 'You are \"Tuney\"")
    # A file written without it (as from a run that had none) is caught: llama.cpp would not render it.
    plain = export_gguf(lora_run_dir, tmp_path / "plain.gguf", dtype="f16")
    failed = {(c.name, c.path) for c in verify(run, gguf=plain, prompts=2, max_new_tokens=4).failed}
    assert {("prompt ids", "gguf (F16)"), ("system prompt", "gguf (F16)")} <= failed
    assert all(path == "gguf (F16)" for _, path in failed)


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "gemma3_text"])
def test_verify_passes_on_other_families_and_their_gguf(arch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.export.test_gguf_architectures import FAMILY, _config, _tokenizer

    tokenizer = _tokenizer(FAMILY[arch])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(arch, len(tokenizer), tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    gguf_file = export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="f16")
    report = verify(tmp_path / "m", gguf=gguf_file, prompts=2, max_new_tokens=4)
    assert report.ok, report.failed
    assert _lines(report)[("prompt ids", "gguf (F16)")].ok


def test_verify_reads_held_out_conversations(lora_run_dir, tmp_path, capsys):
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "val.jsonl", [
        {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Bonjour"}]},
        {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A model."},
                      {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Tiny."}]},
    ])
    assert main(["verify", str(lora_run_dir), "--data", str(data), "--max-new-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and "2 conversations encoded" in report["checks"][0]["detail"]


SANDBOXED = "{{ ''.__class__.__mro__ }}"  # refused by transformers' sandboxed Jinja environment


def test_a_template_the_sandbox_refuses_is_a_user_error_not_a_bug(lora_run_dir, tmp_path, capsys):
    hostile = _run_with_template(lora_run_dir, tmp_path / "run", lambda t: SANDBOXED + t)
    assert main(["verify", str(hostile), "--prompts", "1", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "is unsafe" in err and "a bug in tunesmith" not in err
    gguf_file = export_gguf(hostile, tmp_path / "hostile.gguf", dtype="f16")
    assert main(["verify", str(lora_run_dir), "--gguf", str(gguf_file), "--prompts", "1",
                 "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "the GGUF's chat template refused" in err and "a bug in tunesmith" not in err
