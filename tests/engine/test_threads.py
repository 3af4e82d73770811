"""coe.engine.threads: helper threads that leave no OpenMP pool behind."""

from __future__ import annotations

import pytest
import torch

from coe.engine.threads import run_in_fresh_thread, single_threaded_openmp


def test_run_in_fresh_thread_returns_and_raises():
    import threading

    main = threading.get_ident()
    assert run_in_fresh_thread(lambda: threading.get_ident()) != main
    with pytest.raises(KeyError, match="boom"):
        run_in_fresh_thread(lambda: {}["boom"])


def test_single_threaded_openmp_is_per_thread():
    before = torch.get_num_threads()

    def inside() -> int:
        single_threaded_openmp()
        (torch.ones(100_000) + 1).sum()  # a parallel-sized op still works
        return torch.get_num_threads()

    inner = run_in_fresh_thread(inside)
    if "OpenMP" in torch.__config__.parallel_info():
        assert inner == 1
    assert torch.get_num_threads() == before  # the process-wide setting is untouched
