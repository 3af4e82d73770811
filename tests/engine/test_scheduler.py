"""Continuous batching: batching invariance, adapter isolation, seeds, cancellation, timeouts, the
bounded queue, eviction with pinning and fair rotation, cold loads during decoding, asyncio
streaming, per-request failures and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from coe.engine import GenerationOutput, StreamDelta
from coe.errors import AdapterNotFound, EngineUnavailable, GenerationError, QueueFull, RequestTimeout

PROMPTS = ["The quick brown fox", "jumps over", "the lazy dog, again and again", "Grüße aus Köln", "x"]


def _alone(engine, jobs, **kw):
    return [engine.generate(p, adapter=a, max_tokens=kw.get("max_tokens", 16)).token_ids for p, a in jobs]


def _together(engine, jobs, **kw):
    """Submit every job before consuming any, so they share steps."""
    streams = [engine.stream(p, adapter=a, max_tokens=kw.get("max_tokens", 16)) for p, a in jobs]
    return [[it for it in s if isinstance(it, GenerationOutput)][0].token_ids for s in streams]


def _wait_idle(engine, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = engine.stats()
        if st["running"] == 0 and st["queue_depth"] == 0 and st["kv_slots_free"] == engine.serving.max_batch:
            return st
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


@pytest.fixture()
def two_adapters(adapter_factory):
    return {"a": adapter_factory("a", r=4, targets="all-linear", seed=41),
            "b": adapter_factory("b", r=16, targets=("q_proj", "v_proj", "down_proj"), seed=42)}


def test_batching_invariance_and_adapter_isolation(engine_factory, two_adapters):
    engine = engine_factory(max_batch=8)
    for n, p in two_adapters.items():
        engine.load_adapter(n, p)
    jobs = [(p, a) for p in PROMPTS[:3] for a in (None, "a", "b")]
    alone = _alone(engine, jobs)
    together = _together(engine, jobs)
    assert together == alone
    # each adapter's output is its own: the same prompt gives three different continuations
    for i in range(3):
        trio = alone[3 * i : 3 * i + 3]
        assert len({tuple(t) for t in trio}) == 3, trio
    assert engine.stats()["steps_total"] > 0
    _wait_idle(engine)


def test_seeded_sampling_is_batch_independent(engine_factory, two_adapters):
    engine = engine_factory(max_batch=6)
    engine.load_adapter("a", two_adapters["a"])
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.9, seed=77)
    alone = engine.generate(PROMPTS[0], adapter="a", **kw).token_ids
    others = [engine.stream(p, adapter=None, max_tokens=20, temperature=1.0) for p in PROMPTS[1:4]]
    mine = engine.stream(PROMPTS[0], adapter="a", **kw)
    got = [x for x in mine if isinstance(x, GenerationOutput)][0].token_ids
    for s in others:
        list(s)
    assert got == alone


def test_stream_deltas_and_final(engine_factory):
    engine = engine_factory()
    items = list(engine.stream("Grüße aus Köln", max_tokens=12))
    deltas, final = items[:-1], items[-1]
    assert isinstance(final, GenerationOutput) and all(isinstance(d, StreamDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert final.text == engine.generate("Grüße aus Köln", max_tokens=12).text


def test_closing_a_stream_cancels_and_frees_the_slot(engine_factory):
    engine = engine_factory(max_batch=2)
    s = engine.stream(PROMPTS[0], max_tokens=200, ignore_eos=True)
    assert isinstance(next(s), StreamDelta)
    assert engine.stats()["running"] == 1
    s.close()
    st = _wait_idle(engine)
    assert st["cancelled_total"] == 1


def test_timeout(engine_factory):
    engine = engine_factory()
    forward = engine.model.forward

    def slow(*args):  # >= 2 ms a step: 200 tokens take > 0.4 s, however fast the machine
        time.sleep(0.002)
        return forward(*args)

    engine.model.forward = slow  # an instance attribute: the scheduler calls self.model.forward
    with pytest.raises(RequestTimeout, match="timeout of 0.05 s"):
        engine.generate(PROMPTS[0], max_tokens=200, ignore_eos=True, timeout=0.05)
    assert _wait_idle(engine)["timeouts_total"] == 1


def test_queue_full_is_a_typed_error(engine_factory):
    engine = engine_factory(max_batch=1, max_queue=1)
    first = engine.stream(PROMPTS[0], max_tokens=200, ignore_eos=True)
    next(first)  # running
    second = engine.stream(PROMPTS[1], max_tokens=4)  # waits for the only KV slot
    with pytest.raises(QueueFull, match="serving.max_queue=1"):
        engine.generate(PROMPTS[2], max_tokens=4)
    first.close()
    assert isinstance(list(second)[-1], GenerationOutput)


def test_eviction_with_pinning_and_fair_rotation(engine_factory, adapter_factory):
    """One device slot, three adapters, many concurrent requests: every request gets its own
    adapter's output (a running sequence's adapter is never evicted) and none starves."""
    names = ["p", "q", "r"]
    engine = engine_factory(max_loras=1, max_batch=4)
    for i, n in enumerate(names):
        engine.load_adapter(n, adapter_factory(n, r=4, targets="all-linear", seed=60 + i))
    jobs = [(PROMPTS[i % 3], names[i % 3]) for i in range(9)]
    alone = _alone(engine, jobs, max_tokens=10)
    together = _together(engine, jobs, max_tokens=10)
    assert together == alone
    waits = engine.stats()["max_queue_wait_s"]
    assert set(names) <= set(waits)
    _wait_idle(engine)


def test_cold_load_during_decoding(engine_factory, two_adapters, adapter_factory):
    engine = engine_factory(max_batch=6)
    engine.load_adapter("a", two_adapters["a"])
    jobs = [(PROMPTS[0], "a"), (PROMPTS[1], None)]
    alone = _alone(engine, jobs, max_tokens=30)
    engine.registry.register("cold", str(adapter_factory("cold", r=8, targets="all-linear", seed=70)))
    streams = [engine.stream(p, adapter=a, max_tokens=30) for p, a in jobs]
    next(streams[0])
    assert {i.name: i.location for i in engine.list_adapters()}["cold"] == "disk"
    cold_out = engine.generate(PROMPTS[2], adapter="cold", max_tokens=8)
    got = [[x for x in s if isinstance(x, GenerationOutput)][0].token_ids for s in streams]
    assert got == alone
    cold_alone = engine.generate(PROMPTS[2], adapter="cold", max_tokens=8)
    assert cold_out.token_ids == cold_alone.token_ids
    assert engine.stats()["adapter_loads_total"] >= 1


def test_bad_cold_adapter_fails_only_its_requests(tmp_path, engine_factory):
    engine = engine_factory()
    engine.registry.register("ghost", str(tmp_path / "missing"))
    other = engine.stream(PROMPTS[0], max_tokens=10)
    with pytest.raises(AdapterNotFound, match="'ghost'.*does not exist"):
        engine.generate(PROMPTS[1], adapter="ghost", max_tokens=4)
    assert isinstance(list(other)[-1], GenerationOutput)


def test_astream_and_task_cancellation(engine_factory):
    engine = engine_factory(max_batch=2)

    async def main():
        text = ""
        async for item in engine.astream(PROMPTS[0], max_tokens=8):
            if isinstance(item, StreamDelta):
                text += item.text
            else:
                assert item.text == text
        agen = engine.astream(PROMPTS[1], max_tokens=200, ignore_eos=True)
        started = asyncio.Event()

        async def consume():
            async for _ in agen:
                started.set()

        task = asyncio.create_task(consume())
        # the first delta, not a fixed sleep: on a quiet machine 200 tiny-model tokens take < 0.2 s
        await asyncio.wait_for(started.wait(), 30)
        assert engine.stats()["running"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _wait_idle(engine)["cancelled_total"] == 1


def test_per_request_failures_leave_others_running(engine_factory, monkeypatch):
    engine = engine_factory(max_batch=4)
    want = engine.generate(PROMPTS[0], max_tokens=12).token_ids
    real_forward = engine.model.forward
    poison = engine.tokenizer("~")["input_ids"][-1]

    def forward(batch, k, v):
        if poison in batch.token_ids.tolist():
            raise RuntimeError("poisoned token")
        return real_forward(batch, k, v)

    monkeypatch.setattr(engine.model, "forward", forward)
    good = engine.stream(PROMPTS[0], max_tokens=12)
    next(good)
    with pytest.raises(GenerationError, match="poisoned token"):
        engine.generate("~~~ poisoned", max_tokens=5)
    assert [x for x in good if isinstance(x, GenerationOutput)][0].token_ids == want


def test_shutdown_lets_in_flight_finish_then_refuses(engine_factory):
    engine = engine_factory()
    s = engine.stream(PROMPTS[0], max_tokens=20)
    next(s)
    t = threading.Thread(target=engine.shutdown, kwargs={"grace_s": 30})
    t.start()
    time.sleep(0.05)
    with pytest.raises(EngineUnavailable):
        engine.generate("late", max_tokens=2)
    assert isinstance(list(s)[-1], GenerationOutput)
    t.join(10)
    assert not engine.scheduler.alive


def test_cold_load_runs_off_the_decode_thread(engine_factory, two_adapters, adapter_factory, monkeypatch):
    """A slow cold load (a disk taking 0.6 s here) must not stall running streams: they get
    tokens meanwhile, and the disk is read on a thread other than the step loop's (which runs
    only the read's in-memory pieces, between steps: Scheduler.read_in_pieces)."""
    from coe.engine import adapters

    engine = engine_factory(max_batch=4)
    engine.load_adapter("a", two_adapters["a"])
    want = engine.generate(PROMPTS[0], adapter="a", max_tokens=200, ignore_eos=True).token_ids
    engine.registry.register("slow", str(adapter_factory("slow", r=4, targets="all-linear", seed=71)))
    real_read = adapters.read_file_ahead
    window = {}

    def slow_disk(path, *args):
        window["start"] = time.monotonic()
        window["thread"] = threading.current_thread()
        time.sleep(0.6)
        real_read(path, *args)
        window["end"] = time.monotonic()

    monkeypatch.setattr(adapters, "read_file_ahead", slow_disk)
    arrivals = []
    running = engine.stream(PROMPTS[0], adapter="a", max_tokens=200, ignore_eos=True)
    next(running)
    cold = engine.stream(PROMPTS[1], adapter="slow", max_tokens=4)
    got = []
    for item in running:
        arrivals.append(time.monotonic())
        if isinstance(item, GenerationOutput):
            got = item.token_ids
    assert isinstance(list(cold)[-1], GenerationOutput)
    assert got == want
    assert "start" in window, "the cold adapter's file was not read"
    assert window["thread"] is not engine.scheduler._thread
    during = [t for t in arrivals if window["start"] < t < window["end"]]
    assert len(during) >= 5, f"only {len(during)} tokens arrived during a 0.6 s cold load"


