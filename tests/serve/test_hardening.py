"""An exposed server: API key, chat template file, max_tokens bounds, strict types, drain on SIGTERM (issue 24)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import LiveServer, build_tokenizer, start_server

from qwerky.errors import QwerkyError

TOK = build_tokenizer()
KEY = "sk-qwerky-test"


def _client(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def guarded(student_dir: Path) -> Iterator[LiveServer]:
    """A server with an API key and a small generation limit."""
    with start_server(student_dir, "--api-key", KEY, "--max-tokens-limit", "8") as server:
        yield server


# ---- API key --------------------------------------------------------------------------------------------
def test_api_key_through_the_openai_client(guarded: LiveServer) -> None:
    for wrong in ("not-the-key", KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as exc:
            _client(guarded, wrong).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(guarded, wrong).models.list()
    good = _client(guarded, KEY)
    out = good.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 2
    chat = good.chat.completions.with_raw_response.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                          max_tokens=2)
    assert chat.status_code == 200 and chat.parse().choices[0].message.role == "assistant"
    assert [m.id for m in good.models.list().data] == ["tiny"]


def test_api_key_raw_http(guarded: LiveServer) -> None:
    url = guarded.url
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer x"}):
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert resp.status_code == 401, headers
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        assert "Authorization: Bearer" in resp.json()["error"]["message"]
    assert httpx.get(f"{url}/stats").status_code == 401
    assert httpx.get(f"{url}/v1/nothing").status_code == 401  # unknown routes do not reveal themselves
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # open: load balancers probe it
    ok = httpx.get(f"{url}/stats", headers={"Authorization": f"bearer {KEY}"})
    assert ok.status_code == 200 and "active" in ok.json()


def test_api_key_from_the_environment(student_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWERKY_API_KEY", "from-env")
    with start_server(student_dir) as server:
        with pytest.raises(openai.AuthenticationError):
            _client(server, KEY).models.list()
        assert _client(server, "from-env").models.list().data[0].id == "tiny"
    with pytest.raises(QwerkyError, match="empty"):
        start_server(student_dir, "--api-key", "")


# ---- chat template ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untemplated_dir(student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny student with its chat template removed (a base model's folder)."""
    path = tmp_path_factory.mktemp("serve") / "no_template"
    shutil.copytree(student_dir, path)
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_chat_without_a_template_is_400_naming_the_flag(untemplated_dir: Path) -> None:
    with start_server(untemplated_dir) as server:
        assert server.app.state.qwerky.chat_template is None
        with pytest.raises(openai.BadRequestError) as exc:
            _client(server, "x").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert exc.value.body["code"] == "no_chat_template" and "--chat-template FILE" in exc.value.body["message"]


def test_chat_template_file(untemplated_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with start_server(untemplated_dir, "--chat-template", str(template)) as server:
        out = _client(server, "x").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "the fox"}], max_tokens=3, temperature=0,
            extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == len(TOK.encode("USER: the fox\nASSISTANT:"))
    assert out.usage.completion_tokens == 3


def test_chat_template_file_errors_at_startup(student_dir: Path, tmp_path: Path, capsys) -> None:
    from qwerky.cli import main

    with pytest.raises(QwerkyError, match="no such file"):
        start_server(student_dir, "--chat-template", str(tmp_path / "missing.jinja"))
    assert main(["serve", str(student_dir), "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwerky: error: --chat-template") and "missing.jinja" in err and "\n" not in err
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(QwerkyError, match="not a valid Jinja template"):
        start_server(student_dir, "--chat-template", str(broken))


# ---- max_tokens ------------------------------------------------------------------------------------------
def test_max_tokens_over_the_server_limit(guarded: LiveServer) -> None:
    client = _client(guarded, KEY)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 8
    for n in (9, 10**30):
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(model="tiny", prompt="hi", max_tokens=n)
        body = exc.value.body
        assert body["param"] == "max_tokens" and body["code"] == "max_tokens_exceeded"
        assert "limit of 8" in body["message"] and "--max-tokens-limit" in body["message"]
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=100)
    assert exc.value.body["param"] == "max_completion_tokens"
    # no max_tokens: the chat default (256) is clamped to the limit, not refused
    out = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"


