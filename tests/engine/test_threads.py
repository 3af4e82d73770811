"""coe.engine.threads: helper threads that leave no OpenMP pool behind."""

from __future__ import annotations

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
