"""Preference objectives on the one loop: DPO, ORPO and SimPO train, log, evaluate, checkpoint and resume like SFT."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import read_losses, tiny_config, tiny_overrides
from tests.train.test_resume import _flags, _train_cli
from tunesmith.data.pairs import EncodedPair
from tunesmith.errors import UsageError
from tunesmith.run import read_metrics
from tunesmith.train.loop import finetune, prepare_run

PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.", "你好吗？"]


def pair_rows(n: int = 24) -> list[dict]:
    """TRL-style conversational pairs: the chosen answer starts with "Ahoy!", the rejected one does not."""
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}]
        answer = f"Answer number {i}."
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Ahoy! {answer}"}],
                     "rejected": [{"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture
def pair_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pair_rows()), encoding="utf-8")
    return path


def _config(model, data, out, objective, **extra):
    values = {"method__objective": objective, "data__max_length": 64, "train__max_steps": 6, "data__val_size": 4,
              "train__lr": 5e-3, "method__dropout": 0.1, **extra}
    return tiny_config(model, data, out, **values)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_each_objective_trains_and_logs_rewards(tiny_model_dir, pair_file, tmp_path, objective):
    out = tmp_path / objective
    result = finetune(_config(tiny_model_dir, pair_file, out, objective))
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6
    for row in steps:
        assert set(row) >= {"rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy"}
        assert row["reward_margin"] == pytest.approx(row["rewards_chosen"] - row["rewards_rejected"], abs=1e-6)
        assert 0 <= row["preference_accuracy"] <= 1
    final = rows[-1]
    assert final["eval_loss"] == result.final_eval_loss and "eval_preference_accuracy" in final
    # the objective's loss fell and the chosen answers gained on the rejected ones
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    info = json.loads((out / "tunesmith.json").read_text())
    assert info["objective"] == objective
    assert (out / "loss.png").stat().st_size > 0


def test_dpo_starts_at_ln2_because_policy_and_reference_are_the_same_model(tiny_model_dir, pair_file, tmp_path):
    """With the adapter disabled as the reference and dropout off, step 0's held-out DPO loss is exactly ln 2
    per pair, whatever the LoRA dropout setting (a second copy of the base or a live dropout mask would not)."""
    result = finetune(_config(tiny_model_dir, pair_file, tmp_path / "run", "dpo", train__max_steps=1,
                              method__sft_weight=0))
    assert result.initial_eval_loss == pytest.approx(0.6931471805599453, abs=1e-6)


def test_dpo_sft_term_adds_the_chosen_answers_nll_per_token(tiny_model_dir, pair_file, tmp_path):
    """The plan's default sft_weight 1: each held-out pair's loss at step 0 is ln 2 plus its chosen answer's NLL
    per answer token, computed here from the base model itself."""
    from transformers import AutoModelForCausalLM

    from tunesmith.loss import side_logps

    config = _config(tiny_model_dir, pair_file, tmp_path / "run", "dpo", train__max_steps=1)
    run = prepare_run(config)
    assert run.config.method.sft_weight == 1.0
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    chosen = [c / pair.chosen.num_supervised for (c, _), pair in zip(side_logps(base, run.data.val, 0, progress=False),
                                                                      run.data.val, strict=True)]
    expected = 0.6931471805599453 - sum(chosen) / len(chosen)
    result = finetune(config)
    assert result.initial_eval_loss == pytest.approx(expected, abs=1e-5)
    assert expected > 0.6931471805599453 + 1  # a random tiny model's NLL: the term is really there


def test_full_fine_tuning_gets_a_separate_reference(tiny_model_dir, pair_file, tmp_path):
    result = finetune(_config(tiny_model_dir, pair_file, tmp_path / "full", "dpo", method__name="full",
                              train__lr=1e-4, train__max_steps=3, method__sft_weight=0))
    assert result.initial_eval_loss == pytest.approx(0.6931471805599453, abs=1e-6)
    assert result.steps == 3


def test_pairs_are_packed_side_by_side_and_averaged_per_pair(tiny_model_dir, pair_file, tmp_path):
    run = prepare_run(_config(tiny_model_dir, pair_file, tmp_path / "run", "dpo"))
    assert all(isinstance(p, EncodedPair) for p in run.data.train) and len(run.data.train) == 20
    pair = run.data.train[0]
    # only the answers are supervised, each ending with the end-of-turn token
    for side in pair.sides:
        supervised = [t for t in side.labels if t != -100]
        assert supervised and supervised[-1] == run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert run.plan.objective == "dpo" and "preference pairs" in run.plan.lines()[0]
    assert run.config.train.lr == 5e-3  # set by hand: kept


def test_plan_lowers_the_learning_rate_for_preference_objectives(tiny_model_dir, pair_file, tmp_path):
    def planned_lr(objective, **extra):
        config = _config(tiny_model_dir, pair_file, tmp_path / objective, objective, **extra)
        config.train.lr = None
        return prepare_run(config).config.train.lr

    # ORPO at the SFT rate; DPO and SimPO at half of it with their SFT term (the default), a tenth without
    assert planned_lr("dpo") == planned_lr("simpo") == pytest.approx(planned_lr("orpo") / 2, rel=0.1)
    assert planned_lr("dpo", method__sft_weight=0) == pytest.approx(planned_lr("orpo") / 10, rel=0.1)


@pytest.fixture
def signed_off_pair_file(tmp_path):
    """The chosen answer is the rejected one plus a sign-off: the answers share a long prefix."""
    rows = [{**r, "chosen": [{"role": "assistant", "content": f"{r['rejected'][0]['content']} Ahoy!"}]}
            for r in pair_rows()]
    path = tmp_path / "signed_off.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _prefix_warnings(plan) -> list[str]:
    return [w for w in plan.warnings if "sharing a long prefix" in w]


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_plan_warns_when_most_answers_share_a_prefix_and_the_sft_term_is_off(tiny_model_dir, signed_off_pair_file,
                                                                            tmp_path, objective):
    plan = prepare_run(_config(tiny_model_dir, signed_off_pair_file, tmp_path / "off", objective,
                               method__sft_weight=0)).plan
    assert plan.long_prefix_pairs == plan.examples == 20 and plan.sft_weight == 0
    assert "20 with answers sharing a long prefix" in plan.lines()[0]
    [warning] = _prefix_warnings(plan)
    assert warning.startswith("100% of the pairs (20)") and "cancel" in warning
    assert "--method.sft_weight 1" in warning and "--objective orpo" in warning
    assert "sharing a long prefix" in "\n".join(plan.lines()[1:])  # printed as a WARNING line
    default = prepare_run(_config(tiny_model_dir, signed_off_pair_file, tmp_path / "on", objective)).plan
    assert default.sft_weight == 1.0 and default.long_prefix_pairs == 20 and not _prefix_warnings(default)


def test_plan_counts_no_shared_prefix_when_the_answers_differ_from_the_start(tiny_model_dir, pair_file, tmp_path):
    plan = prepare_run(_config(tiny_model_dir, pair_file, tmp_path / "run", "dpo", method__sft_weight=0)).plan
    assert plan.long_prefix_pairs == 0 and not _prefix_warnings(plan)
    assert "sharing a long prefix" not in plan.lines()[0]


def test_sft_weight_is_refused_where_it_does_not_apply(tiny_model_dir, pair_file, tmp_path):
    with pytest.raises(UsageError, match="orpo's loss already holds the SFT term"):
        prepare_run(_config(tiny_model_dir, pair_file, tmp_path / "run", "orpo", method__sft_weight=1))


def test_sft_on_pair_data_names_the_objective_to_use(tiny_model_dir, pair_file, tmp_path):
    with pytest.raises(Exception, match="--method.objective"):
        prepare_run(_config(tiny_model_dir, pair_file, tmp_path / "run", "sft"))


def test_train_on_prompt_is_refused_for_preference(tiny_model_dir, pair_file, tmp_path):
    with pytest.raises(UsageError, match="train_on_prompt"):
        prepare_run(_config(tiny_model_dir, pair_file, tmp_path / "run", "dpo", data__train_on_prompt=True))


def test_dpo_sigkill_then_resume_matches_a_straight_run(tiny_model_dir, pair_file, tmp_path):
    extra = {"method__objective": "dpo", "train__max_steps": 8, "output__save_every": 4, "method__dropout": 0.1,
             "data__val_size": 4}
    straight = tmp_path / "straight"
    finetune(tiny_config(tiny_model_dir, pair_file, straight, **extra))

    run = tmp_path / "killed"
    flags = _flags(tiny_overrides(tiny_model_dir, pair_file, run, **extra))
    killed = _train_cli(flags, TUNESMITH_TEST_KILL="after-checkpoint:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _train_cli([*flags, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    assert read_losses(run) == read_losses(straight) and len(read_losses(run)) == 8
    margins = [[r.get("reward_margin") for r in read_metrics(d / "metrics.jsonl")] for d in (run, straight)]
    assert margins[0] == margins[1]
    ours, theirs = load_file(run / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_eval_on_pairs_reports_preference_accuracy_and_margins_against_base(tiny_model_dir, pair_file, tmp_path):
    from tunesmith.evaluate.pipeline import evaluate

    run = tmp_path / "run"
    finetune(_config(tiny_model_dir, pair_file, run, "dpo", train__max_steps=10))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(30)[24:]), encoding="utf-8")
    result = evaluate(str(run), str(held_out), compare="base", max_new_tokens=4, batch_size=4,
                      metrics="exact_match", out=str(tmp_path / "report"), progress=False)
    tuned, base = result.metrics, result.compare_metrics
    assert tuned["pairs"] == base["pairs"] == 6
    for key in ("preference_accuracy", "logp_margin"):
        assert key in tuned and key in base and key in result.deltas
    assert 0 <= tuned["preference_accuracy"] <= 1
    # relative to the reference (the base with the adapter off) = the tuned margin minus the base's own margin
    assert tuned["reward_margin"] == pytest.approx(tuned["logp_margin"] - base["logp_margin"], abs=1e-3)
    assert "reward_margin" not in base  # a plain model is its own reference
    assert tuned["logp_margin"] > base["logp_margin"]  # DPO moved the chosen answers up
    assert len(result.predictions) == 6 and result.predictions[0]["reference"].startswith("Ahoy!")
    assert "preference_accuracy" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow  # three subprocesses (chat, serve) and a merge
def test_a_dpo_run_is_used_like_any_run_generate_chat_serve_and_merge(tiny_model_dir, pair_file, tmp_path):
    import subprocess
    import sys

    import openai

    from tests.serve.test_server import _free_port, _wait_healthy
    from tunesmith.cli import main

    run = tmp_path / "run"
    finetune(_config(tiny_model_dir, pair_file, run, "dpo", train__max_steps=2))
    assert main(["generate", str(run), "--prompt", "Say hello.", "--max-new-tokens", "4"]) == 0
    chat = subprocess.run([sys.executable, "-m", "tunesmith.cli", "chat", str(run), "--max-new-tokens", "4"],
                          input="Say hello.\n/exit\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", str(run), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.terminate()
        server.wait(timeout=30)
