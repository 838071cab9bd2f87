"""An OpenAI-compatible HTTP API over one loaded model (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions and /v1/completions (streaming as server-sent events, or
not), GET /v1/models, GET /health, GET /stats. Requests are validated by pydantic; every 4xx carries
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``, so the official
clients raise their usual ``BadRequestError``, ``AuthenticationError`` or ``NotFoundError``.

Chat prompts are rendered by data.prompt.render_prompt, as training rendered its conversations: the
run's template and system prompt, and a request's ``tools`` (and assistant ``tool_calls``) where
training put a conversation's function schemas and calls.

Guards, cheapest first (``Guard``, an ASGI middleware that runs before any body is read):
an API key (``--api-key`` or TUNESMITH_API_KEY) required on everything but /health, compared in
constant time; a body-size limit checked on Content-Length before reading and counted while
reading chunked bodies, so an oversized body costs neither time nor memory. Then, per request:
a ``model`` other than the served one is a 404; a prompt that does not fit the context, or
max_tokens beyond it, is a 400.

Control tokens in chat messages are refused with a 400 rather than escaped: the rendered prompt
is tokenized as a whole, so a ``<|im_end|>`` in a user's text would become a real end of turn
and let the user write a system turn. Escaping would need a tokenizer-specific spelling that
silently changes the text the client sent; refusing (as tiktoken does by default for special
tokens) tells the client. /v1/completions takes a raw prompt that the client writes in full,
markers included, so there is no turn boundary to forge there and control tokens pass.

Concurrent requests share the model: a single worker thread (serve.batching.Batcher) owns it and
decodes every running request in one batch, admitting newcomers and retiring finished ones at each
token step. Up to ``max_batch`` requests run
together; the rest wait in a FIFO queue without holding a thread each, and past ``max_queue``
waiting requests (with the batch full) the server answers 429, so a flood cannot exhaust its memory.
A client that disconnects, or a stream that reached a stop string, leaves the batch at the next
token. An omitted temperature means greedy (reproducible) decoding, unlike OpenAI's default of
1.0: a small fine-tuned model is usually wanted deterministic; pass a temperature to sample. A
``seed`` seeds that request's own generator (see serve.batching), so it reproduces alone or under load.
GET /stats reports the queue and what the worker has done (largest batch, decode steps, requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunesmith.data.prompt import render_prompt
from tunesmith.data.tokenize import TemplateRefused
from tunesmith.inference import GenerationOptions, find_control_token, load_for_generation, precision_name
from tunesmith.serve import batching
from tunesmith.serve.batching import DEFAULT_MAX_BATCH, Batcher, Done, Piece

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BODY_MB = 4.0  # a 128k-token prompt is well under 1 MB of JSON; anything far larger is abuse
DEFAULT_MAX_QUEUE = 256
OPEN_PATHS = {"/health"}  # answered without the API key: load balancers probe it


# ----------------------------------------------------------------------------------- request types

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls, rendered as training rendered them

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; templates know only "system".
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        return {**message, "tool_calls": self.tool_calls} if self.tool_calls else message


class FunctionSchema(BaseModel):
    model_config = ConfigDict(extra="allow")  # description, parameters, strict...

    name: str


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSchema


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
    # torch.Generator.manual_seed's range; beyond it the worker could not seed the request's generator
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
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
    tools: list[Tool] | None = None  # shown to the model as training showed a conversation's tools
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


class APIError(Exception):
    """An error answered in OpenAI's shape; subclasses fix the status."""

    status = 400
    type_ = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class BadRequest(APIError):
    pass


class ModelNotFound(APIError):
    status = 404


class Busy(APIError):
    status = 429
    type_ = "server_error"


# ---------------------------------------------------------------------------------------- the app

