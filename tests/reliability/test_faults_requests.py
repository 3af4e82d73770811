"""Faults inside one request, against the real server: an exception in one sequence (while taking a
token, or while building the shared model step), and clients that disconnect mid-generation.

The faults are injected with monkeypatch into the engine's ``Sequence`` for requests carrying a
marker seed (the seed does not change greedy output), so no product code carries a test hook.
Every other request must finish with exactly the text it gets when served alone, and the engine
must end idle with every KV slot free.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from coe.engine.scheduler import Scheduler
from coe.engine.sequence import Sequence

POISON_SEED = 424242
FAULT = "injected fault in one sequence"
TEXT = "Turn this into JSON with keys product and price: the kettle costs 39.99 euros."
OTHERS = [("sql", "How many customers signed up in March?"), ("json", TEXT), ("tiny-llama", "hello there"),
          ("auto", "SELECT name FROM users WHERE id = 3"), ("auto", "Why is the sky blue?"), ("json", "hi")]


def _poisoned(seq: Sequence) -> bool:
    return seq.request.seed == POISON_SEED


@pytest.fixture
def solo(real):
    """What each of OTHERS answers when served alone."""
    return {case: real.answer(*case, max_tokens=16) for case in OTHERS}


def _run_with_others(real, poisoned_call):
    with ThreadPoolExecutor(len(OTHERS) + 1) as pool:
        bad = pool.submit(poisoned_call)
        others = {case: pool.submit(real.chat, *case, max_tokens=16) for case in OTHERS}
    return bad.result(), {case: f.result() for case, f in others.items()}


def _assert_others_unaffected(others, solo):
    for case, r in others.items():
        assert r.status_code == 200, (case, r.text)
        assert r.json()["choices"][0]["message"]["content"] == solo[case], case


def test_exception_while_taking_a_token_fails_only_that_request(real, solo, monkeypatch):
    append = Sequence.append

    def faulty(self, token):
        if _poisoned(self) and len(self.out_ids) >= 2:
            raise RuntimeError(FAULT)
        return append(self, token)

    monkeypatch.setattr(Sequence, "append", faulty)
    bad, others = _run_with_others(real, lambda: real.chat("json", TEXT, max_tokens=16, seed=POISON_SEED))
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["code"] == "generation_failed" and FAULT in err["message"] and "RuntimeError" in err["message"]
    _assert_others_unaffected(others, solo)

    # Streaming: the first tokens went out, then one error event names the cause; no [DONE].
    s = real.stream("json", TEXT, max_tokens=16, seed=POISON_SEED)
    assert s.status == 200 and s.text and not s.done
    assert s.error["code"] == "generation_failed" and FAULT in s.error["message"]
    real.wait_idle()


def test_exception_in_the_shared_model_step_fails_only_that_request(real, solo, monkeypatch):
    """A sequence that breaks the batched step: the step is rolled back and re-run one request at a
    time, so only the request that fails alone is failed."""
    decode_item = Sequence.decode_item

    def faulty(self):
        if _poisoned(self) and len(self.out_ids) >= 3:
            raise RuntimeError(FAULT)
        return decode_item(self)

    monkeypatch.setattr(Sequence, "decode_item", faulty)
    before = real.stats()["failed_total"]
    bad, others = _run_with_others(real, lambda: real.chat("sql", TEXT, max_tokens=16, seed=POISON_SEED))
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["code"] == "generation_failed" and FAULT in err["message"] and "model step" in err["message"]
    _assert_others_unaffected(others, solo)
    stats = real.wait_idle()
    assert stats["failed_total"] == before + 1


def test_client_disconnects_free_their_slots(real, solo, monkeypatch):
    step = Scheduler._step

    def slow_step(self):  # long enough that every request is still running when its client leaves
        time.sleep(0.05)
        return step(self)

    monkeypatch.setattr(Scheduler, "_step", slow_step)
    before = real.stats()["cancelled_total"]
    body = {"model": "json", "stream": True, "max_tokens": 120, "temperature": 0.0,
            "messages": [{"role": "user", "content": "tell me a long story"}]}

    def stream_then_leave(_):
        with httpx.stream("POST", real.base_url + "/chat/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            next(line for line in lines if line.startswith("data: ") and '"content"' in line)

    def wait_then_leave(_):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(real.base_url + "/chat/completions", json={**body, "stream": False}, timeout=0.5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(stream_then_leave, range(6)))
        list(pool.map(wait_then_leave, range(2)))
    stats = real.wait_idle()
    assert stats["cancelled_total"] == before + 8, stats
    monkeypatch.undo()
    for case, text in solo.items():
        assert real.answer(*case, max_tokens=16) == text
    metrics = real.http.get("/metrics").text
    assert 'status="499"' in metrics and "coe_requests_in_flight 0.0" in metrics
