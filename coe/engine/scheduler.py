"""The step loop: continuous batching of many requests, across adapters, on one background thread.

One thread owns the model. Callers (any thread, or an asyncio loop) submit validated requests
into a bounded queue and read results from a per-request sink. Between two steps the loop:
1. takes new submissions, cancellations and finished adapter loads;
2. fails requests past their deadline (``RequestTimeout``);
3. admits waiting requests in arrival order while KV slots last: a request whose adapter is
   resident is pinned to it at once; one whose adapter is only in CPU memory gets a free (or
   least recently used, unpinned) device slot; one whose adapter is still on disk starts a cold
   load on a worker thread and waits, so running streams keep decoding meanwhile;
4. builds one step: a decode token for every running sequence plus prompt chunks of admitted
   ones, up to ``serving.prefill_chunk`` prompt tokens (an eighth of it, at least 32, while
   other sequences are decoding), so long prompts are chunked across steps and running streams
   are not starved; one ``LoRAMeta`` for all adapters in it;
5. runs the forward pass, samples, detokenizes, and hands out deltas and finished outputs.

Fairness (LoRAX's adapter exchange): when a waiting request needs a device slot and every slot
holds an adapter in use, the least recently used such adapter is marked draining: it admits no new
requests, so its running ones finish, its slot frees, and the waiting adapter takes it. So no
adapter waits forever, however many distinct adapters are queued. The longest queue wait per
adapter is reported in ``stats``.

Failures stay per request: an error while sampling or detokenizing one sequence fails only that
sequence; a failed forward pass rolls the step back and re-runs its sequences one per step, so
only the one that fails alone is failed (``GenerationError`` naming the cause).

This module knows nothing about HTTP or routing; requests arrive already tokenized and checked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from coe.engine.batch import build_step
from coe.engine.kv_cache import KVCache
from coe.engine.model import Transformer
from coe.engine.outputs import GenerationOutput, StreamDelta
from coe.engine.adapters import PackedAdapter
from coe.engine.registry import AdapterRegistry
from coe.engine.threads import background_compute, set_foreground_busy
from coe.engine.request import Request
from coe.engine.sampling import sample_batch
from coe.engine.sequence import Sequence
from coe.errors import (
    CoeError,
    EngineUnavailable,
    GenerationError,
    QueueFull,
    RequestCancelled,
    RequestTimeout,
    UnknownModel,
)

logger = logging.getLogger("coe.engine")

BASE = "<base>"  # stats key for requests on the base model
# Seconds of copying an adapter into its slot per gap between two steps while sequences run
# (at least one layer a gap; AdapterRegistry.activate). An r=16 all-linear SmolLM2 adapter takes
# 21-49 ms in one piece on a 2-core Xeon VM, as long as the 16-row decode step it then delays
# (~35 ms there); in 4 ms pieces, ~1 ms a layer, it takes ~8 gaps and adds at most ~5 ms to any
# one of them. A request for that adapter waits those few steps longer; with nothing running
# the write is done at once.
SLOT_WRITE_SLICE_S: float | None = 0.004
# Adapter reads that start while sequences run go in pieces on the loop too (read_in_pieces).
# Both flags so that a benchmark can compare both ways (python -m coe.engine.bench --loads):
# None / False is the earlier design, the whole write in one gap and the read on its thread.
READ_IN_PIECES = True


class Job:
    """A submitted request: its sequence, where its results go, and its cancel flag.

    ``sink`` receives ``StreamDelta`` items (when ``stream``), then exactly one
    ``GenerationOutput`` or one exception.
    """

    __slots__ = ("seq", "sink", "stream", "cancelled", "deadline", "done", "_scheduler")

    def __init__(self, seq: Sequence, sink: Callable[[Any], None], stream: bool, scheduler: "Scheduler") -> None:
        self.seq = seq
        self.sink = sink
        self.stream = stream
        self.cancelled = False
        self.deadline = seq.submitted + seq.request.timeout_s
        self.done = False
        self._scheduler = scheduler

    def cancel(self) -> None:
        """Stop the request; its KV slot and adapter pin are released before the next step."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._scheduler._wake()


