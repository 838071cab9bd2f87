"""`tunesmith verify`: what was trained is what will be served, checked on the same conversations.

Every path the model meets renders the same held-out conversations (``--data``, else a few built-in
questions) and the results are compared, one pass/fail line each:

- prompt ids: training's tokenization (the full example must begin with the prompt, its answer supervised
  from there), ``generate``, the server's chat endpoint (through its own request handling, in process), the
  merged export (loaded as a plain model directory) and the GGUF's embedded template and vocabulary (read as
  llama.cpp would: the template applied to the messages alone, since llama.cpp knows no run) give the
  same prompt token ids;
- stop ids: the token that closes an assistant turn in training (its last supervised label) is one of the
  ids generation stops at on every path; for the GGUF, llama.cpp's end-of-generation set: the file's EOS
  and EOT ids and the control tokens it recognises by name;
- answers: greedy answers of the adapter, the server, the merged model and the GGUF agree on every prompt
  (required for f32/f16 files; for bf16, q8_0 and smaller the agreement is reported, never required, and
  an f16 file is written alongside in a temporary directory so the exact comparison is still made);
- system prompt: the one training used (the run's, or the template's default) is in every served prompt.

``verify`` returns a report; ``ok`` holds only when every required line passes.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError

from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.prompt import render_prompt, with_system_prompt
from tunesmith.data.readers import load_conversations
from tunesmith.data.tokenize import IGNORE, EncodeOptions, encode, prompt_text
from tunesmith.errors import TunesmithError
from tunesmith.export.gguf import export_gguf
from tunesmith.export.merge import merge_to_dir
from tunesmith.inference import GenerationOptions, generate, stop_token_ids
from tunesmith.models.load import load
from tunesmith.output import print_table, progress_bar, verbose
from tunesmith.run import run_system_prompt
from tunesmith.serve import server

# llama.cpp marks these as end-of-generation by name when the file does not (llama-vocab.cpp).
LLAMA_CPP_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
                       "<|end_of_text|>", "<end_of_utterance>")
PROBES = ["Who are you?", "What is the capital of France?", "Explain machine learning in one sentence.",
          "你好，你是谁？", "Give me three tips for staying healthy.", "Translate 'good morning' into French."]


@dataclass
class Check:
    name: str  # prompt ids, stop ids, answers, system prompt
    path: str  # training, generate, serve, merged, gguf
    ok: bool
    detail: str
    required: bool = True


@dataclass
class VerifyReport:
    source: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.required and not c.ok]

    def to_dict(self) -> dict:
        return {"source": self.source, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}


@dataclass
class Route:
    """One way the model is met: its tokenizer, stop ids, and (when it generates) a model."""

    name: str
    tokenizer: object
    stop_ids: set[int]
    prompts: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    answers: list[str] | None = None


def verify(run_or_model, *, gguf=None, merged=None, data=None, prompts: int = 4,
           max_new_tokens: int = 24) -> VerifyReport:
    """Check ``run_or_model`` (a run dir, model dir or alias) against its merged export (``merged``, a
    directory; merged into a temporary one when omitted and the source is an adapter) and ``gguf``."""
    adapter = load(run_or_model, dtype=torch.float32, device="cpu")
    report = VerifyReport(source=str(adapter.path))
    merges = merged is not None or _is_adapter(adapter)
    with progress_bar("verify: training's prompts", 3 + merges + (gguf is not None), unit="steps") as bar:
        convs = _conversations(data, prompts)
        training = _training_path(adapter, convs, report)
        with tempfile.TemporaryDirectory(prefix="tunesmith-verify-") as tmp:
            paths = [_stage(bar, "generate", _generate_path, adapter, convs, max_new_tokens),
                     _stage(bar, "serve", _serve_path, adapter, convs, max_new_tokens)]
            bar.set_description("verify: merging")
            merged_dir = merged or _merge_if_adapter(adapter, Path(tmp))
            if merged_dir is not None:
                paths.append(_stage(bar, "the merged model", _merged_path, merged_dir, convs, max_new_tokens))
            if gguf is not None:
                paths.append(_stage(bar, "the GGUF", _gguf_path, Path(gguf), convs, max_new_tokens))
                if not _exact(paths[-1]):  # answers are only required of an exact type: write the f16 one too
                    bar.total += 1
                    f16 = export_gguf(run_or_model, Path(tmp) / "f16.gguf", dtype="f16")
                    paths.append(_stage(bar, "an f16 GGUF", _gguf_path, f16, convs, max_new_tokens))
            bar.set_description("verify: comparing")
            _compare(report, adapter, training, paths)
            bar.update(bar.total - bar.n)
    return report


def _stage(bar, what: str, route, *args) -> Route:
    """One path's answers under the verify bar (each is a model's greedy answers: the slow part)."""
    bar.set_description(f"verify: answers of {what}")
    path = route(*args)
    bar.update(1)
    return path


# ------------------------------------------------------------------------------------- conversations

def _conversations(data, count: int) -> list:
    """The last ``count`` conversations of ``data`` (pass held-out data: a validation file), or the built-in
    questions with a placeholder answer (their prompts are compared, and the answer's closing token)."""
    if data is not None:
        convs = [c for c in load_conversations([str(data)]) if not c.is_text and c.messages
                 and c.messages[-1].role == "assistant"]
        return convs[-count:]
    return [Conversation([Message("user", q), Message("assistant", "I am an assistant.")]) for q in PROBES[:count]]


def _user_messages(conv) -> list[dict]:
    """What a client sends: the turns before the answer, with the conversation's own system prompt only."""
    prompt = conv.prompt()
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return messages + [{"role": m.role, "content": m.content} for m in prompt.messages]


# ------------------------------------------------------------------------------------------- paths

@dataclass
class Training:
    prompts: list[list[int] | None]
    end_ids: set[int]
    system: str | None
    texts: list[str]


def _training_path(adapter, convs, report: VerifyReport) -> Training:
    """Each conversation encoded as training encodes it (the run's system prompt given to those without)."""
    system = run_system_prompt(adapter.run_info)
    prompts, ends, texts, problems = [], set(), [], []
    for conv in with_system_prompt(convs, system):
        try:
            encoded = encode(conv, adapter.tokenizer, EncodeOptions())
            text = prompt_text(conv, adapter.tokenizer)
        except Exception as exc:  # the template cannot be trained on: that is the finding
            problems.append(str(exc))
            prompts.append(None)
            texts.append("")
            continue
        ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
        supervised = [i for i, label in enumerate(encoded.labels) if label != IGNORE]
        answer_starts = len(ids) < len(encoded.labels) and encoded.labels[len(ids)] != IGNORE
        if encoded.input_ids[:len(ids)] != ids or not answer_starts:
            problems.append(f"the training example does not begin with the rendered prompt ({len(ids)} tokens) "
                            "followed by the supervised answer")
        ends.add(encoded.labels[supervised[-1]] if supervised else -1)
        prompts.append(ids)
        texts.append(text)
    eos = adapter.tokenizer.eos_token
    report.checks.append(Check("prompt ids", "training", not problems,
                               f"{problems[0]} (the tokenizer's EOS is {eos!r})" if problems
                               else f"{len(convs)} conversations encoded, answers supervised"))
    return Training(prompts, ends - {-1}, system, texts)


def render(loaded, messages: list[dict]) -> str:
    """The prompt generate, chat and serve render for ``messages`` (the run's system prompt included)."""
    return render_prompt(loaded.tokenizer, messages, loaded.run_info)


def _generate_path(adapter, convs, max_new_tokens: int) -> Route:
    return _loaded_route("generate", adapter, convs, max_new_tokens)


def _loaded_route(name: str, loaded, convs, max_new_tokens: int) -> Route:
    """What generate does with a loaded model: its prompts, its stop ids, its greedy answers."""
    path = Route(name, loaded.tokenizer, set(stop_token_ids(loaded.model, loaded.tokenizer)))
    path.texts = [render(loaded, _user_messages(c)) for c in convs]
    path.prompts = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in path.texts]
    path.answers = _greedy(loaded.model, loaded.tokenizer, path.texts, max_new_tokens)
    return path


