"""Live OpenAI-compatible server on a loopback port, driven with the official `openai` client and httpx."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest
from serve_helpers import build_tokenizer

TOK = build_tokenizer()
PROMPT = "The quick brown fox jumps over the lazy dog."


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(f"{server.url}/stats").json()
        if (stats["active"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_health_and_models(live_student) -> None:
    assert httpx.get(f"{live_student.url}/health").json()["status"] == "ok"
    models = _client(live_student).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion(live_student) -> None:
    out = _client(live_student).completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and isinstance(choice.text, str)
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == len(TOK.encode(PROMPT))
    ids = live_student.engine.generate(TOK.encode(PROMPT), _greedy(8)).output_ids
    assert choice.text == TOK.decode(ids)


def _greedy(n: int):
    from qwerky.serve.engine import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_completion_token_prompt_seed_and_stop(live_student) -> None:
    client = _client(live_student)
    ids = TOK.encode(PROMPT)
    kw = dict(model="tiny", prompt=ids, max_tokens=12, temperature=0.9, top_p=0.95, seed=11,
              extra_body={"top_k": 40, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    full = a.choices[0].text
    if len(full) >= 4:
        stop = full[2:4]
        c = client.completions.create(**kw, stop=[stop])
        assert c.choices[0].finish_reason == "stop" and c.choices[0].text == full[:full.find(stop)]


def test_streamed_chat_completion(live_student) -> None:
    client = _client(live_student)
    messages = [{"role": "user", "content": "What is the pass key?"}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].message.content == text
    assert plain.choices[0].message.role == "assistant"


def test_raw_sse_format(live_student) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live_student.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_echo_logprobs_for_loglikelihood(live_student) -> None:
    """What lm-eval's local-completions sends: token prompt, echo, logprobs=1, max_tokens 1 (or 0)."""
    client = _client(live_student)
    ids = TOK.encode(PROMPT)
    expected = live_student.engine.prompt_logprobs(ids)
    for max_tokens in (0, 1):
        out = client.completions.create(model="tiny", prompt=[ids], max_tokens=max_tokens, temperature=0,
                                        logprobs=1, echo=True)
        lp = out.choices[0].logprobs
        n = len(ids) + max_tokens
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=1e-4)
        assert all(len(t) == 1 and max(t.values()) >= v - 1e-5
                   for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        assert out.choices[0].text.startswith(TOK.decode(ids))
        assert lp.text_offset == sorted(lp.text_offset)
    # lm-eval's own parser on the raw response
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    raw = httpx.post(f"{live_student.url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": [ids, ids[:5]], "max_tokens": 1, "temperature": 0, "logprobs": 1,
        "echo": True, "seed": 1234}).json()
    parsed = LocalCompletionsAPI.parse_logprobs(raw, ctxlens=[3, 2])
    assert len(parsed) == 2 and parsed[0][0] == pytest.approx(sum(expected[3:]), abs=1e-3)
    assert all(isinstance(g, bool) and math.isfinite(s) for s, g in parsed)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": [[]]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [5, 100000]}, 400, "prompt"),
    ({"model": "tiny", "prompt": list(range(3, 310))}, 400, "prompt"),  # over --max-prompt-tokens 300
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
])
def test_bad_requests_get_openai_errors(live_student, body, status, param) -> None:
    resp = httpx.post(f"{live_student.url}/v1/completions", json=body, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_bad_requests_through_the_openai_client(live_student) -> None:
    client = _client(live_student)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="hi", max_tokens=-1)
    assert exc.value.body["param"] == "max_tokens"  # the client unwraps {"error": ...}
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4", prompt="hi")
    assert exc.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_is_400(live_student, raw: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        resp = httpx.post(f"{live_student.url}{path}", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_bad_chat_requests(live_student) -> None:
    url = f"{live_student.url}/v1/chat/completions"
    assert httpx.post(url, json={"model": "tiny", "messages": []}).status_code == 400
    assert httpx.post(url, json={"model": "tiny", "messages": [{"content": "no role"}]}).status_code == 400
    resp = httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"
    assert httpx.get(f"{live_student.url}/v1/nothing").status_code == 404
    assert "error" in httpx.get(f"{live_student.url}/v1/nothing").json()


def test_client_disconnect_frees_the_slot(live_student) -> None:
    before = httpx.get(f"{live_student.url}/stats").json()["cancelled"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 100_000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{live_student.url}/v1/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # got a first chunk; now hang up
    stats = _wait_idle(live_student)
    assert stats["active"] == 0 and stats["cancelled"] == before + 1
    # a non-streaming request whose client times out is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_student.url}/v1/completions", timeout=1.0,
                   json={**body, "stream": False})
    stats = _wait_idle(live_student)
    assert stats["active"] == 0 and stats["cancelled"] == before + 2


def test_queueing_beyond_max_concurrent(student_dir) -> None:
    from serve_helpers import start_server

    with start_server(student_dir, "--max-concurrent", "2") as server:
        async def run() -> list[dict]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                reqs = [http.post("/v1/completions", json={"model": "tiny", "prompt": f"{PROMPT} {i}",
                                                           "max_tokens": 6, "temperature": 0, "ignore_eos": True})
                        for i in range(6)]
                return [r.json() for r in await asyncio.gather(*reqs)]

        results = asyncio.run(run())
        stats = server.engine.stats()
    assert all(r["usage"]["completion_tokens"] == 6 for r in results)
    assert stats["peak_active"] == 2 and stats["completed"] >= 6


def test_many_concurrent_http_requests(live_student) -> None:
    """96 clients at once against max_concurrent 64 (the 256-request load test drives the engine directly)."""
    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=96, max_keepalive_connections=96)
        async with httpx.AsyncClient(base_url=live_student.url, timeout=300, limits=limits) as http:
            reqs = [http.post("/v1/completions", json={"model": "tiny", "prompt": f"fox {i}", "max_tokens": 4,
                                                       "temperature": 0.7, "seed": i, "ignore_eos": True})
                    for i in range(96)]
            out = await asyncio.gather(*reqs)
            return [r.json()["usage"]["completion_tokens"] for r in out if r.status_code == 200]

    assert asyncio.run(run()) == [4] * 96
    assert live_student.engine.stats()["peak_active"] == 64


def test_teacher_server(live_teacher, hf_teacher_dir) -> None:
    """A plain HF folder is served by the per-request KV-cache engine, same API."""
    client = _client(live_teacher)
    assert httpx.get(f"{live_teacher.url}/health").json()["engine"] == "teacher"
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(hf_teacher_dir).eval()
    ids = TOK.encode(PROMPT)
    ref = teacher.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, len(ids):].tolist()
    assert out.choices[0].text == TOK.decode(ref)
    echo = client.completions.create(model="tiny", prompt=[ids], max_tokens=0, logprobs=1, echo=True)
    assert len(echo.choices[0].logprobs.token_logprobs) == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
