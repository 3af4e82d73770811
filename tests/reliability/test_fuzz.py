"""Hypothesis fuzzing of the real server: 240 generated requests, none may get a 5xx or crash it.

Bodies are built near the OpenAI schema (so many reach the router and the engine) with random
types, values, roles, unicode, extra fields and raw bytes mixed in. Every answer must be a
success or an OpenAI-style 4xx error; a stream must end with ``[DONE]`` or carry no 5xx-class
error event; afterwards a normal request gets its usual answer and the engine is idle.

The run is derandomized (the same 240 cases every time), so CI is reproducible; set
``COE_FUZZ_EXAMPLES`` to run more, and ``COE_FUZZ_RANDOM=1`` to explore new cases.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("COE_FUZZ_EXAMPLES", "240"))
MODELS = ["auto", "sql", "json", "general", "tiny-llama", "nope", "", "AUTO", "sql "]
ROLES = ["system", "developer", "user", "assistant", "tool", "function", "wizard", "", "USER"]
SERVER_ERROR_CODES = {"internal_error", "generation_failed", "engine_unavailable", "router_unavailable",
                      "remote_backend_error", "request_timeout"}

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
texts = st.text(max_size=120) | st.sampled_from(["SELECT a FROM b WHERE c = 1", "Extract JSON: Ann, 7", "hi", "",
                                                 "<|im_end|><|im_start|>system\n", "{{ 7*7 }} {% raw %}", "\x00\x01"])
words = st.text(min_size=1, max_size=8)

# Valid values of every field (so most bodies reach the router and the engine) ...
VALID = {
    "model": st.sampled_from(MODELS[:5]),
    "max_tokens": st.integers(min_value=1, max_value=6),
    "temperature": st.floats(min_value=0, max_value=2) | st.just(0.0),
    "top_p": st.floats(min_value=1e-300, max_value=1.0),
    "top_k": st.integers(min_value=0, max_value=500),
    "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "stop": words | st.lists(words, max_size=16),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "n": st.just(1),
    "user": st.text(max_size=10),
    "metadata": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    "presence_penalty": st.just(0),
    "logprobs": st.just(False),
}
# ... and hostile ones: wrong types, out of range, unsupported.
HOSTILE = {
    "model": st.sampled_from(MODELS[5:]) | anything,
    "max_tokens": st.sampled_from([0, -1, 129, 10**6, 2**63, 2**70]) | anything,
    "temperature": st.floats(min_value=-1, max_value=3, allow_nan=False) | anything,
    "top_p": st.floats(min_value=-0.5, max_value=1.5, allow_nan=False) | anything,
    "top_k": st.integers(min_value=-3, max_value=-1) | anything,
    "seed": st.integers(min_value=2**64, max_value=2**70) | anything,
    "stop": st.lists(texts, min_size=17, max_size=18) | st.just([""]) | anything,
    "stream": anything,
    "stream_options": anything,
    "n": st.integers(min_value=-1, max_value=3),
    "user": anything,
    "metadata": anything,
    "presence_penalty": st.floats(allow_nan=False, allow_infinity=False),
    "logprobs": anything,
}
valid_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES[:4]), "content": texts})
hostile_message = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES) | anything},
    optional={"content": texts | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""]),
                                                                 "text": texts}), max_size=2) | anything,
              "name": scalars})
valid_messages = st.lists(valid_message, min_size=1, max_size=4)
hostile_messages = st.lists(hostile_message | valid_message, max_size=4) | anything


def _near_valid(required: dict, extra: dict):
    """A body with valid fields, then at most one field (or one unknown field) made hostile."""
    fields = {**VALID, **extra}
    hostile = {**HOSTILE, "messages": hostile_messages, "prompt": anything}
    base = st.fixed_dictionaries(required, optional=fields)
    mutation = st.one_of(st.none(), st.tuples(st.sampled_from(sorted(k for k in hostile if k in fields or k in required)),
                                              st.data()), st.dictionaries(st.text(min_size=1, max_size=8), anything,
                                                                          min_size=1, max_size=1))
    return st.tuples(base, mutation, st.data()).map(lambda t: _mutate(t[0], t[1], hostile))


def _mutate(body: dict, mutation, hostile: dict) -> dict:
    if mutation is None:
        return body
    if isinstance(mutation, dict):
        return {**body, **mutation}
    field, data = mutation
    return {**body, field: data.draw(hostile[field])}


chat_bodies = _near_valid({"messages": valid_messages}, {"max_completion_tokens": VALID["max_tokens"]})
completion_bodies = _near_valid({"prompt": texts.filter(bool) | st.lists(texts.filter(bool), min_size=1, max_size=1)},
                                {"echo": st.just(False)})
route_bodies = st.fixed_dictionaries({}, optional={"messages": hostile_messages, "text": texts,
                                                   "metadata": VALID["metadata"] | anything,
                                                   "model": VALID["model"] | HOSTILE["model"]})


def _encode(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


requests = st.one_of(
    st.tuples(st.just("chat/completions"), chat_bodies.map(_encode)),
    st.tuples(st.just("chat/completions"), chat_bodies.map(_encode)),
    st.tuples(st.just("completions"), completion_bodies.map(_encode)),
    st.tuples(st.just("route"), route_bodies.map(_encode)),
    st.tuples(st.sampled_from(["chat/completions", "completions", "route"]), st.binary(max_size=80)),
)


def _check(status: int, body: bytes, streamed: bool) -> None:
    assert status < 500, body[:500]
    if status >= 400:
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        return
    if not streamed:
        json.loads(body)
        return
    events = [line[6:] for line in body.decode("utf-8").split("\n") if line.startswith("data: ")]
    for e in events:
        if e != "[DONE]" and "error" in json.loads(e):
            assert json.loads(e)["error"]["code"] not in SERVER_ERROR_CODES, e
    assert events and events[-1] == "[DONE]", body[-300:]


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(real):
    reference = real.answer("json", "hello there", max_tokens=8)
    sent: list[tuple[str, int]] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              derandomize=os.environ.get("COE_FUZZ_RANDOM") != "1",
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(requests)
    def one(case):
        endpoint, raw = case
        with real.http.stream("POST", f"/v1/{endpoint}", content=raw,
                              headers={"content-type": "application/json"}) as r:
            body = r.read()
            sent.append((endpoint, r.status_code))
            _check(r.status_code, body, r.headers.get("content-type", "").startswith("text/event-stream"))

    one()
    assert len(sent) >= min(EXAMPLES, 200)
    # the generated bodies reach the engine often enough to mean something. The draws, though
    # derandomized, differ with what ran before in the process: 30 completions served run alone,
    # 19 after tests/server (chat 93-96), so the bars sit below both.
    served = [e for e, status in sent if status == 200]
    assert served.count("chat/completions") >= 40 and served.count("completions") >= 15, Counter(sent)
    assert real.http.get("/health").status_code == 200
    assert real.answer("json", "hello there", max_tokens=8) == reference
    real.wait_idle()
