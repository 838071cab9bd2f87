"""Preference tuning that changes what the model says: with tunesmith's defaults and nothing else, DPO, ORPO and
SimPO make the default model write, on prompts it never saw, a phrase its base never writes, wherever in the
answer the preference puts it (real default model: slow).

The end of the answer is the hard case: the chosen answer is the rejected one plus a sign-off, so the two share
every token up to it, and only the first differing one (the rejected side's end-of-turn token against the
sign-off's first token) carries DPO's signal. Without the SFT term the plan now adds, preference accuracy
reached 1.0 while the greedy answers stayed as they were (train/objectives.py has the measurements).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from bench.preference_pairs import PHRASE, POSITIONS, pairs, shows_property, with_phrase, write_pairs
from tests.conftest import real_model_env
from tests.e2e import readme
from tests.e2e.clone import fresh_clone

N_TRAIN, N_HELDOUT = 32, 10
# Each held-out prompt's answer must reach its end within the cap for a sign-off to be seen at all; the
# training answers are at most 36 words (~50 tokens).
MAX_NEW_TOKENS = 96


@pytest.mark.parametrize("position", POSITIONS)
def test_the_pairs_differ_only_in_the_property(tmp_path, position):
    paths = write_pairs(tmp_path, N_TRAIN, N_HELDOUT, position=position, sentences=2)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    held = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert len(train) == N_TRAIN and len(held) == N_HELDOUT
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held}
    for row in train + held:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert shows_property(chosen, position) and not shows_property(rejected, position)
        assert chosen == with_phrase(rejected, position)
        assert not any(shows_property(chosen, other) for other in POSITIONS if other != position)


def test_the_property_is_read_where_it_belongs():
    assert shows_property("  ahoy! Yes", "start") and not shows_property("Yes, ahoy!", "start")
    assert shows_property("Paris is big. Fair winds!\n", "end") and not shows_property("Fair winds! Paris.", "end")
    assert not shows_property("Paris is big. Fair winds! Fair winds!", "end")  # the degenerate loop
    assert shows_property("Paris is the capital. Mark my words: it is big and old.", "middle")
    assert not shows_property("Mark my words: Paris is the capital.", "middle")
    assert not shows_property("Paris is the capital of France. Mark my words:", "middle")
    # the sign-off data shares every word but the sign-off: the case DPO alone did not learn
    row = pairs(0, "end")[0]
    assert row["chosen"][0]["content"].startswith(row["rejected"][0]["content"])
    assert len(pairs(0, "start", 1)) > 500 and PHRASE["start"] == "Ahoy!"


def _cli(*args: str, env: dict, cwd=None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], env=env, capture_output=True, text=True,
                          timeout=3600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _share_showing(predictions, position: str) -> float:
    """The share of answers carrying the phrase once where it belongs; at the end, only answers the model ended
    itself (one cut at the token cap right after a sign-off says nothing of whether it would stop)."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == N_HELDOUT
    return sum(shows_property(r["prediction"], position) and (position != "end" or r["finish_reason"] == "stop")
               for r in rows) / len(rows)


# (position, layout, objective). The sign-off with DPO in LLaMA-Factory's sharegpt layout, as a user of that tool
# would bring it, is the README's own run: test_the_readmes_preference_run_changes_the_answers.
# These (3 to 4 minutes each) run with `-m slow` or `-m long`, outside the default run, which keeps the README's.
CASES = [("start", "trl", "dpo"), ("middle", "trl", "dpo"), ("end", "trl", "orpo"), ("end", "trl", "simpo")]


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize(("position", "layout", "objective"), CASES, ids=[f"{p}-{o}-{la}" for p, la, o in CASES])
def test_preference_tuning_with_defaults_changes_the_answers(use_default_model, tmp_path, position, layout,
                                                             objective):
    env = real_model_env(use_default_model)
    paths = write_pairs(tmp_path / "data", N_TRAIN, N_HELDOUT, position=position, sentences=2, layout=layout)
    run, out = tmp_path / "run", tmp_path / "eval"
    _cli("train", "--data", str(paths["train"]), "--objective", objective, "--output-dir", str(run), env=env)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["objective"] == objective and not plan["warnings"], plan["warnings"]

    _cli("eval", str(run), "--data", str(paths["heldout"]), "--compare", "base", "--out", str(out),
         "--metrics", "exact_match", "--max-new-tokens", str(MAX_NEW_TOKENS), env=env)
    _assert_the_answers_changed(out, position, objective)


PREFERENCE = "Preference tuning: SFT, then DPO"


@pytest.mark.slow
def test_the_readmes_preference_run_changes_the_answers(use_default_model, tmp_path):
    """The README's CPU-sized DPO run, each command as written in a clone: its pairs (the sign-off, sharegpt
    layout), its training command within its stated time and without a plan warning, its evaluation."""
    clone = fresh_clone(tmp_path)
    env = real_model_env(use_default_model, PYTHONPATH=str(clone / "src"))
    lines = [c.line for c in readme.commands(PREFERENCE)]
    (make_pairs,) = [line for line in lines if line.startswith("python bench/preference_pairs.py")]
    position, layout = shlex.split(make_pairs)[3:5]
    assert (position, layout) == ("end", "sharegpt")
    subprocess.run([sys.executable, *shlex.split(make_pairs)[1:]], cwd=clone, env=env, check=True,
                   capture_output=True)

    trained = readme.readme_training_command("--data pairs/train.json")
    readme.run_timed(trained, clone, env)
    (evaluate,) = [c for c in readme.commands(PREFERENCE) if c.line.startswith("tunesmith eval runs/dpo ")]
    _cli(*evaluate.tunesmith_argv, env=env, cwd=clone)
    argv = evaluate.tunesmith_argv
    assert argv[argv.index("--max-new-tokens") + 1] == str(MAX_NEW_TOKENS)
    _assert_the_answers_changed(clone / argv[argv.index("--out") + 1], position, "dpo")


def _assert_the_answers_changed(out, position: str, objective: str) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    tuned, base = metrics["metrics"], metrics["compare_metrics"]
    shown = {name: _share_showing(out / file, position)
             for name, file in (("tuned", "predictions.jsonl"), ("base", "predictions.base.jsonl"))}
    print(f"{position}/{objective}: {PHRASE[position]!r} in {shown['tuned']:.0%} of tuned answers (base "
          f"{shown['base']:.0%}); preference accuracy {tuned['preference_accuracy']:.2f} (base "
          f"{base['preference_accuracy']:.2f}); closer to chosen {tuned['closer_to_chosen']:.2f} (base "
          f"{base['closer_to_chosen']:.2f})")
    assert shown["base"] <= 0.1
    assert shown["tuned"] >= 0.8
    assert tuned["preference_accuracy"] >= 0.9
    assert tuned["closer_to_chosen"] >= 0.8 > base["closer_to_chosen"]
