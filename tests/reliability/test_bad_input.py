"""Bad input against the real server: every case is a 4xx naming the field (never a 5xx), and the
server keeps answering normally afterwards."""

from __future__ import annotations

import json

import pytest

from helpers import BODY_LIMIT

MSG = [{"role": "user", "content": "hello"}]


def body(**fields):
    return json.dumps({"model": "json", "messages": MSG, "max_tokens": 4, **fields}).encode()


# (case, endpoint, raw body, status, error code or None, param or None, words in the message)
CASES = [
    ("malformed JSON", "chat/completions", b'{"model": "json", "messages": [', 400, "invalid_request", None, ("not valid JSON",)),
    ("not an object", "chat/completions", b"[1, 2, 3]", 400, "invalid_request", None, ("must be a JSON object",)),
    ("empty body", "chat/completions", b"", 400, "invalid_request", None, ("empty",)),
    ("nested too deeply", "chat/completions", b'{"metadata": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400,
     "invalid_request", None, ("nested too deeply",)),
    ("invalid UTF-8", "chat/completions", b'{"model": "json", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     400, "invalid_utf8", None, ("UTF-8",)),
    ("lone surrogate", "chat/completions", b'{"model": "json", "messages": [{"role": "user", "content": "\\ud800"}]}',
     400, "invalid_request", None, ("not valid JSON",)),
    ("messages not a list", "chat/completions", body(messages="hello"), 400, "invalid_request", "messages", ()),
    ("max_tokens a string", "chat/completions", body(max_tokens="ten"), 400, "invalid_request", "max_tokens", ("int",)),
    ("temperature a string", "chat/completions", body(temperature="hot"), 400, "invalid_request", "temperature", ()),
    ("stream not a bool", "chat/completions", body(stream="yes"), 400, "invalid_request", "stream", ()),
    ("model a number", "chat/completions", body(model=7), 400, "invalid_request", "model", ()),
    ("content a number", "chat/completions", body(messages=[{"role": "user", "content": 3}]), 400, "invalid_request",
     "messages[0].content", ()),
    ("unknown role", "chat/completions", body(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_request",
     "messages[0].role", ("wizard",)),
    ("message without role", "chat/completions", body(messages=[{"content": "x"}]), 400, "invalid_request", None, ("role",)),
    ("empty messages", "chat/completions", body(messages=[]), 400, "invalid_request", "messages", ()),
    ("no messages", "chat/completions", json.dumps({"model": "json"}).encode(), 400, "invalid_request", "messages", ()),
    ("max_tokens 0", "chat/completions", body(max_tokens=0), 400, "invalid_request", "max_tokens", ()),
    ("max_tokens negative", "chat/completions", body(max_tokens=-3), 400, "invalid_request", "max_tokens", ()),
    ("max_tokens over the limit", "chat/completions", body(max_tokens=129), 400, "invalid_request", "max_tokens",
     ("128", "max_tokens_limit")),
    ("max_completion_tokens over the limit", "chat/completions", body(max_completion_tokens=10**9), 400, "invalid_request",
     "max_tokens", ("128",)),
    ("prompt over the context", "chat/completions", body(messages=[{"role": "user", "content": "word " * 400}]), 400,
     "context_length_exceeded", "messages", ("256",)),
    ("prompt + max_tokens over the context", "chat/completions",
     body(max_tokens=100, messages=[{"role": "user", "content": "word " * 60}]), 400, "context_length_exceeded",
     "max_tokens", ("256",)),
    ("n > 1", "chat/completions", body(n=3), 400, "invalid_request", "n", ("n=3",)),
    ("tools", "chat/completions", body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "invalid_request",
     "tools", ()),
    ("logit_bias", "chat/completions", body(logit_bias={"5": 10}), 400, "invalid_request", "logit_bias", ()),
    ("json mode", "chat/completions", body(response_format={"type": "json_object"}), 400, "invalid_request",
     "response_format", ()),
    ("penalty", "chat/completions", body(presence_penalty=1.5), 400, "invalid_request", "presence_penalty", ()),
    ("logprobs", "chat/completions", body(logprobs=True, top_logprobs=3), 400, "invalid_request", None, ("logprobs",)),
    ("unknown field", "chat/completions", body(frobnicate=1), 400, "invalid_request", "frobnicate", ("frobnicate",)),
    ("temperature out of range", "chat/completions", body(temperature=2.5), 400, "invalid_request", "temperature", ()),
    ("top_p zero", "chat/completions", body(top_p=0), 400, "invalid_request", "top_p", ()),
    ("17 stop strings", "chat/completions", body(stop=["x"] * 17), 400, "invalid_request", "stop", ()),
    ("empty stop string", "chat/completions", body(stop=[""]), 400, "invalid_request", "stop", ()),
    ("image content", "chat/completions", body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "invalid_request", None, ("image_url",)),
    ("unknown model", "chat/completions", body(model="m" * 5000), 404, "model_not_found", "model", ("auto",)),
    ("two prompts", "completions", json.dumps({"model": "json", "prompt": ["a", "b"]}).encode(), 400, "invalid_request",
     "prompt", ()),
    ("empty prompt", "completions", json.dumps({"model": "json", "prompt": ""}).encode(), 400, "invalid_request",
     "prompt", ()),
    ("echo", "completions", json.dumps({"model": "json", "prompt": "x", "echo": True}).encode(), 400, "invalid_request",
     "echo", ()),
    ("route: both", "route", json.dumps({"text": "x", "messages": MSG}).encode(), 400, "invalid_request", "messages", ()),
    ("admin: no name", "load_lora_adapter", json.dumps({"lora_path": "x"}).encode(), 400, "invalid_request",
     "lora_name", ()),
]


@pytest.mark.parametrize("case, endpoint, raw, status, code, param, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx(real, case, endpoint, raw, status, code, param, words):
    r = real.http.post(f"/v1/{endpoint}", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]
    assert len(err["message"]) < 1000, "an error must not echo a huge input back"


def test_oversized_bodies_are_413_with_or_without_content_length(real):
    big = body(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 10)}])
    r = real.http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # chunked transfer: the server learns the size only while reading
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = real.http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = real.http.post("/v1/load_lora_adapter", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_streaming_keeps_the_status_of_errors_found_before_the_first_token(real):
    with real.http.stream("POST", "/v1/chat/completions", content=body(stream=True, max_tokens=0),
                          headers={"content-type": "application/json"}) as r:
        assert r.status_code == 400
    s = real.stream("json", "word " * 400)
    assert s.status == 400 and s.events[0]["error"]["code"] == "context_length_exceeded"


def test_near_zero_temperature_and_top_p_are_greedy(real):
    """Values the schema accepts but float32 sampling cannot (1/T overflows, a nucleus below the
    smallest float32 drops every token) mean "the most likely token", as in vLLM."""
    greedy = real.answer("json", "hello there", max_tokens=8)
    for extra in ({"temperature": 1e-300}, {"temperature": 1e-7}, {"temperature": 1.0, "top_p": 1e-300},
                  {"temperature": 0.7, "top_p": 1e-9, "seed": 3}):
        assert real.answer("json", "hello there", max_tokens=8, **extra) == greedy, extra


def test_the_server_still_answers_normally(real):
    first = real.answer("json", "hello there", max_tokens=8)
    assert real.http.get("/health").json() == {"status": "ok"}
    assert real.answer("json", "hello there", max_tokens=8) == first
    real.wait_idle()
