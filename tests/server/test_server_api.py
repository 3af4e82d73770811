"""The HTTP API over a fake pipeline backend (Litestar TestClient): shapes, routing, SSE framing."""

from __future__ import annotations

import json



def chat(client, content, model="auto", **kw):
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}], **kw})


def sse_events(text: str) -> list[str]:
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = text.split("\n\n")
    assert events[-1] == ""
    for e in events[:-1]:
        assert e.startswith("data: "), e
    return [e[len("data: "):] for e in events[:-2]]  # the JSON events, without [DONE]


def test_chat_auto_routes_and_reports_the_decision(client):
    r = chat(client, "select names from the users table")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "sql"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "sql heard select names from the"}
    assert body["coe"] == {"expert": "sql", "adapter": "sql", "source": "router", "score": 0.9,
                           "reason": "router score 0.90 >= threshold 0.50"}
    assert r.headers["x-coe-expert"] == "sql"
    assert r.headers["x-coe-source"] == "router"
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] == 6


def test_expert_system_prompt_and_generation_defaults_apply(client):
    chat(client, "anything", model="sql")
    call = client.engine.calls[-1]
    assert call["messages"][0] == {"role": "system", "content": "You write SQL."}
    assert call["adapter"] == "sql"
    assert call["max_tokens"] == 6 and call["temperature"] == 0.0  # the expert's generation defaults
    # the request's own values win, and its own system message is kept
    client.post("/v1/chat/completions", json={
        "model": "sql", "max_tokens": 3, "temperature": 0.7,
        "messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "x"}]})
    call = client.engine.calls[-1]
    assert [m["content"] for m in call["messages"]] == ["be terse", "x"]
    assert call["max_tokens"] == 3 and call["temperature"] == 0.7


def test_max_tokens_default_and_openai_defaults(client):
    chat(client, "hello", model="json")
    call = client.engine.calls[-1]
    assert call["max_tokens"] == 16  # serving.max_tokens_default: neither request nor expert sets it
    assert call["temperature"] == 1.0 and call["top_p"] == 1.0  # OpenAI's defaults
    assert call["stop"] == []
    chat(client, "hello", model="math")
    assert client.engine.calls[-1]["stop"] == ["STOP"]  # the expert's stop strings
    chat(client, "hello", model="math", stop="x")
    assert client.engine.calls[-1]["stop"] == ["x"]


def test_explicit_base_and_adapterless_expert(client):
    r = chat(client, "select from table", model="fake-base")
    body = r.json()
    assert body["coe"]["expert"] is None and body["coe"]["adapter"] is None and body["coe"]["source"] == "explicit"
    assert body["model"] == "fake-base" and r.headers["x-coe-expert"] == "fake-base"
    assert body["choices"][0]["message"]["content"].startswith("base heard")
    r = chat(client, "hello there")  # no keyword: fallback to general, which has no adapter
    assert r.json()["coe"]["source"] == "fallback"
    assert r.json()["coe"]["expert"] == "general" and r.json()["coe"]["adapter"] is None
    assert client.engine.calls[-1]["adapter"] is None


def test_metadata_and_user_reach_the_rules(client):
    r = chat(client, "select from table", metadata={"tenant": "acme"})
    assert r.json()["coe"]["source"] == "rule" and r.json()["coe"]["expert"] == "general"


def test_max_completion_tokens_and_length_finish(client):
    r = chat(client, "one two three four five", model="json", max_completion_tokens=2)
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_content_parts_and_developer_role(client):
    r = client.post("/v1/chat/completions", json={"model": "json", "messages": [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}]})
    assert r.status_code == 200
    call = client.engine.calls[-1]
    assert call["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "a b"}]


def test_stream_framing_first_chunk_has_role_and_coe(client):
    r = chat(client, "what is two plus two", stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-coe-expert"] == "math"
    events = [json.loads(e) for e in sse_events(r.text)]
    first = events[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["coe"]["expert"] == "math" and first["coe"]["source"] == "router"
    assert all("coe" not in e for e in events[1:])
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "math heard what is two plus two"
    finish = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 7
    assert len({e["id"] for e in events}) == 1


def test_stream_without_usage_has_no_usage_chunk(client):
    events = [json.loads(e) for e in sse_events(chat(client, "hi", model="json", stream=True).text)]
    assert all("usage" not in e for e in events)


def test_text_completions_route_on_the_prompt(client):
    r = client.post("/v1/completions", json={"model": "auto", "prompt": "extract json from this", "max_tokens": 3})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "json heard extract"
    assert body["coe"]["expert"] == "json"
    call = client.engine.calls[-1]
    assert call["prompt"] == "extract json from this" and call["messages"] is None  # no template, no system prompt
    r = client.post("/v1/completions", json={"model": "sql", "prompt": ["only one"], "stream": True})
    events = [json.loads(e) for e in sse_events(r.text)]
    assert events[0]["coe"]["expert"] == "sql"
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "sql heard only one"


def test_models_lists_auto_experts_and_base(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["auto", "sql", "json", "math", "general", "fake-base"]


def test_route_endpoint(client):
    r = client.post("/v1/route", json={"text": "extract the json"})
    body = r.json()
    assert body["expert"] == "json" and body["source"] == "router" and body["adapter"] == "json"
    assert set(body["scores"]) == {"sql", "json", "math", "general"}
    r = client.post("/v1/route", json={"messages": [{"role": "user", "content": "sum three plus four"}]})
    assert r.json()["expert"] == "math"
    assert client.post("/v1/route", json={}).status_code == 400
    assert client.post("/v1/route", json={"text": "x", "model": "nope"}).status_code == 404
    assert client.engine.calls == []  # no generation


def test_health_ready_schema(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    schema = client.get("/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/load_lora_adapter" in schema["paths"]


def test_metrics_count_requests_tokens_and_latencies(client):
    chat(client, "select from table")
    chat(client, "nothing", model="nope")
    chat(client, "two plus two", stream=True)
    text = client.get("/metrics").text
    assert 'coe_requests_total{endpoint="/v1/chat/completions",expert="sql",source="router",status="200"} 1.0' in text
    assert 'coe_requests_total{endpoint="/v1/chat/completions",expert="math",source="router",status="200"} 1.0' in text
    assert 'status="404"' in text
    assert 'coe_completion_tokens_total{expert="sql"} 5.0' in text
    assert 'coe_time_to_first_token_seconds_count{expert="math"} 1.0' in text
    assert "coe_inter_token_latency_seconds_count" in text
    assert "coe_route_latency_seconds_count 2.0" in text
    assert 'coe_resident_adapters{location="cpu"} 3.0' in text
    assert "coe_queue_depth 0.0" in text and "coe_requests_in_flight 0.0" in text
    assert 'coe_engine_max_queue_wait_s{key="sql"} 0.5' in text and "coe_engine_running 0.0" in text
    assert "coe_engine_accepting" not in text and "coe_engine_model_id" not in text  # non-numbers are skipped


def test_draining_server_answers_503(client):
    client.app.state.draining = True
    r = chat(client, "x")
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200


def test_empty_model_is_unknown(client):
    r = chat(client, "hi", model="")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_lifespan_builds_and_shuts_down_the_pipeline(fake_setup, monkeypatch):
    """create_app(config) without a pipeline: the lifespan builds it, and shuts it down on exit."""
    from litestar.testing import TestClient

    from coe.pipeline import Pipeline
    from coe.server.app import create_app
    from coe.server.auth import ApiKeys

    cfg, engine, pipeline = fake_setup
    calls = []

    def from_config(config, engine=None, train_router_if_missing=False, **kw):
        calls.append((config, train_router_if_missing))
        return pipeline

    monkeypatch.setattr(Pipeline, "from_config", staticmethod(from_config))
    with TestClient(create_app(cfg, train_router_if_missing=True, api_keys=ApiKeys())) as c:
        assert c.get("/ready").status_code == 200
        assert chat(c, "select from table").json()["coe"]["expert"] == "sql"
    assert calls == [(cfg, True)]
    assert engine.shutdown_called


def test_lifespan_freezes_the_startup_heap_and_unfreezes_it(fake_setup):
    """While the app runs, the objects alive at start-up are out of the collector's full passes
    (``coe.engine.threads.freeze_heap``); at shutdown they are collectable again."""
    import gc

    from litestar.testing import TestClient

    from coe.server.app import create_app
    from coe.server.auth import ApiKeys

    cfg, _engine, pipeline = fake_setup
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(cfg, pipeline=pipeline, api_keys=ApiKeys())) as c:
        assert gc.get_freeze_count() > 1000 and c.get("/health").status_code == 200
    assert gc.get_freeze_count() == 0
