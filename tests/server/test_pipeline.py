"""The pipeline in-process (no HTTP), over the fake engine and chain."""

from __future__ import annotations

import asyncio

import pytest

from coe.errors import ContextTooLong, InvalidRequest, UnknownModel
from coe.pipeline import PipelineResult, TextDelta


def test_chat_returns_text_and_decision(fake_setup):
    _, engine, p = fake_setup
    r = p.chat([{"role": "user", "content": "select from the table"}])
    assert isinstance(r, PipelineResult)
    assert r.decision.expert == "sql" and r.decision.source == "router"
    assert r.text == "sql heard select from the table" and r.adapter == "sql" and r.model == "sql"
    assert engine.calls[-1]["messages"][0]["content"] == "You write SQL."


def test_explicit_base_and_unknown(fake_setup):
    _, engine, p = fake_setup
    r = p.chat([{"role": "user", "content": "select from table"}], model="fake-base", max_tokens=2)
    assert r.decision.expert is None and r.adapter is None and r.model == "fake-base"
    assert r.text == "base heard" and r.finish_reason == "length"
    with pytest.raises(UnknownModel) as e:
        p.chat([{"role": "user", "content": "x"}], model="maths")
    assert "'maths'" in str(e.value) and "math" in str(e.value)


def test_sampling_merge_order(fake_setup):
    _, engine, p = fake_setup
    p.chat([{"role": "user", "content": "x"}], model="sql")
    assert engine.calls[-1]["max_tokens"] == 6 and engine.calls[-1]["temperature"] == 0.0
    p.chat([{"role": "user", "content": "x"}], model="sql", temperature=0.3, seed=7, top_k=5)
    c = engine.calls[-1]
    assert (c["temperature"], c["seed"], c["top_k"], c["max_tokens"]) == (0.3, 7, 5, 6)
    with pytest.raises(InvalidRequest):
        p.chat([{"role": "user", "content": "x"}], bogus=1)


def test_context_checks(fake_setup):
    _, _, p = fake_setup
    with pytest.raises(ContextTooLong):
        p.chat([{"role": "user", "content": " ".join(["w"] * 80)}])


def test_message_validation(fake_setup):
    _, _, p = fake_setup
    for bad in ([], "hello", [{"role": "robot", "content": "x"}], [42]):
        with pytest.raises(InvalidRequest):
            p.chat(bad)


def test_completion_routes_on_prompt(fake_setup):
    _, engine, p = fake_setup
    r = p.complete("two plus two", max_tokens=3)
    assert r.decision.expert == "math" and r.text == "math heard two"
    assert engine.calls[-1]["messages"] is None


def test_sync_stream(fake_setup):
    _, _, p = fake_setup
    s = p.stream_chat([{"role": "user", "content": "extract json"}])
    assert s.decision.expert == "json"  # known before the first token
    assert "".join(s) == "json heard extract json"
    assert s.result is not None and s.result.completion_tokens == 4


def test_async_stream_and_cancellation(fake_setup):
    _, engine, p = fake_setup
    engine.delay_s = 0.01

    async def main():
        req = p.prepare_chat([{"role": "user", "content": "one two three four five six seven"}], model="json")
        items = [i async for i in p.astream(req)]
        assert all(isinstance(i, TextDelta) for i in items[:-1]) and isinstance(items[-1], PipelineResult)
        assert "".join(i.text for i in items[:-1]) == items[-1].text
        # cancelling the consumer cancels the backend stream and frees its slot
        agen = p.astream(req)
        await agen.__anext__()
        assert engine.running == 1
        await agen.aclose()
        assert engine.running == 0 and engine.cancelled == 1

        async def consume():
            async for _ in p.astream(req):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.025)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.running == 0 and engine.cancelled == 2

    asyncio.run(main())


def test_models_and_route_scores(fake_setup):
    _, _, p = fake_setup
    assert [m["id"] for m in p.models()] == ["auto", "sql", "json", "math", "general", "fake-base"]
    d = p.route(text="extract the json")
    assert d.expert == "json" and d.scores["json"] == pytest.approx(0.9)
