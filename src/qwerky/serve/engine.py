"""Continuous-batching generation engines: the student (fixed-size states) and a teacher baseline.

One background thread owns the model (the student's forward shares a per-model context, so two
threads must never run it at once). Between decode steps it admits waiting requests (up to
`max_concurrent` active rows), prefills each new prompt alone (B=1, the chunked parallel form, reusing
the prefix state cache), drops finished or cancelled rows, and then runs one T=1 decode step for all
active rows together. For the student the active rows live in one batched QwerkyState that is
re-stacked / re-selected only when membership changes, so memory per sequence is the state size
whatever the context length. The teacher engine keeps one KV cache per request and steps the rows
one by one (the baseline the benchmark compares against).

Requests stream text deltas to a thread-safe queue (sync iteration) or an asyncio queue (server).
For a graceful stop, `drain()` ends the waiting requests at once and refuses new ones, and `cut()` ends
the active rows at the next step boundary (finish_reason "shutdown" for both).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .prefix_cache import PrefixStateCache

log = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI names). temperature 0 = greedy; top_k 0 = off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: chosen token's log-prob plus the top k

    def validate(self) -> None:
        """Raise ValueError(param, message) on settings the engine cannot honour."""
        if self.max_tokens < 0:
            raise InvalidParam("max_tokens", "max_tokens must be >= 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParam("temperature", "temperature must be a finite number >= 0")
        if not (0 < self.top_p <= 1):
            raise InvalidParam("top_p", "top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidParam("top_k", "top_k must be >= 0 (0 disables it)")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidParam("logprobs", "logprobs must be between 0 and 20")
        if any(not s for s in self.stop):
            raise InvalidParam("stop", "stop strings must be non-empty")


class InvalidParam(ValueError):
    """A request setting is invalid; `param` names it for the OpenAI-style error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class StreamEvent:
    """One streamed piece: new text (stop strings and incomplete characters held back) and its tokens."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | "shutdown"
    error: str | None = None


class GenerationRequest:
    """A submitted request: its state of progress and the stream of events the engine pushes."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = f"req-{next(_ids)}"
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(int(params.seed))
        else:
            self.generator.seed()
        self.output_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[dict[int, float]] = []
        self.text = ""  # generated text so far (stop string removed once found)
        self.emitted = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.prefill_tokens = 0  # prompt tokens actually run through the model
        self.cached_tokens = 0  # prompt tokens covered by the prefix state cache
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self._loop = loop
        self._aqueue: asyncio.Queue[StreamEvent] | None = asyncio.Queue() if loop is not None else None
        self._queue: queue.Queue[StreamEvent] = queue.Queue()
        self._pending_tokens: list[int] = []
        self._pending_logprobs: list[float] = []
        self._pending_top: list[dict[int, float]] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _push(self, event: StreamEvent) -> None:
        if self._aqueue is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
            except RuntimeError:  # the server's loop is gone (shutdown): nobody is listening
                pass
        else:
            self._queue.put(event)

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Blocking iterator over the stream (requests submitted without an event loop)."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    async def aevents(self) -> AsyncIterator[StreamEvent]:
        """Async iterator over the stream (requests submitted with `loop=`)."""
        assert self._aqueue is not None, "submit(..., loop=asyncio.get_running_loop()) to stream asynchronously"
        while True:
            event = await self._aqueue.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> str:
        """Wait for the end and return the generated text."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.id} did not finish in {timeout} s")
        return self.text


class _EngineBase:
    """Queueing, admission, sampling, stop strings and streaming; subclasses own the model state."""

    kind = "base"

    def __init__(self, model: Any, tokenizer: Any, max_concurrent: int = 16, max_waiting: int = 4096,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_concurrent = int(max_concurrent)
        self.max_waiting = int(max_waiting)
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer))
        self.device = next(model.parameters()).device
        self._cv = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._active: list[GenerationRequest] = []
        self._stopping = False
        self._draining = False  # drain(): no new requests; the active ones run on until cut()
        self._cut_reason: str | None = None  # cut(): end every active row at the next step boundary
        self._thread: threading.Thread | None = None
        self.counters = {"submitted": 0, "completed": 0, "cancelled": 0, "failed": 0, "shutdown": 0,
                         "generated_tokens": 0,
                         "prefill_tokens": 0, "cached_prompt_tokens": 0, "decode_steps": 0, "rows_stepped": 0}
        self.state_bytes = 0
        self.peak_state_bytes = 0
        self.peak_state_bytes_per_seq = 0
        self.peak_active = 0

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> _EngineBase:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"qwerky-{self.kind}-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or running end with finish_reason "cancelled"."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self, reason: str = "the server is shutting down") -> int:
        """Stop admitting: later submits raise ShuttingDown and every waiting request ends now.

        Waiting requests finish with finish_reason "shutdown" (and `reason` as their error) so that their
        clients get an answer at once instead of waiting for rows that will never free up; the active rows
        keep decoding until they finish or `cut` is called. Returns how many waiting requests were ended.
        """
        with self._cv:
            self._draining = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for req in waiting:
            self._finish(req, "shutdown", f"{reason}; this request was not started, retry it elsewhere")
        return len(waiting)

    def cut(self, reason: str = "the server is shutting down") -> None:
        """End every active row at the next step boundary with finish_reason "shutdown" (after `drain`)."""
        with self._cv:
            self._cut_reason = reason
            self._cv.notify_all()

    def pending(self) -> int:
        """Requests submitted and not yet finished (waiting or active)."""
        with self._cv:
            return len(self._waiting) + sum(1 for r in list(self._active) if not r.finished)

    def __enter__(self) -> _EngineBase:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- public API ------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> GenerationRequest:
        """Queue a request; it starts when a row is free. Raises InvalidParam / QueueFull."""
        params = params or SamplingParams()
        params.validate()
        if not prompt_ids:
            raise InvalidParam("prompt", "the prompt is empty")
        req = GenerationRequest(prompt_ids, params, loop)
        with self._cv:
            if self._stopping or self._draining:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(req)
            self.counters["submitted"] += 1
            self._cv.notify_all()
        if self._thread is None:
            self.start()
        return req

    def cancel(self, req: GenerationRequest) -> None:
        """Stop a request (client gone); its row is freed before the next decode step."""
        if req.finished:
            return
        req.cancelled.set()
        with self._cv:
            waiting = req in self._waiting
            if waiting:
                self._waiting.remove(req)
            self._cv.notify_all()
        if waiting:
            self._finish(req, "cancelled")

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 timeout: float | None = None) -> GenerationRequest:
        """Submit and wait (convenience for tests and scripts)."""
        req = self.submit(prompt_ids, params)
        req.result(timeout)
        return req

    def _enqueue(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the engine is shut down")
            self._jobs.append((fn, fut))
            self._cv.notify_all()
        if self._thread is None:
            self.start()
        return fut

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run fn on the engine thread between steps (the only thread allowed to touch the model)."""
        return self._enqueue(fn).result(timeout)

    async def acall(self, fn: Callable[[], Any]) -> Any:
        """`call` for async callers."""
        return await asyncio.wrap_future(self._enqueue(fn))

    def prompt_logprobs(self, token_ids: Sequence[int], top: int = 0, segment: int = 1024
                        ) -> list[float | None] | tuple[list[float | None], list[dict[int, float] | None]]:
        """Log-prob of each prompt token given the previous ones (None for the first).

        With top > 0 also returns, per position, the `top` most likely token ids and their log-probs.
        Runs on the engine thread; long prompts go through the model in segments carried by the
        state/KV cache so the [T, vocab] logits never exist all at once.
        """
        ids = [int(t) for t in token_ids]
        result = self.call(lambda: self._prompt_logprobs(ids, top, segment))
        return result if top > 0 else result[0]

    def _prompt_logprobs(self, ids: list[int], top: int, segment: int
                         ) -> tuple[list[float | None], list[dict[int, float] | None]]:
        lps: list[float | None] = [None]
        tops: list[dict[int, float] | None] = [None]
        if not ids:
            return [], []
        cache = self._new_cache()
        prev: torch.Tensor | None = None  # log-probs predicted by the last token of the previous segment
        with torch.inference_mode():
            for start in range(0, len(ids), segment):
                chunk = ids[start:start + segment]
                x = torch.tensor([chunk], dtype=torch.long, device=self.device)
                logits = self.model(x, past_key_values=cache, use_cache=True).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                preds = logp[:-1] if prev is None else torch.cat([prev[None], logp[:-1]])
                targets = torch.tensor(chunk if prev is not None else chunk[1:], device=preds.device)
                chosen = preds.gather(1, targets[:, None])[:, 0]
                lps.extend(float(v) for v in chosen.tolist())
                if top > 0:
                    vals, idx = preds.topk(min(top, preds.shape[-1]), dim=-1)
                    tops.extend({int(i): float(v) for i, v in zip(ir, vr)}
                                for ir, vr in zip(idx.tolist(), vals.tolist()))
                prev = logp[-1]
        return lps, tops

    def stats(self) -> dict[str, Any]:
        with self._cv:
            waiting = len(self._waiting)
            active = sum(1 for r in list(self._active) if not r.finished)  # rows already done leave next step
        out: dict[str, Any] = {"kind": self.kind, "waiting": waiting, "active": active,
                               "max_concurrent": self.max_concurrent, **self.counters,
                               "state_bytes": self.state_bytes, "peak_state_bytes": self.peak_state_bytes,
                               "state_bytes_per_seq": self.state_bytes // active if active else 0,
                               "peak_state_bytes_per_seq": self.peak_state_bytes_per_seq,
                               "peak_active": self.peak_active}
        return out

    # ---- subclass hooks ----------------------------------------------------------------------------
    def _new_cache(self) -> Any:
        raise NotImplementedError

    def _prefill(self, req: GenerationRequest) -> tuple[Any, torch.Tensor]:
        """Run the prompt; return (the request's cache/state, logits [V] for the next token)."""
        raise NotImplementedError

    def _join(self, caches: list[Any]) -> None:
        """Append new rows (in order) to the running batch."""
        raise NotImplementedError

    def _leave(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch (indices into the current rows)."""
        raise NotImplementedError

    def _decode(self, tokens: list[int]) -> torch.Tensor:
        """One T=1 step for all rows; returns logits [rows, V]."""
        raise NotImplementedError

    def _memory(self) -> int:
        """Bytes of state/KV cache held for the active rows."""
        raise NotImplementedError

    # ---- loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._jobs or self._active):
                        self._cv.wait()
                    if self._stopping:
                        break
                    cut = self._cut_reason
                    jobs = list(self._jobs)
                    self._jobs.clear()
                    newcomers = []
                    while self._waiting and len(self._active) + len(newcomers) < self.max_concurrent:
                        newcomers.append(self._waiting.popleft())
                for fn, fut in jobs:
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:  # noqa: BLE001 - handed to the caller
                            fut.set_exception(exc)
                self._admit(newcomers)
                if cut is not None:
                    for req in self._active:
                        if not req.finished:
                            self._finish(req, "shutdown",
                                         f"{cut}; generation was cut after {len(req.output_ids)} tokens")
                self._drop_finished()
                if self._active:
                    self._step()
        self._abort_all()

    def _admit(self, newcomers: list[GenerationRequest]) -> None:
        joined: list[GenerationRequest] = []
        caches: list[Any] = []
        for req in newcomers:
            if req.cancelled.is_set():
                self._finish(req, "cancelled")
                continue
            if req.params.max_tokens == 0:
                self._finish(req, "length")
                continue
            try:
                cache, logits = self._prefill(req)
                self.counters["prefill_tokens"] += req.prefill_tokens
                self.counters["cached_prompt_tokens"] += req.cached_tokens
                self._accept(req, self._sample(req, logits[None])[0], logits)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the engine
                log.exception("prefill failed for %s", req.id)
                self._fail(req, exc)
                continue
            if not req.finished:
                joined.append(req)
                caches.append(cache)
        if joined:
            self._join(caches)
            self._active.extend(joined)
            self.peak_active = max(self.peak_active, len(self._active))

    def _drop_finished(self) -> None:
        for req in self._active:
            if req.cancelled.is_set() and not req.finished:
                self._finish(req, "cancelled")
        keep = [i for i, r in enumerate(self._active) if not r.finished]
        if len(keep) != len(self._active):
            self._leave(keep)
            self._active = [self._active[i] for i in keep]
            self.state_bytes = self._memory()

    def _step(self) -> None:
        rows = self._active
        try:
            logits = self._decode([r.output_ids[-1] for r in rows])
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("decode step failed")
            for r in rows:
                self._fail(r, exc)
            self._drop_finished()
            return
        self.counters["decode_steps"] += 1
        self.counters["rows_stepped"] += len(rows)
        mem = self._memory()
        self.state_bytes = mem
        self.peak_state_bytes = max(self.peak_state_bytes, mem)
        self.peak_state_bytes_per_seq = max(self.peak_state_bytes_per_seq, mem // len(rows))
        chosen = self._sample_rows(rows, logits)
        for i, r in enumerate(rows):
            self._accept(r, chosen[i], logits[i])
        self._drop_finished()

    # ---- sampling --------------------------------------------------------------------------------
    def _sample_rows(self, rows: list[GenerationRequest], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, r in enumerate(rows):
            out.append(greedy[i] if _is_greedy(r.params) else self._sample(r, logits[i:i + 1])[0])
        return out

    @staticmethod
    def _sample(req: GenerationRequest, logits: torch.Tensor) -> list[int]:
        """Sample from logits [1, V] with the request's temperature, top-k, top-p and generator."""
        p = req.params
        logits = logits.float()
        if _is_greedy(p):
            return logits.argmax(dim=-1).tolist()
        scores = logits / p.temperature
        if p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = scores.topk(p.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            remove = cum - sorted_scores.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        probs = scores.softmax(-1)
        return torch.multinomial(probs.cpu(), 1, generator=req.generator)[:, 0].tolist()

    # ---- output ----------------------------------------------------------------------------------
    def _accept(self, req: GenerationRequest, token: int, logits: torch.Tensor) -> None:
        """Record one generated token; detect eos / stop strings / length; stream what is safe to show."""
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        p = req.params
        if token in self.eos_token_ids and not p.ignore_eos:
            self._finish(req, "stop")
            return
        req.output_ids.append(token)
        req._pending_tokens.append(token)
        self.counters["generated_tokens"] += 1
        if p.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            req.output_logprobs.append(float(logp[token]))
            req._pending_logprobs.append(float(logp[token]))
            top: dict[int, float] = {}
            if p.logprobs > 0:
                vals, idx = logp.topk(p.logprobs)
                top = {int(i): float(v) for i, v in zip(idx.tolist(), vals.tolist())}
            req.output_top_logprobs.append(top)
            req._pending_top.append(top)
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        if p.stop:
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                req.text = text[:min(hits)]
                self._finish(req, "stop")
                return
        req.text = text
        if len(req.output_ids) >= p.max_tokens:
            self._finish(req, "length")
            return
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe = len(text.rstrip("\ufffd"))
        for s in p.stop:  # hold back a tail that may be the start of a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        if safe > req.emitted or req._pending_tokens:
            self._emit(req, text[req.emitted:max(safe, req.emitted)])
            req.emitted = max(safe, req.emitted)

    def _emit(self, req: GenerationRequest, text: str, finish_reason: str | None = None,
              error: str | None = None) -> None:
        event = StreamEvent(text, req._pending_tokens, req._pending_logprobs, req._pending_top, finish_reason, error)
        req._pending_tokens, req._pending_logprobs, req._pending_top = [], [], []
        req._push(event)

    def _finish(self, req: GenerationRequest, reason: str, error: str | None = None) -> None:
        if req.finished:
            return
        req.finish_reason = reason
        req.error = error
        req.finished_at = time.monotonic()
        rest = req.text[req.emitted:] if reason != "cancelled" else ""
        req.emitted = len(req.text)
        # count it before the final event goes out: a client that has its answer must find it counted
        key = {"cancelled": "cancelled", "error": "failed", "shutdown": "shutdown"}.get(reason, "completed")
        self.counters[key] += 1
        self._emit(req, rest, reason, error)
        req.done.set()

    def _fail(self, req: GenerationRequest, exc: BaseException) -> None:
        self._finish(req, "error", f"{type(exc).__name__}: {exc}")

    def _abort_all(self) -> None:
        with self._cv:
            pending = list(self._waiting) + list(self._active)
            self._waiting.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
        for req in pending:
            self._finish(req, "cancelled")
        for _, fut in jobs:
            fut.cancel()
        if self._active:
            self._leave([])
            self._active = []


class StudentEngine(_EngineBase):
    """Continuous batching over QwerkyState rows, with the prefix state cache."""

    kind = "student"

    def __init__(self, model: Any, tokenizer: Any, max_concurrent: int = 16, prefix_cache_mb: float = 256,
                 prefix_block_tokens: int = 64, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, max_concurrent, **kwargs)
        self.prefix_cache = PrefixStateCache(int(prefix_cache_mb * 2**20), prefix_block_tokens)
        self._state: Any = None  # one QwerkyState holding every active row

    def _new_cache(self) -> Any:
        return self.model.init_state(1, self.device)

    def _forward(self, ids: Sequence[int], state: Any) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.model(x, past_key_values=state, use_cache=True, logits_to_keep=1).logits[0, -1]

    def _prefill(self, req: GenerationRequest) -> tuple[Any, torch.Tensor]:
        """Prefill from the longest cached block-prefix; save the state at each later block boundary.

        The prompt is always cut at the same block boundaries (cold or warm), so a warm start computes
        exactly what the cold run computed and greedy outputs match token for token.
        """
        ids = req.prompt_ids
        cache = self.prefix_cache
        if not cache.enabled:
            state = self._new_cache()
            req.prefill_tokens = len(ids)
            return state, self._forward(ids, state)
        bt = cache.block_tokens
        limit = ((len(ids) - 1) // bt) * bt  # the last token always runs (its logits start decoding)
        keys = cache.block_keys(ids[:limit])
        start, state = cache.lookup(keys)
        if state is None:
            state = self._new_cache()
        req.cached_tokens = start
        req.prefill_tokens = len(ids) - start
        for end in range(start + bt, limit + 1, bt):
            self._forward(ids[end - bt:end], state)
            cache.insert(keys[end // bt - 1], state.clone())
        return state, self._forward(ids[max(start, limit):], state)

    def _join(self, caches: list[Any]) -> None:
        from qwerky.modeling.state_cache import QwerkyState

        parts = ([self._state] if self._state is not None else []) + caches
        self._state = parts[0] if len(parts) == 1 else QwerkyState.stack(parts)

    def _leave(self, keep: list[int]) -> None:
        if not keep:
            self._state = None
        elif self._state is not None and len(keep) != self._state.batch_size:
            self._state = self._state.select(keep)

    def _decode(self, tokens: list[int]) -> torch.Tensor:
        x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        return self.model(x, past_key_values=self._state, use_cache=True).logits[:, -1]

    def _memory(self) -> int:
        return int(self._state.nbytes()) if self._state is not None else 0

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["prefix_cache"] = self.prefix_cache.stats()
        return out


class TeacherEngine(_EngineBase):
    """Baseline for a plain HF model: one KV cache per request (as `generate` keeps), rows stepped one by one.

    Same queueing, sampling and streaming as the student engine, so the benchmark compares like with like.
    """

    kind = "teacher"

    def __init__(self, model: Any, tokenizer: Any, max_concurrent: int = 16, **kwargs: Any) -> None:
        kwargs.pop("prefix_cache_mb", None)
        kwargs.pop("prefix_block_tokens", None)
        super().__init__(model, tokenizer, max_concurrent, **kwargs)
        self._caches: list[Any] = []

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _prefill(self, req: GenerationRequest) -> tuple[Any, torch.Tensor]:
        cache = self._new_cache()
        x = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        logits = self.model(x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        req.prefill_tokens = len(req.prompt_ids)
        return cache, logits

    def _join(self, caches: list[Any]) -> None:
        self._caches.extend(caches)

    def _leave(self, keep: list[int]) -> None:
        self._caches = [self._caches[i] for i in keep]

    def _decode(self, tokens: list[int]) -> torch.Tensor:
        rows = []
        for tok, cache in zip(tokens, self._caches):
            x = torch.tensor([[tok]], dtype=torch.long, device=self.device)
            rows.append(self.model(x, past_key_values=cache, use_cache=True).logits[0, -1])
        return torch.stack(rows)

    def _memory(self) -> int:
        return sum(kv_cache_bytes(c) for c in self._caches)


class QueueFull(RuntimeError):
    """More requests waiting than `max_waiting`."""


class ShuttingDown(RuntimeError):
    """The engine is draining or stopped and admits no new request (the server answers 503)."""


def _is_greedy(p: SamplingParams) -> bool:
    """temperature 0 (or so small that logits / temperature would overflow) or top_k 1 mean argmax."""
    return p.temperature < 1e-5 or p.top_k == 1


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers KV cache (keys + values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def is_student(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "qwerky" and hasattr(model, "init_state")


def build_engine(model: Any, tokenizer: Any, **kwargs: Any) -> _EngineBase:
    """A StudentEngine for a converted model, else a TeacherEngine."""
    cls = StudentEngine if is_student(model) else TeacherEngine
    return cls(model, tokenizer, **kwargs)


Engine = _EngineBase

__all__ = ["Engine", "GenerationRequest", "InvalidParam", "QueueFull", "SamplingParams", "ShuttingDown",
           "StreamEvent", "StudentEngine", "TeacherEngine", "build_engine", "is_student", "kv_cache_bytes"]
