"""The KV cache: one statically preallocated slot per running sequence.

Why static slots rather than paged blocks: on a CPU (and for the small models this engine mostly
serves) the cost that matters is ops per layer. With a slot per sequence, a decode batch whose
sequences sit in consecutive slots reads its keys and values as one strided view
``k[layer][lo:hi, :, :L]`` straight into SDPA, with no gather; paged blocks would need a gather
(or a paged-attention kernel) every layer. Writes are one ``index_put_`` per layer for all of a
step's tokens. The price is memory reserved for ``max_batch x max_seq_len`` tokens, which paging
would share; slots are handed out lowest-first so that low concurrency only ever touches the first
few, and the memory is reserved but not committed until used (see ``ensure_clean``).

Layout per layer: ``[max_batch, K, max_len, D]`` (K kv heads, D head dim), max_len rounded up to a
multiple of 8.

This module knows nothing about models' weights, adapters or requests.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    """Per-layer K and V tensors plus the free-slot list.

    Args:
        n_layers / n_kv_heads / head_dim: the model's attention shape.
        max_batch: sequences held at once (slots).
        max_seq_len: tokens per sequence.
        dtype / device: of the cache tensors.
    """

    # Positions are zeroed in pages of this many tokens the first time a step reads them.
    CLEAN_CHUNK = 256

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_batch: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_batch = max_batch
        self.max_len = -(-max_seq_len // 8) * 8
        shape = (max_batch, n_kv_heads, self.max_len, head_dim)
        # torch.empty reserves address space without touching it, so resident memory grows with
        # the slots actually used. Attention reads up to the longest context of a batch, so rows
        # past a shorter sequence's end must hold finite numbers (a masked 0 * NaN is still NaN):
        # ``ensure_clean`` zeroes each slot's positions the first time they can be read.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._clean = [0] * max_batch
        self._free = list(range(max_batch))
        heapq.heapify(self._free)
        self.bytes_per_token = 2 * n_layers * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take the lowest free slot (keeps running sequences in consecutive slots)."""
        if not self._free:
            raise RuntimeError("KV cache has no free slot; the scheduler must check num_free first")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        """Give a slot back; its contents stay (finite) and are overwritten by the next owner."""
        assert 0 <= slot < self.max_batch and slot not in self._free, f"KV slot {slot} released twice"
        heapq.heappush(self._free, slot)

    def ensure_clean(self, slot: int, length: int, written: int) -> None:
        """Make positions ``[0, length)`` of ``slot`` safe to read before a step reads them.

        Args:
            slot: the KV slot.
            length: the step reads positions below this (the longest context in its batch).
            written: positions ``[0, written)`` already hold this slot's sequence; never zeroed.
        """
        if self._clean[slot] >= length:
            return
        start = max(self._clean[slot], written)
        end = min(self.max_len, -(-length // self.CLEAN_CHUNK) * self.CLEAN_CHUNK)
        if end > start:
            for t in self.k:
                t[slot, :, start:end].zero_()
            for t in self.v:
                t[slot, :, start:end].zero_()
        self._clean[slot] = end

    def reserved_bytes(self) -> int:
        """Bytes of address space reserved for the whole cache."""
        return self.bytes_per_token * self.max_batch * self.max_len
