"""The README's commands stay true: every `tunesmith ...` line in its code blocks parses."""

import re
import shlex

import pytest

from tests.conftest import REPO
from tunesmith.cli import build_parser
from tunesmith.train.commands import parse_train_args


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
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
