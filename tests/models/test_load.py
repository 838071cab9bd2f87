from pathlib import Path

from tunesmith.data.prompt import from_messages, with_system_prompt
from tunesmith.models.load import Loaded, load


def _as_trained(loaded: Loaded, messages: list[dict]) -> list[dict]:
    """The messages with the run's system prompt given as data.prompt gives it (the rule's one owner)."""
    return with_system_prompt([from_messages(messages)], loaded.system_prompt)[0].to_messages()


def test_run_system_prompt_is_prepended_only_when_caller_gives_none():
    loaded = Loaded(model=None, tokenizer=None, path=Path("run"), base_path=Path("base"),
                    run_info={"system_prompt": "You are Nova."})
    user = [{"role": "user", "content": "Who are you?"}]
    assert _as_trained(loaded, user) == [{"role": "system", "content": "You are Nova."}, *user]
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert _as_trained(loaded, own) == own
    plain = Loaded(model=None, tokenizer=None, path=Path("m"), base_path=Path("m"))
    assert _as_trained(plain, user) == user and plain.system_prompt is None


def test_plain_model_dir_loads_in_eval_mode_with_a_pad_token(tiny_model_dir):
    loaded = load(tiny_model_dir)
    assert not loaded.model.training and not loaded.is_run
    assert loaded.base_path == tiny_model_dir and loaded.tokenizer.pad_token is not None