def test_a_busy_adapter_cannot_starve_another(engine_factory, adapter_factory):
    """One device slot, two KV slots; three workers keep adapter p busy (each resubmits as soon as
    its request ends, so p always has a request running and one waiting). A request on q still
    runs while p's requests keep arriving (p is drained for it), p is served again afterwards,
    and the waits are reported per adapter. Without the rotation q would wait forever."""
    engine = engine_factory(max_loras=1, max_batch=2, max_queue=64)
    engine.load_adapter("p", adapter_factory("p", r=4, targets="all-linear", seed=80))
    engine.load_adapter("q", adapter_factory("q", r=4, targets="all-linear", seed=81))
    q_alone = engine.generate(PROMPTS[1], adapter="q", max_tokens=6).token_ids
    p_alone = engine.generate(PROMPTS[0], adapter="p", max_tokens=12, ignore_eos=True).token_ids
    stop = threading.Event()
    p_done: list[tuple[float, list[int]]] = []

    def worker():
        while not stop.is_set():
            out = engine.generate(PROMPTS[0], adapter="p", max_tokens=12, ignore_eos=True)
            p_done.append((time.monotonic(), out.token_ids))

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        while len(p_done) < 3:  # p owns the only adapter slot and is in use
            time.sleep(0.005)
        out = engine.generate(PROMPTS[1], adapter="q", max_tokens=6, timeout=30)
        q_end = time.monotonic()
        while not any(t > q_end for t, _ in p_done):  # p comes back after q
            assert all(w.is_alive() for w in workers)
            time.sleep(0.005)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert out.token_ids == q_alone
    assert all(ids == p_alone for _, ids in p_done)
    waits = engine.stats()["max_queue_wait_s"]
    assert waits["q"] > 0 and waits["p"] > 0