def _serve_path(adapter, convs, max_new_tokens: int) -> Route:
    """The server's chat endpoint, in process: its request parsing, its prompt, its stop handling."""
    from fastapi.testclient import TestClient

    app = server.create_app(adapter)
    path = Route("serve", adapter.tokenizer, set(stop_token_ids(adapter.model, adapter.tokenizer)), answers=[])
    with TestClient(app) as client:
        for conv in convs:
            messages = _user_messages(conv)
            request = server.ChatRequest(messages=messages, max_tokens=max_new_tokens, temperature=0)
            rendered = [m.as_template_message() for m in request.messages]
            text = render(adapter, rendered)
            path.texts.append(text)
            path.prompts.append(adapter.tokenizer(text, add_special_tokens=False)["input_ids"])
            reply = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": max_new_tokens,
                                                              "temperature": 0})
            body = reply.json()
            if reply.status_code != 200:
                path.answers.append(f"<HTTP {reply.status_code}: {body}>")
                continue
            if body["usage"]["prompt_tokens"] != len(path.prompts[-1]):  # what the server really tokenized
                path.prompts[-1] = [-1] * body["usage"]["prompt_tokens"]
            path.answers.append(body["choices"][0]["message"]["content"])
    return path


def _is_adapter(loaded) -> bool:
    return (Path(loaded.path) / "adapter_config.json").is_file()


