"""GRPO: advantages and token losses by hand, the loss and gradient against TRL's GRPOTrainer, and runs of the loop
on the tiny model (metrics, samples, a failing reward through the CLI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tunesmith.config import MethodConfig
from tunesmith.train.grpo import (
    PromptExample,
    Rollout,
    group_advantages,
    policy_backward,
    sequence_weights,
    token_losses,
)
from tunesmith.train.plan import ModelFacts

# ---------------------------------------------------------------- the formulas by hand


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased, as TRL's nanstd
    advantages, zero = group_advantages(rewards, 4, "group")
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-12)
    assert zero.tolist() == [False, True]

    batch_std = float(rewards.std())
    advantages, _ = group_advantages(rewards, 4, "batch")
    assert advantages.tolist() == pytest.approx([0.5 / (batch_std + 1e-4), -0.5 / (batch_std + 1e-4),
                                                 -0.5 / (batch_std + 1e-4), 0.5 / (batch_std + 1e-4), 0, 0, 0, 0])
    advantages, _ = group_advantages(rewards, 4, "none")
    assert advantages.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_token_losses_clip_the_ratio_and_add_the_k3_kl():
    logps = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    old = torch.log(torch.tensor([0.25, 0.25, 0.5, 1.0]))  # ratios 2, 2, 1, 0.5
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    losses, info = token_losses(logps, old, advantages, epsilon=0.2)
    # -min(r A, clip(r) A): A>0, r=2 -> -1.2; A<0, r=2 -> 2; r=1 -> -1; A<0, r=0.5 -> min(-0.5, -0.8) -> 0.8
    assert losses.tolist() == pytest.approx([-1.2, 2.0, -1.0, 0.8])
    assert info["clipped"].tolist() == [True, False, False, True]
    ref = torch.log(torch.tensor([0.25, 0.5, 0.5, 1.0]))
    with_kl, info = token_losses(logps, old, advantages, epsilon=0.2, beta=0.1, ref_logps=ref)
    kl = [0.5 - math.log(0.5) - 1, 0.0, 0.0, 2 - math.log(2) - 1]
    assert info["kl"].tolist() == pytest.approx(kl, abs=1e-6)
    ratios = [2, 2, 1, 0.5]  # the KL term is importance-corrected by the ratio, as in TRL
    assert (with_kl - losses).tolist() == pytest.approx([0.1 * k * r for k, r in zip(kl, ratios, strict=True)], abs=1e-6)


def test_sequence_weights_per_loss_type():
    assert sequence_weights("grpo", [2, 4], 2, 8, 6) == [1 / 4, 1 / 8]
    assert sequence_weights("dr_grpo", [2, 4], 2, 8, 6) == [1 / 16, 1 / 16]
    assert sequence_weights("dapo", [2, 4], 2, 8, 6) == [1 / 6, 1 / 6]


# ---------------------------------------------------------------- against TRL


PROMPTS = ["What is the capital of France?", "Who are you?"]
# Per prompt, two completions: one ends with <|im_end|> (id 2, in the loss, as TRL's completion mask has it), one is
# cut at max_completion_length without it.
COMPLETIONS = ["The capital of France is Paris.", "Paris.", "I am a helpful assistant.", "A fox jumps over the lazy"]
MAX_COMPLETION = 6


def _grpo_trainer(trl, tiny_model_dir, tokenizer, tmp_path, loss_type: str, beta: float):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, beta=beta, epsilon=0.2,
                          temperature=0.7, num_generations=2, per_device_train_batch_size=4,
                          max_completion_length=MAX_COMPLETION, bf16=False, fp16=False, use_cpu=True, report_to=[],
                          dataloader_num_workers=0, seed=0, disable_dropout=True)
    trainer = trl.GRPOTrainer(model=base, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, processing_class=tokenizer, peft_config=lora,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so the policy is not the base model
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return trainer


def _token_ids(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in PROMPTS]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = tokenizer.eos_token_id
    completions = []
    for k, text in enumerate(COMPLETIONS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        completions.append(ids[:MAX_COMPLETION - 1] + [eos] if k % 2 == 0 else ids[:MAX_COMPLETION])
    assert completions[3][-1] != eos and len(completions[3]) == MAX_COMPLETION  # one cut at the limit
    return prompt_ids, completions


def _trl_inputs(prompt_ids, completions, pad_id, advantages, old, ref) -> dict:
    """TRL's batch layout: left-padded prompts, right-padded completions with their mask, per-token tensors."""
    per = [prompt_ids[i // 2] for i in range(len(completions))]
    width, length = max(map(len, per)), max(map(len, completions))
    prompt = torch.tensor([[pad_id] * (width - len(p)) + p for p in per])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in per])
    completion = torch.tensor([c + [pad_id] * (length - len(c)) for c in completions])
    mask = torch.tensor([[1] * len(c) + [0] * (length - len(c)) for c in completions])

    def padded(values):
        return torch.tensor([v + [0.0] * (length - len(v)) for v in values])

    return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion, "completion_mask": mask,
            "advantages": torch.tensor(advantages), "old_per_token_logps": padded(old),
            "ref_per_token_logps": padded(ref), "num_items_in_batch": mask.sum()}


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize(("loss_type", "row_tokens"), [("grpo", 1024), ("dr_grpo", 1024), ("dapo", 1024),
                                                     ("grpo", 16)])
