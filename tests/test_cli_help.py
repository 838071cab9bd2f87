"""`tunesmith --help`: what the tool is for, then examples that are real commands."""

from __future__ import annotations

import shlex

from tunesmith.cli import EXAMPLES, build_parser
from tunesmith.serve.chat import HELP
from tunesmith.train.commands import parse_train_args


def _example_commands() -> list[list[str]]:
    lines = [line.strip() for line in EXAMPLES.splitlines() if line.strip().startswith("tunesmith ")]
    return [shlex.split(line.split("  ")[0])[1:] for line in lines]


def test_help_opens_with_what_tunesmith_does_and_ends_with_examples():
    text = build_parser().format_help()
    assert text.splitlines()[2].startswith("From your own instruction or chat data")
    assert "examples:" in text and "The command table" not in text
    assert len(_example_commands()) >= 6


def test_every_example_parses_as_written():
    parser = build_parser()
    for argv in _example_commands():
        if argv[0] == "train":
            parse_train_args(argv[1:])
        else:
            assert parser.parse_args(argv).func is not None, argv


def test_chat_help_names_every_slash_command():
    commands = build_parser()._subparsers._group_actions[0]
    chat_help = next(a.help for a in commands._choices_actions if a.dest == "chat")
    for command in HELP.split(": ", 1)[1].replace(" TEXT", "").split(", "):  # what /help in the chat lists
        assert command in chat_help, command


def test_eval_help_names_and_explains_the_pair_metrics():
    commands = build_parser()._subparsers._group_actions[0]
    text = " ".join(commands.choices["eval"].format_help().split())
    for name in ("preference_accuracy", "closer_to_chosen", "f1_chosen_minus_rejected"):
        assert name in text, name
    assert ("closer_to_chosen: the share of greedy answers nearer the chosen answer than the rejected one by token F1 "
            "(ties count half)") in text
