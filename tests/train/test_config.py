"""The typed config: defaults < YAML < CLI, typing, unknown keys, --help and --print-config."""

from __future__ import annotations

import pytest
import yaml

from tunesmith.config import Config, fields_info, load_config
from tunesmith.errors import UsageError
from tunesmith.train.commands import build_parser, parse_train_args, run_train_command


def test_cli_beats_yaml_beats_default(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 2e-4\n  batch_size: 8\nmethod:\n  target_modules: [q_proj, v_proj]\n")
    path, overrides, _ = parse_train_args([str(cfg), "--lr", "1e-3", "--data", "a.json,b.json"])
    config = load_config(path, overrides)
    assert config.train.lr == 1e-3  # CLI over YAML
    assert config.train.batch_size == 8  # YAML over default
    assert config.train.grad_accum == Config().train.grad_accum  # default
    assert config.method.target_modules == ["q_proj", "v_proj"]
    assert config.data.path == ["a.json", "b.json"]


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads 2e-4 (no dot) as the string "2e-4"; the field's type decides.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 2e-4\n")
    assert load_config(cfg).train.lr == pytest.approx(2e-4)


def test_long_and_short_flags_last_one_wins():
    _, overrides, _ = parse_train_args(["--train.lr", "1e-3", "--lr", "3e-3"])
    assert load_config(None, overrides).train.lr == 3e-3


def test_bools_and_none():
    config = load_config(None, ["data.packing=false", "data.template=none", "train.resume_force=true"])
    assert config.data.packing is False and config.data.template is None and config.train.resume_force is True
    with pytest.raises(UsageError, match="data.packing: expected true or false"):
        load_config(None, ["data.packing=yes please"])


def test_choices_are_checked():
    with pytest.raises(UsageError, match="method.name: 'lorra' is not one of"):
        load_config(None, ["method.name=lorra"])


def test_unknown_cli_key_names_the_nearest():
    with pytest.raises(UsageError, match=r"unknown config key 'train\.lrr'; did you mean 'train\.lr'"):
        parse_train_args(["--train.lrr", "3"])
    with pytest.raises(UsageError, match=r"'batchsize'; did you mean 'train\.batch_size'"):
        parse_train_args(["--batchsize", "3"])


def test_unknown_yaml_key_names_file_line_and_nearest(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: x\ntrain:\n  lr: 1e-4\n  warmup_step: 10\n")
    with pytest.raises(UsageError, match=r"c\.yaml:5: unknown config key 'train\.warmup_step'; "
                                         r"did you mean 'train\.warmup_steps'"):
        load_config(cfg)
    cfg.write_text("trian:\n  lr: 1e-4\n")
    with pytest.raises(UsageError, match=r"c\.yaml:1: unknown config section 'trian'; did you mean 'train'"):
        load_config(cfg)


def test_help_lists_every_option_and_the_short_flags():
    text = build_parser().format_help()
    for info in fields_info():
        assert f"--{info.key}" in text
    for flag in ("--model", "--data", "--eval-data", "--output-dir", "--method", "--epochs", "--max-steps", "--lr",
                 "--batch-size", "--grad-accum", "--max-length", "--seed", "--save-every", "--resume",
                 "--resume-force", "--print-config"):
        assert f"{flag} " in text or f"{flag}\n" in text
    assert "(default: None)" not in text and "(default: unset)" in text


def test_print_config_round_trips(tmp_path, capsys):
    assert run_train_command(["--method", "dora", "--train.epochs", "2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["name"] == "dora" and printed["train"]["epochs"] == 2.0
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(printed))
    assert load_config(dumped) == load_config(None, ["method.name=dora", "train.epochs=2"])


def test_the_seed_example_loads():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "seed_lora.yaml")
    assert (config.method.name, config.method.r, config.method.alpha, config.method.dropout) == ("lora", 16, 32, 0.1)
    assert config.method.target_modules == ["q_proj", "v_proj"]
    assert (config.train.epochs, config.train.batch_size, config.train.grad_accum) == (3, 4, 4)
    assert (config.train.lr, config.train.log_every) == (2e-4, 10)
    assert config.train.warmup_steps is None  # the seed's 100 is most of this data's run: the plan chooses
    assert (config.output.save_every, config.eval.eval_every, config.output.save_total_limit) == (500, 500, 2)
    assert config.eval.load_best is True


def test_fingerprint_leaves_out_exactly_the_fields_that_do_not_change_what_is_learned():
    from tunesmith.config import fingerprint_keys

    left_out = {info.key for info in fields_info()} - set(fingerprint_keys())
    assert left_out == {"train.resume", "train.resume_force", "train.log_every", "eval.batch_size",
                        "model.allow_pickle", *(info.key for info in fields_info() if info.key.startswith("output."))}


def test_bounds_and_choices_are_declared_with_their_fields():
    from tunesmith.config import ADAPTER_METHODS, check_config, choices, minimum
    from tunesmith.data.tokenize import TRUNCATION_POLICIES
    from tunesmith.run import is_adapter

    assert choices("data.truncation") == TRUNCATION_POLICIES
    assert all(is_adapter(m) == (m in ADAPTER_METHODS) for m in choices("method.name"))
    config = load_config(None, ["data.path=a.jsonl", f"data.max_length={minimum('data.max_length') - 1}"])
    with pytest.raises(UsageError, match="data.max_length must be >= 8"):
        check_config(config)


def test_data_check_refuses_a_max_length_training_would_refuse(tmp_path, capsys):
    """`data check --max-length` previews training, so it takes the same lower bound (it accepted 2 to 7)."""
    from tunesmith.cli import main

    path = tmp_path / "ok.jsonl"
    path.write_text('{"instruction": "hi", "output": "hello"}\n')
    assert main(["data", "check", str(path), "--max-length", "4", "--no-tokens"]) == 2
    assert "--max-length must be at least 8, not 4" in capsys.readouterr().err
