"""The preference objectives against their papers, the sequence log-probabilities against a plain forward, and
DPO against TRL's DPOTrainer on the same tokens."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tunesmith.config import MethodConfig
from tunesmith.data.tokenize import IGNORE, Encoded
from tunesmith.loss import sequence_logps
from tunesmith.train.objectives import (
    STAT_KEYS,
    EncodedPair,
    Objective,
    collate_pairs,
    compute_reference,
    dpo_loss,
    orpo_loss,
    reference_model,
    simpo_loss,
    step_stats,
)

PAD = 3

# ---------------------------------------------------------------- golden numbers, computed by hand from the papers

# (chosen, rejected, reference chosen, reference rejected, chosen answer tokens, rejected answer tokens): summed
# log-probabilities of whole answers. The last two pairs are large: a policy far ahead of its reference, and one far
# behind it; the third has answers the model is almost sure of (per-token probability near 1).
GOLDEN = [
    (-12.5, -15.25, -13.0, -14.5, 5, 7),
    (-3.2, -1.1, -2.9, -1.4, 2, 1),
    (-0.006, -0.9, -0.01, -0.5, 3, 4),
    (-250.0, -180.0, -300.0, -120.0, 40, 30),
    (-6000.0, -30.0, -5500.0, -45.0, 60, 10),
]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _close(actual: float, expected: float, tol: float = 1e-6) -> bool:
    return abs(actual - expected) <= tol * max(1.0, abs(expected))


def _columns(values):
    return [torch.tensor(list(column), dtype=torch.float64) for column in zip(*values, strict=True)]


def paper_dpo(pc, pr, rc, rr, beta, eps):
    """Rafailov et al. 2023 eq. 7, with Mitchell's conservative DPO: the preference flipped with probability eps."""
    reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    h = reward_c - reward_r
    return -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h), reward_c, reward_r


def paper_simpo(pc, pr, nc, nr, beta, gamma, eps):
    """Meng et al. 2024 eq. 6: -log sigmoid(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma)."""
    reward_c, reward_r = beta / nc * pc, beta / nr * pr
    h = reward_c - reward_r - gamma
    return -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h), reward_c, reward_r


def paper_orpo(pc, pr, nc, nr, lam):
    """Hong et al. 2024 eq. 6-7: L_SFT + lambda * L_OR, with L_OR = -log sigmoid(log(odds(y_w) / odds(y_l))),
    odds(y) = P(y|x) / (1 - P(y|x)), P(y|x) = exp(mean token log-probability), L_SFT the chosen mean NLL per token."""
    def odds(logp_sum, n):
        p = math.exp(logp_sum / n)
        return p / (1 - p)

    l_or = -_log_sigmoid(math.log(odds(pc, nc) / odds(pr, nr)))
    return -pc / nc + lam * l_or, lam * pc / nc, lam * pr / nr


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.35)])
def test_dpo_loss_is_the_papers(beta, eps):
    chosen, rejected, ref_chosen, ref_rejected, _, _ = _columns(GOLDEN)
    loss, reward_c, reward_r = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, eps)
    assert loss.dtype == torch.float64 and loss.shape == (len(GOLDEN),)
    for k, (pc, pr, rc, rr, _, _) in enumerate(GOLDEN):
        expected = paper_dpo(pc, pr, rc, rr, beta, eps)
        for got, want in zip((loss[k], reward_c[k], reward_r[k]), expected, strict=True):
            assert _close(float(got), want), (k, float(got), want)
    # the large pairs sit in the tails of the sigmoid: no overflow, the loss is ~0 or ~|margin|
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (10.0, 0.0, 0.1), (2.0, 0.5, 0.3)])
def test_simpo_loss_is_the_papers(beta, gamma, eps):
    chosen, rejected, _, _, n_chosen, n_rejected = _columns(GOLDEN)
    loss, reward_c, reward_r = simpo_loss(chosen / n_chosen, rejected / n_rejected, beta, gamma, eps)
    assert loss.dtype == torch.float64
    for k, (pc, pr, _, _, nc, nr) in enumerate(GOLDEN):
        expected = paper_simpo(pc, pr, nc, nr, beta, gamma, eps)
        for got, want in zip((loss[k], reward_c[k], reward_r[k]), expected, strict=True):
            assert _close(float(got), want), (k, float(got), want)


@pytest.mark.parametrize("lam", [0.1, 0.25, 1.0])
def test_orpo_loss_is_the_papers(lam):
    chosen, rejected, _, _, n_chosen, n_rejected = _columns(GOLDEN)
    loss, reward_c, reward_r = orpo_loss(chosen / n_chosen, rejected / n_rejected, lam)
    assert loss.dtype == torch.float64
    for k, (pc, pr, _, _, nc, nr) in enumerate(GOLDEN):
        expected = paper_orpo(pc, pr, nc, nr, lam)
        for got, want in zip((loss[k], reward_c[k], reward_r[k]), expected, strict=True):
            assert _close(float(got), want), (k, float(got), want)