class Scheduler:
    """Runs the step loop on a daemon thread.

    Args:
        model / kv / registry / tokenizer: the engine's parts (the loop is their only user while it runs).
        max_seq_len: the context limit.
        prefill_chunk: prompt tokens per step at most.
        max_queue: requests waiting (not yet running) at most; more raise ``QueueFull``.
    """

    def __init__(self, model: Transformer, kv: KVCache, registry: AdapterRegistry, tokenizer: Any, *,
                 max_seq_len: int, prefill_chunk: int, max_queue: int) -> None:
        self.model = model
        self.kv = kv
        self.registry = registry
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._isolate: set[Job] = set()  # run alone after a failed shared step
        self._loads: dict[str, Future] = {}
        self._reads: list[tuple[Any, Future]] = []  # adapter reads run in pieces between steps (read_in_pieces)
        self._draining: dict[str, str] = {}  # victim adapter -> the waiting adapter it makes room for
        # cold loads read adapters here without an OpenMP pool of their own (see coe.engine.threads)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coe-adapter-load", initializer=background_compute)
        self._accepting = True
        self._stop = False
        self._max_wait: dict[str, float] = {}
        self.counters = {"requests": 0, "finished": 0, "tokens": 0, "steps": 0, "failed": 0, "cancelled": 0,
                         "timeouts": 0, "adapter_loads": 0, "adapter_load_errors": 0, "prefill_tokens": 0}
        self._busy = False  # running sequences, as told to coe.engine.threads.set_foreground_busy
        self._thread = threading.Thread(target=self._loop, name="coe-engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side (any thread)

    def submit(self, seq: Sequence, sink: Callable[[Any], None], *, stream: bool) -> Job:
        """Queue a sequence.

        Raises:
            EngineUnavailable: the engine is shutting down.
            QueueFull: ``max_queue`` requests are already waiting.
        """
        job = Job(seq, sink, stream, self)
        with self._cond:
            if not self._accepting or self._stop:
                raise EngineUnavailable("the engine is shutting down and accepts no new requests; retry on another instance")
            waiting = len(self._inbox) + len(self._waiting)
            if waiting >= self.max_queue:
                raise QueueFull(f"the engine queue is full ({waiting} requests waiting, serving.max_queue={self.max_queue}); "
                                "retry shortly", retry_after_s=1.0)
            self._inbox.append(job)
            self.counters["requests"] += 1
            self._cond.notify()
        return job

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the loop thread between two steps and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        with self._cond:
            if self._stop:
                raise EngineUnavailable("the engine loop has stopped")
            self._calls.append((fn, fut))
            self._cond.notify()
        return fut.result(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._cond:
            waiting = list(self._inbox) + list(self._waiting)
            running = list(self._running)
            max_wait = dict(self._max_wait)
        for job in waiting:  # requests still waiting count with their wait so far
            key = job.seq.request.adapter or BASE
            max_wait[key] = max(max_wait.get(key, 0.0), now - job.seq.submitted)
        used_tokens = sum(len(j.seq.prompt_ids) + len(j.seq.out_ids) for j in running)
        return {
            "queue_depth": len(waiting),
            "running": len(running),
            "max_queue_wait_s": {k: round(v, 4) for k, v in max_wait.items()},
            "adapters_loading": sorted(self._loads),
            "adapters_draining": sorted(self._draining),
            "kv_cache_used_bytes": used_tokens * self.kv.bytes_per_token,
            "kv_slots_free": self.kv.num_free,
            **{f"{k}_total": v for k, v in self.counters.items()},
        }

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting; let running and queued requests finish within ``grace_s``; then fail the
        rest with ``EngineUnavailable`` and stop the loop."""
        with self._cond:
            self._accepting = False
            self._cond.notify()
        deadline = time.monotonic() + max(0.0, grace_s)
        while time.monotonic() < deadline:
            with self._cond:
                if not (self._inbox or self._waiting or self._running):
                    break
            time.sleep(0.01)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stop or self._inbox or self._calls or self._running or self._waiting
                               or self._reads or self.registry.pending_writes()):
                        self._cond.wait()
                    if self._stop:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    calls = list(self._calls)
                    self._calls.clear()
                    reads = list(self._reads)
                # adapter reads and slot writes under way go on first (see write_budget_s): a write
                # begun below (by a call or by _admit) then takes no second piece in the same gap
                if reads:
                    self._continue_reads(reads, self.write_budget_s())
                if self.registry.pending_writes():
                    self.registry.continue_writes(self.write_budget_s())
                for fn, fut in calls:
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed back to the caller
                        fut.set_exception(exc)
                self._reap()
                self._admit()
                self._set_busy(bool(self._running))
                if self._running:
                    self._step()
                    self._set_busy(bool(self._running))
                elif self._waiting:
                    # Everything waiting is blocked on a cold load or a draining slot: sleep until
                    # a load finishes or something new arrives (both notify).
                    with self._cond:
                        if not (self._inbox or self._calls or self._stop):
                            self._cond.wait(timeout=0.05)
        except BaseException:  # a bug in the loop itself: fail everything rather than hang callers
            logger.exception("engine loop crashed")
            raise
        finally:
            self._set_busy(False)
            self._fail_all(EngineUnavailable("the engine stopped before this request finished"))

    def read_in_pieces(self, name: str, source: str) -> PackedAdapter:
        """Read adapter ``name`` from ``source`` (``AdapterRegistry.read``'s result and errors),
        from a thread other than the loop's: while the loop runs sequences, only the first piece
        (resolving the source, the config, reading the file through, opening it) runs here, so
        the loop never waits on the disk, and the loop runs the rest (parsing from memory,
        checks, packing) between its steps, ``write_budget_s`` a gap; otherwise all of it here.

        Why: a read on a background thread while the loop decodes takes the GIL and a core from
        the steps in many small bites (on two cores there is no idle core to run it on). On a
        2-core Xeon VM (``python -m coe.engine.bench --loads 10``: 8 streams, 10 loads each way
        alternating in one engine, with the slot write in pieces or whole to match), the p99
        gap of a load's window over the median gap was 1.31 in pieces (each load 1.11-1.56)
        against 1.64 (1.37-2.66), and a load's window 511 ms against 670."""
        if not READ_IN_PIECES or threading.current_thread() is self._thread or not self._running:
            return self.registry.read(name, source)
        steps = self.registry.read_steps(name, source)
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        fut: Future = Future()
        with self._cond:
            if self._stop:
                steps.close()
                raise EngineUnavailable("the engine loop has stopped")
            self._reads.append((steps, fut))
            self._cond.notify()
        return fut.result()

    def _continue_reads(self, reads: list[tuple[Any, Future]], budget_s: float | None) -> None:
        """Run pieces of the reads under way (oldest first) for up to ``budget_s`` seconds (at
        least one piece; None: to their ends), resolving each finished read's future."""
        end = None if budget_s is None else time.perf_counter() + budget_s
        for i, (steps, fut) in enumerate(reads):
            if i and end is not None and time.perf_counter() >= end:
                break
            try:
                while True:
                    next(steps)
                    if end is not None and time.perf_counter() >= end:
                        break
                continue
            except StopIteration as done:
                fut.set_result(done.value)
            except BaseException as exc:  # the reader's own errors (AdapterError, ...) go back to it
                fut.set_exception(exc)
            with self._cond:
                self._reads.remove((steps, fut))

    def write_budget_s(self) -> float | None:
        """Seconds of adapter-slot writing one gap between steps may take while sequences run
        (``SLOT_WRITE_SLICE_S``), or None (the whole write at once) when none does. Only
        between steps of the loop thread (``Engine.load_adapter``'s activation also asks here)."""
        return SLOT_WRITE_SLICE_S if self._running else None  # (None also where the flag is None)

    def _set_busy(self, busy: bool) -> None:
        """Tell ``coe.engine.threads`` whether this loop runs sequences (on changes only): adapter
        readers on background threads then yield the GIL between tensors."""
        if busy != self._busy:
            self._busy = busy
            set_foreground_busy(busy)

    def _fail_all(self, exc: CoeError) -> None:
        with self._cond:
            jobs = list(self._inbox) + self._waiting + self._running
            self._inbox.clear()
            self._waiting = []
            self._running = []
            self._stop = True
            calls = list(self._calls)
            self._calls.clear()
            reads = list(self._reads)
            self._reads.clear()
        for steps, fut in reads:
            steps.close()
            fut.set_exception(EngineUnavailable("the engine loop stopped before this adapter was read"))
        for job in jobs:
            self._finish(job, exc)
        for _, fut in calls:
            fut.set_exception(EngineUnavailable("the engine loop has stopped"))

    def _finish(self, job: Job, result: GenerationOutput | BaseException) -> None:
        """Release the job's KV slot and adapter pin, then deliver its result (exactly once)."""
        if job.done:
            return
        job.done = True
        seq = job.seq
        if seq.kv_slot >= 0:
            self.kv.release(seq.kv_slot)
            seq.kv_slot = -1
        if seq.lease is not None:
            self.registry.unpin(seq.lease)
            seq.lease = None
        self._isolate.discard(job)
        if isinstance(result, BaseException):
            key = {RequestCancelled: "cancelled", RequestTimeout: "timeouts"}.get(type(result), "failed")
            self.counters[key] += 1
        else:
            self.counters["finished"] += 1
        try:
            job.sink(result)
        except Exception:  # a consumer that went away must not break the loop
            logger.debug("result sink failed", exc_info=True)

    def _reap(self) -> None:
        """Drop cancelled and timed-out requests, running or waiting; collect finished loads."""
        now = time.monotonic()
        for jobs in (self._running, self._waiting):
            keep = []
            for job in jobs:
                if job.cancelled:
                    self._finish(job, RequestCancelled("the request was cancelled"))
                elif now > job.deadline:
                    r = job.seq.request
                    self._finish(job, RequestTimeout(f"the request ran past its timeout of {r.timeout_s:g} s and was "
                                                     f"cancelled after {len(job.seq.out_ids)} tokens"))
                else:
                    keep.append(job)
            jobs[:] = keep
        for name, fut in list(self._loads.items()):
            if not fut.done():
                continue
            del self._loads[name]
            exc = fut.exception()
            if exc is None:
                self.counters["adapter_loads"] += 1
                continue
            self.counters["adapter_load_errors"] += 1
            keep = []
            for job in self._waiting:
                if job.seq.request.adapter == name:
                    self._finish(job, exc if isinstance(exc, CoeError) else GenerationError(f"adapter {name!r} failed to load: {exc}"))
                else:
                    keep.append(job)
            self._waiting = keep

    # ------------------------------------------------------------------ admission

    def _admit(self) -> None:
        if not self._waiting:
            return
        reg = self.registry
        # A drain whose waiter is gone (cancelled, timed out, failed) is called off.
        waiting_adapters = {j.seq.request.adapter for j in self._waiting}
        for victim, waiter in list(self._draining.items()):
            if waiter not in waiting_adapters:
                del self._draining[victim]
        admitted: list[Job] = []
        blocked_on_slot: list[str] = []
        for job in self._waiting:
            if self.kv.num_free == 0:
                break
            name = job.seq.request.adapter
            try:
                if name is not None:
                    if name in self._draining or name in blocked_on_slot or reg.writing(name):
                        continue  # (a write under way goes on at the top of each turn of the loop)
                    if reg.slot_of(name) is None:
                        if not reg.has(name):
                            raise UnknownModel(f"adapter {name!r} was unloaded before the request started", param="adapter")
                        if not reg.is_packed(name):
                            self._start_load(name)
                            continue
                        slot = reg.free_or_evictable_slot()
                        if slot is None:
                            blocked_on_slot.append(name)
                            self._reserve_slot_for(name)
                            continue
                        written = reg.activate(name, slot, budget_s=self.write_budget_s())
                        self._release_drain(name)
                        if written is None:  # a write spread over the next gaps (see write_budget_s)
                            continue
                    job.seq.lease = reg.pin(name)
                    job.seq.lora_slot = job.seq.lease.slot
                job.seq.kv_slot = self.kv.allocate()
            except CoeError as exc:
                self._finish(job, exc)
                admitted.append(job)  # removed from waiting either way
                continue
            except Exception as exc:  # e.g. an allocation failure while copying weights
                self._finish(job, GenerationError(f"could not start the request: {type(exc).__name__}: {exc}"))
                admitted.append(job)
                continue
            job.seq.started = time.monotonic()
            key = name or BASE
            self._max_wait[key] = max(self._max_wait.get(key, 0.0), job.seq.started - job.seq.submitted)
            admitted.append(job)
            if not job.done:
                self._running.append(job)
        if admitted:
            done = set(map(id, admitted))
            self._waiting = [j for j in self._waiting if id(j) not in done]

    def _start_load(self, name: str) -> None:
        if name not in self._loads:
            fut = self._loader.submit(self._load_worker, name)
            self._loads[name] = fut

    def _load_worker(self, name: str) -> None:
        try:
            self.registry.ensure_packed(name, read=self.read_in_pieces)
        finally:
            self._wake()

    def _reserve_slot_for(self, name: str) -> None:
        """Mark one resident, in-use adapter as draining so that ``name`` gets its slot."""
        if name in self._draining.values():
            return
        candidates = [n for n in self.registry.resident() if n not in self._draining]
        if not candidates:
            return
        # The resident adapter used least recently (the registry's LRU order) gives way.
        order = {a: i for i, a in enumerate(self.registry.lru_order())}
        victim = min(candidates, key=lambda n: order.get(n, -1))
        self._draining[victim] = name

    def _release_drain(self, name: str) -> None:
        for victim, waiter in list(self._draining.items()):
            if waiter == name or victim not in self.registry.resident():
                del self._draining[victim]

    # ------------------------------------------------------------------ one step

    def _step(self) -> None:
        running = self._running
        alone = next((j for j in running if j in self._isolate), None)
        group = [alone] if alone is not None else running
        decodes = sorted((j for j in group if not j.seq.prefilling), key=lambda j: j.seq.kv_slot)
        prefill_jobs = []
        chunks = []
        # With streams decoding, prompts advance in smaller chunks so a step costs at most a few
        # decode steps (on a CPU a step's time grows with its tokens); alone, at full chunk size.
        budget = self.prefill_chunk if not decodes else min(self.prefill_chunk, max(32, self.prefill_chunk // 8))
        saved = {}
        for job in group:
            if job.seq.prefilling and budget > 0:
                saved[job] = job.seq.num_prefilled
                chunk = job.seq.next_prefill(budget)
                budget -= len(chunk.tokens)
                chunks.append(chunk)
                if chunk.last:
                    prefill_jobs.append(job)
        try:
            batch = build_step([j.seq.decode_item() for j in decodes], chunks, num_lora_slots=self.model.num_lora_slots,
                               kv=self.kv, device=self.model.device)
            logits = self.model.forward(batch, self.kv.k, self.kv.v)
        except Exception as exc:  # the per-request boundary for a whole step
            for job, n in saved.items():
                job.seq.num_prefilled = n
            if len(group) == 1:
                logger.warning("request failed in the model step: %s", exc)
                self._finish(group[0], GenerationError(f"generation failed in the model step: {type(exc).__name__}: {exc}"))
                self._running = [j for j in self._running if not j.done]
            else:
                logger.warning("a shared step failed (%s); retrying its %d requests one by one", exc, len(group))
                self._isolate.update(group)
            return
        if alone is not None:
            self._isolate.discard(alone)
        self.counters["steps"] += 1
        self.counters["prefill_tokens"] += sum(len(c.tokens) for c in chunks)
        sampled = decodes + prefill_jobs
        if not sampled:
            return
        try:
            tokens = sample_batch(logits, [j.seq.sampler for j in sampled])
        except Exception:  # one request's sampling settings or logits broke the batch call
            tokens = []
            for i, job in enumerate(sampled):
                try:
                    tokens.append(sample_batch(logits[i : i + 1], [job.seq.sampler])[0])
                except Exception as exc:
                    tokens.append(None)
                    self._finish(job, GenerationError(f"sampling failed: {type(exc).__name__}: {exc}"))
        finished = False
        for job, tok in zip(sampled, tokens):
            if tok is None or job.done:
                finished = True
                continue
            seq = job.seq
            try:
                delta = seq.append(tok)
            except Exception as exc:
                self._finish(job, GenerationError(f"detokenizing failed: {type(exc).__name__}: {exc}"))
                finished = True
                continue
            self.counters["tokens"] += 1
            if job.stream:
                try:
                    job.sink(StreamDelta(delta, (tok,)))
                except Exception:  # the consumer is gone
                    job.cancelled = True
            if seq.finished:
                self._finish(job, seq.output())
                finished = True
        if finished:
            self._running = [j for j in self._running if not j.done]
