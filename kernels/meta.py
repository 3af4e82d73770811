"""Per-step LoRA metadata: built once per decode/prefill step, read by every LoRA layer.

A step maps each token to an adapter slot (``slots[t] = s``, ``-1`` = no adapter). Every LoRA
layer of the step needs the same derived facts: which tokens use which slot, grouped; which slots
are active; and, on the host, whether any token uses an adapter at all. Deriving them once per
step instead of once per layer is what keeps the per-layer cost of a LoRA call down to a few
tensor ops (vLLM's ``LoRAKernelMeta`` makes the same split).

This module knows nothing about weights, dtypes of activations, or how a backend uses the
metadata beyond the index tensors it exposes; backends attach their own per-step precomputations
to ``LoRAMeta.cache`` (keyed by backend-chosen strings) so that work is also done once per step.
"""

from __future__ import annotations

import torch

__all__ = ["LoRAMeta"]


class LoRAMeta:
    """Token-to-slot mapping of one step, sorted and grouped by slot.

    Build it with :meth:`LoRAMeta.build` once per step, pass it to every ``add_lora`` /
    ``add_lora_packed`` call of that step, and drop it afterwards. It is read-only for callers.

    Attributes (T tokens, S slots, U active slots):
        num_tokens: T.
        num_slots: S, the leading dimension of the stacked A/B tensors it may be used with.
        any_lora: host bool, True when at least one token has a slot. When False every op returns
            at once without touching any tensor.
        slots: int64 [T] on ``device``, the mapping itself.
        sorted_token_ids: int64 [T] on ``device``, token indices ordered by slot (stable); the
            ``-1`` tokens come first, so the adapter tokens are ``sorted_token_ids[T - num_lora_tokens:]``.
        active_slots: int64 [U] on ``device``, the slots used this step, ascending.
        tokens_per_slot: int64 [U] on ``device``, how many tokens each active slot has.
        slot_starts: int64 [U] on ``device``, where each active slot's tokens begin in
            ``sorted_token_ids``.
        active_slots_host / tokens_per_slot_host / slot_starts_host: the same as tuples of ints.
        slots_host / sorted_token_ids_host: ``slots`` and ``sorted_token_ids`` as tuples of ints
            (what host-side backends read without a tensor op).
        num_lora_tokens: host int, tokens with a slot.
        max_tokens_per_slot: host int, the largest entry of ``tokens_per_slot`` (0 if none).
        single_slot: host int: the slot when exactly one slot is active, else -1.
        device: where the device tensors live; device_index: its ``get_device()`` (-1 = CPU).
        cache: dict for backends' per-step precomputations (see the module docstring).

    Example:
        >>> meta = LoRAMeta.build(torch.tensor([2, -1, 0, 2]), num_slots=4)
        >>> meta.any_lora, meta.active_slots_host, meta.tokens_per_slot_host
        (True, (0, 2), (1, 2))
    """

    __slots__ = (
        "num_tokens",
        "num_slots",
        "any_lora",
        "slots",
        "sorted_token_ids",
        "active_slots",
        "tokens_per_slot",
        "slot_starts",
        "active_slots_host",
        "tokens_per_slot_host",
        "slot_starts_host",
        "slots_host",
        "sorted_token_ids_host",
        "num_lora_tokens",
        "max_tokens_per_slot",
        "single_slot",
        "device",
        "device_index",
        "cache",
    )

    @classmethod
    def build(cls, slots: torch.Tensor, num_slots: int, *, device: torch.device | str | None = None) -> "LoRAMeta":
        """Derive the step's metadata from the per-token slot mapping.

        The mapping is read on the host (one device-to-host copy if ``slots`` lives on a GPU: this
        is the step's only sync, so build the mapping on the CPU and pass ``device`` when you can).

        Args:
            slots: int tensor [T], the slot of each token, ``-1`` for none. Any integer dtype.
            num_slots: S, the number of stacked adapter slots (``A.shape[0]``).
            device: where the device-side tensors go. Default: ``slots.device``.

        Returns:
            The metadata, with ``any_lora`` False when no token has a slot.

        Raises:
            ValueError: ``slots`` is not a 1-D integer tensor, ``num_slots`` is not a positive
                int, or a slot is outside ``[-1, num_slots)``.
        """
        if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
            shape = tuple(slots.shape) if isinstance(slots, torch.Tensor) else type(slots).__name__
            raise ValueError(f"slots must be a 1-D integer tensor [T]; got {shape}")
        if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
            raise ValueError(f"slots must have an integer dtype; got {slots.dtype}")
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int (the stacked slot count S); got {num_slots!r}")
        device = torch.device(device) if device is not None else slots.device
        host = slots.to("cpu", torch.int64)
        values = host.tolist()  # the grouping below is plain Python: T is small, and ops cost more
        num_tokens = len(values)

        self = cls.__new__(cls)
        self.num_tokens = num_tokens
        self.num_slots = num_slots
        self.cache = {}
        lo, hi = (min(values), max(values)) if values else (-1, -1)
        if lo < -1 or hi >= num_slots:
            bad = [v for v in values if v < -1 or v >= num_slots]
            raise ValueError(
                f"slots must lie in [-1, {num_slots}) for num_slots={num_slots}; "
                f"got {bad[:8]} among {num_tokens} tokens"
            )
        self.any_lora = hi >= 0
        self.slots_host = tuple(values)
        self.slots = host.to(device, non_blocking=True) if device != host.device else host
        self.device = device = self.slots.device  # "cuda" -> "cuda:0", so device checks compare equal
        self.device_index = self.slots.get_device()  # -1 on the CPU; what the per-call checks compare

        if not self.any_lora:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            self.sorted_token_ids = torch.arange(num_tokens, device=device)
            self.sorted_token_ids_host = tuple(range(num_tokens))
            self.active_slots = self.tokens_per_slot = self.slot_starts = empty
            self.active_slots_host = self.tokens_per_slot_host = self.slot_starts_host = ()
            self.num_lora_tokens = self.max_tokens_per_slot = 0
            self.single_slot = -1
            return self

        by_slot: dict[int, list[int]] = {}
        for t, s in enumerate(values):
            by_slot.setdefault(s, []).append(t)  # stable: tokens keep their order within a slot
        order = by_slot.pop(-1, [])
        num_none = len(order)
        active = sorted(by_slot)
        counts, starts = [], []
        for s in active:
            starts.append(len(order))
            counts.append(len(by_slot[s]))
            order.extend(by_slot[s])

        self.active_slots_host = tuple(active)
        self.sorted_token_ids_host = tuple(order)
        self.tokens_per_slot_host = tuple(counts)
        self.slot_starts_host = tuple(starts)
        self.num_lora_tokens = num_tokens - num_none
        self.max_tokens_per_slot = max(counts)
        self.single_slot = active[0] if len(active) == 1 else -1
        packed = torch.tensor([order, active + [0] * (num_tokens - len(active))], dtype=torch.int64)
        table = torch.tensor([counts, starts], dtype=torch.int64)
        if device != packed.device:
            packed, table = packed.to(device, non_blocking=True), table.to(device, non_blocking=True)
        self.sorted_token_ids = packed[0]
        self.active_slots = packed[1, : len(active)]
        self.tokens_per_slot = table[0]
        self.slot_starts = table[1]
        return self

    def __repr__(self) -> str:
        return (
            f"LoRAMeta(num_tokens={self.num_tokens}, num_slots={self.num_slots}, any_lora={self.any_lora}, "
            f"active_slots={self.active_slots_host}, tokens_per_slot={self.tokens_per_slot_host})"
        )
