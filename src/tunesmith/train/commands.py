"""`tunesmith train [CONFIG.yaml] [--section.key value ...]`: flags built from the typed config."""

from __future__ import annotations

import argparse
import sys

from tunesmith.config import (
    FLAG_ALIASES,
    apply_overrides,
    apply_yaml,
    fields_info,
    unknown_key_error,
    validate,
)

_USAGE = "tunesmith train [CONFIG.yaml] [--print-config] [--section.key VALUE ...]"
_EPILOG = """precedence: --flags > CONFIG.yaml > defaults. Lists are comma separated, bools true/false.
examples:
  tunesmith train --data train.jsonl --max-steps 100
  tunesmith train examples/seed_lora.yaml --data.path data.json --train.max_steps 5
  tunesmith train examples/seed_lora.yaml --resume auto
  accelerate launch --num_processes 2 -m tunesmith.cli train CONFIG.yaml   (data-parallel)"""


def _metavar(info) -> str:
    tp = str(info.type)
    for name, shown in (("list", "A,B"), ("bool", "true|false"), ("int", "INT"), ("float", "NUM")):
        if name in tp:
            return shown
    return "TEXT"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith train", allow_abbrev=False, usage=_USAGE, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Fine-tune a model (LoRA, DoRA, rsLoRA, QLoRA, full, freeze).")
    parser.add_argument("config", nargs="?", help="YAML config file (sections: model, data, method, train, eval, output)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    short = parser.add_argument_group("common flags (each sets one config key)")
    for flag, key in FLAG_ALIASES.items():
        if flag == "resume-force":
            short.add_argument(f"--{flag}", dest=key, action="store_const", const="true", default=argparse.SUPPRESS,
                               help=f"same as --{key} true")
        else:
            short.add_argument(f"--{flag}", dest=key, metavar="VALUE", default=argparse.SUPPRESS, help=f"= --{key}")
    for section, infos in _by_section().items():
        group = parser.add_argument_group(f"{section} options")
        for info in infos:
            choices = f" {{{','.join(info.choices)}}}" if info.choices else ""
            group.add_argument(f"--{info.key}", dest=info.key, metavar=_metavar(info),
                               default=argparse.SUPPRESS,
                               help=f"{info.help}{choices} (default: {info.default!r})".replace("%", "%%"))
    return parser


def _by_section() -> dict[str, list]:
    out: dict[str, list] = {}
    for info in fields_info():
        out.setdefault(info.key.split(".")[0], []).append(info)
    return out


def parse_train_args(argv: list[str]):
    """(config file, ``section.key=value`` overrides, print_config) from the train command line."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    for item in unknown:
        if item.startswith("--"):
            raise unknown_key_error(item[2:].split("=")[0], "command line: ")
        parser.error(f"unexpected argument {item!r}")
    # A short flag and its long form share one dest, so the later one on the line wins.
    overrides = [f"{k}={v}" for k, v in vars(args).items() if "." in k]
    return args.config, overrides, args.print_config


def run_train_command(argv: list[str]) -> int:
    from tunesmith.config import Config

    path, overrides, print_config = parse_train_args(argv)
    config = Config()
    if path:
        apply_yaml(config, path)
    apply_overrides(config, overrides)
    if print_config:
        sys.stdout.write(config.to_yaml())
        return 0
    validate(config)
    from tunesmith.train.loop import finetune

    result = finetune(config)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    losses = [f"{what} loss {value:.4f}" for what, value in
              (("final train", result.final_train_loss), ("eval", result.final_eval_loss)) if value is not None]
    print(f"run saved to {result.run_dir} ({', '.join([f'{result.steps} steps', *losses])})")
    return 0
