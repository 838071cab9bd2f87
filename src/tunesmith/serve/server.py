"""An OpenAI-compatible HTTP API over one loaded model (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions and /v1/completions (streaming as server-sent events, or
not), GET /v1/models, GET /health. Requests are validated by pydantic; every 4xx carries
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``, so the official
clients raise their usual ``BadRequestError``.

One model, one generation at a time: a transformers model is not safe to call from several
threads, so a lock serializes generation. Concurrent requests queue on it and each gets its own
answer. An omitted temperature means greedy (reproducible) decoding, unlike OpenAI's default of
1.0: a small fine-tuned model is usually wanted deterministic; pass a temperature to sample.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from tunesmith.inference import GenerationOptions, generate, render_prompt, stream

DEFAULT_MAX_TOKENS = 256


# ----------------------------------------------------------------------------------- request types

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; templates know only "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by both completion endpoints; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------------------- the app

def create_app(loaded) -> FastAPI:
    """The FastAPI app serving ``loaded`` (a tunesmith.models.load.Loaded)."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)
    engine = Engine(loaded)
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "tunesmith"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        messages = engine.loaded.with_system([m.as_template_message() for m in request.messages])
        try:
            prompt = render_prompt(engine.tokenizer, messages)
        except TemplateError as exc:  # the chat template's own raise_exception, e.g. roles not alternating
            raise BadRequest(f"the model's chat template refused these messages: {exc}", "messages") from exc
        return engine.respond(prompt, request, chat=True)

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        return engine.respond(prompt, request, chat=False)

    return app


def _error_body(message: str, param: str | None = None, type_: str = "invalid_request_error",
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        # FastAPI answers 422 with its own shape; OpenAI clients expect 400 and {"error": {...}}.
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(_error_body(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"),
                                status_code=400)
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(_error_body(message, param), status_code=400)

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest):
        return JSONResponse(_error_body(str(exc), exc.param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(_error_body(str(exc.detail), type_=type_), status_code=exc.status_code)


# ------------------------------------------------------------------------------------- generation

class Engine:
    """The model behind the API: one request generates at a time."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model_id = loaded.path.name if loaded.path else "tunesmith"
        self.created = int(time.time())
        self.context_length = getattr(loaded.model.config, "max_position_embeddings", None)
        self.lock = threading.Lock()

    def options(self, prompt_tokens: int, request: SamplingRequest) -> GenerationOptions:
        max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens or DEFAULT_MAX_TOKENS
        if self.context_length:
            room = self.context_length - prompt_tokens
            if room < 1:
                raise BadRequest(f"the prompt is {prompt_tokens} tokens; this model's context is "
                                 f"{self.context_length}", "messages")
            max_tokens = min(max_tokens, room)
        return GenerationOptions(max_new_tokens=max_tokens, temperature=request.temperature or 0.0,
                                 top_p=request.top_p, stop=request.stops())

    def respond(self, prompt: str, request: SamplingRequest, chat: bool):
        prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        options = self.options(prompt_tokens, request)
        reply = Reply(chat=chat, model=self.model_id, prompt_tokens=prompt_tokens)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = self.stream_events(prompt, options, request.seed, reply, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        with self.lock:
            _seed(request.seed)
            result = generate(self.model, self.tokenizer, [prompt], options)[0]
        return reply.whole(result.text, result.finish_reason, result.completion_tokens)

    def stream_events(self, prompt: str, options: GenerationOptions, seed: int | None, reply: Reply,
                      include_usage: bool) -> Iterator[str]:
        pieces = self._generate_in_background(prompt, options, seed)
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        text, finish = yield from _stop_aware(pieces, options.stop, reply)
        completion_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if finish is None:
            finish = "length" if completion_tokens >= options.max_new_tokens else "stop"
        yield _sse(reply.chunk({}, finish_reason=finish))
        if include_usage:
            yield _sse(reply.chunk(None, usage=reply.usage(completion_tokens)))
        yield "data: [DONE]\n\n"

    def _generate_in_background(self, prompt: str, options: GenerationOptions, seed: int | None) -> Iterator[str]:
        """Generate under the lock in a thread of its own, handing pieces over through a queue.

        The lock's release must not depend on the client: one that stops reading (a disconnect, or
        a stop string reached) leaves the generation to finish, bounded by max_tokens, and the next
        request proceeds."""
        pieces: queue.Queue = queue.Queue()

        def produce():
            with self.lock:
                try:
                    _seed(seed)
                    for piece in stream(self.model, self.tokenizer, prompt, options):
                        pieces.put(piece)
                except Exception as exc:  # handed to the consumer, which raises it in the response
                    pieces.put(exc)
                finally:
                    pieces.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while (item := pieces.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


def _stop_aware(pieces: Iterator[str], stops: list[str], reply: Reply):
    """Forward text as it comes, holding back only what could be the start of a stop string.

    Returns (all text sent, "stop" if a stop string ended it or None)."""
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    for piece in pieces:
        text += piece
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            if cut > sent:
                yield _sse(reply.delta(text[sent:cut]))
            return text[:cut], "stop"
        safe = len(text) - hold
        if safe > sent:
            yield _sse(reply.delta(text[sent:safe]))
            sent = safe
    if len(text) > sent:
        yield _sse(reply.delta(text[sent:]))
    return text, None


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Reply:
    """OpenAI response shapes for one request (chat.completion or text_completion, and their chunks)."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _envelope(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def whole(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], self.usage(completion_tokens))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], self.usage(completion_tokens))

    def delta(self, text: str) -> dict:
        return self.chunk({"content": text})

    def chunk(self, delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> dict:
        if not self.chat:
            text = (delta or {}).get("content", "")
            choices = [] if delta is None else [{"index": 0, "text": text, "logprobs": None,
                                                 "finish_reason": finish_reason}]
            return self._envelope("text_completion", choices, usage)
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        return self._envelope("chat.completion.chunk", choices, usage)


def serve(model, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load ``model`` (alias, model dir or run dir) and serve it until interrupted."""
    import uvicorn

    from tunesmith.models.load import load

    loaded = load(model)
    app = create_app(loaded)
    print(f"serving {loaded.path} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
