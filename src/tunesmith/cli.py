"""The command table: each subcommand parses its arguments and calls one library function (its --help is
built from DESCRIPTION and EXAMPLES below).

argparse rather than typer: `tunesmith train` builds its flags from the typed config at run
time (every `--section.key` with the help text of its field), which argparse does directly and
typer's signature-driven model does not; one parser style for every command keeps them alike.
Imports of heavy libraries happen inside the handlers so `tunesmith --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys

from tunesmith import __version__
from tunesmith.config import UIConfig, ui_fields
from tunesmith.config import choices as config_choices
from tunesmith.output import quiet_libraries


def _quickstart(args) -> int:
    from tunesmith.quickstart import quickstart

    quickstart(name=args.name, author=args.author, out=args.out, model=args.model, max_steps=args.max_steps)
    return 0


def _models_list(args) -> int:
    from tunesmith.models.commands import print_models

    print_models(as_json=args.json)
    return 0


def _models_pull(args) -> int:
    from tunesmith.models.commands import pull_with_progress

    pull_with_progress(args.name)
    return 0


def _data_check(args) -> int:
    from tunesmith.data.doctor import run_check_command
    from tunesmith.data.prompts import check_prompts, is_prompt_data, prompt_report_lines

    if not args.eval_files and is_prompt_data(args.files, columns=args.columns, encoding=args.encoding):
        # prompts without answers (GRPO's data): lengths, duplicates and cuts of the prompts themselves
        report = check_prompts(args.files, model=args.model, template=args.template, max_length=args.max_length,
                               columns=args.columns, encoding=args.encoding, tokens=not args.no_tokens)
        print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else "\n".join(prompt_report_lines(report)))
        return 0 if report["ok"] else 1
    return run_check_command(args)


def _data_convert(args) -> int:
    from tunesmith.data.convert import run_convert_command

    return run_convert_command(args)


def _train(args) -> int:
    from tunesmith.train.commands import run_train_command

    return run_train_command(args.argv)


def _eval(args) -> int:
    from tunesmith.evaluate.commands import run_eval_command

    return run_eval_command(args)


def _generate(args) -> int:
    from tunesmith.data.prompt import read_tools, render_prompt
    from tunesmith.inference import GenerationOptions, generate, load_for_generation

    tools = read_tools(args.tools)
    loaded = load_for_generation(args.model, args.precision)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    prompt = render_prompt(loaded.tokenizer, messages, loaded.run_info, tools=tools)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    print(generate(loaded.model, loaded.tokenizer, [prompt], options)[0].text)
    return 0


def _chat(args) -> int:
    from tunesmith.serve.chat import chat_repl

    return chat_repl(args.model, system=args.system, tools=args.tools, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, precision=args.precision)


def _serve(args) -> int:
    from tunesmith.serve.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_body_mb=args.max_body_mb,
          max_queue=args.max_queue, max_batch=args.max_batch, allow_pickle=args.allow_pickle, precision=args.precision)
    return 0


def _export(args) -> int:
    from tunesmith.export.commands import run_export_command

    return run_export_command(args)


def _verify(args) -> int:
    from tunesmith.export.commands import run_verify_command

    return run_verify_command(args)


def _runs(args) -> int:
    from tunesmith.runs import print_runs

    return print_runs(args.dir, as_json=args.json)


def _ui(args) -> int:
    from tunesmith.ui.app import run_ui

    run_ui(UIConfig(**{info.key: getattr(args, info.key) for info in ui_fields()}))
    return 0


def _add_ui_flags(p: argparse.ArgumentParser) -> None:
    """One flag per UIConfig field: --runs-dir for runs_dir, a switch for a bool."""
    for info in ui_fields():
        flag = "--" + info.key.replace("_", "-")
        if info.type is bool:
            p.add_argument(flag, action="store_true", help=info.help)
            continue
        kind = next((t for t in (int, float) if info.type is t), str)
        parse = _number(kind, info.minimum) if info.minimum is not None else kind
        p.add_argument(flag, type=parse, default=info.default, choices=info.choices, help=info.help)


def _number(kind, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type that refuses values transformers would reject later with a traceback."""
    def parse(text: str):
        value = kind(text)
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bounds = f"{'above' if low_open else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def _add_generation_flags(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    p.add_argument("--max-new-tokens", type=_number(int, 1), default=max_new_tokens,
                   help=f"most tokens to generate per answer (default: {max_new_tokens})")
    p.add_argument("--temperature", type=_number(float, 0), default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0,
                   help="nucleus sampling mass (with a temperature)")


