"""Loading a model runs none of its files as code: pickle-only weights are refused unless allowed,
and a model that ships its own modeling code is refused (trust_remote_code is never on)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tunesmith.config import MethodConfig
from tunesmith.errors import UsageError
from tunesmith.models.load import load
from tunesmith.train.methods import load_base_model

SRC = Path(__file__).resolve().parents[2] / "src" / "tunesmith"


class WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _without_weights(tiny_model_dir: Path, out: Path) -> Path:
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


@pytest.fixture
def pickle_only_dir(tiny_model_dir, tmp_path):
    """The tiny model with its weights saved only as pytorch_model.bin (a pickle)."""
    out = _without_weights(tiny_model_dir, tmp_path / "pickled")
    reference = load(tiny_model_dir, dtype=torch.float32, device="cpu").model
    torch.save(reference.state_dict(), out / "pytorch_model.bin")
    return out


def test_a_pickle_only_model_is_refused_unless_allowed(pickle_only_dir, tiny_model_dir):
    with pytest.raises(UsageError, match=r"only in pickle format \(pytorch_model\.bin\).*--model\.allow_pickle true"):
        load(pickle_only_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="pickle format"):
        load_base_model(pickle_only_dir, MethodConfig())

    allowed = load(pickle_only_dir, dtype=torch.float32, device="cpu", allow_pickle=True).model
    reference = load(tiny_model_dir, dtype=torch.float32, device="cpu").model
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(allowed(ids).logits, reference(ids).logits)


def test_a_malicious_pickle_is_never_opened(tiny_model_dir, tmp_path):
    out = _without_weights(tiny_model_dir, tmp_path / "evil")
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": WritesMarker(marker)}, out / "pytorch_model.bin")
    with pytest.raises(UsageError, match="pickle"):
        load(out, dtype=torch.float32, device="cpu")
    assert not marker.exists()


def test_training_refuses_a_pickle_only_base(pickle_only_dir, tmp_path):
    from tests.train.helpers import chat_rows, tiny_config, write_chat
    from tunesmith.train.loop import finetune

    data = write_chat(tmp_path / "train.jsonl", chat_rows(8))
    with pytest.raises(UsageError, match="pickle format"):
        finetune(tiny_config(pickle_only_dir, data, tmp_path / "run", train__max_steps=1))


def test_a_model_with_its_own_code_is_refused_without_running_it(tiny_model_dir, tmp_path):
    out = _without_weights(tiny_model_dir, tmp_path / "remote")
    shutil.copy(next(tiny_model_dir.glob("*.safetensors")), out)
    marker = tmp_path / "ran"
    (out / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\nfrom transformers import PretrainedConfig\n"
                                          "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="its own Python code"):
        load(out, dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="its own Python code"):
        load_base_model(out, MethodConfig())
    assert not marker.exists()


def test_trust_remote_code_is_never_switched_on_in_the_source():
    offending = [f"{path.relative_to(SRC)}:{i}" for path in SRC.rglob("*.py")
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"trust_remote_code\s*=\s*(?!False)", line)]
    assert offending == []
