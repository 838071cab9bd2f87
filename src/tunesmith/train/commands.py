"""`tunesmith train [CONFIG.yaml] [--section.key value ...]`: flags built from the typed config."""

from __future__ import annotations

import argparse
import json
import sys

from tunesmith.config import FLAG_ALIASES, REPEATABLE_FLAGS, fields_info, load_config, unknown_key_error

_USAGE = "tunesmith train [CONFIG.yaml] [--plan] [--json] [--print-config] [--section.key VALUE ...]"
_EPILOG = """precedence: --flags > CONFIG.yaml > defaults. Lists are comma separated, bools true/false.
examples:
  tunesmith train --data train.jsonl --plan          (what the run would do, without training)
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
    parser.add_argument("--print-config", action="store_true", help="print the config as YAML and exit")
    parser.add_argument("--plan", action="store_true",
                        help="print the run plan (data, batches, steps, learning rate, the automatic choices and "
                             "their reasons, warnings, a time estimate) and exit without loading the model")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout; progress and logs go to stderr. With --plan, the "
                             "plan: examples, val_examples, tokens, supervised_tokens, method, objective, processes, "
                             "packing, row_length, rows_per_epoch, micro_batch, grad_accum, steps_per_epoch, epochs, "
                             "total_steps, warmup_steps, lr, scheduler, tokens_per_step, estimate_s, estimate_basis, "
                             "template and template_reason (the chat template applied, and why), prompts_per_step, "
                             "num_generations and max_completion_length (GRPO; null otherwise), long_prefix_pairs "
                             "and sft_weight (preference pairs whose answers share more than half of the shorter "
                             "one, and the SFT term's weight; 0 and null for other data), "
                             "choices [{key, value, reason, auto}], warnings, measured_tokens_per_s and elapsed_s "
                             "(null until trained). Otherwise, after training, the run summary: run_dir, steps, "
                             "final_train_loss, initial_eval_loss and final_eval_loss (null without held-out data), "
                             "tokens, supervised_tokens, elapsed_s, stopped_early, warnings, plan (as with --plan)")
    short = parser.add_argument_group("common flags (each sets one config key)")
    for flag, key in FLAG_ALIASES.items():
        if flag == "resume-force":
            short.add_argument(f"--{flag}", dest=key, action="store_const", const="true", default=argparse.SUPPRESS,
                               help=f"same as --{key} true")
        elif flag in REPEATABLE_FLAGS:
            short.add_argument(f"--{flag}", dest=key, metavar="VALUE", action="append", default=argparse.SUPPRESS,
                               help=f"adds one item to --{key} (repeatable)")
        else:
            short.add_argument(f"--{flag}", dest=key, metavar="VALUE", default=argparse.SUPPRESS, help=f"= --{key}")
    for section, infos in _by_section().items():
        group = parser.add_argument_group(f"{section} options")
        for info in infos:
            choices = f" {{{','.join(info.choices)}}}" if info.choices else ""
            group.add_argument(f"--{info.key}", dest=info.key, metavar=_metavar(info),
                               default=argparse.SUPPRESS,
                               help=f"{info.help}{choices}{_default_note(info)}".replace("%", "%%"))
    return parser


def _default_note(info) -> str:
    """" (default: X)"; an unset field's help says what unset means, so it gets no "(default: None)"."""
    if info.default is None:
        return "" if "default" in info.help else " (default: unset)"
    return f" (default: {info.default!r})"


def _by_section() -> dict[str, list]:
    out: dict[str, list] = {}
    for info in fields_info():
        out.setdefault(info.key.split(".")[0], []).append(info)
    return out


def parse_train_args(argv: list[str]):
    """(config file, ``section.key=value`` overrides, the parsed flags) from the train command line."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    for item in unknown:
        if item.startswith("--"):
            raise unknown_key_error(item[2:].split("=")[0], "command line: ")
        parser.error(f"unexpected argument {item!r}")
    # A short flag and its long form share one dest, so the later one on the line wins.
    # A repeated flag's items stay a list, so a comma inside one (a regex) does not split it.
    overrides = [(k, v) if isinstance(v, list) else f"{k}={v}" for k, v in vars(args).items() if "." in k]
    return args.config, overrides, args


def run_train_command(argv: list[str]) -> int:
    path, overrides, flags = parse_train_args(argv)
    config = load_config(path, overrides)
    if flags.print_config:
        sys.stdout.write(config.to_yaml())
        return 0
    from tunesmith.train.loop import finetune, prepare_run  # deferred: torch; --help answers at once

    if flags.plan:
        plan = prepare_run(config).plan
        print(json.dumps(plan.to_dict(), indent=2) if flags.json else "\n".join(["run plan:", *plan.lines()]))
        return 0

    result = finetune(config)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    if flags.json:
        print(json.dumps(summary_dict(result), indent=2))
    else:
        print("\n".join(summary_lines(result)))
    return 0


def summary_dict(result) -> dict:
    return {"run_dir": str(result.run_dir), "steps": result.steps, "final_train_loss": result.final_train_loss,
            "initial_eval_loss": result.initial_eval_loss, "final_eval_loss": result.final_eval_loss,
            "tokens": result.tokens, "supervised_tokens": result.supervised_tokens,
            "elapsed_s": round(result.elapsed_s, 1), "stopped_early": result.stopped_early,
            "warnings": result.warnings, "plan": result.plan.to_dict() if result.plan else None}


def summary_lines(result) -> list[str]:
    """The closing summary: where the run is, its losses, the learning check and any warning."""
    losses = [f"final train loss {result.final_train_loss:.4f}"] if result.final_train_loss is not None else []
    lines = [f"run saved to {result.run_dir} ({', '.join([f'{result.steps} steps', *losses])})"]
    before, after = result.initial_eval_loss, result.final_eval_loss
    if before is not None and after is not None:
        change = 100 * (before - after) / before if before else 0.0
        verdict = f"improved {change:.0f}%" if after < before else "did NOT improve"
        lines.append(f"held-out loss {before:.4f} -> {after:.4f}: {verdict}")
    elif after is not None:
        lines.append(f"held-out loss {after:.4f}")
    else:
        lines.append("no held-out data: pass --eval-data FILE or --data.val_size 0.1 to check what the model learned")
    lines += [f"WARNING: {w}" for w in result.warnings]
    return lines
