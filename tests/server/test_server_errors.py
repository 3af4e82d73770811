"""Error mapping: every coe error class, Litestar's HTTP errors, and bad input -> OpenAI error bodies."""

from __future__ import annotations

import pytest

from coe import errors as E
from coe.server.errors import ERROR_KINDS, error_payload


def assert_error(r, status, code=None, param=None, contains=()):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    for c in contains:
        assert c in err["message"], err["message"]
    return err


def post_chat(client, **body):
    body.setdefault("model", "auto")
    body.setdefault("messages", [{"role": "user", "content": "hello"}])
    return client.post("/v1/chat/completions", json=body)


def test_every_coe_error_class_is_mapped():
    classes = [c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.CoeError)]
    for cls in classes:
        assert cls in ERROR_KINDS, f"{cls.__name__} has no HTTP mapping in coe/server/errors.py"


@pytest.mark.parametrize("exc, status, code", [
    (E.InvalidRequest("bad", param="x"), 400, "invalid_request"),
    (E.ContextTooLong("long"), 400, "context_length_exceeded"),
    (E.UnknownModel("nope"), 404, "model_not_found"),
    (E.AdapterNotFound("a", "gone"), 404, "adapter_not_found"),
    (E.AdapterPathForbidden("a", "outside"), 400, "adapter_path_forbidden"),
    (E.AdapterError("a", "corrupt"), 422, "adapter_error"),
    (E.AuthError("no key"), 401, "invalid_api_key"),
    (E.QueueFull("full", retry_after_s=2.5), 429, "queue_full"),
    (E.EngineUnavailable("down"), 503, "engine_unavailable"),
    (E.RouterError("untrained"), 503, "router_unavailable"),
    (E.RequestTimeout("slow"), 504, "request_timeout"),
    (E.GenerationError("boom"), 500, "generation_failed"),
    (E.RemoteBackendError("unreachable"), 502, "remote_backend_error"),
    (RuntimeError("secret /path"), 500, "internal_error"),
])
def test_error_payload_table(exc, status, code):
    got_status, body, headers = error_payload(exc)
    assert got_status == status and body["error"]["code"] == code
    if isinstance(exc, E.QueueFull):
        assert headers["Retry-After"] == "3"
    if isinstance(exc, E.AuthError):
        assert headers["WWW-Authenticate"] == "Bearer"
    if isinstance(exc, RuntimeError):
        assert "secret" not in body["error"]["message"]  # internals never leak into the body


def test_unknown_model_is_404_naming_it_and_listing_models(client):
    err = assert_error(post_chat(client, model="sqll"), 404, "model_not_found", "model",
                       contains=("'sqll'", "auto", "sql", "general", "fake-base", "Did you mean 'sql'"))
    assert err["type"] == "invalid_request_error"


def test_bad_bodies_are_400_naming_the_field(client):
    assert_error(post_chat(client, messages=[]), 400, param="messages")
    assert_error(post_chat(client, messages=[{"role": "wizard", "content": "x"}]), 400, param="messages[0].role")
    assert_error(post_chat(client, messages=[{"role": "user", "content": 3}]), 400, param="messages[0].content")
    assert_error(post_chat(client, temperature=5), 400, param="temperature")
    assert_error(post_chat(client, max_tokens=0), 400, param="max_tokens")
    assert_error(post_chat(client, max_tokens=65), 400, param="max_tokens", contains=("64", "max_tokens_limit"))
    assert_error(post_chat(client, n=2), 400, param="n", contains=("n=2",))
    assert_error(post_chat(client, tools=[{"type": "function"}]), 400, param="tools")
    assert_error(post_chat(client, frequency_penalty=0.5), 400, param="frequency_penalty")
    assert_error(post_chat(client, bogus=1), 400, param="bogus", contains=("bogus",))
    assert_error(post_chat(client, stop=[""]), 400, param="stop")
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)
    r = client.post("/v1/chat/completions", content=b'{"model": "auto", "messages": [{"role": "user", "content": "\xff"}]}',
                    headers={"content-type": "application/json"})
    assert_error(r, 400)
    # neutral values of unsupported parameters are fine
    assert post_chat(client, n=1, presence_penalty=0, logprobs=False).status_code == 200


def test_completions_bad_prompt(client):
    assert_error(client.post("/v1/completions", json={"model": "auto", "prompt": ["a", "b"]}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"model": "auto", "prompt": ""}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"model": "auto", "prompt": "x", "echo": True}), 400, param="echo")


def test_oversized_body_is_413(client):
    assert_error(post_chat(client, messages=[{"role": "user", "content": "x" * 5000}]), 413, "request_too_large")


def test_context_too_long_is_400_naming_the_limit(client):
    long = " ".join(["w"] * 70)
    assert_error(post_chat(client, messages=[{"role": "user", "content": long}]), 400, "context_length_exceeded",
                 contains=("64",))
    # an explicit max_tokens that cannot fit is an error; a defaulted one shrinks to fit
    mid = " ".join(["w"] * 50)
    assert_error(post_chat(client, model="json", max_tokens=40, messages=[{"role": "user", "content": mid}]), 400,
                 "context_length_exceeded", param="max_tokens")
    assert post_chat(client, model="json", messages=[{"role": "user", "content": mid}]).status_code == 200
    assert client.engine.calls[-1]["max_tokens"] == 64 - 52


def test_queue_full_is_429_with_retry_after(client):
    client.engine.max_running = 0
    r = post_chat(client)
    assert_error(r, 429, "queue_full")
    assert r.headers["Retry-After"] == "2"
    r = post_chat(client, stream=True)  # streaming admission errors keep their status too
    assert_error(r, 429, "queue_full")


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_error_mid_stream_is_one_sse_error_event(client, monkeypatch):
    async def broken(*a, **kw):
        from fakes import Delta

        yield Delta("partial")
        raise E.GenerationError("the sequence failed: NaN logits")

    monkeypatch.setattr(client.engine, "astream", broken)
    r = post_chat(client, stream=True)
    assert r.status_code == 200
    events = r.text.strip().split("\n\n")
    assert events[-1].startswith('data: {"error"') and "NaN logits" in events[-1]
    assert "[DONE]" not in r.text
