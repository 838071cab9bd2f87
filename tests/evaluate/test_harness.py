"""`tunesmith eval --harness`: lm-eval tasks on a tiny LoRA run and its base, checked against scores by hand.

Two local tasks (no hub): a multiple-choice one (lm-eval's loglikelihood requests) and a generative
one (generate_until). Their answers are set from the models' own log-likelihoods and greedy outputs,
computed here with plain transformers and peft, so the expected accuracy of the run and of its base is
known exactly and differs between them: a harness that lost the adapter, the template or the choices'
scores would report other numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.evaluate.test_pipeline import QA, make_lora_run
from tunesmith.cli import main

QUESTIONS = ["What is the capital of France?", "Who are you?", "Explain machine learning in one sentence.",
             "你好，世界！你是谁？", "Translate the following text into English.", "What is the weather in Paris?",
             "The quick brown fox jumps over", "机器学习是什么？", "Call the function get_weather.", "hello"]
CHOICES = ["Paris", "I am a helpful assistant.", "机器学习", "fox", "weather"]
GEN_TOKENS = 6


# ---------------------------------------------------------------- scoring by hand

def context(tokenizer, question: str, chat: bool) -> str:
    if not chat:
        return question
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def choice_loglikelihoods(model, tokenizer, ctx: str, choices: list[str]) -> list[float]:
    """log P(choice | context) as lm-eval defines it: the context's trailing whitespace goes to the choice."""
    import torch

    stripped = ctx.rstrip()
    scores = []
    for choice in choices:
        full = tokenizer(ctx + choice, add_special_tokens=False)["input_ids"]
        n_ctx = len(tokenizer(stripped, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        scores.append(sum(logprobs[i - 1, full[i]].item() for i in range(n_ctx, len(full))))
    return scores


def greedy(model, tokenizer, ctx: str) -> str:
    import torch

    ids = torch.tensor([tokenizer(ctx, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def argmax(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of equal scores, as numpy's


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("harness-run"), tiny_model_dir, seed=3)


@pytest.fixture(scope="module")
def by_hand(tiny_run, tiny_model_dir) -> dict:
    """Per model (run, base) and prompt style (chat, raw): each question's choice scores and greedy answer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    models = {"base": base, "run": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                             str(tiny_run)).eval()}
    found = {}
    for name, model in models.items():
        for chat in (True, False):
            contexts = [context(tokenizer, q, chat) for q in QUESTIONS]
            found[name, chat] = {"scores": [choice_loglikelihoods(model, tokenizer, c, CHOICES) for c in contexts],
                                 "greedy": [greedy(model, tokenizer, c) for c in contexts] if chat else None}
    return found


@pytest.fixture(scope="module")
def tasks(by_hand, tmp_path_factory) -> Path:
    """mc: the right choice is in turn the run's best, the base's best, and one that neither model ranks first;
    gen: the run's greedy answer on even rows."""
    run, base = by_hand["run", True], by_hand["base", True]
    labels = []
    for i, (run_scores, base_scores) in enumerate(zip(run["scores"], base["scores"], strict=True)):
        bests = [argmax(run_scores), argmax(base_scores)]
        labels.append(bests[i % 3] if i % 3 < 2 else next(k for k in range(len(CHOICES)) if k not in bests))
    targets = [answer if i % 2 == 0 else "not an answer" for i, answer in enumerate(run["greedy"])]
    folder = tmp_path_factory.mktemp("harness-tasks")
    data = write_jsonl(folder / "data.jsonl", [{"question": q, "choices": CHOICES, "label": label, "target": t}
                                               for q, label, t in zip(QUESTIONS, labels, targets, strict=True)])
    source = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: mc\n{source}output_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\ntarget_delimiter: ''\n"
        "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    (folder / "gen.yaml").write_text(
        f"task: gen\n{source}output_type: generate_until\ndoc_to_text: '{{{{question}}}}'\n"
        f"doc_to_target: '{{{{target}}}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: {GEN_TOKENS}\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n", encoding="utf-8")
    (folder / "labels.json").write_text(json.dumps({"labels": labels, "targets": targets}))
    return folder


def expected_acc(scores: list[list[float]], labels: list[int]) -> float:
    return sum(argmax(s) == label for s, label in zip(scores, labels, strict=True)) / len(labels)


def expected_match(answers: list[str], targets: list[str]) -> float:
    return sum(a == t for a, t in zip(answers, targets, strict=True)) / len(targets)


# ---------------------------------------------------------------- tests

def test_harness_scores_run_and_base_as_computed_by_hand(tiny_run, by_hand, tasks, tmp_path, capsys):
    truth = json.loads((tasks / "labels.json").read_text())
    run, base = by_hand["run", True], by_hand["base", True]
    want = {"mc/acc": (expected_acc(run["scores"], truth["labels"]), expected_acc(base["scores"], truth["labels"])),
            "gen/exact_match": (expected_match(run["greedy"], truth["targets"]),
                                expected_match(base["greedy"], truth["targets"]))}
    assert want["gen/exact_match"][0] == 0.5
    assert want["mc/acc"][0] != want["mc/acc"][1], "the adapter should change some choice (pick another seed)"

    out = tmp_path / "eval"
    code = main(["eval", str(tiny_run), "--harness", str(tasks), "--compare", "base", "--out", str(out),
                 "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["data"] is None and saved["compare"].startswith("base (")
    assert saved["options"]["harness"]["task_names"] == ["gen", "mc"]
    assert saved["options"]["harness"]["chat_template"] is True
    for key, (model_value, base_value) in want.items():
        metric = f"harness/{key}"
        assert 0 <= saved["metrics"][metric] <= 1
        assert saved["metrics"][metric] == pytest.approx(model_value)
        assert saved["compare_metrics"][metric] == pytest.approx(base_value)
        assert saved["deltas"][metric] == pytest.approx(model_value - base_value)
    assert saved["metrics"]["harness/mc/n"] == saved["compare_metrics"]["harness/gen/n"] == len(QUESTIONS)
    assert "harness/mc/acc_stderr" in saved["metrics"] and "harness/mc/acc_stderr" not in saved["deltas"]

    report = (out / "report.md").read_text(encoding="utf-8")
    row = next(line for line in report.splitlines() if line.startswith("| harness/mc/acc |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:] == [f"{want['mc/acc'][0]:.4f}", f"{want['mc/acc'][1]:.4f}",
                         f"{want['mc/acc'][0] - want['mc/acc'][1]:+.4f}"]
    assert "- lm-eval: tasks " in report and "chat template applied" in report
    assert "## Sample predictions" not in report and not (out / "lengths.png").exists()
    assert "harness/mc/acc" in capsys.readouterr().out


def test_data_and_harness_together_with_limit_and_raw_prompts(tiny_run, by_hand, tasks, tmp_path, capsys):
    """--data and --harness both run into one document; the limit and --no-harness-chat-template take effect."""
    truth = json.loads((tasks / "labels.json").read_text())
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])
    code = main(["eval", str(tiny_run), "--data", str(qa), "--harness", str(tasks / "mc.yaml"), "--harness-limit",
                 "4", "--harness-fewshot", "0", "--no-harness-chat-template", "--json", "--max-new-tokens", "2",
                 "--metrics", "exact_match", "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    document = json.loads(capsys.readouterr().out)
    raw = by_hand["run", False]["scores"][:4]
    assert document["metrics"]["exact_match"] is not None and document["metrics"]["n"] == len(QA)
    assert document["metrics"]["harness/mc/acc"] == pytest.approx(expected_acc(raw, truth["labels"][:4]))
    assert document["metrics"]["harness/mc/n"] == 4
    assert document["options"]["harness"]["chat_template"] is False and document["options"]["max_new_tokens"] == 2
    report = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| harness/mc/acc |" in report and "| exact_match |" in report and "## Sample predictions" in report
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == document["metrics"]


def test_unknown_task_names_the_closest_and_how_to_list(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--harness", "mmlu_abstract_algebr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --harness: unknown lm-eval task 'mmlu_abstract_algebr'")
    assert "mmlu_abstract_algebra" in err and "lm-eval ls tasks" in err and "Traceback" not in err


def test_missing_lm_eval_names_the_extra(tiny_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    assert main(["eval", str(tiny_run), "--harness", "mmlu"]) == 2
    assert "pip install 'tunesmith[harness]'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--harness", "no/such/task.yaml"], "no/such/task.yaml: no such task file or directory"),
    (["--harness-limit", "3", "--data", "x.jsonl"], "--harness-limit: for lm-eval tasks only; add --harness"),
    (["--harness", "mmlu", "--limit", "3"], "--limit: for --data only"),
])
def test_harness_usage_errors(tiny_run, argv, message, capsys):
    assert main(["eval", str(tiny_run), *argv]) == 2
    assert message in capsys.readouterr().err


def test_harness_with_predictions_is_refused(tmp_path, capsys):
    assert main(["eval", "--predictions", str(tmp_path / "p.jsonl"), "--harness", "mmlu"]) == 2
    assert "drop --harness" in capsys.readouterr().err


def _yaml_lines(text: str) -> list[str]:
    """A YAML file's lines without its comments."""
    import re

    return [re.sub(r"\s+#.*", "", line) for line in text.splitlines() if not line.startswith("#")]


def test_the_readme_offline_task_yaml_runs_as_shown(tiny_run, tmp_path, monkeypatch, capsys):
    """The README's task YAML is the shipped examples/harness/capitals.yaml, and its command runs offline from that
    folder (the tiny run in place of the default model): 12 examples scored, an accuracy between 0 and 1."""
    import shlex

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    shown = readme.split("examples/harness/capitals.yaml` is", 1)[1]
    yaml_block = shown.split("```yaml\n", 1)[1].split("```", 1)[0]
    shipped = (root / "examples" / "harness" / "capitals.yaml").read_text(encoding="utf-8")
    assert _yaml_lines(yaml_block) == _yaml_lines(shipped)
    command = shown.split("```bash\n", 1)[1].split("\n", 1)[0]
    folder, argv = command.split(" && ")
    monkeypatch.chdir(root / folder.removeprefix("cd "))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = shlex.split(argv)[1:]
    assert main([args[0], str(tiny_run), *args[2:], "--out", str(tmp_path / "bench")]) == 0
    metrics = json.loads((tmp_path / "bench" / "metrics.json").read_text())["metrics"]
    assert metrics["harness/capitals/n"] == 12 and 0 <= metrics["harness/capitals/acc"] <= 1


def test_harness_requests_show_as_our_progress_and_lm_evals_bars_only_with_verbose(tiny_run, tasks, tmp_path,
                                                                                    capsys, monkeypatch):
    """stderr to a file: lm-eval's request bar becomes tunesmith's progress line (count, share, ETA) and its
    bookkeeping bars show nothing; --verbose gives lm-eval's own bars back."""
    import re

    from tunesmith import output

    monkeypatch.setattr(output, "PIPE_REPORT_S", 0.0)
    argv = ["eval", str(tiny_run), "--harness", str(tasks / "mc.yaml"), "--harness-limit", "3", "--json"]
    assert main([*argv, "--out", str(tmp_path / "quiet")]) == 0
    err = capsys.readouterr().err
    done = re.findall(r"harness \S+ \(loglikelihood\): (\d+)/(\d+) requests \((\d+)%\)", err)
    assert done and done[-1][0] == done[-1][1] == str(3 * len(CHOICES)) and done[-1][2] == "100"
    assert "Running loglikelihood requests" not in err and "it/s]" not in err
    assert main([*argv, "--verbose", "--out", str(tmp_path / "loud")]) == 0
    err = capsys.readouterr().err
    assert "Running loglikelihood requests" in err and not re.search(r"harness \S+ \(loglikelihood\):", err)
