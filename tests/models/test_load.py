from pathlib import Path

from tunesmith.models.load import Loaded, load


def test_run_system_prompt_is_prepended_only_when_caller_gives_none():
    loaded = Loaded(model=None, tokenizer=None, path=Path("run"), base_path=Path("base"),
                    run_info={"system_prompt": "You are Nova."})
    user = [{"role": "user", "content": "Who are you?"}]
    assert loaded.with_system(user) == [{"role": "system", "content": "You are Nova."}, *user]
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert loaded.with_system(own) == own
    plain = Loaded(model=None, tokenizer=None, path=Path("m"), base_path=Path("m"))
    assert plain.with_system(user) == user and plain.system_prompt is None


def test_plain_model_dir_loads_in_eval_mode_with_a_pad_token(tiny_model_dir):
    loaded = load(tiny_model_dir)
    assert not loaded.model.training and not loaded.is_run
    assert loaded.base_path == tiny_model_dir and loaded.tokenizer.pad_token is not None