def test_max_tokens_bounded_by_a_teachers_context(live_teacher) -> None:
    """The teacher (max_position_embeddings 4096) cannot generate past its context."""
    ids = TOK.encode("The quick brown fox")
    client = openai.OpenAI(base_url=f"{live_teacher.url}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=ids, max_tokens=4096 - len(ids) + 1)
    body = exc.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    assert "4096" in body["message"] and f"at most {4096 - len(ids)}" in body["message"]
    assert live_teacher.app.state.qwerky.context == 4096


def test_cancelled_request_logs_no_unretrieved_exception(live_student) -> None:
    """A non-streaming client that times out used to leave '_GatheringFuture exception was never retrieved'."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.ERROR)
    logging.getLogger("asyncio").addHandler(handler)
    try:
        before = live_student.engine.stats()["cancelled"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live_student.url}/v1/completions", timeout=1.0,
                       json={"model": "tiny", "prompt": "fox", "max_tokens": 100_000, "ignore_eos": True})
        deadline = time.monotonic() + 30
        while live_student.engine.stats()["cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the handler returns after the engine has ended the request
        gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    assert live_student.engine.stats()["cancelled"] == before + 1
    assert not [r for r in records if "never retrieved" in r.getMessage()]


# ---- strict types ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, extra, param", [
    ("completions", {"stream": "yes"}, "stream"),
    ("completions", {"stream": 1}, "stream"),
    ("completions", {"echo": "true"}, "echo"),
    ("completions", {"ignore_eos": 0}, "ignore_eos"),
    ("completions", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("completions", {"max_tokens": "16"}, "max_tokens"),
    ("completions", {"max_tokens": 2.5}, "max_tokens"),
    ("completions", {"max_tokens": True}, "max_tokens"),
    ("completions", {"temperature": "0.5"}, "temperature"),
    ("completions", {"temperature": float("nan")}, "temperature"),
    ("completions", {"top_p": float("inf")}, "top_p"),
    ("completions", {"seed": 2**70}, "seed"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("chat/completions", {"stream": "yes"}, "stream"),
    ("chat/completions", {"logprobs": "true"}, "logprobs"),
    ("chat/completions", {"max_completion_tokens": "4"}, "max_completion_tokens"),
])
def test_strict_types(live_student, path: str, extra: dict, param: str) -> None:
    base = ({"prompt": "hi"} if path == "completions" else {"messages": [{"role": "user", "content": "hi"}]})
    body = json.dumps({"model": "tiny", "max_tokens": 2, **base, **extra})  # json.dumps writes NaN / Infinity
    resp = httpx.post(f"{live_student.url}/v1/{path}", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param.split(".")[-1] in err["message"]


def test_integers_are_valid_floats_and_seeds_fill_64_bits(live_student) -> None:
    for extra in ({"temperature": 1, "top_p": 1}, {"seed": 2**64 - 1}, {"seed": -1}):
        resp = httpx.post(f"{live_student.url}/v1/completions",
                          json={"model": "tiny", "prompt": "hi", "max_tokens": 2, **extra})
        assert resp.status_code == 200, (extra, resp.text)


# ---- drain -------------------------------------------------------------------------------------------------
def test_engine_drain_and_cut(student) -> None:
    """drain() ends the queue at once and refuses new work; cut() ends the active rows; nothing is left."""
    from qwerky.serve.engine import SamplingParams, ShuttingDown, StudentEngine

    params = SamplingParams(max_tokens=1_000_000, temperature=0, ignore_eos=True)
    with StudentEngine(student, TOK, max_concurrent=2, eos_token_ids=[]) as engine:
        reqs = [engine.submit(TOK.encode(f"fox {i}"), params) for i in range(5)]
        deadline = time.monotonic() + 60
        while engine.stats()["active"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.drain("stopping") == 3
        with pytest.raises(ShuttingDown):
            engine.submit(TOK.encode("late"), params)
        queued = [r for r in reqs if r.finished]
        assert len(queued) == 3 and all(r.finish_reason == "shutdown" and "not started" in r.error for r in queued)
        assert all(not r.output_ids for r in queued) and engine.pending() == 2
        engine.cut("stopping")
        for r in reqs:
            r.result(timeout=30)
        active = [r for r in reqs if r not in queued]
        assert all(r.finish_reason == "shutdown" and "cut after" in r.error and r.output_ids for r in active)
        assert engine.pending() == 0 and engine.stats()["shutdown"] == 5


@pytest.fixture(scope="module")
def student(student_dir: Path):
    from qwerky.surgery import load_student

    return load_student(student_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHUTDOWN_TIMEOUT = 5.0
SLACK = 20.0  # generous: a shared 2-core CI machine; the bound under test is the timeout, not speed


def _run_and_terminate(student_dir: Path, tmp_path: Path, n: int, active: int, shutdown_timeout: float,
                       second_signal: bool = False) -> tuple[list[dict], float, tuple, float]:
    """A `python -m qwerky.serve.app` subprocess, `n` never-ending requests (`active` of them decoding), SIGTERM.

    Returns every client's outcome, the time of the signal, what /health and a new request got while
    draining, and the time the process had exited (it must exit 0 and log no traceback).
    """
    port = _free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwerky.serve.app", str(student_dir), "--port", str(port), "--served-model-name",
             "tiny", "--max-concurrent", str(active), "--max-tokens-limit", "1000000", "--shutdown-timeout",
             str(shutdown_timeout), "--threads", "1"], stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        results, t_signal, during = asyncio.run(_drive_and_terminate(proc, url, n, active, second_signal))
        rc = proc.wait(timeout=shutdown_timeout + SLACK)
        t_exit = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text()
    assert rc == 0, log_text
    assert "Traceback" not in log_text and "never retrieved" not in log_text, log_text
    return results, t_signal, during, t_exit


def test_sigterm_with_32_requests_in_flight(student_dir: Path, tmp_path: Path) -> None:
    """The issue's case: 8 active + 24 queued requests, SIGTERM. Every client gets an answer (a complete one
    or an error) within the shutdown timeout, queued ones before active ones are cut, and the process exits 0.
    """
    results, t_signal, during, t_exit = _run_and_terminate(student_dir, tmp_path, 32, 8, SHUTDOWN_TIMEOUT)
    assert t_exit - t_signal <= SHUTDOWN_TIMEOUT + SLACK

    health, late = during
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"

    assert len(results) == 32
    outcomes = [r["outcome"] for r in results]
    assert outcomes.count("not started") == 24 and outcomes.count("cut") == 8, outcomes
    for r in results:
        assert r["at"] - t_signal <= SHUTDOWN_TIMEOUT + SLACK
        if r["stream"]:
            assert r["events"][-1] == "[DONE]", r  # a complete SSE stream even when cut
            err = json.loads(r["events"][-2])["error"]
            assert err["code"] == "server_shutting_down" and err["type"] == "server_error"
            if r["outcome"] == "cut":
                assert len(r["events"]) > 2  # text streamed before the cut
        else:
            assert r["status"] == 503 and r["body"]["error"]["code"] == "server_shutting_down"
    # the queue is answered at once, not when the active rows are cut
    assert max(r["at"] for r in results if r["outcome"] == "not started") < min(
        r["at"] for r in results if r["outcome"] == "cut")


def test_second_sigterm_cuts_at_once(student_dir: Path, tmp_path: Path) -> None:
    """A second signal does not wait out a long --shutdown-timeout: active requests are cut now, and their
    clients still get a 503 / a final SSE error event rather than a dropped connection."""
    long_timeout = 600.0
    results, t_signal, _, t_exit = _run_and_terminate(student_dir, tmp_path, 4, 2, long_timeout, second_signal=True)
    assert sorted(r["outcome"] for r in results) == ["cut", "cut", "not started", "not started"]
    assert t_exit - t_signal < long_timeout / 2


async def _drive_and_terminate(proc: subprocess.Popen, url: str, n: int, active: int,
                               second_signal: bool) -> tuple[list[dict], float, tuple]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=SHUTDOWN_TIMEOUT + SLACK + 60, limits=limits) as http:
        deadline = time.monotonic() + 120
        while True:  # wait for the server
            assert proc.poll() is None, "the server exited during startup"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)

        async def one(i: int) -> dict:
            stream = i % 2 == 0
            body = {"model": "tiny", "prompt": f"the fox {i}", "max_tokens": 1_000_000, "temperature": 0,
                    "ignore_eos": True, "stream": stream}
            if not stream:
                resp = await http.post("/v1/completions", json=body)
                out = {"stream": False, "status": resp.status_code, "body": resp.json(), "at": time.monotonic()}
                message = out["body"].get("error", {}).get("message", "")
            else:
                events: list[str] = []
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                out = {"stream": True, "status": resp.status_code, "events": events, "at": time.monotonic()}
                message = json.loads(events[-2]).get("error", {}).get("message", "") if len(events) > 1 else ""
            out["outcome"] = "not started" if "not started" in message else "cut" if "cut after" in message else "?"
            return out

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        deadline = time.monotonic() + 120
        while True:  # every request in: `active` decoding, the rest queued
            stats = (await http.get("/stats")).json()
            if stats["active"] == active and stats["waiting"] == n - active:
                break
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.05)
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while True:  # draining: the health probe says so, and a new request is refused
            health = await http.get("/health")
            if health.status_code == 503:
                break
            assert time.monotonic() - t_signal < SHUTDOWN_TIMEOUT, "no drain after SIGTERM"
            await asyncio.sleep(0.02)
        late = await http.post("/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2})
        if second_signal:
            proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    return list(results), t_signal, (health, late)


def test_new_flags_and_their_defaults() -> None:
    import argparse

    from qwerky.serve import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["d"])
    assert (args.api_key, args.chat_template, args.max_tokens_limit, args.shutdown_timeout) == (None, None, 4096, 30)
    args = parser.parse_args(["d", "--api-key", "k", "--chat-template", "t.jinja", "--max-tokens-limit", "9",
                              "--shutdown-timeout", "2.5"])
    assert (args.api_key, args.chat_template, args.max_tokens_limit, args.shutdown_timeout) == ("k", "t.jinja", 9, 2.5)