def create_app(loaded, *, api_key: str | None = None, max_body_mb: float = DEFAULT_MAX_BODY_MB,
               max_queue: int = DEFAULT_MAX_QUEUE, max_batch: int = DEFAULT_MAX_BATCH,
               names: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving ``loaded`` (a tunesmith.models.load.Loaded).

    ``names`` are further names a request's ``model`` may use (what the server was started with)."""
    engine = Engine(loaded, max_queue=max_queue, max_batch=max_batch, names=names)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.batcher.close()  # the worker thread ends with the server

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(Guard, api_key=api_key, max_body=int(max_body_mb * 1024 * 1024))
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.model_id, **engine.batcher.counts()}

    @app.get("/stats")
    def stats() -> dict:
        return {"model": engine.model_id, "precision": precision_name(engine.loaded.model.dtype),
                **engine.batcher.stats()}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "tunesmith"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        engine.check_model(request.model)
        messages = [m.as_template_message() for m in request.messages]
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        _refuse_control_tokens(messages, tools, engine.tokenizer)
        try:
            prompt = render_prompt(engine.tokenizer, messages, engine.loaded.run_info, tools=tools)
        except TemplateRefused as exc:  # the chat template's own raise_exception, e.g. roles not alternating
            raise BadRequest(f"the model's chat template refused these messages: {exc.reason}", "messages") from exc
        return await engine.respond(prompt, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        engine.check_model(request.model)
        prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        return await engine.respond(prompt, request, chat=False)

    return app


def _refuse_control_tokens(messages: list[dict], tools: list[dict] | None, tokenizer) -> None:
    """A 400 naming the first field (content, tool calls, tool schemas) that spells out a control token."""
    fields = [(f"messages.{i}.content", m["content"]) for i, m in enumerate(messages)]
    fields += [(f"messages.{i}.tool_calls", json.dumps(m["tool_calls"], ensure_ascii=False))
               for i, m in enumerate(messages) if m.get("tool_calls")]
    fields += [("tools", json.dumps(tools, ensure_ascii=False))] if tools else []
    for param, text in fields:
        if token := find_control_token(text, tokenizer):
            raise BadRequest(f"{param} contains the control token {token!r}, which the model would read as "
                             "template structure (a turn boundary), not as text; remove it", param,
                             "control_token_in_content")


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

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return JSONResponse(_error_body(str(exc), exc.param, exc.type_, exc.code), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(_error_body(str(exc.detail), type_=type_), status_code=exc.status_code)


# ----------------------------------------------------------------------------------------- guards

class Guard:
    """ASGI middleware: API key and body size, decided from the headers before the body is read.

    A chunked body (no Content-Length) is counted as it arrives; past the limit the 413 is sent
    at once and the app is told the client left, so at most ``max_body`` bytes are ever held."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key_digest and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await _send_error(send, 401, _error_body(
                "Incorrect or missing API key: send it as the header 'Authorization: Bearer <key>'",
                type_="invalid_request_error", code="invalid_api_key"))
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send_error(send, 413, self._too_large())
        await self._capped(scope, receive, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        # Digests have equal length, so compare_digest's time depends on neither the key nor its length.
        given = hashlib.sha256(token.strip().encode()).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.key_digest)

    def _too_large(self) -> dict:
        return _error_body(f"the request body is larger than this server's limit of {self.max_body} bytes "
                           "(tunesmith serve --max-body-mb)", code="request_too_large")

    async def _capped(self, scope, receive, send):
        seen, refused = 0, False

        async def counted_receive():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                refused = True
                await _send_error(send, 413, self._too_large())
                return {"type": "http.disconnect"}  # the app stops reading; nothing more is buffered
            return message

        async def guarded_send(message):
            if not refused:  # the 413 has been answered; whatever the app says next is dropped
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise


async def _send_error(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------------------------- generation

class Engine:
    """The model behind the API: requests go to the batching worker, answers come back as events."""

    def __init__(self, loaded, max_queue: int = DEFAULT_MAX_QUEUE, max_batch: int = DEFAULT_MAX_BATCH,
                 names: tuple[str, ...] = ()):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.path.name if loaded.path else "tunesmith"
        self.names = {self.model_id, *names, *([str(loaded.path)] if loaded.path else [])}
        self.created = int(time.time())
        self.context_length = getattr(loaded.model.config, "max_position_embeddings", None)
        self.max_queue = max_queue
        self.batcher = Batcher(loaded.model, loaded.tokenizer, max_batch=max_batch)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise ModelNotFound(f"The model '{name}' does not exist: this server serves '{self.model_id}' "
                                "(GET /v1/models)", "model", "model_not_found")

    def check_room(self) -> None:
        waiting = self.batcher.counts()["waiting"]
        if self.batcher.full() and waiting >= self.max_queue:
            raise Busy(f"the server is busy: {waiting} requests are waiting (--max-queue {self.max_queue}); "
                       "retry later", code="server_busy")

    def options(self, prompt_tokens: int, request: SamplingRequest, chat: bool) -> GenerationOptions:
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        max_tokens = asked or DEFAULT_MAX_TOKENS
        if self.context_length:
            context, where = self.context_length, "messages" if chat else "prompt"
            if prompt_tokens >= context:
                raise BadRequest(f"This model's maximum context length is {context} tokens, and the {where} "
                                 f"alone is {prompt_tokens} tokens; shorten the {where}", where,
                                 "context_length_exceeded")
            if asked and prompt_tokens + asked > context:
                raise BadRequest(f"This model's maximum context length is {context} tokens; you requested "
                                 f"{prompt_tokens + asked} ({prompt_tokens} in the {where}, {asked} for the "
                                 f"completion); lower max_tokens to at most {context - prompt_tokens}",
                                 "max_tokens", "context_length_exceeded")
            max_tokens = min(max_tokens, context - prompt_tokens)
        return GenerationOptions(max_new_tokens=max_tokens, temperature=request.temperature or 0.0,
                                 top_p=request.top_p, stop=request.stops())

    async def respond(self, prompt: str, request: SamplingRequest, chat: bool):
        # Tokenizing a long prompt takes a while: off the event loop, which serves everyone.
        ids = await run_in_threadpool(lambda: self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        options = self.options(len(ids), request, chat)
        self.check_room()
        reply = Reply(chat=chat, model=self.model_id, prompt_tokens=len(ids))
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = self.stream_events(ids, options, request.seed, reply, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        async for event in self.events(ids, options, request.seed):
            done = event
        return reply.whole(done.text.strip(), done.finish_reason, done.completion_tokens)

    async def stream_events(self, ids: list[int], options: GenerationOptions, seed: int | None, reply: Reply,
                            include_usage: bool) -> AsyncIterator[str]:
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        try:
            async with contextlib.aclosing(self.events(ids, options, seed)) as events:
                async for event in events:
                    if isinstance(event, Piece):
                        yield _sse(reply.delta(event.text))
                    done = event
        except Exception as exc:  # the status line is sent: the error goes in the stream, as OpenAI's does
            yield _sse(_error_body(f"generation failed: {exc}", type_="server_error"))
            yield "data: [DONE]\n\n"
            return
        yield _sse(reply.chunk({}, finish_reason=done.finish_reason))
        if include_usage:
            yield _sse(reply.chunk(None, usage=reply.usage(done.completion_tokens)))
        yield "data: [DONE]\n\n"

    async def events(self, ids: list[int], options: GenerationOptions, seed: int | None) -> AsyncIterator[Piece | Done]:
        """Submit to the worker and yield its events as they come, ``Done`` last.

        Leaving early (a disconnect cancels the response's task) takes the request out of the batch
        at the worker's next step, so an abandoned request neither holds a row nor runs to max_tokens."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def hand_over(event) -> None:  # called on the worker's thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, event)

        request = self.batcher.submit(batching.Request(ids, options, hand_over, seed))
        try:
            while not isinstance(event := await events.get(), Done):
                if isinstance(event, Exception):
                    raise event
                yield event
            yield event
        finally:
            request.cancel()


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


def bind_warning(host: str, api_key: str | None) -> str | None:
    """What to tell someone serving beyond this machine with no key, or None."""
    if api_key or host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"serving on {host} without an API key: anyone who can reach this port can use the model; "
            "set --api-key or TUNESMITH_API_KEY")


def serve(model, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          max_body_mb: float = DEFAULT_MAX_BODY_MB, max_queue: int = DEFAULT_MAX_QUEUE,
          max_batch: int = DEFAULT_MAX_BATCH, allow_pickle: bool = False, precision: str | None = None) -> None:
    """Load ``model`` (alias, model dir or run dir) and serve it until interrupted.

    ``api_key`` defaults to the TUNESMITH_API_KEY environment variable; ``precision``: see
    ``inference.load_for_generation`` (None: fp32 on CPU, where batched answers equal lone ones)."""
    import uvicorn

    api_key = api_key or os.environ.get("TUNESMITH_API_KEY") or None
    if warning := bind_warning(host, api_key):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    loaded = load_for_generation(model, precision, allow_pickle=allow_pickle)
    app = create_app(loaded, api_key=api_key, max_body_mb=max_body_mb, max_queue=max_queue, max_batch=max_batch,
                     names=(str(model),))
    locked = "; API key required" if api_key else ""
    print(f"serving {loaded.path} at http://{host}:{port}/v1 (OpenAI-compatible{locked}; Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