def test_zero_label_smoothing_and_zero_margin():
    """At a zero margin every objective's pair term is log 2, whatever the smoothing."""
    zero = torch.zeros(1, dtype=torch.float64)
    for eps in (0.0, 0.3):
        loss, _, _ = dpo_loss(zero - 4, zero - 5, zero - 4, zero - 5, 0.1, eps)
        assert _close(float(loss), math.log(2))
        loss, _, _ = simpo_loss(zero - 1, zero - 1, 2.0, 0.0, eps)
        assert _close(float(loss), math.log(2))
    loss, _, _ = orpo_loss(zero - 0.5, zero - 0.5, 0.2)
    assert _close(float(loss), 0.5 + 0.2 * math.log(2))


@pytest.mark.parametrize("name,beta,gamma,eps", [("dpo", 0.1, 0.0, 0.1), ("simpo", 2.0, 0.5, 0.0),
                                                 ("orpo", 0.1, 0.0, 0.0)])
def test_objective_wires_sums_counts_and_statistics(monkeypatch, name, beta, gamma, eps):
    """Objective.loss takes each side's sum and token count from sequence_logps in seq_ids order (2k chosen,
    2k + 1 rejected), averages per token for SimPO/ORPO, and sums the pair losses and the statistics."""
    logps = torch.tensor([v for pc, pr, *_ in GOLDEN for v in (pc, pr)], dtype=torch.float64)
    counts = torch.tensor([n for *_, nc, nr in GOLDEN for n in (nc, nr)])
    monkeypatch.setattr("tunesmith.train.objectives.sequence_logps", lambda model, inputs, sequences: (logps, counts))
    side = Encoded([1, 2], [IGNORE, 2])
    pairs = [EncodedPair(side, side, reference=(rc, rr)) for _, _, rc, rr, _, _ in GOLDEN]
    batch = [[0, 1, 2], [3, 4]]
    loss, stats = Objective(name, beta, gamma, eps).loss(None, pairs, batch, {})

    if name == "dpo":
        expected = [paper_dpo(pc, pr, rc, rr, beta, eps) for pc, pr, rc, rr, _, _ in GOLDEN]
    elif name == "simpo":
        expected = [paper_simpo(pc, pr, nc, nr, beta, gamma, eps) for pc, pr, _, _, nc, nr in GOLDEN]
    else:
        expected = [paper_orpo(pc, pr, nc, nr, beta) for pc, pr, _, _, nc, nr in GOLDEN]
    # Objective.pair_losses works in float32 (the model's log-probabilities): relative 1e-6 of the summed terms
    total = sum(abs(e[0]) for e in expected)
    assert abs(float(loss) - sum(e[0] for e in expected)) <= 1e-6 * total
    want_stats = [sum(e[1] for e in expected), sum(e[2] for e in expected),
                  sum(e[1] - e[2] for e in expected), sum(e[1] > e[2] for e in expected)]
    assert stats.shape == (len(STAT_KEYS),)
    for got, want in zip(stats.tolist(), want_stats, strict=True):
        assert abs(got - want) <= 1e-6 * max(1.0, sum(abs(e[1]) + abs(e[2]) for e in expected))
    assert stats[3] == sum(e[1] > e[2] for e in expected)  # the accuracy count is exact
    means = step_stats(stats, len(pairs))
    assert means["preference_accuracy"] == pytest.approx(want_stats[3] / len(pairs))


# ---------------------------------------------------------------- sequence log-probabilities on a tiny model


def _random_pairs(vocab: int, n: int, seed: int = 0) -> list[EncodedPair]:
    """Pairs of random token sequences: a shared prompt, each side its own answer (only the answer supervised)."""
    rng = random.Random(seed)

    def side(prompt: list[int]) -> Encoded:
        answer = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 9))]
        return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer)

    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 12))]
        pairs.append(EncodedPair(side(prompt), side(prompt)))
    return pairs


def _alone(model, encoded: Encoded) -> tuple[float, int]:
    """A side's summed answer log-probability from a plain forward of that side alone."""
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]
    total, count = 0.0, 0
    for t, label in enumerate(encoded.labels):
        if t > 0 and label != IGNORE:
            total += float(logp[t - 1, label])
            count += 1
    return total, count


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=request.param)
    return model.eval()


def _expected_seq_ids(pairs, batch, packing) -> torch.Tensor:
    sides = [[len(s.input_ids) for i in row for s in pairs[i].sides] for row in batch]
    if packing:
        width = max(sum(row) for row in sides)
        out, number = torch.full((len(batch), width), -1), 0
        for b, row in enumerate(sides):
            at = 0
            for n in row:
                out[b, at:at + n] = number
                at, number = at + n, number + 1
        return out
    lengths = [n for row in sides for n in row]
    out = torch.full((len(lengths), max(lengths)), -1)
    for k, n in enumerate(lengths):
        out[k, :n] = k
    return out


@pytest.mark.parametrize("packing,batch", [(True, [[0, 1, 2], [3, 4]]), (True, [[4, 0, 3, 1, 2]]),
                                           (False, [[0], [1], [2], [3], [4]]), (False, [[2, 4], [0]])])
