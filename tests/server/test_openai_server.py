"""End to end: a real uvicorn server over the real engine (tiny random Llama + tiny LoRA adapters)
and the real decision chain (centroid router on the embedded MiniLM body), driven by the
official ``openai`` client. A second server with ``backend: remote`` forwards to the first
over real HTTP.

Greedy decoding makes every answer a pure function of (adapter, messages), so "correct" is
checked exactly: a request's text must equal the same request served alone.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from coe.server.app import create_app
from live import LiveServer
from tiny import TINY_MODEL_ID, make_tiny_adapter, tiny_experts_yaml

SQL_TEXT = "SELECT name FROM users WHERE id = 3"  # the sql-statement rule fires
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="session")
def pipeline(tiny):
    from coe.pipeline import Pipeline

    p = Pipeline.from_config(tiny.config_path, train_router_if_missing=True)
    yield p
    p.shutdown(0)


@pytest.fixture(scope="session")
def server(pipeline):
    with LiveServer(create_app(pipeline.config, pipeline=pipeline)) as s:
        yield s


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def ask(client, model, text, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **{**GREEDY, **kw})


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["auto", "sql", "json", "general", TINY_MODEL_ID]


def test_chat_auto_explicit_and_base(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": SQL_TEXT}], **GREEDY)
    auto = raw.parse()
    assert raw.headers["x-coe-expert"] == "sql"
    coe = auto.model_extra["coe"]
    assert coe["expert"] == "sql" and coe["adapter"] == "sql" and coe["source"] == "rule"
    assert "sql-statement" in coe["reason"]
    assert auto.object == "chat.completion" and auto.model == "sql"
    assert auto.usage.completion_tokens > 0
    assert auto.usage.total_tokens == auto.usage.prompt_tokens + auto.usage.completion_tokens

    explicit = ask(client, "sql", SQL_TEXT)
    assert explicit.model_extra["coe"]["source"] == "explicit"
    assert explicit.choices[0].message.content == auto.choices[0].message.content
    base = ask(client, TINY_MODEL_ID, SQL_TEXT)
    assert base.model_extra["coe"]["expert"] is None and base.model_extra["coe"]["adapter"] is None
    other = ask(client, "json", SQL_TEXT)
    # three different weights -> three different greedy answers (adapters are not no-ops)
    texts = {explicit.choices[0].message.content, base.choices[0].message.content, other.choices[0].message.content}
    assert len(texts) == 3


def test_router_decides_without_a_rule(client, server):
    r = httpx.post(server.base_url + "/route", json={"text": "Extract the name and age as JSON: Bob, 41."}).json()
    assert r["source"] in ("router", "fallback") and set(r["scores"]) == {"sql", "json", "general"}
    resp = ask(client, "auto", "Extract the name and age as JSON: Bob, 41.")
    assert resp.model_extra["coe"]["expert"] == r["expert"] and resp.model_extra["coe"]["source"] == r["source"]


def test_streaming_matches_non_streaming(client):
    full = ask(client, "json", "hello there", max_tokens=16)
    stream = client.chat.completions.create(
        model="json", messages=[{"role": "user", "content": "hello there"}], stream=True,
        stream_options={"include_usage": True}, **{**GREEDY, "max_tokens": 16})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["coe"]["expert"] == "json"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions(client):
    r = client.completions.create(model="auto", prompt=SQL_TEXT, max_tokens=6, temperature=0.0)
    assert r.model_extra["coe"]["expert"] == "sql" and r.choices[0].text
    s = client.completions.create(model="sql", prompt=SQL_TEXT, max_tokens=6, temperature=0.0, stream=True)
    parts = list(s)
    assert parts[0].model_extra["coe"]["source"] == "explicit"
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text


def test_system_prompt_and_defaults_apply(client, server):
    # the sql expert's default max_tokens is 8 and its system prompt is prepended
    r = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "count rows"}])
    assert r.usage.completion_tokens <= 8
    with_sys = client.chat.completions.create(model="sql", max_tokens=8, temperature=0.0, messages=[
        {"role": "system", "content": "You write SQL."}, {"role": "user", "content": "count rows"}])
    assert with_sys.choices[0].message.content == r.choices[0].message.content
    assert with_sys.usage.prompt_tokens == r.usage.prompt_tokens


def test_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "sqll", "x")
    assert "'sqll'" in str(e.value) and "auto" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        ask(client, "auto", "x", n=2)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "auto", "x", max_tokens=100000)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "json", "word " * 400)
    assert "256" in str(e.value)  # names the context limit
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "json", "x" * 1_100_000)
    assert e.value.status_code == 413


def test_runtime_load_and_unload(client, server, tiny):
    target = tiny.config_path.parent / "runtime" / "pirate"
    if not target.exists():
        make_tiny_adapter(tiny.model_dir, target, seed=7)
    r = httpx.post(server.base_url + "/load_lora_adapter", json={"lora_name": "pirate", "lora_path": str(target)})
    assert r.status_code == 200, r.text
    assert "pirate" in [m.id for m in client.models.list().data]
    listed = {a["name"]: a for a in httpx.get(server.base_url + "/adapters").json()["data"]}
    assert set(listed) >= {"sql", "json", "pirate"} and listed["pirate"]["bytes"] > 0
    pirate = ask(client, "pirate", "hello there")
    assert pirate.model_extra["coe"]["adapter"] == "pirate"
    assert pirate.choices[0].message.content != ask(client, TINY_MODEL_ID, "hello there").choices[0].message.content
    assert httpx.post(server.base_url + "/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        ask(client, "pirate", "hello there")
    outside = tiny.config_path.parent.parent / "outside-roots"
    r = httpx.post(server.base_url + "/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(outside)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_path_forbidden"


def test_twenty_concurrent_mixed_requests_are_all_correct(client, server):
    cases = [(m, t) for t in ("hello there", SQL_TEXT, "Turn this into JSON: Ann, 7.", "count the rows in orders",
                              "why is the sky blue?") for m in ("auto", "sql", "json", TINY_MODEL_ID)]
    assert len(cases) == 20
    solo = {(m, t): ask(client, m, t).choices[0].message.content for m, t in cases}
    aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)

    async def one(m, t):
        r = await aclient.chat.completions.create(model=m, messages=[{"role": "user", "content": t}], **GREEDY)
        return r.choices[0].message.content

    async def main():
        return await asyncio.gather(*(one(m, t) for m, t in cases))

    together = asyncio.run(main())
    wrong = [(c, solo[c], got) for c, got in zip(cases, together) if solo[c] != got]
    assert not wrong, wrong


def test_client_disconnect_frees_the_slot(server, pipeline):
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.base_url + "/chat/completions", json={
            "model": "json", "stream": True, "max_tokens": 120, "temperature": 0.0,
            "messages": [{"role": "user", "content": "tell me a long story"}]}) as resp:
            lines = resp.iter_lines()
            assert next(l for l in lines if l.startswith("data: "))
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        adapters = {a["name"]: a for a in pipeline.list_adapters()}
        if adapters["json"]["in_flight"] == 0:
            break
        time.sleep(0.05)
    assert adapters["json"]["in_flight"] == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="499"' in metrics


def test_metrics_and_health(server, client):
    ask(client, "auto", SQL_TEXT)
    text = httpx.get(server.url + "/metrics").text
    for name in ("coe_requests_total", "coe_time_to_first_token_seconds_bucket", "coe_inter_token_latency_seconds",
                 "coe_route_latency_seconds", "coe_prompt_tokens_total", "coe_completion_tokens_total",
                 "coe_resident_adapters", "coe_requests_in_flight"):
        assert name in text, name
    assert 'expert="sql",source="rule",status="200"' in text
    assert "coe_queue_depth 0.0" in text and 'coe_engine_max_queue_wait_s{key="sql"}' in text
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"


def test_remote_backend_forwards_to_a_second_coe_server(server, tiny, client):
    """coe(remote) -> HTTP -> coe(local engine): same answers, routing stays in the front server."""
    from coe.pipeline import Pipeline

    path = tiny_experts_yaml(tiny.config_path.parent, tiny.model_dir, tiny.adapters, filename="experts.remote.yaml",
                             base_backend={"backend": "remote", "url": server.base_url, "id": TINY_MODEL_ID,
                                           "timeout_s": 60})
    front = Pipeline.from_config(path, train_router_if_missing=True)
    with LiveServer(create_app(front.config, pipeline=front)) as s2:
        c2 = openai.OpenAI(base_url=s2.base_url, api_key="unused", max_retries=0)
        for model, text in (("auto", SQL_TEXT), ("json", "hello there"), ("general", "hi"), (TINY_MODEL_ID, "hi")):
            direct = ask(client, model, text)
            via = ask(c2, model, text)
            assert via.choices[0].message.content == direct.choices[0].message.content, model
            assert via.model_extra["coe"]["expert"] == direct.model_extra["coe"]["expert"]
        stream = c2.chat.completions.create(model="json", messages=[{"role": "user", "content": "hello there"}],
                                            stream=True, **GREEDY)
        chunks = list(stream)
        assert chunks[0].model_extra["coe"]["expert"] == "json"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            ask(client, "json", "hello there").choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            ask(c2, "nope", "x")
        assert [m.id for m in c2.models.list().data] == ["auto", "sql", "json", "general", TINY_MODEL_ID]
    front.shutdown(0)
