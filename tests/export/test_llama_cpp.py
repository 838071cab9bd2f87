"""llama.cpp itself (llama-cpp-python) runs the GGUF export as tunesmith runs the run.

The default model (SmolLM2-135M-Instruct) is fine-tuned for a few LoRA steps on the quickstart's identity
data, exported as f16 and q8_0 GGUF, and each file is loaded in llama_cpp.Llama. Three prompts are rendered
with the run's chat template and tokenized by the run's tokenizer, as `tunesmith generate` does; llama.cpp is
fed those same token ids (its own tokenization of the rendered text is checked to be identical, so a
llama.cpp user who renders the template gets them too, and the template stored in the file renders the same
prompts in llama-cpp-python's chat formatter) and decodes greedily, stopping at the ids tunesmith
stops at. Its text must equal tunesmith's greedy answer (fp32, the adapter unmerged) on every prompt for f16;
for q8_0 the agreement is printed and recorded (measured here: 2/3; the third answer parts after "1. Stay
hydrated,"), and only a non-empty answer is required. The Ollama Modelfile written beside each file renders the
same three prompts (its Go template run through test_ollama's imitation of Ollama) and stops at the same
tokens. Two to four minutes on two CPU cores with the default model cached.
"""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: pip install 'tunesmith[llamacpp]' (the test extra has it)")

PROMPTS = ["Who are you?", "What is the capital of France?", "Give me three tips for staying healthy."]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def tuned_run(default_model_home, tmp_path_factory):
    """The quickstart's data and LoRA defaults, three optimizer steps: a tuned model in about a minute."""
    from tests.train.helpers import tiny_config
    from tunesmith.quickstart import write_identity_data
    from tunesmith.train.loop import finetune

    root = tmp_path_factory.mktemp("llama-cpp")
    train_file, _ = write_identity_data(root / "data", "Aurora", "Lumen")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNESMITH_HOME", str(default_model_home))
        finetune(tiny_config("smollm2-135m-instruct", train_file, root / "run", train__max_steps=3,
                             train__batch_size=4, train__grad_accum=1, train__lr=1e-3, data__max_length=256,
                             train__precision="auto"))
    return root / "run"


@pytest.fixture(scope="module")
def reference(tuned_run, default_model_home):
    """tunesmith generate's side: prompt ids, stop ids and greedy answers (fp32, the adapter unmerged)."""
    import torch

    from tunesmith.data.prompt import render_prompt
    from tunesmith.inference import GenerationOptions, generate, stop_token_ids
    from tunesmith.models.load import load

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNESMITH_HOME", str(default_model_home))
        loaded = load(tuned_run, dtype=torch.float32, device="cpu")
    texts = [render_prompt(loaded.tokenizer, [{"role": "user", "content": p}], loaded.run_info) for p in PROMPTS]
    answers = generate(loaded.model, loaded.tokenizer, texts, GenerationOptions(max_new_tokens=MAX_TOKENS))
    stops = set(stop_token_ids(loaded.model, loaded.tokenizer))
    return {"texts": texts, "ids": [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
            "stops": stops, "stop_tokens": {loaded.tokenizer.convert_ids_to_tokens(i) for i in stops},
            "answers": [a.text for a in answers]}


def llama_greedy(llm, ids: list[int], stops: set[int]) -> str:
    """Greedy decoding in llama.cpp from ``ids``, up to MAX_TOKENS, stopping before a stop id; decoded as
    inference.decode_new does (a cut multi-byte character dropped)."""
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stops or len(out) == MAX_TOKENS:
            break
        out.append(token)
    return llm.detokenize(out).decode("utf-8", errors="replace").rstrip("\ufffd").strip()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_answers_as_tunesmith_generate(tuned_run, reference, use_default_model, tmp_path, dtype,
                                                 record_property):
    from tests.export.test_ollama import ollama_render, parse_modelfile
    from tunesmith.export.gguf import export_gguf
    from tunesmith.export.ollama import modelfile_path

    path = export_gguf(tuned_run, tmp_path / f"tuned-{dtype}.gguf", dtype=dtype, modelfile=True)
    modelfile = modelfile_path(path).read_text(encoding="utf-8")
    for prompt, text in zip(PROMPTS, reference["texts"], strict=True):
        assert ollama_render(modelfile, [{"role": "user", "content": prompt}]) == text
    assert {value for name, value in parse_modelfile(modelfile) if name == "PARAMETER stop"} == \
        reference["stop_tokens"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=False,
                          verbose=False)
    for text, ids in zip(reference["texts"], reference["ids"], strict=True):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
    # The template stored in the file, as llama-cpp-python's chat completion renders it (Jinja2 on the metadata).
    special = lambda token: llm.detokenize([token], special=True).decode()  # noqa: E731
    embedded = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], eos_token=special(llm.token_eos()), bos_token=special(llm.token_bos()))
    for prompt, text in zip(PROMPTS, reference["texts"], strict=True):
        assert embedded(messages=[{"role": "user", "content": prompt}]).prompt == text
    stops = reference["stops"]
    # llama.cpp's own end-of-generation set holds them too (create_completion and llama-cli stop there)
    assert all(llama_cpp.llama_vocab_is_eog(llm._model.vocab, i) for i in stops)
    answers = [llama_greedy(llm, ids, stops) for ids in reference["ids"]]
    agree = sum(a == b for a, b in zip(answers, reference["answers"], strict=True))
    print(f"\nllama.cpp {dtype}: {agree}/{len(PROMPTS)} greedy answers equal tunesmith generate's")
    for prompt, ours, theirs in zip(PROMPTS, reference["answers"], answers, strict=True):
        print(f"  {prompt!r}\n    tunesmith: {ours!r}\n    llama.cpp: {theirs!r}")
    record_property(f"llama_cpp_{dtype}_agreement", f"{agree}/{len(PROMPTS)}")
    assert all(answers), answers
    if dtype == "f16":
        assert answers == reference["answers"]