def test_loss_and_gradient_match_trl(loss_type, row_tokens, tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """Every completion in one packed row, or (16 tokens a row) each in its own forward/backward piece."""
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl): no GRPOTrainer to compare with")
    from tunesmith.train import grpo

    monkeypatch.setattr(grpo, "CPU_ROW_TOKENS", row_tokens)
    beta = 0.04
    trainer = _grpo_trainer(trl, tiny_model_dir, tiny_tokenizer, tmp_path, loss_type, beta)
    model = trainer.model
    prompt_ids, completions = _token_ids(tiny_tokenizer)
    pad_id = tiny_tokenizer.pad_token_id
    advantages = [0.9, -0.9, 1.3, -0.4]
    # pi_old and ref moved off the policy by fixed amounts, so ratios leave [0.8, 1.2] and the clipping acts
    gen = torch.Generator().manual_seed(1)
    old = [(torch.randn(len(c), generator=gen) * 0.3).tolist() for c in completions]
    ref = [(torch.randn(len(c), generator=gen) * 0.3).tolist() for c in completions]
    examples = [PromptExample(ids, text, {}) for ids, text in zip(prompt_ids, PROMPTS, strict=True)]
    rollout = Rollout([0, 0, 1, 1], completions, advantages)
    method = MethodConfig(objective="grpo", loss_type=loss_type, beta=beta, epsilon=0.2, temperature=0.7,
                          num_generations=2, max_completion_length=MAX_COMPLETION, num_iterations=2)

    # pi_old and ref are offsets from the policy's own log-probabilities, computed by TRL's forward
    inputs = _trl_inputs(prompt_ids, completions, pad_id, advantages, [[0.0] * len(c) for c in completions],
                         [[0.0] * len(c) for c in completions])
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])
    rollout.old_logps = [(current[i, :len(c)] + torch.tensor(old[i])).tolist() for i, c in enumerate(completions)]
    rollout.ref_logps = [(current[i, :len(c)] + torch.tensor(ref[i])).tolist() for i, c in enumerate(completions)]
    inputs = _trl_inputs(prompt_ids, completions, pad_id, advantages, rollout.old_logps, rollout.ref_logps)

    model.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = _lora_grads(model)

    model.zero_grad(set_to_none=True)
    sums = policy_backward(trainer.accelerator, model, examples, rollout, method, pad_id, len(completions),
                           sum(map(len, completions)))
    ours = _lora_grads(model)

    print(f"GRPO {loss_type}: tunesmith {sums.loss:.9f}  TRL {float(trl_loss.detach()):.9f}")
    assert sums.loss == pytest.approx(float(trl_loss.detach()), abs=1e-5)
    assert sums.clipped > 0  # the comparison covers the clipped branch
    assert ours.keys() == trl_grads.keys() and len(ours) > 0
    worst = max(float((ours[k] - trl_grads[k]).abs().max()) for k in ours)
    scale = max(float(g.abs().max()) for g in trl_grads.values())
    print(f"  largest gradient difference {worst:.2e} (largest gradient {scale:.2e})")
    assert scale > 1e-4 and worst <= 1e-5


