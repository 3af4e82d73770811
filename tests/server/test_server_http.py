"""HTTP-level behaviour under a real uvicorn server, with the fake engine: the official openai
client's view of errors and auth, and client disconnects cancelling generation."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from coe.server.app import create_app
from coe.server.auth import ApiKeys
from live import LiveServer

MSG = [{"role": "user", "content": "select names from the users table"}]


@pytest.fixture
def live(fake_setup):
    cfg, engine, pipeline = fake_setup
    app = create_app(cfg, pipeline=pipeline, api_keys=ApiKeys(["k-user"], "k-admin"))
    with LiveServer(app) as s:
        s.engine = engine
        s.app = app
        yield s


def test_openai_client_sees_coe_field_errors_and_auth(live):
    c = openai.OpenAI(base_url=live.base_url, api_key="k-user", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert raw.headers["x-coe-expert"] == "sql"
    r = raw.parse()
    assert r.model_extra["coe"]["source"] == "router" and r.choices[0].message.content.startswith("sql heard")
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="sqll", messages=MSG)
    assert "did you mean 'sql'" in str(e.value).lower()
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="auto", messages=MSG, n=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.base_url, api_key="wrong", max_retries=0).models.list()
    live.engine.max_running = 0
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="auto", messages=MSG)
    assert e.value.response.headers["retry-after"] == "2"
    live.engine.max_running = 64


def wait_until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_client_disconnect_mid_stream_cancels_generation(live):
    live.engine.delay_s = 0.05
    words = " ".join(["w"] * 30)
    with httpx.Client(timeout=10, headers={"Authorization": "Bearer k-user"}) as h:
        with h.stream("POST", live.base_url + "/chat/completions", json={
            "model": "json", "stream": True, "max_tokens": 30,
            "messages": [{"role": "user", "content": words}]}) as resp:
            assert resp.status_code == 200, resp.read()
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: ") for line in got)
            assert live.engine.running == 1
    assert wait_until(lambda: live.engine.running == 0), "the slot was not freed after the disconnect"
    assert live.engine.cancelled == 1 and live.engine.finished == 0
    metrics = httpx.get(live.url + "/metrics").text
    assert 'status="499"' in metrics and "coe_requests_in_flight 0.0" in metrics


def test_client_disconnect_non_streaming_cancels_generation(live):
    live.engine.delay_s = 0.05
    words = " ".join(["w"] * 30)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.base_url + "/chat/completions", timeout=0.4, headers={"Authorization": "Bearer k-user"},
                   json={"model": "json", "max_tokens": 30, "messages": [{"role": "user", "content": words}]})
    assert wait_until(lambda: live.engine.running == 0 and live.engine.cancelled == 1)
    assert live.engine.finished == 0


def test_concurrent_requests_are_served_concurrently(live):
    live.engine.delay_s = 0.02
    c = openai.AsyncOpenAI(base_url=live.base_url, api_key="k-user", max_retries=0)
    prompts = [("sql", "a b c d e"), ("json", "f g h i"), ("general", "j k l"), ("auto", "extract json now")] * 5

    async def one(model, text):
        r = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=8)
        return r.model_extra["coe"]["expert"], r.choices[0].message.content

    async def main():
        return await asyncio.gather(*(one(m, t) for m, t in prompts))

    out = asyncio.run(main())
    for (model, text), (expert, content) in zip(prompts, out):
        want = "json" if model == "auto" else model
        assert expert == want
        assert content == " ".join(f"{'base' if want == 'general' else want} heard {text}".split()[:8])
    assert live.engine.peak_running > 1  # they overlapped in the engine, not served one by one
