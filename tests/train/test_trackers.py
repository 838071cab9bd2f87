"""Experiment trackers (--output.report_to): each gets the config, every metrics.jsonl row and the final losses.

Real libraries, real local stores: MLflow with a file store read back through its client, W&B in
offline mode with the run file it writes decoded record by record, TensorBoard's event files read
by its own EventAccumulator, trackio's local database through its API.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys

import pytest

from tests.train.helpers import tiny_config
from tunesmith.errors import UsageError
from tunesmith.run import read_metrics, tracker_names
from tunesmith.train.loop import finetune

NUMERIC = ("loss", "lr", "grad_norm", "tokens", "supervised_tokens")


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


def train(tiny_model_dir, chat_file, out, report_to: str, **extra):
    extra = {"train__max_steps": 4, "eval__eval_every": 2, "data__val_size": 0.1, **extra}
    result = finetune(tiny_config(tiny_model_dir, chat_file, out, output__report_to=report_to, **extra))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in with_key(rows, "loss")] == [1, 2, 3, 4] and with_key(rows, "eval_loss")
    return result, rows


def with_key(rows: list[dict], key: str) -> list[dict]:
    """The metrics rows that carry ``key`` (an evaluation-only row has no train loss, for example)."""
    return [r for r in rows if r.get(key) is not None]


def test_report_to_parses_and_refuses_unknown_trackers():
    from tunesmith.config import load_config

    assert tracker_names(load_config(None, []).output) == []  # none by default
    assert tracker_names(load_config(None, ["output.report_to=none"]).output) == []
    config = load_config(None, ["output.report_to=mlflow, wandb", "output.tensorboard=true"])
    assert tracker_names(config.output) == ["mlflow", "wandb", "tensorboard"]
    with pytest.raises(UsageError, match="unknown tracker 'comet'.*tensorboard, mlflow, wandb, trackio"):
        tracker_names(load_config(None, ["output.report_to=mlflow,comet"]).output)


def test_a_missing_tracker_library_fails_before_any_work(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError, match="pip install wandb"):
        finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "run", output__report_to="wandb"))
    assert not (tmp_path / "run").exists()


@needs("mlflow")
def test_mlflow_file_store_gets_config_rows_and_final_eval(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    result, rows = train(tiny_model_dir, chat_file, tmp_path / "run", "mlflow")

    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("tunesmith")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["method.name"] == "lora" and run.data.params["train.max_steps"] == "4"
    assert run.data.params["model.name"] == str(tiny_model_dir)
    for key in (*NUMERIC, "eval_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r[key]))
                                                        for r in with_key(rows, key)]
    assert run.data.metrics["final_eval_loss"] == pytest.approx(result.final_eval_loss)
    assert run.data.metrics["final_train_loss"] == pytest.approx(result.final_train_loss)


@needs("mlflow")
def test_a_tracker_that_cannot_start_is_named(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(UsageError, match="output.report_to: mlflow could not start: .*nosuchscheme"):
        finetune(tiny_config(tiny_model_dir, chat_file, tmp_path / "run", output__report_to="mlflow",
                             train__max_steps=1))


def wandb_records(path):
    """Decode a W&B run file: its LevelDB-style log (7-byte header, 32 KiB blocks of checksummed chunks)
    holds one protobuf Record per entry, parsed with wandb's own message class."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: the block is padded
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@needs("wandb")
def test_wandb_offline_run_holds_config_rows_and_final_eval(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))  # nothing lands in the user's folders
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir = tmp_path / "run"
    result, rows = train(tiny_model_dir, chat_file, run_dir, "wandb")

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # the run was finished, not left open

    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
    assert config["method.name"] == "lora" and config["train.max_steps"] == 4
    assert config["model.name"] == str(tiny_model_dir)
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == "run"

    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    for key in (*NUMERIC, "eval_loss"):
        assert [(h["_step"], h[key]) for h in history if key in h] == [(r["step"], pytest.approx(r[key]))
                                                                      for r in with_key(rows, key)]
    (final,) = [h for h in history if "final_eval_loss" in h]
    assert final["final_eval_loss"] == pytest.approx(result.final_eval_loss)
    assert final["final_train_loss"] == pytest.approx(result.final_train_loss)


@needs("tensorboard")
def test_tensorboard_event_files_hold_every_row(tiny_model_dir, chat_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, rows = train(tiny_model_dir, chat_file, tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in (*NUMERIC, "eval_loss"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(r["step"], pytest.approx(r[key], rel=1e-6))
                                                                    for r in with_key(rows, key)]
    (final,) = events.Scalars("final_eval_loss")
    assert final.step == 4 and final.value == pytest.approx(result.final_eval_loss, rel=1e-6)
    (hparams,) = (tmp_path / "run" / "tensorboard").glob("*/hparams.yml")
    assert "method.name: lora" in hparams.read_text()


@needs("trackio")
def test_trackio_local_project_gets_every_row(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    # trackio reads TRACKIO_DIR once, when first imported (trl imports it too): point its modules there as well
    for module in [m for name, m in sys.modules.items() if name.startswith("trackio") and hasattr(m, "TRACKIO_DIR")]:
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    monkeypatch.setenv("TRACKIO_PROJECT", "tunesmith-test")
    result, rows = train(tiny_model_dir, chat_file, tmp_path / "run", "trackio")
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_project_db_path("tunesmith-test").is_relative_to(tmp_path / "trackio")
    logs = SQLiteStorage.get_logs("tunesmith-test", run="run")
    logged = [log for log in logs if "loss" in log]
    assert [(log["step"], log["loss"]) for log in logged] == [(r["step"], pytest.approx(r["loss"]))
                                                              for r in with_key(rows, "loss")]
    assert [log["final_eval_loss"] for log in logs if "final_eval_loss" in log] == [
        pytest.approx(result.final_eval_loss)]
    assert SQLiteStorage.get_run_config("tunesmith-test", run="run")["method.name"] == "lora"