def test_sequence_logps_match_each_side_alone(tiny_llama, packing, batch):
    model = tiny_llama
    pairs = _random_pairs(model.config.vocab_size, 5)
    inputs = collate_pairs(pairs, batch, packing, PAD)
    assert torch.equal(inputs["seq_ids"], _expected_seq_ids(pairs, batch, packing))
    if packing:
        assert inputs["attention_mask"].ndim == 4 and inputs["input_ids"].shape[0] == len(batch)

    order = [i for row in batch for i in row]
    with torch.no_grad():
        logps, counts = sequence_logps(model, inputs, 2 * len(order))
    expected = [_alone(model, side) for i in order for side in pairs[i].sides]
    assert counts.tolist() == [n for _, n in expected]
    assert counts.tolist() == [s.num_supervised for i in order for s in pairs[i].sides]
    torch.testing.assert_close(logps.float(), torch.tensor([v for v, _ in expected]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- DPO against TRL


def _trl_pairs() -> list[dict]:
    prompts = ["What is the capital of France?", "Who are you?", "Explain machine learning in one sentence.",
               "你是谁？"]
    chosen = ["The capital of France is Paris.", "I am a helpful assistant.",
              "Machine learning lets computers learn from data.", "我是一个有用的AI助手。"]
    rejected = ["Paris.", "A fox.", "No.", "你好，世界！深度学习基于多层神经网络。"]
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def _pairs_from_trl_batch(batch: dict) -> list[EncodedPair]:
    """tunesmith pairs from exactly the token ids of TRL's batch: rows [chosen..., rejected...], the prompt's labels
    ignored and the completion's (TRL's completion_mask, EOS and all) supervised."""
    sides = []
    for ids, attention, completion in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                          batch["completion_mask"].tolist(), strict=True):
        n = sum(attention)
        assert attention[:n] == [1] * n  # right-padded
        ids, completion = ids[:n], completion[:n]
        first = completion.index(1)
        assert completion[first:] == [1] * (n - first) and first > 0  # prompt, then the completion to the end
        sides.append(Encoded(ids, [IGNORE] * first + ids[first:]))
    half = len(sides) // 2
    return [EncodedPair(c, r) for c, r in zip(sides[:half], sides[half:], strict=True)]


def test_dpo_matches_trl(tiny_model_dir, tiny_tokenizer, tmp_path):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl): no DPOTrainer to compare with")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], bf16=False, fp16=False,
                         use_cpu=True, per_device_train_batch_size=3, max_length=None, report_to=[],
                         dataloader_num_workers=0, seed=0, disable_dropout=True)
    # The adapter comes from peft_config: given a PeftModel instead, TRL 1.16 would copy its adapter as a "ref"
    # adapter and use that as the reference, not the base model.
    trainer = trl.DPOTrainer(model=base, ref_model=None, args=args, processing_class=tiny_tokenizer,
                             train_dataset=Dataset.from_list(_trl_pairs()), peft_config=lora)
    model = trainer.model
    assert trainer.ref_model is None and "ref" not in model.peft_config  # the adapter is disabled for the reference
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: the policy is no longer the reference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["input_ids"].shape[0] == 6
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    mode = "train" if trainer.model.training else "eval"
    trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items() if v}

    pairs = _pairs_from_trl_batch(batch)
    eos = tiny_tokenizer.eos_token_id  # <|im_end|> ends each answer and is supervised, as in TRL
    assert all(eos in side.labels for p in pairs for side in p.sides)
    pad_id = tiny_tokenizer.pad_token_id
    method = MethodConfig(name="lora", objective="dpo")
    with reference_model(model, method, lambda: pytest.fail("an adapter needs no copy of the base model")) as ref:
        compute_reference(ref, pairs, pad_id, batch_size=2, progress=False)
    assert all(p.reference is not None for p in pairs)

    objective = Objective(name="dpo", beta=0.1)
    ours = {}
    for packing, rows in ((True, [[0, 1, 2]]), (False, [[0], [1], [2]]), (True, [[2, 0], [1]])):
        with torch.no_grad():
            loss, stats = objective.loss(model, pairs, rows, collate_pairs(pairs, rows, packing, pad_id))
        ours[(packing, len(rows))] = (float(loss) / len(pairs), step_stats(stats, len(pairs)))

    for key, (loss, stats) in ours.items():
        diff = abs(loss - trl_loss)
        print(f"DPO loss, packing={key[0]} rows={key[1]}: tunesmith {loss:.9f}  TRL {trl_loss:.9f}  |diff| {diff:.2e}")
        assert diff <= 1e-5, key
        assert stats["rewards_chosen"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
        assert stats["rewards_rejected"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
        assert stats["reward_margin"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)
        assert stats["preference_accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-6)
    # the check has teeth: the policy moved away from the reference, so the loss is not log 2
    assert abs(trl_loss - math.log(2)) > 1e-3
    assert max(abs(stats["rewards_chosen"]), abs(stats["rewards_rejected"])) > 1e-3
