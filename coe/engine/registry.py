"""The adapter registry: names, a CPU tier (LRU), and the device slots of the model's LoRA stacks.

Three places an adapter can be (``AdapterInfo.location``):
- ``disk``: registered (name -> source) but not read; the first use reads it;
- ``cpu``: read, validated and packed in CPU memory; at most ``max_cpu_loras`` such adapters
  are kept beyond the device-resident ones, least recently used dropped first;
- ``device``: copied into one of ``max_loras`` slots of the stacked A/B tensors that every LoRA
  layer reads. A resident adapter keeps its packed CPU copy, so eviction is free and the next
  activation is a copy.

An adapter used by a running sequence is pinned (``in_flight > 0``) and is never evicted. The
stacks' rank is the largest resident adapter's rank (they grow when a larger one arrives; smaller
ranks are zero-padded), so a deployment of r=16 adapters never pays for ``max_lora_rank=64``.

Threading: ``read``/``load`` do disk IO and validation and may run on any thread; everything that
touches the model's stacks (``activate``, ``continue_writes``, ``ensure_rank``) must run where no
forward pass is in flight (the engine's step loop, between steps). A lock guards the bookkeeping.

Writing a slot may be spread over several gaps between steps (``activate``'s ``budget_s``): the
slot is then reserved for the adapter (no other adapter takes it, no step reads it) but the
adapter is not resident (``slot_of`` is None) until its last layer is written; the step loop
goes on with ``continue_writes``. Why: copying an r=16 all-linear adapter into a slot takes one
pass over ~30 MB (its float32 stacks and their float16 copies, 21-49 ms on a 2-core Xeon VM), as
long as a 16-row decode step there, and written in one gap it lengthened that gap by about half
for every running stream.

This module knows nothing about requests or HTTP; ``adapters.py`` does the reading.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generator

import torch

from coe.engine.adapters import PackedAdapter, read_adapter, read_adapter_steps
from coe.engine.model import GROUP_BITS, Transformer
from coe.engine.outputs import AdapterInfo
from coe.errors import AdapterError, UnknownModel

logger = logging.getLogger("coe.engine")


@dataclass
class _Entry:
    name: str
    source: str
    packed: PackedAdapter | None = None
    slot: int | None = None
    in_flight: int = 0
    last_used: int = 0
    removed: bool = False
    writing: int | None = None  # the slot being written, while a write spans several gaps (see activate)
    write_layer: int = 0  # the next layer that write copies
    write_fused: bool = True  # whether every stack written so far may run in the fused kernel


class AdapterRegistry:
    """Adapters by name, their CPU copies, and the model's device slots.

    Args:
        model: the model whose LoRA stacks are the device slots.
        max_loras: device slots.
        max_cpu_loras: packed adapters kept in CPU memory beyond the resident ones.
        max_lora_rank: adapters above this rank are refused.
        base_names: names identifying the base model (adapter base-model check).
        strict_base_model: refuse adapters trained for another base model.
    """

    def __init__(self, model: Transformer, *, max_loras: int, max_cpu_loras: int, max_lora_rank: int,
                 base_names: tuple[str, ...] = (), strict_base_model: bool = False) -> None:
        self.model = model
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.base_names = base_names
        self.strict_base_model = strict_base_model
        self._entries: dict[str, _Entry] = {}
        self._slots: list[_Entry | None] = [None] * max_loras
        self._cpu_lru: OrderedDict[str, None] = OrderedDict()  # packed, not resident
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self._written = threading.Condition(self._lock)  # notified when a write ends (done or called off)
        self.generation = 0  # bumped whenever slots change (for tests and stats)

    # ------------------------------------------------------------------ names

    def register(self, name: str, source: str) -> None:
        """Record ``name -> source`` without reading it (read on first use)."""
        with self._lock:
            old = self._entries.get(name)
            if old is not None and not old.removed:
                if old.source == str(source):
                    return
                self._remove(old)
            self._entries[name] = _Entry(name, str(source))

    def has(self, name: str) -> bool:
        with self._lock:
            e = self._entries.get(name)
            return e is not None and not e.removed

    def names(self) -> list[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if not e.removed]

    def _entry(self, name: str) -> _Entry:
        e = self._entries.get(name)
        if e is None or e.removed:
            known = ", ".join(sorted(self.names())) or "none"
            raise UnknownModel(f"adapter {name!r} is not loaded (known adapters: {known}); load it first", param="adapter")
        return e

    # ------------------------------------------------------------------ reading (any thread)

    def read(self, name: str, source: str) -> PackedAdapter:
        """Read and validate ``source`` for ``name`` (no registry change). Raises ``AdapterError``."""
        return read_adapter(name, source, self.model.args, max_rank=self.max_lora_rank, dtype=self.model.dtype,
                            base_names=self.base_names, strict_base_model=self.strict_base_model)

    def read_steps(self, name: str, source: str) -> Generator[None, None, PackedAdapter]:
        """:meth:`read` as a generator of pieces of work, the file read through in the first
        (``read_adapter_steps`` with ``read_ahead``)."""
        return read_adapter_steps(name, source, self.model.args, max_rank=self.max_lora_rank, dtype=self.model.dtype,
                                  base_names=self.base_names, strict_base_model=self.strict_base_model, read_ahead=True)

    def load(self, name: str, source: str | None = None, read: Callable[[str, str], PackedAdapter] | None = None) -> PackedAdapter:
        """Register (or re-register) and read ``name`` into the CPU tier now.

        A new source replaces the old one only once it has loaded cleanly: a failed load leaves
        the registry as it was. ``read(name, source)`` reads it (default :meth:`read`; the engine
        passes ``Scheduler.read_in_pieces``).
        """
        with self._lock:
            e = self._entries.get(name)
            if source is None:
                e = self._entry(name)
                source = e.source
                if e.packed is not None:
                    return e.packed
        packed = (read or self.read)(name, str(source))
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.removed or e.source != str(source):
                if e is not None and not e.removed:
                    self._remove(e)
                e = self._entries[name] = _Entry(name, str(source))
            self._set_packed(e, packed)
            return packed

    def ensure_packed(self, name: str, read: Callable[[str, str], PackedAdapter] | None = None) -> PackedAdapter:
        """The packed copy of a registered adapter, reading it from its source if needed (with
        ``read``, as :meth:`load`)."""
        with self._lock:
            e = self._entry(name)
            if e.packed is not None:
                return e.packed
            source = e.source
        packed = (read or self.read)(name, source)
        with self._lock:
            e = self._entries.get(name)
            if e is not None and not e.removed and e.source == source:
                if e.packed is None:
                    self._set_packed(e, packed)
                return e.packed
        return packed

    def is_packed(self, name: str) -> bool:
        with self._lock:
            e = self._entries.get(name)
            return e is not None and not e.removed and e.packed is not None

    def _set_packed(self, e: _Entry, packed: PackedAdapter) -> None:
        e.packed = packed
        e.last_used = next(self._clock)
        if e.slot is None:
            self._cpu_lru[e.name] = None
            self._cpu_lru.move_to_end(e.name)
            self._trim_cpu()

    def _trim_cpu(self) -> None:
        while len(self._cpu_lru) > self.max_cpu_loras:
            victim = next(iter(self._cpu_lru))
            del self._cpu_lru[victim]
            ve = self._entries.get(victim)
            if ve is not None and ve.slot is None:
                ve.packed = None

    # ------------------------------------------------------------------ device slots (step loop only)

    def slot_of(self, name: str) -> int | None:
        with self._lock:
            e = self._entries.get(name)
            return None if e is None or e.removed else e.slot

    def free_or_evictable_slot(self, exclude: Callable[[str], bool] | None = None) -> int | None:
        """A slot ``activate`` could use now: a free one, else the least recently used unpinned one
        whose adapter ``exclude`` does not protect (never one being written)."""
        with self._lock:
            for i, e in enumerate(self._slots):
                if e is None:
                    return i
            best = None
            for i, e in enumerate(self._slots):
                if e.writing is None and e.in_flight == 0 and not (exclude and exclude(e.name)):
                    if best is None or e.last_used < self._slots[best].last_used:
                        best = i
            return best

    def activate(self, name: str, slot: int | None = None, budget_s: float | None = None) -> int | None:
        """Make ``name`` resident (it must be packed) and return its slot.

        Args:
            name: a registered, packed adapter.
            slot: the slot to use (from ``free_or_evictable_slot``); default: pick one. Ignored
                while ``name``'s write is under way (it goes on in its slot).
            budget_s: seconds this call may spend copying layers (at least one layer): a write
                that does not fit is left under way and None returned; :meth:`continue_writes`
                (or another call) goes on with it. None: the whole write now.

        Raises:
            AdapterError: no slot is free and every resident adapter is pinned.
        """
        with self._lock:
            e = self._entry(name)
            if e.slot is not None:
                e.last_used = next(self._clock)
                return e.slot
            if e.writing is None:
                if e.packed is None:
                    raise AdapterError(name, "is not in memory yet (internal: ensure_packed before activate)")
                if slot is None:
                    slot = self.free_or_evictable_slot()
                if slot is None:
                    raise AdapterError(name, f"all {self.max_loras} adapter slots are in use by running requests; retry shortly")
                old = self._slots[slot]
                assert old is None or (old.in_flight == 0 and old.writing is None), f"slot {slot} holds pinned adapter {old.name!r}"
                if old is not None:
                    old.slot = None
                    self._slots[slot] = None
                    if old.removed:
                        old.packed = None
                    elif old.packed is not None:
                        self._cpu_lru[old.name] = None
                self._ensure_rank(e.packed.rank)
                self._begin_write(e, slot)
            return self._write_some(e, budget_s)

    def writing(self, name: str) -> bool:
        """Whether ``name``'s slot is being written (see :meth:`activate`'s ``budget_s``)."""
        with self._lock:
            e = self._entries.get(name)
            return e is not None and not e.removed and e.writing is not None

    def _writes(self) -> list[_Entry]:
        """The writes under way: entries holding a slot they are still writing."""
        return [e for e in self._slots if e is not None and e.writing is not None]

    def pending_writes(self) -> bool:
        with self._lock:
            return bool(self._writes())

    def continue_writes(self, budget_s: float | None = None) -> list[str]:
        """Go on with the writes under way, in slot order, for up to ``budget_s`` seconds (at
        least one layer; None: to their end). Returns the adapters that became resident."""
        done: list[str] = []
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        with self._lock:
            for i, e in enumerate(self._writes()):
                if i and deadline is not None and time.perf_counter() >= deadline:
                    break
                left = None if deadline is None else max(0.0, deadline - time.perf_counter())
                if self._write_some(e, left) is not None:
                    done.append(e.name)
        return done

    def wait_written(self, name: str, timeout: float | None = None) -> bool:
        """Block until ``name``'s write under way (if any) ends; True if it is resident then."""
        with self._written:
            self._written.wait_for(lambda: not self.writing(name), timeout)
            return self.slot_of(name) is not None

    def _begin_write(self, e: _Entry, slot: int) -> None:
        """Reserve ``slot`` for ``e`` (no longer free, never evictable, read by no step) and
        start its write at layer 0."""
        self._set_groups(slot, e.packed)
        e.writing, e.write_layer, e.write_fused = slot, 0, True
        self._slots[slot] = e
        self._cpu_lru.pop(e.name, None)  # held by its slot from now on, never trimmed

    def _write_some(self, e: _Entry, budget_s: float | None) -> int | None:
        """Copy layers of ``e``'s write (at least one; all of them when ``budget_s`` is None);
        the slot once the last one is in, else None."""
        slot, layers = e.writing, e.packed.layers
        end = None if budget_s is None else time.perf_counter() + budget_s
        while e.write_layer < len(layers):
            e.write_fused &= self._write_layer(slot, e.write_layer, layers[e.write_layer], e.packed.rank)
            e.write_layer += 1
            if end is not None and time.perf_counter() >= end:
                break
        if e.write_layer < len(layers):
            return None
        self._set_fused(slot, e.write_fused, e.name)
        e.slot = slot
        e.last_used = next(self._clock)
        self._end_write(e)
        self._trim_cpu()
        self.generation += 1
        return slot

    def _end_write(self, e: _Entry) -> None:
        e.writing = None
        self._written.notify_all()

    def _ensure_rank(self, rank: int) -> None:
        """Grow the stacks to ``rank`` (re-copying resident adapters), never shrink."""
        model = self.model
        if model.num_lora_slots == self.max_loras and model.lora_rank >= rank:
            return
        model.allocate_lora(self.max_loras, max(rank, model.lora_rank))
        for i, e in enumerate(self._slots):
            if e is not None and e.writing is not None:  # the new stacks hold none of it: start again
                self._begin_write(e, i)
            elif e is not None:
                self._write_slot(i, e.packed)

    def _write_slot(self, slot: int, packed: PackedAdapter) -> None:
        """Copy a packed adapter into ``slot`` of every stack at once (zeros where it has no
        weights): a resident adapter re-copied after the stacks grew (``_ensure_rank``).

        Tried: copying into a reserved free slot from the thread that read the adapter, the loop
        only publishing it. The bench's ITL-during-load case, 10 loads each in one engine (8
        streams, 2-core EPYC, ninth session of 2026-12-07): p99 over median 1.25-1.83 (median
        1.45) with that, 1.26-1.79 (1.49) with the write on the loop thread, and 1.13-1.70 (1.41)
        for a load that writes no slot: on two cores the copy takes a core from the step wherever
        it runs, so the extra concurrency bought nothing measurable and was not kept. A write
        spread over the gaps between steps (``activate``'s ``budget_s``) is what the step loop does
        now."""
        self._set_groups(slot, packed)
        fused = True
        for li, groups in enumerate(packed.layers):
            fused &= self._write_layer(slot, li, groups, packed.rank)
        self._set_fused(slot, fused, packed.name)

    def _set_groups(self, slot: int, packed: PackedAdapter) -> None:
        """Tell the model which fused groups of each layer ``packed`` (written into ``slot``) has."""
        self.model.set_slot_groups(slot, [sum(GROUP_BITS[g] for g in groups) for groups in packed.layers])

    def _set_fused(self, slot: int, fused: bool, name: str) -> None:
        """Tell the model whether ``slot``'s adapter (all of it written) may run in the fused kernel."""
        self.model.set_slot_fused(slot, fused)
        if not fused:
            logger.warning("adapter %r has LoRA A or B weights beyond float16's range (|value| > 65504): its decode "
                           "steps skip the fused block kernel, which reads float16 copies of A and B, and run the "
                           "slower float32 path", name)

    @torch.inference_mode()
    def _write_layer(self, slot: int, li: int, groups: dict, r: int) -> bool:
        """Copy one layer of a packed adapter (rank ``r``) into ``slot`` of that layer's stacks
        (zeros where it has no weights), with their fused copies (~1 ms a layer for SmolLM2 at
        r=16). Returns whether every stack may run the slot in the fused kernel (see
        ``LoRAStack.refresh``)."""
        fused = True
        for group, stack in self.model.layers[li].lora.items():
            A, Bt, scale = stack.A[slot], stack.Bt[slot], stack.scale
            trio = groups.get(group)
            if trio is None:
                A.zero_()
                Bt.zero_()
                scale[:, slot] = 0
                fused &= stack.refresh(slot)
                continue
            pa, pbt, ps = trio
            if r == stack.rank:
                A.copy_(pa)
                Bt.copy_(pbt)
            else:  # zero-pad the rank up to the stacks'
                n = len(stack.output_slices)
                A.zero_()
                A.view(n, stack.rank, stack.d_in)[:, :r].copy_(pa.view(n, r, stack.d_in))
                Bt.zero_()
                Bt[:r].copy_(pbt)
            scale[:, slot] = ps
            if stack.folded:  # see LoRAStack: the scaling lives in A's slice rows
                A.view(len(stack.output_slices), stack.rank, stack.d_in).mul_(ps.to(A.dtype).view(-1, 1, 1))
            fused &= stack.refresh(slot)
        return fused

    def pin(self, name: str) -> "_Entry":
        """Count a running sequence on a resident adapter.

        Returns:
            A lease: pass it to :meth:`unpin`; ``lease.slot`` is the adapter's slot. (A lease, not
            the name, because an adapter unloaded mid-request is no longer findable by name.)
        """
        with self._lock:
            e = self._entry(name)
            assert e.slot is not None, f"adapter {name!r} pinned while not resident"
            e.in_flight += 1
            e.last_used = next(self._clock)
            return e

    def unpin(self, lease: "_Entry") -> None:
        """A sequence on the adapter finished; frees its slot if it was unloaded meanwhile."""
        with self._lock:
            lease.in_flight = max(0, lease.in_flight - 1)
            lease.last_used = next(self._clock)
            if lease.removed and lease.in_flight == 0:
                self._free_slot(lease)

    def in_flight(self, name: str) -> int:
        with self._lock:
            e = self._entries.get(name)
            return 0 if e is None else e.in_flight

    # ------------------------------------------------------------------ unload / info

    def unload(self, name: str) -> None:
        """Forget ``name``. New requests can no longer use it; running ones finish on it, then its
        slot is freed.

        Raises:
            UnknownModel: no such adapter.
        """
        with self._lock:
            self._remove(self._entry(name))

    def _remove(self, e: _Entry) -> None:
        e.removed = True
        self._cpu_lru.pop(e.name, None)
        if self._entries.get(e.name) is e:
            del self._entries[e.name]
        if e.in_flight == 0:
            self._free_slot(e)

    def _free_slot(self, e: _Entry) -> None:
        if e.writing is not None:  # a write under way is called off; its slot is free again
            if self._slots[e.writing] is e:
                self._slots[e.writing] = None
            self._end_write(e)
        if e.slot is not None and self._slots[e.slot] is e:
            self._slots[e.slot] = None
            self.generation += 1
        e.slot = None
        e.packed = None

    def lru_order(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return [e.name for e in sorted((e for e in self._slots if e is not None and e.writing is None),
                                           key=lambda e: e.last_used)]

    def resident(self) -> list[str]:
        with self._lock:
            return [e.name for e in self._slots if e is not None and e.writing is None]

    def info(self) -> list[AdapterInfo]:
        with self._lock:
            out = []
            for e in self._entries.values():
                if e.removed:
                    continue
                location = "device" if e.slot is not None else "cpu" if e.packed is not None else "disk"
                out.append(AdapterInfo(
                    name=e.name, source=e.source, location=location,
                    bytes=e.packed.nbytes if e.packed is not None else 0,
                    pinned=e.in_flight > 0, in_flight=e.in_flight,
                    rank=e.packed.rank if e.packed is not None else None,
                ))
            return out