def _add_precision_flag(p: argparse.ArgumentParser, default: str | None = "auto", why: str = "") -> None:
    from tunesmith.inference import PRECISIONS

    shown = f"default: {default}" if default else "default: fp32 on CPU, bf16 on a GPU that has it"
    p.add_argument("--precision", default=default, choices=PRECISIONS,
                   help="weights' dtype for generation: auto is bf16 where the CPU (AVX512-BF16, AMX) or GPU computes "
                        f"it natively, else fp32; greedy answers in bf16 can differ from fp32's after a few tokens "
                        f"({shown}{why})")


DESCRIPTION = """From your own instruction or chat data to a fine-tuned, evaluated, servable model:
check the data, fine-tune, evaluate before against after, chat, serve and export."""
EXAMPLES = """examples:
  tunesmith quickstart --name Aurora --author Lumen     the whole path on the default model, minutes on a CPU
  tunesmith data check train.jsonl                      errors with file:line, statistics, the loss mask
  tunesmith train --data train.jsonl --plan             what training would do, without training
  tunesmith train --data train.jsonl --output-dir runs/mine
  tunesmith eval runs/mine --data held_out.jsonl --compare base
  tunesmith chat runs/mine
  tunesmith serve runs/mine --port 8000                 OpenAI-compatible API
  tunesmith export runs/mine --gguf --dtype q8_0 --out mine.gguf

`tunesmith COMMAND --help` lists a command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' own progress bars and prints (transformers' 'Loading weights', "
                             "bert_score's, lm-eval's); anywhere on the line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("quickstart", help="fine-tune the default model on an identity dataset, end to end")
    p.add_argument("--name", default="Aurora", help="the name the tuned model should answer with")
    p.add_argument("--author", default="the tunesmith community", help="who made the tuned model")
    p.add_argument("--out", default=None, help="run directory (default: ./runs/quickstart-NAME)")
    p.add_argument("--model", default=None, help="base model (default: the embedded default)")
    p.add_argument("--max-steps", type=int, default=None, help="override the number of training steps")
    p.set_defaults(func=_quickstart)

    models = sub.add_parser("models", help="list or pull models").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="aliases and what is cached (size, path)",
                          description="Aliases and cache entries: a table on a terminal, tab-separated lines in a pipe.")
    p.add_argument("--json", action="store_true", help="print one JSON object: cache (the models directory), "
                   "models: [{name, hub_id, description, cached, size (bytes), path}]")
    p.set_defaults(func=_models_list)
    p = models.add_parser("pull", help="fetch a model into the cache")
    p.add_argument("name", help="an alias or a hub id")
    p.set_defaults(func=_models_pull)

    data = sub.add_parser("data", help="check and convert datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="the data doctor: schema errors with file:line, stats, duplicates, mask preview")
    p.add_argument("files", nargs="+", help="data files or directories")
    p.add_argument("--model", default=None, help="tokenizer and chat template for token statistics (default: the default model)")
    p.add_argument("--max-length", type=int, default=None, help="report what this sequence length truncates or drops")
    p.add_argument("--truncation", default="truncate_prompt", choices=config_choices("data.truncation"),
                   help="policy for examples over --max-length")
    p.add_argument("--template", default=None, help="built-in template (chatml, llama3, gemma, mistral, alpaca, seed) or a .jinja file "
                        "instead of the tokenizer's (default: its own, else the model family's)")
    p.add_argument("--eval", dest="eval_files", action="append", default=[], help="eval file: check train/eval overlap")
    p.add_argument("--format", default=None, help="force the input format (alpaca, sharegpt, openai, prompt-completion, "
                   "text; preference pairs: alpaca, sharegpt, trl, openai-preference)")
    p.add_argument("--columns", default=None, help="column mapping, e.g. instruction=question,output=answer")
    p.add_argument("--encoding", default=None,
                   help="text encoding of the data files (default: UTF-8, with or without a byte-order mark)")
    p.add_argument("--json", action="store_true", help=(
        "print one JSON object: ok, files, formats {file: format}, num_examples, num_valid, num_turns, "
        "errors and warnings [{file, line, field, message, severity}], duplicates [{kind, rows}], "
        "overlap [{eval, train}], char_lengths and token_lengths {p50, p90, p99, max, mean, prompt, response} "
        "(token_lengths null with --no-tokens), truncated, dropped, supervised_token_share, zero_supervised, "
        "long_examples, preview {source, segments, marked}, model, template, template_reason, max_length, "
        "truncation, elapsed_s, "
        "kind (sft or pairs); for preference pairs the lengths have prompt, chosen and rejected, and pairs "
        "{prompt_duplicates, truncation {over_max_length, prompt_tokens_cut, response_tokens_cut, responses_cut}}"))
    p.add_argument("--no-tokens", action="store_true", help="skip token statistics (no tokenizer needed)")
    p.set_defaults(func=_data_check)

    p = data.add_parser("convert", help="convert between data formats")
    p.add_argument("file", help="input file or directory")
    p.add_argument("--to", required=True, help="target layout; preference pairs convert to alpaca, sharegpt, trl or "
                   "openai-preference", choices=["alpaca", "openai", "sharegpt", "prompt-completion", "seed-instruction",
                                                 "seed-chat", "trl", "openai-preference"])
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--format", default=None, help="force the input format")
    p.add_argument("--columns", default=None, help="column mapping, e.g. instruction=question,output=answer")
    p.add_argument("--system-prompt", default=None, help="system prompt for seed-chat (default: the seed's)")
    p.add_argument("--labels", default=None,
                   help="seed-instruction labels as instruction,input,output (default: 指令,输入,输出)")
    p.add_argument("--encoding", default=None,
                   help="text encoding of the data files (default: UTF-8, with or without a byte-order mark)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    p.set_defaults(func=_data_convert)

    p = sub.add_parser("train", help="fine-tune (LoRA, DoRA, rsLoRA, QLoRA, full, freeze); --help lists every option",
                       add_help=False)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a model or run (your data, lm-eval benchmarks), or score predictions")
    p.add_argument("model", nargs="?", default=None, help="model or run directory (omit with --predictions)")
    p.add_argument("--data", default=None, help=(
        "evaluation data; references are the assistant turns. On preference pairs (chosen, rejected) also "
        "preference_accuracy and logp_margin (the chosen answer likelier than the rejected), reward_accuracy for "
        "an adapter run, and closer_to_chosen: the share of greedy answers nearer the chosen answer than the "
        "rejected one by token F1 (ties count half), with f1_chosen_minus_rejected, so --compare base shows "
        "whether what the model says moved, not only what it finds likely"))
    p.add_argument("--harness", default=None, metavar="TASKS",
                   help="lm-evaluation-harness tasks, comma separated: names (mmlu, cmmlu, ceval-valid, gsm8k), a task "
                        "YAML file or a directory of them; scores land in the metrics as harness/TASK/METRIC "
                        "(needs pip install 'tunesmith[harness]'; hub datasets need a network)")
    p.add_argument("--harness-limit", type=_number(int, 1), default=None, metavar="N",
                   help="score only the first N examples of each lm-eval task")
    p.add_argument("--harness-fewshot", type=_number(int, 0), default=None, metavar="K",
                   help="examples shown before each lm-eval question (default: each task's own)")
    p.add_argument("--harness-chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="render lm-eval prompts with the chat template and the run's system prompt "
                        "(default: when the tokenizer has a template, as every run's has)")
    p.add_argument("--predictions", default=None, help="score a predictions.jsonl (prediction, reference[, label])")
    p.add_argument("--metrics", default=None, help="comma list: rouge,bleu,chrf,exact_match,length,bertscore,classification,perplexity")
    p.add_argument("--labels", default=None, help="classification labels, comma separated")
    p.add_argument("--reward", action="append", default=None, metavar="FILE.py:FUNCTION",
                   help="score answers to the prompts of --data with a reward function (repeatable): "
                        "fn(prompts, completions, **fields) -> list of floats, or a built-in (exact, contains, "
                        "regex:PATTERN, max_words:N, json_schema:FILE); reports the mean reward and the pass rate "
                        "(reward > 0) of each")
    p.add_argument("--samples", type=_number(int, 1), default=1, metavar="K",
                   help="with --reward: K sampled answers per prompt (temperature 1.0 unless --temperature), for "
                        "pass@K (default 1: one greedy answer)")
    p.add_argument("--compare", default=None, help="'base' (the run's base model) or another model/run")
    p.add_argument("--out", default=None, help="report directory (metrics.json, predictions.jsonl, report.md, charts)")
    p.add_argument("--json", action="store_true", help=(
        "print one JSON object: model, data (null with --harness alone), options (lm-eval's under harness), "
        "metrics {name: value} (lm-eval's as harness/TASK/METRIC), compare, compare_metrics, "
        "deltas (compare_* and deltas null without --compare), paths {name: written file}"))
    p.add_argument("--batch-size", type=_number(int, 1), default=None,
                   help="prompts generated together (default 64), and the batch of perplexity and of lm-eval's "
                        "requests (default 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of --data")
    p.add_argument("--jieba", action="store_true",
                   help="segment Chinese with jieba for ROUGE and closer_to_chosen (default: characters)")
    p.add_argument("--bertscore-model", default=None, help="encoder for BERTScore (default: the embedded MiniLM)")
    p.add_argument("--encoding", default=None,
                   help="text encoding of --data or --predictions (default: UTF-8, with or without a byte-order mark)")
    _add_generation_flags(p)
    _add_precision_flag(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="answer one prompt")
    p.add_argument("model", help="alias, model directory, .gguf file or run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--tools", default=None, help="JSON file of function schemas shown to the model as training showed them")
    _add_generation_flags(p)
    _add_precision_flag(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="interactive chat (/reset, /system TEXT, /history, /prompt, /exit)")
    p.add_argument("model", help="alias, model directory or run directory")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--tools", default=None, help="JSON file of function schemas shown to the model as training showed them")
    _add_generation_flags(p, max_new_tokens=512)
    _add_precision_flag(p, default=None)
    p.set_defaults(func=_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API")
    p.add_argument("model", help="alias, model directory or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $TUNESMITH_API_KEY)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted, in MiB (2**20 bytes)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for the model; more get a 429")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests generated together in one batch; more wait in the queue")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle (.bin) weights when a model has no safetensors; pickles can run code")
    _add_precision_flag(p, default=None, why="; in fp32 a batch of requests answers exactly as each request alone")
    p.set_defaults(func=_serve)

    p = sub.add_parser("export", help="merged HF weights or a GGUF file")
    p.add_argument("model", help="run directory or model")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="write a merged Hugging Face model directory")
    mode.add_argument("--gguf", action="store_true", help="write a GGUF file")
    p.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
                   help="GGUF tensor type (4- and 5-bit types keep the embedding and output matrices in q8_0)")
    p.add_argument("--out", required=True, help="output directory (--merge) or .gguf file (--gguf)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: format (merge or gguf), path, bytes, dtype (null for merge), source, "
                        "modelfile (the Ollama Modelfile written beside a GGUF, else null), "
                        "verify (the verify report, null with --no-verify)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    p.add_argument("--no-verify", action="store_true", help="skip `tunesmith verify` on the written export")
    p.set_defaults(func=_export)

    p = sub.add_parser("verify", help="check that training, generate, serve, the merged export and a GGUF "
                                      "render the same prompts, stop at the trained end token and answer alike")
    p.add_argument("model", help="run directory or model")
    p.add_argument("--gguf", default=None, metavar="FILE", help="a .gguf export to check as llama.cpp reads it")
    p.add_argument("--merged", default=None, metavar="DIR", help="a merged export (default: merge to a temp dir)")
    p.add_argument("--data", default=None, help="held-out conversations (default: a few built-in questions)")
    p.add_argument("--prompts", type=_number(int, 1), default=4, help="how many conversations")
    p.add_argument("--max-new-tokens", type=_number(int, 1), default=24, help="greedy answer length compared")
    p.add_argument("--json", action="store_true", help="print one JSON object: source, ok, checks (name, path, "
                                                       "ok, detail, required)")
    p.set_defaults(func=_verify)

    p = sub.add_parser("runs", help="every run under a folder: status, method, data, steps, losses",
                       description="Runs under DIR: a table on a terminal, tab-separated lines in a pipe.")
    p.add_argument("dir", nargs="?", default="runs", help="folder holding run directories (default: runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object: root, runs: [{path, name, status "
                   "(running, finished, stopped, failed), method, data, steps, total_steps, train_loss, eval_loss, "
                   "checkpoint, pid, modified}]")
    p.set_defaults(func=_runs)

    p = sub.add_parser("ui", help="the web UI: data check, train, runs, chat, evaluate, export (English and Chinese)")
    _add_ui_flags(p)
    p.set_defaults(func=_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [arg for arg in argv if arg != "--verbose"]  # every command takes it, train's own parser included
    quiet_libraries(verbose)
    if argv[:1] == ["train"]:
        # argparse.REMAINDER drops a leading --option inside a subparser; train parses its own line.
        args = argparse.Namespace(func=_train, argv=argv[1:])
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        import os

        from tunesmith.errors import TunesmithError, report_error
        from tunesmith.models.resolve import cache_root

        if os.environ.get("TUNESMITH_DEBUG") and not isinstance(exc, TunesmithError):
            raise
        # A user error is one message; a bug is one line naming its saved traceback, never a dump.
        return report_error(exc, argv, crash_dir=cache_root() / "crash-reports")


if __name__ == "__main__":
    sys.exit(main())