# ---------------------------------------------------------------- the loop on the tiny model


REWARDS = '''
def short(prompts, completions, **fields):
    return [1.0 if len(c) < 25 else 0.0 for c in completions]


def mentions(prompts, completions, answer, **fields):
    return [float(a.lower() in c.lower()) for c, a in zip(completions, answer)]


def broken(prompts, completions, **fields):
    return [float("nan")] * len(completions)


def raises(prompts, completions, **fields):
    raise KeyError("solution")
'''


@pytest.fixture
def prompt_files(tmp_path):
    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(12)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS, encoding="utf-8")
    return data, rewards


def grpo_overrides(model_dir, data, rewards, out, **extra) -> list:
    values = {"model.name": model_dir, "data.path": data, "output.output_dir": out, "method.objective": "grpo",
              "train.precision": "fp32", "train.max_steps": 4, "train.lr": 5e-3, "method.max_completion_length": 12,
              "method.num_generations": 4, "train.batch_size": 2, "output.sample_every": 2}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()] + [("method.rewards", [f"{rewards}:short", f"{rewards}:mentions"])]


def test_a_grpo_run_logs_rewards_lengths_and_samples(tiny_model_dir, prompt_files, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.run import read_metrics
    from tunesmith.train.loop import finetune

    data, rewards = prompt_files
    result = finetune(load_config(None, grpo_overrides(tiny_model_dir, data, rewards, tmp_path / "run")))
    assert result.steps == 4
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # every step is logged
    for key in ("reward", "reward_std", "reward/short", "reward/short/std", "reward/mentions", "completion_length",
                "completion_length_max", "clipped_share", "zero_std_share", "clip_ratio", "generation_s",
                "backward_s"):
        assert all(key in r for r in rows), key
    assert all(r["completion_length_max"] <= 12 for r in rows)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 4}
    assert set(samples[0]["rewards"]) == {"short", "mentions"} and samples[0]["source"].endswith("prompts.jsonl:" +
                                                                                                 samples[0]["source"].rsplit(":", 1)[1])
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file() and (tmp_path / "run" / "loss.png").is_file()
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["objective"], plan["num_generations"], plan["max_completion_length"]) == ("grpo", 4, 12)


def test_same_seed_same_run(tiny_model_dir, prompt_files, tmp_path):
    """The sampling generator is seeded from (seed, step): two runs draw the same completions and end the same."""
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.train.loop import finetune

    data, rewards = prompt_files
    for name in ("a", "b"):
        finetune(load_config(None, grpo_overrides(tiny_model_dir, data, rewards, tmp_path / name, train__max_steps=2)))
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()


def _train_cli(args: list[str], cwd=None, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("function", "said"), [("broken", "returned nan for row"),
                                                 ("raises", "raised KeyError: 'solution'")])
def test_a_failing_reward_ends_the_run_naming_it(function, said, tiny_model_dir, prompt_files, tmp_path):
    data, rewards = prompt_files
    run = tmp_path / "run"
    result = _train_cli(["--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(run),
                         "--objective", "grpo", "--reward", f"{rewards}:short", "--reward", f"{rewards}:{function}",
                         "--method.max_completion_length", "8", "--method.num_generations", "2",
                         "--max-steps", "2", "--train.precision", "fp32"])
    assert result.returncode != 0
    assert f"reward {rewards}:{function} {said}" in result.stderr, result.stderr[-2000:]
    assert "prompts.jsonl:" in result.stderr  # the row
    assert not (run / "adapter_model.safetensors").exists()


