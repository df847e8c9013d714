"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over a generation engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /stats.
A converted (qwerky) folder is served by the continuous-batching StudentEngine; any other HF causal LM
folder by the TeacherEngine (one KV cache per request), so the two can be benchmarked the same way.
Every invalid request gets a 4xx with an OpenAI-style body {"error": {message, type, param, code}};
a client that disconnects (streaming or not) has its request cancelled and its row freed. With an API
key (--api-key or QWERKY_API_KEY) every route but /health needs `Authorization: Bearer KEY`. SIGTERM
(or Ctrl-C) drains: new requests get 503, queued ones 503 at once, active ones run for at most
--shutdown-timeout seconds and are then cut (503 / a final SSE error event), then the process exits.

Run: `python -m qwerky.serve.app DIR [--port 8000]` or `qwerky serve DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwerky.errors import QwerkyError

from .engine import (
    Engine,
    GenerationRequest,
    InvalidParam,
    QueueFull,
    SamplingParams,
    ShuttingDown,
    build_engine,
    is_student,
)

API_KEY_ENV = "QWERKY_API_KEY"  # as vLLM's VLLM_API_KEY: read when --api-key is not given
DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_SHUTDOWN_TIMEOUT = 30.0

log = logging.getLogger(__name__)


# ---- errors ------------------------------------------------------------------------------------------
class APIError(Exception):
    """Raised inside handlers; rendered as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _validation_error(exc: ValidationError | RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                        for e in errors[:5])
    return error_response(400, message or "invalid request", param=param, code="invalid_value")


# ---- request bodies ------------------------------------------------------------------------------------
# strict: no coercion, so `"stream": "yes"`, `"max_tokens": "16"` or `"echo": 1` are 400s naming the field
# instead of being read as true / 16 (OpenAI's own API rejects them too); ints are still valid floats.
_STRICT = ConfigDict(extra="allow", strict=True)  # extra: OpenAI clients send fields we ignore (user, ...)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Body(BaseModel):
    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)  # extension (vLLM-style); -1 or 0: off
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False  # extension
    stream_options: StreamOptions | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- the app -----------------------------------------------------------------------------------------
class ServerState:
    """What the handlers share: engine, tokenizer, the served name, limits, the API key and the drain state."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, max_prompt_tokens: int,
                 default_max_tokens: int = 16, api_key: str | None = None, chat_template: str | None = None,
                 max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        if max_tokens_limit < 1:
            raise QwerkyError(f"--max-tokens-limit must be >= 1, got {max_tokens_limit}")
        if not shutdown_timeout >= 0:
            raise QwerkyError(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}")
        if api_key is not None and not api_key:
            raise QwerkyError(f"the API key is empty; pass a non-empty --api-key (or {API_KEY_ENV}), or neither")
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = int(max_tokens_limit)
        self.context = model_context(engine)
        self.api_key = api_key
        # --chat-template wins over the tokenizer's own (as in vLLM); None: the tokenizer's, if it has one
        self.chat_template_override = chat_template
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.shutdown_timeout = float(shutdown_timeout)
        self.draining = False
        self.hurry = False  # a second signal during a drain: cut the active rows now instead of at the deadline
        self.inflight = 0  # HTTP requests inside the app (all but /health), so a drain knows when all are answered
        self.created = int(time.time())
        self.vocab_size = len(tokenizer)
        model_vocab = getattr(getattr(engine.model, "config", None), "vocab_size", None)
        if model_vocab:
            self.vocab_size = max(self.vocab_size, int(model_vocab))

    async def drain(self, timeout: float | None = None, grace: float = 5.0) -> None:
        """Graceful stop: refuse new work, answer the queue now, give active rows `timeout` s, then cut them.

        New requests get 503 from the guard; queued ones end at once (503, or a final SSE error event);
        active ones run until they finish or the deadline, when they are cut at the next step boundary.
        Then it waits (at most `grace` s more) until every response has been written, so the server can
        close its sockets without dropping anyone.
        """
        if self.draining:
            return
        self.draining = True
        timeout = self.shutdown_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queued = self.engine.drain("the server is shutting down")
        log.warning("shutting down: %d queued requests refused; waiting up to %g s for %d active (--shutdown-timeout)",
                    queued, timeout, self.engine.pending())
        while self.engine.pending() and loop.time() < deadline and not self.hurry:
            await asyncio.sleep(0.05)
        if self.engine.pending():
            why = "a second signal" if self.hurry else f"--shutdown-timeout {timeout:g} s"
            log.warning("shutting down: cutting %d active requests (%s)", self.engine.pending(), why)
            self.engine.cut(f"the server is shutting down ({why})")
        end = loop.time() + grace
        while (self.engine.pending() or self.inflight) and loop.time() < end:
            await asyncio.sleep(0.02)
        log.warning("shutting down: drained in %.1f s%s", loop.time() - deadline + timeout,
                    "" if not self.inflight else f", {self.inflight} responses still open")


def model_context(engine: Engine) -> int | None:
    """Tokens (prompt + generated) the model can attend to, or None when it has no hard limit.

    A teacher is bounded by its `max_position_embeddings`; a recurrent student carries a fixed-size
    state and has none (quality past the training length is what `qwerky longctx` measures), so only
    the server's --max-tokens-limit bounds it.
    """
    if engine.kind != "teacher":
        return None
    value = getattr(getattr(engine.model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Guard:
    """ASGI middleware in front of every route but /health: the API key, then the drain, then a count.

    Pure ASGI rather than BaseHTTPMiddleware, which would buffer streams and hide client disconnects.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        st = self.state
        if st.api_key is not None and not _authorized(scope, st.api_key):
            resp = error_response(401, "missing or wrong API key: send the key given to the server (--api-key or "
                                  f"{API_KEY_ENV}) as the header 'Authorization: Bearer KEY'", "invalid_request_error",
                                  None, "invalid_api_key")
            resp.headers["WWW-Authenticate"] = "Bearer"
            await resp(scope, receive, send)
            return
        if st.draining:
            resp = error_response(503, "the server is shutting down and takes no new requests; retry on another "
                                  "server", "server_error", None, "server_shutting_down")
            resp.headers["Connection"] = "close"
            await resp(scope, receive, send)
            return
        st.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            st.inflight -= 1


def _authorized(scope: Scope, key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


def create_app(engine: Engine, tokenizer: Any, model_name: str = "qwerky", max_prompt_tokens: int = 32768, *,
               api_key: str | None = None, chat_template: str | None = None,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> FastAPI:
    """The FastAPI app; the engine is started with the app and shut down with it.

    `api_key`: required as `Authorization: Bearer` on every route but /health (None: no check).
    `chat_template`: a Jinja template used by /v1/chat/completions instead of the tokenizer's.
    `max_tokens_limit`: the most tokens one request may ask for. `shutdown_timeout`: see ServerState.drain.
    """
    st = ServerState(engine, tokenizer, model_name, max_prompt_tokens, api_key=api_key, chat_template=chat_template,
                     max_tokens_limit=max_tokens_limit, shutdown_timeout=shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="qwerky", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.qwerky = st
    app.add_middleware(Guard, state=st)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_, code=None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health", response_model=None)
    async def health() -> Any:
        """Open without the API key (load balancers probe it); 503 while draining so they stop routing here."""
        if st.draining:
            return JSONResponse(status_code=503, content={"status": "draining", "model": st.model_name,
                                                          "engine": engine.kind})
        return {"status": "ok", "model": st.model_name, "engine": engine.kind}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                            "owned_by": "qwerky", "engine": engine.kind}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await _parse(request, CompletionBody)
        _check_common(st, body)
        prompts = _completion_prompts(st, body.prompt)
        asked = body.max_tokens if "max_tokens" in body.model_fields_set else None  # the 16 default is ours
        max_tokens = _max_tokens(st, "max_tokens", asked, st.default_max_tokens, max(map(len, prompts)))
        params = _sampling(body, max_tokens, body.logprobs)
        if body.echo and body.stream:
            raise APIError(400, "echo is not supported with stream", "echo", "unsupported")
        if body.stream:
            return _stream(request, st, prompts, params, chat=False, include_usage=_usage_wanted(body))
        return await _complete(request, st, prompts, params, echo=body.echo, logprobs=body.logprobs)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        body = await _parse(request, ChatBody)
        _check_common(st, body)
        if not st.chat_template:
            raise APIError(400, f"model {st.model_name!r} has no chat template: start the server with "
                           "--chat-template FILE (a Jinja template), or send raw text to /v1/completions",
                           "messages", "no_chat_template")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        kwargs = {"chat_template": st.chat_template_override} if st.chat_template_override else {}
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's input
            raise APIError(400, f"chat template failed: {exc}", "messages", "invalid_value") from exc
        ids = tokenizer.encode(text, add_special_tokens=False)
        _check_prompt(st, ids)
        if body.max_completion_tokens is not None:
            name, asked = "max_completion_tokens", body.max_completion_tokens
        else:
            name, asked = "max_tokens", body.max_tokens
        max_tokens = _max_tokens(st, name, asked, st.default_max_tokens * 16, len(ids))
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = _sampling(body, max_tokens, k)
        if body.stream:
            return _stream(request, st, [ids], params, chat=True, include_usage=_usage_wanted(body))
        return await _chat(request, st, ids, params)

    return app


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", None, "invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        resp = _validation_error(exc)
        err = json.loads(resp.body)["error"]
        raise APIError(400, err["message"], err["param"], err["code"]) from exc


def _check_common(st: ServerState, body: _Body) -> None:
    if body.model is not None and body.model not in (st.model_name, ""):
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {st.model_name!r}",
                       "model", "model_not_found")
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", "n", "unsupported")
    mt = getattr(body, "max_completion_tokens", None)
    for name, value in (("max_tokens", body.max_tokens), ("max_completion_tokens", mt)):
        if value is not None and value < 0:
            raise APIError(400, f"{name} must be >= 0", name, "invalid_value")


def _usage_wanted(body: _Body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _check_prompt(st: ServerState, ids: list[int]) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
    if len(ids) > st.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {st.max_prompt_tokens} "
                       "(qwerky serve --max-prompt-tokens)", "prompt", "context_length_exceeded")
    if st.context is not None and len(ids) > st.context:
        raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is {st.context} tokens "
                       "(max_position_embeddings)", "prompt", "context_length_exceeded")


def _max_tokens(st: ServerState, name: str, asked: int | None, default: int, prompt_len: int) -> int:
    """The request's generation budget: `asked`, checked against the server limit and the model context.

    Without a bound a request for 10**30 tokens would hold a row until its client gave up. A request that
    does not ask gets `default`, clamped to both bounds instead of refused.
    """
    room = None if st.context is None else st.context - prompt_len
    if asked is None:
        bound = st.max_tokens_limit if room is None else min(st.max_tokens_limit, room)
        return max(0, min(default, bound))
    if asked > st.max_tokens_limit:
        raise APIError(400, f"{name}={asked} is over this server's limit of {st.max_tokens_limit} generated tokens "
                       "per request (set by qwerky serve --max-tokens-limit)", name, "max_tokens_exceeded")
    if room is not None and asked > room:
        raise APIError(400, f"{name}={asked} plus the prompt's {prompt_len} tokens is over the model's context of "
                       f"{st.context} tokens (max_position_embeddings); ask for at most {max(room, 0)}", name,
                       "context_length_exceeded")
    return asked


def _completion_prompts(st: ServerState, prompt: Any) -> list[list[int]]:
    """A string, a list of strings, a token list or a list of token lists -> token lists (one per choice)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
    out = []
    for item in items:
        ids = st.tokenizer.encode(item) if isinstance(item, str) else [int(t) for t in item]
        if any(t < 0 or t >= st.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must lie in [0, {st.vocab_size})", "prompt", "invalid_value")
        _check_prompt(st, ids)
        out.append(ids)
    return out


def _sampling(body: _Body, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=max(0, body.top_k), seed=body.seed, stop=tuple(s for s in stop if s),
                            ignore_eos=body.ignore_eos, logprobs=logprobs)
    try:
        params.validate()
    except InvalidParam as exc:
        raise APIError(400, str(exc), exc.param, "invalid_value") from exc
    return params


def _submit(st: ServerState, ids: list[int], params: SamplingParams) -> GenerationRequest:
    try:
        return st.engine.submit(ids, params, loop=asyncio.get_running_loop())
    except InvalidParam as exc:
        raise APIError(400, str(exc), exc.param, "invalid_value") from exc
    except QueueFull as exc:
        raise APIError(429, f"server busy: {exc}", None, "queue_full", "rate_limit_error") from exc
    except ShuttingDown as exc:
        raise APIError(503, f"{exc}; retry on another server", None, "server_shutting_down", "server_error") from exc


async def _wait(request: Request, st: ServerState, reqs: list[GenerationRequest]) -> None:
    """Wait for every request, cancelling them all if the client goes away first.

    One task per request, each awaited to the end even when cancelled: a cancelled `gather` whose
    outcome nobody read logged "_GatheringFuture exception was never retrieved" for every request whose
    client timed out.
    """
    async def consume(r: GenerationRequest) -> None:
        async for _ in r.aevents():
            pass

    tasks = [asyncio.ensure_future(consume(r)) for r in reqs]
    try:
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.5)
            if pending and await request.is_disconnected():
                for r in reqs:
                    st.engine.cancel(r)
                raise APIError(499, "client disconnected", None, "client_closed")
        for t in tasks:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in reqs:
            if not r.finished:
                st.engine.cancel(r)


def _token_strings(tok: Any, ids: list[int]) -> list[str]:
    return [tok.decode([t]) for t in ids]


def _logprobs_block(tok: Any, ids: list[int], lps: list[float | None], tops: list[dict[int, float] | None],
                    start_offset: int = 0) -> dict[str, Any]:
    tokens = _token_strings(tok, ids)
    offsets, pos = [], start_offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    top_out = [None if t is None else {tok.decode([k]): v for k, v in t.items()} for t in tops]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_out, "text_offset": offsets}


def _check_error(r: GenerationRequest) -> None:
    if r.finish_reason == "error":
        raise APIError(500, f"generation failed: {r.error}", None, "generation_failed", "server_error")
    if r.finish_reason == "shutdown":  # queued when the server began to drain, or cut at --shutdown-timeout
        raise APIError(503, r.error or "the server is shutting down", None, "server_shutting_down", "server_error")


async def _complete(request: Request, st: ServerState, prompts: list[list[int]], params: SamplingParams,
                    echo: bool, logprobs: int | None) -> dict[str, Any]:
    reqs = [_submit(st, ids, params) for ids in prompts]
    await _wait(request, st, reqs)
    choices = []
    prompt_tokens = completion_tokens = cached = 0
    for i, (ids, r) in enumerate(zip(prompts, reqs)):
        _check_error(r)
        prompt_tokens += len(ids)
        completion_tokens += len(r.output_ids)
        cached += r.cached_tokens
        text = r.text
        lp_block = None
        if logprobs is not None:
            gen_ids = r.output_ids
            gen_lps: list[float | None] = list(r.output_logprobs)
            gen_tops: list[dict[int, float] | None] = list(r.output_top_logprobs)
            if echo:
                top = max(1, logprobs)  # lm-eval reads top_logprobs[i] as a dict to decide is_greedy
                plps, ptops = await st.engine.acall(lambda ids=ids, top=top: st.engine._prompt_logprobs(ids, top, 1024))
                prompt_text = st.tokenizer.decode(ids)
                lp_block = _logprobs_block(st.tokenizer, ids + gen_ids, plps + gen_lps, ptops + gen_tops)
                text = prompt_text + text
            else:
                lp_block = _logprobs_block(st.tokenizer, gen_ids, gen_lps, gen_tops)
        elif echo:
            text = st.tokenizer.decode(ids) + text
        choices.append({"index": i, "text": text, "logprobs": lp_block, "finish_reason": _reason(r)})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": st.model_name, "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens, cached)}


async def _chat(request: Request, st: ServerState, ids: list[int], params: SamplingParams) -> dict[str, Any]:
    r = _submit(st, ids, params)
    await _wait(request, st, [r])
    _check_error(r)
    logprobs = None
    if params.logprobs is not None:
        logprobs = {"content": [_chat_logprob(st.tokenizer, t, lp, top) for t, lp, top in
                                zip(r.output_ids, r.output_logprobs, r.output_top_logprobs)]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": st.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                         "logprobs": logprobs, "finish_reason": _reason(r)}],
            "usage": _usage(len(ids), len(r.output_ids), r.cached_tokens)}


def _chat_logprob(tok: Any, token: int, lp: float, top: dict[int, float]) -> dict[str, Any]:
    s = tok.decode([token])
    return {"token": s, "logprob": lp, "bytes": list(s.encode()),
            "top_logprobs": [{"token": tok.decode([k]), "logprob": v, "bytes": list(tok.decode([k]).encode())}
                             for k, v in top.items()]}


def _reason(r: GenerationRequest) -> str:
    return r.finish_reason if r.finish_reason in ("stop", "length") else "stop"


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _stream(request: Request, st: ServerState, prompts: list[list[int]], params: SamplingParams, chat: bool,
            include_usage: bool) -> StreamingResponse:
    """Server-sent events: one chunk per text delta, then the finish chunk, then `data: [DONE]`."""
    reqs = [_submit(st, ids, params) for ids in prompts]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False,
              logprobs: Any = None) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        payload = {"id": rid, "object": obj, "created": created, "model": st.model_name, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    async def gen() -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, r: GenerationRequest) -> None:
            async for ev in r.aevents():
                await queue.put((i, ev))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
        try:
            if chat:
                yield chunk(0, None, None, first=True)
            remaining = len(reqs)
            while remaining:
                i, ev = await queue.get()
                lp = None
                if params.logprobs is not None and ev.token_ids and not chat:
                    lp = _logprobs_block(st.tokenizer, ev.token_ids, list(ev.logprobs), list(ev.top_logprobs))
                if ev.finish_reason is not None:
                    remaining -= 1
                    if ev.finish_reason in ("error", "shutdown"):  # a failure, or cut / refused by a drain
                        if ev.text or lp:
                            yield chunk(i, ev.text, None, logprobs=lp)
                        code = "generation_failed" if ev.finish_reason == "error" else "server_shutting_down"
                        err = {"error": {"message": ev.error, "type": "server_error", "param": None, "code": code}}
                        yield f"data: {json.dumps(err)}\n\n"
                        continue
                    if ev.text or lp:
                        yield chunk(i, ev.text, None, logprobs=lp)
                    yield chunk(i, None, _reason(reqs[i]))
                elif ev.text or lp:
                    yield chunk(i, ev.text, None, logprobs=lp)
            if include_usage:
                usage = _usage(sum(map(len, prompts)), sum(len(r.output_ids) for r in reqs),
                               sum(r.cached_tokens for r in reqs))
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': st.model_name, 'choices': [], 'usage': usage})}\n\n"  # noqa: E501
            yield "data: [DONE]\n\n"
        finally:  # client gone (generator closed / cancelled) or done: free every row still held
            for t in tasks:
                t.cancel()
            for r in reqs:
                if not r.finished:
                    st.engine.cancel(r)

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- loading and running ----------------------------------------------------------------------------------
def load_model(path: str | Path, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer): a qwerky folder through load_student, anything else through AutoModelForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwerky.teacher import check_model_dir

    path = check_model_dir(path, "model")  # a missing folder is one line, not a hub error
    config = json.loads((path / "config.json").read_text())
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    if torch_dtype is None:
        torch_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if config.get("model_type") == "qwerky":
        from qwerky.surgery import load_student

        model = load_student(path, device=device, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(device).eval()
    # never prompt for remote code: a qwerky folder's auto_map is for the model, the tokenizer is a plain one
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    return model, tokenizer


def load_chat_template(path: str | Path) -> str:
    """The text of a --chat-template file, checked at startup: a missing or broken file is one clear error."""
    p = Path(path)
    if not p.is_file():
        raise QwerkyError(f"--chat-template {p}: no such file (pass a Jinja chat template file, e.g. the "
                          "chat_template.jinja of a model of the same family)")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise QwerkyError(f"--chat-template {p} is empty")
    import jinja2

    try:  # the syntax transformers accepts (it adds loopcontrols); rendering errors stay per-request 400s
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise QwerkyError(f"--chat-template {p}: not a valid Jinja template (line {exc.lineno}: {exc.message})"
                          ) from exc
    return text


def resolve_api_key(flag: str | None) -> str | None:
    """--api-key, else $QWERKY_API_KEY, else None (no authentication)."""
    if flag is not None:
        return flag
    return os.environ.get(API_KEY_ENV) or None


def build_app_from_args(args: argparse.Namespace) -> FastAPI:
    chat_template = load_chat_template(args.chat_template) if args.chat_template else None  # before the model
    api_key = resolve_api_key(args.api_key)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    kwargs: dict[str, Any] = {"max_concurrent": args.max_concurrent}
    if is_student(model):
        kwargs.update(prefix_cache_mb=args.prefix_cache_mb, prefix_block_tokens=args.prefix_block_tokens)
    engine = build_engine(model, tokenizer, **kwargs)
    name = args.served_model_name or Path(args.model).resolve().name
    return create_app(engine, tokenizer, name, args.max_prompt_tokens, api_key=api_key, chat_template=chat_template,
                      max_tokens_limit=args.max_tokens_limit, shutdown_timeout=args.shutdown_timeout)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `qwerky serve` (shared with `python -m qwerky.serve.app`)."""
    parser.add_argument("model", help="a converted qwerky folder (continuous batching) or an HF teacher folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default loopback; set --api-key before exposing the server)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}"
                             " if set, else no authentication)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja chat template for /v1/chat/completions (overrides the tokenizer's; for models "
                             "without one)")
    parser.add_argument("--max-concurrent", type=int, default=16, help="active sequences; more requests queue")
    parser.add_argument("--max-prompt-tokens", type=int, default=32768, help="longer prompts get a 400")
    parser.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                        help="most tokens one request may generate; a larger max_tokens gets a 400 (a teacher is "
                             "also bounded by its context)")
    parser.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="SECONDS",
                        help="on SIGTERM/Ctrl-C, how long active requests may run before they are cut (queued ones "
                             "get 503 at once; a second signal exits at once)")
    parser.add_argument("--prefix-cache-mb", type=float, default=256, help="prefix state cache bound (0 = off)")
    parser.add_argument("--prefix-block-tokens", type=int, default=64, help="prefix cache granularity in tokens")
    parser.add_argument("--served-model-name", default=None, help="the `model` clients send (default: folder name)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-level", default="warning")


def _uvicorn_server(app: FastAPI, host: str, port: int, log_level: str) -> Any:
    """A uvicorn.Server whose first SIGTERM/SIGINT drains the app (ServerState.drain) and then exits 0.

    uvicorn's own handling closes the listening socket and then waits, unbounded, for every open response,
    so under load clients waited minutes and got nothing. A second signal cuts the active requests at once
    (their clients still get a 503 or a final SSE error event); a third exits without waiting for anything.
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self._loop: asyncio.AbstractEventLoop | None = None
            self._signals = 0

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # runs in the signal handler
            self._signals += 1
            if self._loop is None or self._signals > 2:  # before startup, or the third: stop now
                self.should_exit = self.force_exit = True
            elif self._signals == 2:
                app.state.qwerky.hurry = True
            else:
                self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self) -> None:
            try:
                await app.state.qwerky.drain()
            except Exception:  # noqa: BLE001 - never stay up because the drain failed
                log.exception("drain failed")
            finally:
                self.should_exit = True

    # timeout_graceful_shutdown: after the drain every response is written, this only bounds stragglers
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    return DrainingServer(config)


def serve_main(args: argparse.Namespace) -> int:
    """Entry point for `qwerky serve`: load, build the app, run uvicorn until SIGTERM / Ctrl-C, drain, exit."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = build_app_from_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and app.state.qwerky.api_key is None:
        log.warning("binding %s without --api-key: anyone who can reach it can use it", args.host)
    _uvicorn_server(app, args.host, args.port, args.log_level).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwerky.serve.app", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return serve_main(args)
    except QwerkyError as err:  # as the qwerky CLI does: one line, status 2
        print(f"qwerky: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