def test_stream_with_stop_string_never_sends_the_stop_text(engine_factory):
    engine = engine_factory()
    full = engine.generate(PROMPTS[0], max_tokens=30).text
    assert len(full) > 8
    stop = full[4:7]
    items = list(engine.stream(PROMPTS[0], max_tokens=30, stop=stop))
    final = items[-1]
    sent = "".join(d.text for d in items[:-1])
    assert final.finish_reason == "stop"
    assert sent == final.text == full[: full.find(stop)]


@pytest.mark.parametrize("how", ["request", "load_adapter"])
def test_a_cold_adapter_is_written_a_piece_per_step_while_streams_run(engine_factory, two_adapters, adapter_factory,
                                                                      monkeypatch, how):
    """While sequences run, a cold adapter goes into its slot a piece per gap between steps (a
    layer a gap with no time budget), never in one gap: the running stream's output and the cold
    adapter's own are exactly what they are alone, and ``load_adapter`` returns once it is
    resident."""
    from coe.engine import scheduler as sched

    engine = engine_factory(max_batch=4, max_seq_len=512)
    engine.load_adapter("a", two_adapters["a"])
    want = engine.generate(PROMPTS[0], adapter="a", max_tokens=480, ignore_eos=True).token_ids
    cold = adapter_factory("cold", r=8, targets="all-linear", seed=70)
    engine.load_adapter("cold", cold)  # nothing running: written at once
    cold_want = engine.generate(PROMPTS[2], adapter="cold", max_tokens=8).token_ids
    engine.unload_adapter("cold")
    monkeypatch.setattr(sched, "SLOT_WRITE_SLICE_S", 0.0)
    reg = engine.registry
    real_write, steps_at = reg._write_layer, []

    def spy(*args):
        steps_at.append(engine.scheduler.counters["steps"])
        return real_write(*args)

    monkeypatch.setattr(reg, "_write_layer", spy)
    running = engine.stream(PROMPTS[0], adapter="a", max_tokens=480, ignore_eos=True)
    next(running)
    if how == "load_adapter":
        info = engine.load_adapter("cold", cold)
        assert info.location == "device"
    else:
        reg.register("cold", str(cold))
    cold_out = engine.generate(PROMPTS[2], adapter="cold", max_tokens=8).token_ids
    got = [x for x in running if isinstance(x, GenerationOutput)][0].token_ids
    assert got == want
    assert cold_out == cold_want
    assert len(steps_at) == len(engine.model.layers)
    assert len(set(steps_at)) == len(steps_at), f"layers written in the same gap: steps {steps_at}"
    _wait_idle(engine)