def _flags(overrides: list) -> list[str]:
    out = []
    for item in overrides:
        if isinstance(item, tuple):
            out += [arg for value in item[1] for arg in ("--reward", value)]
        else:
            key, value = item.split("=", 1)
            out += [f"--{key}", value]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("iterations", [1, 2])
def test_sigkill_then_resume_matches_an_uninterrupted_run(iterations, tiny_model_dir, prompt_files, tmp_path):
    """With num_iterations 2 the checkpoint of step 3 holds a sampled batch with one iteration left (state.json)."""
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.run import read_metrics
    from tunesmith.train.loop import finetune

    data, rewards = prompt_files
    extra = {"train__max_steps": 6, "output__save_every": 3, "method__num_iterations": iterations,
             "method__beta": 0.05}
    finetune(load_config(None, grpo_overrides(tiny_model_dir, data, rewards, tmp_path / "straight", **extra)))

    run = tmp_path / "killed"
    flags = _flags(grpo_overrides(tiny_model_dir, data, rewards, run, **extra))
    killed = _train_cli(flags, TUNESMITH_TEST_KILL="after-checkpoint:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((run / "checkpoints" / "step-3" / "state.json").read_text())
    assert (state["rollout"] is not None) == (iterations == 2)
    resumed = _train_cli([*flags, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr

    def metrics(path):
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(path / "metrics.jsonl")]

    assert metrics(run) == metrics(tmp_path / "straight") and len(metrics(run)) == 6
    assert (run / "samples.jsonl").read_text() == (tmp_path / "straight" / "samples.jsonl").read_text()
    ours, theirs = load_file(run / "adapter_model.safetensors"), load_file(tmp_path / "straight" /
                                                                          "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any("kl" in r for r in metrics(run))


# ---------------------------------------------------------------- the run plan


SMOLLM = ModelFacts(params=135_000_000, hidden_size=576, model_type="llama")


def _grpo_plan(n: int, **values):
    from tunesmith.config import load_config
    from tunesmith.train.loop import Data, plan_run

    examples = [PromptExample([5] * 40, "q", {}) for _ in range(n)]
    overrides = ["data.path=x.jsonl", "method.objective=grpo", *(f"{k.replace('__', '.')}={v}" for k, v in values.items())]
    return plan_run(load_config(None, overrides + [("method.rewards", ["exact"])]), Data(examples, [], "x", n), SMOLLM, 1)


def test_the_plan_knows_grpo():
    from tunesmith.train.plan import GRPO_MIN_STEPS, default_lr

    config, plan = _grpo_plan(64)
    assert (plan.prompts_per_step, plan.num_generations, plan.max_completion_length) == (4, 8, 128)
    assert config.train.grad_accum == 1 and plan.steps_per_epoch == 16 and plan.total_steps >= GRPO_MIN_STEPS
    sft_lr = default_lr("lora", SMOLLM, "sft")[0]
    assert config.train.lr == pytest.approx(sft_lr, rel=0.05)  # tens of steps need the SFT rate (measured)
    lines = "\n".join(plan.lines())
    assert "4 prompts per optimizer step x 8 completions of up to 128 tokens" in lines
    assert "as measured for tens of GRPO steps" in lines
    # generation is in the estimate: longer completions take longer at the same number of steps
    _, longer = _grpo_plan(64, method__max_completion_length=512, train__max_steps=plan.total_steps)
    assert longer.estimate_s > 2 * plan.estimate_s
    config, plan = _grpo_plan(400, method__num_generations=4, train__batch_size=3, train__lr=1e-5)
    assert (plan.prompts_per_step, plan.num_generations, config.train.lr) == (3, 4, 1e-5)  # the user's values win
