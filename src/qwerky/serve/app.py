"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over a generation engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /stats.
A converted (qwerky) folder is served by the continuous-batching StudentEngine; any other HF causal LM
folder by the TeacherEngine (one KV cache per request), so the two can be benchmarked the same way.
Every invalid request gets a 4xx with an OpenAI-style body {"error": {message, type, param, code}};
a client that disconnects (streaming or not) has its request cancelled and its row freed.

Run: `python -m qwerky.serve.app DIR [--port 8000]` or `qwerky serve DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenerationRequest, InvalidParam, QueueFull, SamplingParams, build_engine, is_student

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
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (user, penalties, ...)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # extension (vLLM-style); -1 or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False  # extension
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- the app -----------------------------------------------------------------------------------------
class ServerState:
    """What the handlers share: engine, tokenizer, the served name and limits."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, max_prompt_tokens: int,
                 default_max_tokens: int = 16) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.vocab_size = len(tokenizer)
        model_vocab = getattr(getattr(engine.model, "config", None), "vocab_size", None)
        if model_vocab:
            self.vocab_size = max(self.vocab_size, int(model_vocab))


def create_app(engine: Engine, tokenizer: Any, model_name: str = "qwerky", max_prompt_tokens: int = 32768) -> FastAPI:
    """The FastAPI app; the engine is started with the app and shut down with it."""
    st = ServerState(engine, tokenizer, model_name, max_prompt_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="qwerky", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.qwerky = st

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

    @app.get("/health")
    async def health() -> dict[str, Any]:
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
        max_tokens = st.default_max_tokens if body.max_tokens is None else body.max_tokens
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
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"model {st.model_name!r} has no chat template; use /v1/completions",
                           "messages", "no_chat_template")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's input
            raise APIError(400, f"chat template failed: {exc}", "messages", "invalid_value") from exc
        ids = tokenizer.encode(text, add_special_tokens=False)
        _check_prompt(st, ids)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = st.default_max_tokens * 16 if max_tokens is None else max_tokens
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
    return bool(body.stream_options and body.stream_options.get("include_usage"))


def _check_prompt(st: ServerState, ids: list[int]) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
    if len(ids) > st.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {st.max_prompt_tokens}",
                       "prompt", "context_length_exceeded")


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


async def _wait(request: Request, st: ServerState, reqs: list[GenerationRequest]) -> None:
    """Wait for every request, cancelling them all if the client goes away first."""
    async def drain(r: GenerationRequest) -> None:
        async for _ in r.aevents():
            pass

    task = asyncio.ensure_future(asyncio.gather(*(drain(r) for r in reqs)))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                for r in reqs:
                    st.engine.cancel(r)
                raise APIError(499, "client disconnected", None, "client_closed")
        task.result()
    finally:
        if not task.done():
            task.cancel()
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
                    if ev.finish_reason == "error":
                        err = {"error": {"message": ev.error, "type": "server_error", "param": None,
                                         "code": "generation_failed"}}
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


def build_app_from_args(args: argparse.Namespace) -> FastAPI:
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    kwargs: dict[str, Any] = {"max_concurrent": args.max_concurrent}
    if is_student(model):
        kwargs.update(prefix_cache_mb=args.prefix_cache_mb, prefix_block_tokens=args.prefix_block_tokens)
    engine = build_engine(model, tokenizer, **kwargs)
    name = args.served_model_name or Path(args.model).resolve().name
    return create_app(engine, tokenizer, name, args.max_prompt_tokens)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `qwerky serve` (shared with `python -m qwerky.serve.app`)."""
    parser.add_argument("model", help="a converted qwerky folder (continuous batching) or an HF teacher folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default loopback; the server has no authentication)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-concurrent", type=int, default=16, help="active sequences; more requests queue")
    parser.add_argument("--max-prompt-tokens", type=int, default=32768, help="longer prompts get a 400")
    parser.add_argument("--prefix-cache-mb", type=float, default=256, help="prefix state cache bound (0 = off)")
    parser.add_argument("--prefix-block-tokens", type=int, default=64, help="prefix cache granularity in tokens")
    parser.add_argument("--served-model-name", default=None, help="the `model` clients send (default: folder name)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-level", default="warning")


def serve_main(args: argparse.Namespace) -> int:
    """Entry point for `qwerky serve`: load, build the app, run uvicorn until interrupted."""
    import uvicorn

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the server has no authentication", args.host)
    app = build_app_from_args(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwerky.serve.app", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