def _merge_if_adapter(adapter, tmp: Path) -> Path | None:
    if not _is_adapter(adapter):
        return None  # a plain model: nothing is merged, the model is its own export

    return merge_to_dir(adapter.path, tmp / "merged")


def _merged_path(merged_dir, convs, max_new_tokens: int) -> Route:
    merged = load(merged_dir, dtype=torch.float32, device="cpu")
    return _loaded_route("merged", merged, convs, max_new_tokens)


def _gguf_prompts(file: Path, tokenizer, convs) -> list[str]:
    try:
        return [tokenizer.apply_chat_template(_user_messages(c), tokenize=False, add_generation_prompt=True)
                for c in convs]
    except TemplateError as exc:  # the file's template (its sandbox refusal, its raise_exception), not a bug here
        raise TunesmithError(f"{file}: the GGUF's chat template refused to render the conversations: {exc}") from exc


def _gguf_path(file: Path, convs, max_new_tokens: int) -> Route:
    """The file as llama.cpp meets it: its own template on the client's messages, its own vocabulary and
    end-of-generation ids; answers from transformers' reading of its tensors."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = gguf.GGUFReader(file)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    template = reader.fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in reader.fields \
        else None
    tokenizer.chat_template = template
    path = Route("gguf", tokenizer, _gguf_stop_ids(reader))
    if template is None:
        path.texts = ["<no chat template in the file>"] * len(convs)
    else:
        path.texts = _gguf_prompts(file, tokenizer, convs)
    path.prompts = [_with_bos(reader, tokenizer(t, add_special_tokens=False)["input_ids"]) for t in path.texts]
    with _quiet_gguf_reading():
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = sorted(path.stop_ids)
    path.answers = _greedy(model, tokenizer, path.texts, max_new_tokens)
    path.name = f"gguf ({_gguf_type(reader)})"
    return path


@contextlib.contextmanager
def _quiet_gguf_reading():
    """transformers' GGUF reader draws its own tqdm bar (not its logging one that ``quiet_libraries`` turns off):
    without --verbose it is drawn disabled while verify reads the file."""
    from transformers import modeling_gguf_pytorch_utils as reader

    drawn = reader.tqdm
    if not verbose():
        reader.tqdm = functools.partial(drawn, disable=True)
    try:
        yield
    finally:
        reader.tqdm = drawn


def _with_bos(reader, ids: list[int]) -> list[int]:
    """llama.cpp adds BOS to a prompt when the file says so, unless the template already wrote it."""
    fields = reader.fields
    if "tokenizer.ggml.add_bos_token" not in fields or not fields["tokenizer.ggml.add_bos_token"].contents():
        return ids
    bos = int(fields["tokenizer.ggml.bos_token_id"].contents())
    return ids if ids[:1] == [bos] else [bos, *ids]


def _gguf_stop_ids(reader) -> set[int]:
    fields = reader.fields
    ids = {int(fields[k].contents()) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                               "tokenizer.ggml.eom_token_id") if k in fields}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    return ids | {i for i, t in enumerate(tokens) if t in LLAMA_CPP_EOG_NAMES}


def _gguf_type(reader) -> str:
    import gguf

    return gguf.LlamaFileType(int(reader.fields["general.file_type"].contents())).name.removeprefix("MOSTLY_")


def _exact(path: Route) -> bool:
    return path.name in ("gguf (F16)", "gguf (ALL_F32)")


def _greedy(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    return [g.text for g in generate(model, tokenizer, texts, GenerationOptions(max_new_tokens=max_new_tokens))]


# --------------------------------------------------------------------------------------- comparison

def _compare(report: VerifyReport, adapter, training: Training, paths: list[Route]) -> None:
    names = {token_id: adapter.tokenizer.convert_ids_to_tokens(token_id) for token_id in training.end_ids}
    for path in paths:
        same = [t is not None and t == p for t, p in zip(training.prompts, path.prompts, strict=True)]
        first = next((i for i, s in enumerate(same) if not s), None)
        if first is not None and training.prompts[first] is None:
            detail = "training cannot encode these conversations (see the training line); nothing to compare"
        else:
            detail = f"{sum(same)}/{len(same)} identical to training" + (
                "" if first is None else f"; first difference in: {path.texts[first][:160]!r}")
        report.checks.append(Check("prompt ids", path.name, all(same), detail))
    for path in paths:
        missing = [names[i] for i in training.end_ids if i not in path.stop_ids]
        stops = ", ".join(repr(path.tokenizer.convert_ids_to_tokens(i)) for i in sorted(path.stop_ids))
        if not training.end_ids:
            detail = f"training supervises no end-of-turn token, so nothing learned to emit this path's stops ({stops})"
        elif missing:
            detail = f"end-of-turn {', '.join(map(repr, missing))} supervised in training is not a stop id here ({stops})"
        else:
            detail = f"training's end-of-turn {', '.join(repr(names[i]) for i in sorted(training.end_ids))} stops generation"
        report.checks.append(Check("stop ids", path.name, bool(training.end_ids) and not missing, detail))
    reference = next(p for p in paths if p.name == "generate")
    for path in paths:
        if path is reference or path.answers is None:
            continue
        agree = sum(a == b for a, b in zip(reference.answers, path.answers, strict=True))
        required = not path.name.startswith("gguf") or _exact(path)
        differ = next((b for a, b in zip(reference.answers, path.answers, strict=True) if a != b), None)
        detail = f"{agree}/{len(path.answers)} greedy answers equal the adapter's" + (
            "" if differ is None else f"; e.g. {differ[:80]!r}") + ("" if required else " (reported, not required)")
        report.checks.append(Check("answers", path.name, agree == len(path.answers), detail, required=required))
    _system_check(report, training, paths)


def _system_check(report: VerifyReport, training: Training, paths: list[Route]) -> None:
    if not training.system:
        report.checks.append(Check("system prompt", "all", True, "the run sets none: every path renders the "
                                   "template's default (compared in the prompt ids)"))
        return
    lacking = [p.name for p in paths if not all(training.system in t for t in p.texts)]
    report.checks.append(Check("system prompt", ", ".join(lacking) or "all", not lacking,
                               f"training's system prompt {training.system[:60]!r} is " +
                               ("missing from these paths' prompts" if lacking else "in every path's prompt")))


def print_report(report: VerifyReport) -> None:
    rows = [[c.name, c.path, ("PASS" if c.ok else "FAIL") if c.required else ("pass" if c.ok else "differs"),
             c.detail] for c in report.checks]
    print_table(f"verify {report.source}", ["check", "path", "result", "detail"], rows)
    print(summary_line(report))


def summary_line(report: VerifyReport) -> str:
    if report.ok:
        return f"verify: all {sum(c.required for c in report.checks)} required checks pass"
    failed = "; ".join(f"{c.name} [{c.path}]" for c in report.failed)
    return f"verify: FAILED {len(report.failed)} check(s): {failed}"
