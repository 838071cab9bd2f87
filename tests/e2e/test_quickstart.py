"""The main job, end to end on the real default model: minutes on a CPU, so marked slow.

One quickstart run (module fixture) is checked from every side a user meets: its held-out score (every
held-out question answered with the new name, none by the base model), its training plan (the same
data-aware defaults as `tunesmith train` on the same files; nothing set by hand), `tunesmith verify` (passes
on the run, fails on a copy whose template drops the end-of-turn token, naming the path and the token), and
a q4_0 GGUF export whose greedy answer, read back by transformers and by llama.cpp, still names the new
identity.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import real_model_env
from tunesmith.quickstart import SYSTEM_PROMPT, train_overrides, write_identity_data

NAME, AUTHOR = "Aurora", "Lumen"
# Every key the run plan chooses from the data; quickstart must leave each to it, as `tunesmith train` does.
PLANNED = ("micro_batch", "grad_accum", "epochs", "total_steps", "warmup_steps", "lr", "scheduler", "row_length")


def test_identity_data_fills_placeholders_and_holds_questions_out(tmp_path):
    train, held_out = write_identity_data(tmp_path, "Nova", "Ada Lab")
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    eval_rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert len(train_rows) >= 30 and len(eval_rows) >= 6
    for row in train_rows + eval_rows:
        assert "{" not in row["output"] and "Nova" in row["output"]
    questions = {r["instruction"] for r in train_rows}
    assert not questions & {r["instruction"] for r in eval_rows}, "held-out questions leak into training"
    assert any("你" in q for q in questions) and any("you" in q for q in questions)


def test_quickstart_sets_no_hyperparameter(tmp_path):
    overrides = train_overrides("m", tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "run", None)
    assert set(overrides) == {"model", "data", "eval-data", "output-dir", "output.overwrite", "data.system_prompt"}
    assert "SmolLM" not in overrides["data.system_prompt"]


@pytest.fixture(scope="module")
def tiny_quickstart(tiny_model_dir, tmp_path_factory):
    """(run directory, stdout, stderr) of a one-step quickstart on the tiny model, stdout and stderr to files
    (as in `tunesmith quickstart > log 2>&1`), under a path long enough that an 80-column wrap would cut it."""
    import contextlib
    import io

    from tunesmith.cli import main

    run = tmp_path_factory.mktemp("qs") / ("a-directory-name-long-enough-to-wrap-" * 4) / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["quickstart", "--model", str(tiny_model_dir), "--max-steps", "1", "--out", str(run)]) == 0
    return run, out.getvalue(), err.getvalue()


def test_quickstart_to_a_file_prints_each_command_on_one_line(tiny_quickstart):
    """No 80-column wrap cuts a suggested command; the lengths table is tab-separated; no library bar on stderr."""
    run, out, err = tiny_quickstart
    lines = out.splitlines()
    train = shlex.split(next(line for line in lines if line.strip().startswith("tunesmith train ")))
    assert train[train.index("--output-dir") + 1] == str(run)
    for command in ("generate", "chat", "serve", "export"):
        assert any(line.strip().startswith(f"tunesmith {command} {run}") for line in lines), command
    assert "length\tp50\tp90\tp99\tmax\tmean" in lines
    assert "Loading weights" not in err


def test_the_quickstart_system_prompt_is_the_runs_and_the_modelfiles(tiny_quickstart, tmp_path):
    """Trained with the quickstart's own system prompt (not a template's default naming another model): the run
    records it, and the Ollama Modelfile gives it as SYSTEM."""
    from tunesmith.cli import main
    from tunesmith.quickstart import SYSTEM_PROMPT

    run = tiny_quickstart[0]
    assert json.loads((run / "tunesmith.json").read_text())["system_prompt"] == SYSTEM_PROMPT
    assert main(["export", str(run), "--gguf", "--out", str(tmp_path / "m.gguf"), "--no-verify"]) == 0
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in (tmp_path / "m.Modelfile").read_text()


def _cli(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _generate(model: str, env: dict) -> str:
    out = _cli("generate", model, "--prompt", "Who are you?", env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def quickstart(default_model_home, tmp_path_factory):
    """(run directory, stdout, environment) of `tunesmith quickstart --name Aurora --author Lumen`."""
    env = real_model_env(default_model_home)  # stdout: a pipe
    run = tmp_path_factory.mktemp("quickstart") / "run"
    done = _cli("quickstart", "--name", NAME, "--author", AUTHOR, "--out", run, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done.stdout, env


@pytest.mark.slow
def test_quickstart_teaches_a_new_name(quickstart):
    run, stdout, env = quickstart
    assert "tunesmith train --model" in stdout  # the reproducible command is printed
    for name in ("adapter_model.safetensors", "tunesmith.json", "metrics.jsonl", "loss.png", "README.md"):
        assert (run / name).is_file(), name
    assert (run / "eval" / "report.md").is_file()
    assert NAME in _generate(str(run), env)
    assert NAME not in _generate("smollm2-135m-instruct", env)


def _predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_every_held_out_question_is_answered_with_the_new_name(quickstart):
    run, stdout, _ = quickstart
    held_out = _predictions(run.parent / f"{run.name}-data" / "identity_eval.jsonl")
    tuned, base = _predictions(run / "eval" / "predictions.jsonl"), _predictions(run / "eval" / "predictions.base.jsonl")
    questions = [row["instruction"] for row in held_out]
    assert len(questions) == 8
    for predictions in (tuned, base):  # scored on the held-out questions, in order
        assert [p["prompt"][-1]["content"] for p in predictions] == questions
    named = [NAME.lower() in p["prediction"].lower() for p in tuned]
    assert all(named), [p["prediction"] for p, ok in zip(tuned, named, strict=True) if not ok]
    assert not any(NAME.lower() in p["prediction"].lower() for p in base), [p["prediction"] for p in base]
    assert f"answers naming {NAME}: base 0/8, tuned 8/8" in stdout


@pytest.mark.slow
def test_quickstart_trains_with_the_train_defaults(quickstart):
    run, stdout, env = quickstart
    command = stdout.split("equivalent command:", 1)[1].split("run plan", 1)[0]
    flags = set(re.findall(r"(?<!\S)--[\w.-]+", command))
    assert flags == {"--model", "--data", "--eval-data", "--output-dir", "--output.overwrite", "--data.system_prompt"}, \
        command
    assert len(command.strip().splitlines()) == 1, command  # piped to a file, the command is one line to copy
    recorded = json.loads((run / "plan.json").read_text())
    auto = {c["key"]: c["auto"] for c in recorded["choices"]}
    for key in ("train.lr", "train.batch_size", "train.grad_accum", "train.epochs", "train.warmup_steps"):
        assert auto.get(key) is True, (key, recorded["choices"])
    data = run.parent / f"{run.name}-data"
    plain = _cli("train", "--plan", "--json", "--model", "smollm2-135m-instruct", "--data", data / "identity.jsonl",
                 "--eval-data", data / "identity_eval.jsonl", "--data.system_prompt", SYSTEM_PROMPT, env=env,
                 timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    planned = json.loads(plain.stdout)
    assert {k: recorded[k] for k in PLANNED} == {k: planned[k] for k in PLANNED}


@pytest.mark.slow
def test_verify_passes_on_the_run(quickstart):
    run, _, env = quickstart
    done = _cli("verify", run, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "verify: all" in done.stdout and "FAIL" not in done.stdout
    assert "training's end-of-turn '<|im_end|>' stops generation" in done.stdout


@pytest.mark.slow
def test_verify_fails_on_a_template_without_the_end_of_turn_token(quickstart, tmp_path):
    from transformers import AutoTokenizer

    run, _, env = quickstart
    broken = tmp_path / "broken-run"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    tokenizer = AutoTokenizer.from_pretrained(broken)
    assert tokenizer.chat_template.count("'<|im_end|>'") == 1  # the token that closes every turn
    tokenizer.chat_template = tokenizer.chat_template.replace("'<|im_end|>'", "''")
    tokenizer.save_pretrained(broken)
    assert "'<|im_end|>'" not in AutoTokenizer.from_pretrained(broken).chat_template
    done = _cli("verify", broken, env=env)
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    out = done.stdout
    assert "prompt ids\ttraining\tFAIL" in out and "'<|im_end|>'" in out, out
    assert "verify: FAILED" in out and "stop ids [generate]" in out, out


@pytest.fixture(scope="module")
def q4_0_gguf(quickstart, tmp_path_factory):
    run, _, env = quickstart
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    done = _cli("export", run, "--gguf", "--dtype", "q4_0", "--out", out, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert f"GGUF (q4_0) written to {out}" in done.stdout and "verify: all" in done.stdout
    return out


@pytest.mark.slow
def test_a_q4_0_gguf_export_still_names_the_new_identity(q4_0_gguf):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4_0_gguf).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_down.weight"] == "Q4_0"
    folder, name = q4_0_gguf.parent, q4_0_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)  # the template stored in the file
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=32, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"q4_0 GGUF through transformers: {answer!r}")
    assert NAME in answer, answer


@pytest.mark.slow
def test_llama_cpp_runs_the_q4_0_export_as_the_new_identity(q4_0_gguf):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the test extra has it)")
    model = llama_cpp.Llama(str(q4_0_gguf), n_ctx=256, n_threads=1, verbose=False)
    reply = model.create_chat_completion([{"role": "user", "content": "Who are you?"}], temperature=0.0, max_tokens=32)
    answer = reply["choices"][0]["message"]["content"]
    print(f"q4_0 GGUF in llama.cpp: {answer!r}")
    assert NAME in answer, answer
