"""coe.engine.threads: helper threads that leave no OpenMP pool behind."""

from __future__ import annotations

import threading

import pytest
import torch

from coe.engine.threads import run_in_fresh_thread, compute_on_one_thread


def test_run_in_fresh_thread_returns_and_raises():
    import threading

    main = threading.get_ident()
    assert run_in_fresh_thread(lambda: threading.get_ident()) != main
    with pytest.raises(KeyError, match="boom"):
        run_in_fresh_thread(lambda: {}["boom"])


def test_compute_on_one_thread_is_per_thread():
    before = torch.get_num_threads()

    def inside() -> int:
        compute_on_one_thread()
        (torch.ones(100_000) + 1).sum()  # a parallel-sized op still works
        return torch.get_num_threads()

    inner = run_in_fresh_thread(inside)
    if "OpenMP" in torch.__config__.parallel_info():
        assert inner == 1
    assert torch.get_num_threads() == before  # the process-wide setting is untouched


def test_one_thread_limits_mkl_too_and_passes_arguments():
    import os

    from coe.engine.threads import one_thread

    def work(n: int) -> int:
        before = len(os.listdir("/proc/self/task"))
        a = torch.randn(512, 512)
        a @ a  # an MKL GEMM: with MKL's per-thread count at 1 it starts no worker
        (a + 1).sum()
        return len(os.listdir("/proc/self/task")) - before + n

    # each try on a fresh thread (a pool, once started, would stay); the least growth of three
    # tries discounts a thread some other part of the process happened to start meanwhile
    grown = min(run_in_fresh_thread(lambda: one_thread(work)(0)) for _ in range(3))
    if "OpenMP" in torch.__config__.parallel_info() and torch.get_num_threads() > 1:
        assert grown == 0


def test_background_compute_lowers_only_the_reader_thread():
    import os
    import threading

    from coe.engine.threads import BACKGROUND_NICE, background_compute

    if not hasattr(os, "setpriority"):
        pytest.skip("no per-thread priorities on this platform")
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def inside() -> int:
        background_compute()
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert run_in_fresh_thread(inside) == min(19, mine + BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the caller is untouched


def test_background_readers_yield_only_while_a_decode_loop_runs(monkeypatch):
    from coe.engine import threads

    naps: list[float] = []
    monkeypatch.setattr(threads.time, "sleep", naps.append)

    def reader() -> None:
        threads.background_compute()
        threads.cooperate()

    run_in_fresh_thread(reader)  # no loop running: no nap
    threads.cooperate()  # not a background thread: no nap
    assert naps == []
    threads.set_foreground_busy(True)
    try:
        threads.cooperate()  # still not a background thread
        assert naps == []
        run_in_fresh_thread(reader)
        assert naps == [threads.YIELD_S]
    finally:
        threads.set_foreground_busy(False)
    assert not threads.foreground_busy()


def test_engine_loop_reports_busy_while_running_and_reads_in_pieces(engine_factory, adapter_factory, monkeypatch):
    """While sequences decode, the loop is reported busy (a background reader then naps between
    its tensors), and idle again when they finish; a read during decoding runs its first piece
    (the disk) on the reader's thread and every other piece on the loop thread, between steps
    (Scheduler.read_in_pieces), so the reader never naps."""
    import time

    from coe.engine import threads
    from coe.engine.outputs import StreamDelta

    engine = engine_factory(max_loras=2)
    path = adapter_factory("late", r=4)
    assert not threads.foreground_busy()
    seen = []
    pieces: list[str] = []
    real_steps = engine.registry.read_steps

    def traced_steps(name, source):
        gen = real_steps(name, source)
        while True:
            pieces.append(threading.current_thread().name)
            try:
                next(gen)
            except StopIteration as done:
                return done.value
            yield

    monkeypatch.setattr(engine.registry, "read_steps", traced_steps)
    stream = engine.stream("one two three", adapter=None, max_tokens=200, ignore_eos=True)
    naps: list[float] = []
    sleep = time.sleep
    monkeypatch.setattr(threads.time, "sleep", lambda s: (naps.append(s), sleep(s)))
    for item in stream:
        if isinstance(item, StreamDelta) and not seen:
            seen.append(threads.foreground_busy())
            engine.load_adapter("late", path)  # read while the stream decodes
            assert engine.registry.slot_of("late") is not None
    loop = engine.scheduler._thread.name
    assert seen == [True] and len(pieces) > 2
    assert pieces[0] != loop and set(pieces[1:]) == {loop}, pieces
    assert threads.YIELD_S not in naps
    deadline = time.monotonic() + 5
    while threads.foreground_busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not threads.foreground_busy()
