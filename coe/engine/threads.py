"""Keeping the decode loop the only multi-threaded OpenMP user of the process.

Why this module exists: torch's CPU build runs its intra-op parallelism on GNU OpenMP (libgomp),
which gives every thread that starts a parallel region its own pool of worker threads, kept for
that thread's lifetime. libgomp lets idle workers spin briefly between regions (they are woken
again within microseconds) only while the process's OpenMP worker threads number no more than its
CPUs; past that it parks them at once, and every one of the ~300 parallel regions of a decode
step pays a futex wake-up. On a 2-core machine one stray pool is enough: a decode step of 16
sequences took 131-141 ms on the engine's loop thread after the model had been loaded on the
caller's thread (whose pool stays), against 114-127 ms when the loading ran on a thread that
had exited (``python -m coe.engine.threads``, which prints both; the same step on the main
thread alone took ~120 ms).

So the engine (1) loads its model on a short-lived thread (:func:`run_in_fresh_thread`), whose
pool dies with it, and (2) runs its other helper threads (adapter reads) single-threaded
(:func:`compute_on_one_thread`: OpenMP and MKL's per-thread settings), so they never start a
pool; the server does the same for the worker threads that route requests (the router then
runs on one core, which costs it nothing measurable: 8.9 ms p50 with 1 thread, 7.7 with 2).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import Any, Callable

import torch

_libs: dict[str, Any] = {}


def _torch_lib(filename: str, symbol: str, *, openmp: bool = False) -> Any:
    """The library ``torch/lib/<filename>`` if it is present and exports ``symbol`` (and, with
    ``openmp``, torch's parallel backend is OpenMP), else None; looked up once. Loading it again
    returns the copy torch already uses."""
    if filename not in _libs:
        _libs[filename] = None
        if openmp and "OpenMP" not in torch.__config__.parallel_info():
            return None
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", filename))
            getattr(lib, symbol)
            _libs[filename] = lib
        except (OSError, AttributeError):
            pass
    return _libs[filename]


def compute_on_one_thread() -> None:
    """Make the calling thread's torch work run on itself alone: its OpenMP regions and its MKL
    GEMMs start no worker pool.

    Only this thread changes (``omp_set_num_threads`` and ``MKL_Set_Num_Threads_Local`` are per
    thread); torch's process-wide thread count is untouched. A no-op where torch uses neither.
    """
    torch.get_num_threads()  # let torch apply its per-thread default first, then override it
    gomp = _torch_lib("libgomp.so.1", "omp_set_num_threads", openmp=True)
    if gomp is not None:
        gomp.omp_set_num_threads(1)
    mkl = _torch_lib("libtorch_cpu.so", "MKL_Set_Num_Threads_Local")
    if mkl is not None:
        mkl.MKL_Set_Num_Threads_Local(1)  # the by-value C entry (the lower-case alias takes a pointer)


BACKGROUND_NICE = 10


def background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: its nice value plus ``BACKGROUND_NICE``), for
    work that must not slow the decode loop: adapter reads. Why: a decode step splits its work
    over both cores and waits for the slower half, so a reader holding one core at equal
    priority stretches every step it overlaps (a 16-stream bench saw inter-token gaps of 2-2.5x
    the median during a cold load). At a lower priority the reader mostly runs in the gaps the
    loop leaves (sampling, scheduling); alone on an idle machine it loads as fast as before.
    Raising niceness needs no privilege; where it fails the thread keeps its priority."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (AttributeError, OSError):
        pass


def background_compute() -> None:
    """:func:`compute_on_one_thread`, :func:`background_priority`, and the mark that makes
    :func:`cooperate` yield: the setup of the engine's adapter-reading threads."""
    compute_on_one_thread()
    background_priority()
    _local.background = True


# Python's GIL knows no thread priority. An adapter read is ~1,300 small steps (safetensors
# reads, copies, views), each holding the GIL briefly, and the decode loop needs the GIL back
# after each of its ~900 torch ops and kernel calls a step: while a read ran flat out, the loop
# waited on every one of those hand-overs, and a decode step of 8 streams that overlapped a 30 ms
# read took 76-81 ms instead of ~29 (itl_p99_during_load_ratio 2.4-2.7 in 3 of 10 loads). A
# reader that sleeps YIELD_S every 8 tensors read and every 2 fused groups packed while the loop
# is running leaves the loop most of each step: 10 loads then gave 1.2-1.5 (every 32 tensors and
# 8 groups: 1.2-2.0); the read itself then takes ~0.35-0.5 s instead of ~0.03 s. While the loop
# is idle the reader never sleeps (cold_load_ms unchanged). Measured with the bench's own
# _itl_during_load, 10 loads in one process (2-core EPYC).
# Since 2026-12-08 a read that starts while the loop decodes runs in pieces on the loop itself,
# between steps (Scheduler.read_in_pieces: no GIL hand-overs at all); these naps remain for reads
# that start while the loop is idle and overlap the decoding that follows.
YIELD_S = 0.002
_local = threading.local()
_busy_lock = threading.Lock()
_busy_loops = 0  # engine loops now running sequences (a process may hold several engines)


def set_foreground_busy(busy: bool) -> None:
    """An engine loop says it starts (True) or stops (False) running sequences: calls come in
    pairs, on changes only."""
    global _busy_loops
    with _busy_lock:
        _busy_loops = max(0, _busy_loops + (1 if busy else -1))


def foreground_busy() -> bool:
    return _busy_loops > 0


def cooperate() -> None:
    """Sleep ``YIELD_S`` (releasing the GIL) if this is a background thread
    (:func:`background_compute`) and the decode loop is running; else return at once. Long
    Python work on background threads calls it every few units of work."""
    if foreground_busy() and getattr(_local, "background", False):
        time.sleep(YIELD_S)


def freeze_heap() -> int:
    """Collect garbage once, then take every object now alive out of the cyclic collector's
    scans (``gc.freeze``); returns how many objects are frozen. For a process's startup, once the
    engine (or the server's pipeline) is built and warm; :func:`unfreeze_heap` undoes it.

    Why: a full (generation 2) collection walks every tracked object, ~300,000 once the engine,
    transformers and the tokenizer are loaded, while holding the GIL, and the decode loop needs
    the GIL after each of a step's torch ops and kernel calls: every stream stalls for the pass.
    Measured on the 2-core EPYC (SmolLM2 engine with 8 adapters, after 16-request runs): a full
    collection took 152-162 ms, 0.0 ms with the heap frozen. Such passes are rare while serving
    (none in 78 s of 16-request runs with cold loads), so this bounds a rare stall rather than
    speeding up steps. vLLM's engine core and SGLang do the same after start-up. The cost:
    reference cycles among the frozen objects are not collected until :func:`unfreeze_heap`."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze_heap() -> None:
    """Undo :func:`freeze_heap` (at shutdown): the frozen objects are collectable again."""
    gc.unfreeze()


def one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped to call :func:`compute_on_one_thread` first (for worker threads, e.g. a web
    server's, that run small torch work such as routing next to the engine)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        compute_on_one_thread()
        return fn(*args, **kwargs)

    return wrapper


def run_in_fresh_thread(fn: Callable[[], Any], name: str = "coe-load") -> Any:
    """Run ``fn`` on a new thread, wait for it, and return its result (or raise its exception).

    The thread exits when ``fn`` returns, and with it the OpenMP worker pool it started.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _demo() -> None:  # pragma: no cover - a measurement, printed
    import statistics

    from coe.engine import Engine
    from coe.engine.batch import Decode, build_step

    def time_steps(engine: Any) -> float:
        m, kv = engine.model, engine.kv
        out: list[float] = []

        def run() -> None:
            for t in kv.k + kv.v:
                t.zero_()
            for i in range(33):
                b = build_step([Decode(s, 60, 100 + s, -1) for s in range(16)], [], num_lora_slots=m.num_lora_slots,
                               kv=kv, device=engine.device)
                t0 = time.perf_counter()
                m.forward(b, kv.k, kv.v)
                if i >= 3:
                    out.append(time.perf_counter() - t0)

        run_in_fresh_thread(run, "coe-demo-loop")  # stands for the engine's loop thread
        return statistics.median(out) * 1e3

    torch.set_num_threads(2)
    kw = dict(dtype="float32", device="cpu", max_batch=16, max_seq_len=168)
    fresh = Engine.from_pretrained(None, **kw)  # loads on a fresh thread
    fresh.shutdown()
    print(f"model loaded on an exited thread: {time_steps(fresh):.1f} ms per 16-sequence decode step")
    (torch.randn(4096, 4096) + 1).sum()  # the caller's thread now holds a pool, as a stray user would
    print(f"with a second OpenMP pool alive:  {time_steps(fresh):.1f} ms per 16-sequence decode step")


if __name__ == "__main__":  # python -m coe.engine.threads
    _demo()
