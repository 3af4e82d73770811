"""The float64 oracle for the multi-LoRA ops: slow, obvious, and the ground truth of the tests.

Every token is handled on its own with an einsum over its own copy of its slot's A and B, in
float64, so there is no grouping, sorting, tiling or accumulation-order subtlety to get wrong. Nothing here
is meant to be fast; the production paths are ``torch_ops`` (CPU) and ``triton_ops`` (GPU).
"""

from __future__ import annotations

import torch

__all__ = ["lora_delta", "add_lora", "add_lora_packed"]


def _scale_table(scale: float | torch.Tensor, num_slices: int, num_slots: int) -> torch.Tensor:
    """Any accepted scale form -> float64 [n, S] on the CPU."""
    if not isinstance(scale, torch.Tensor):
        return torch.full((num_slices, num_slots), float(scale), dtype=torch.float64)
    table = scale.detach().to("cpu", torch.float64)
    if table.dim() == 1:
        table = table.expand(num_slices, num_slots)
    return table


def lora_delta(
    x: torch.Tensor,  # [T, d_in]
    A: torch.Tensor,  # [S, n*r, d_in]
    B: torch.Tensor,  # [S, sum(output_slices), r]
    slots: torch.Tensor,  # [T] int, -1 = none
    scale: float | torch.Tensor,  # float | [S] | [n, S]
    output_slices: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The LoRA contribution alone, float64 [T, sum(output_slices)] on the CPU.

    Semantics:
        for t in range(T):
            s = slots[t]
            if s < 0: delta[t] = 0; continue
            for i, (off, d) in enumerate(slices):           # off = sum(output_slices[:i])
                h = A[s, i*r:(i+1)*r, :] @ x[t]              # [r]
                delta[t, off:off+d] = scale[i, s] * B[s, off:off+d, :] @ h
    """
    num_slots, packed_rank, _ = A.shape
    output_slices = tuple(output_slices) if output_slices is not None else (B.shape[1],)
    num_slices = len(output_slices)
    rank = packed_rank // num_slices
    scales = _scale_table(scale, num_slices, num_slots)
    x64, A64, B64 = (t.detach().to("cpu", torch.float64) for t in (x, A, B))
    slots_host = slots.detach().to("cpu", torch.int64)
    rows = torch.nonzero(slots_host >= 0).flatten()
    s = slots_host[rows]  # each row's own slot: gathered per token, no grouping
    delta = torch.zeros(x.shape[0], sum(output_slices), dtype=torch.float64)
    off = 0
    for i, d in enumerate(output_slices):
        h = torch.einsum("trk,tk->tr", A64[s, i * rank : (i + 1) * rank], x64[rows])  # [N, r]
        delta[rows, off : off + d] = scales[i, s].unsqueeze(1) * torch.einsum("tjr,tr->tj", B64[s, off : off + d], h)
        off += d
    return delta


def add_lora(y, x, A, B, slots_or_meta, scale):
    """``add_lora`` computed by the oracle (float64, then rounded once into ``y``'s dtype).

    Same contract as :func:`kernels.add_lora`; rows whose slot is -1 are left bit-identical.
    """
    return add_lora_packed(y, x, A, B, slots_or_meta, scale, (B.shape[1],))


def add_lora_packed(y, x, A, B, slots_or_meta, scale, output_slices):
    """``add_lora_packed`` computed by the oracle; same contract as :func:`kernels.add_lora_packed`."""
    slots = slots_or_meta if isinstance(slots_or_meta, torch.Tensor) else slots_or_meta.slots
    slots_host = slots.detach().to("cpu", torch.int64)
    rows = torch.nonzero(slots_host >= 0).flatten()
    if rows.numel() == 0:
        return y
    delta = lora_delta(x, A, B, slots_host, scale, output_slices)
    updated = y.detach().to("cpu", torch.float64)[rows] + delta[rows]
    y[rows.to(y.device)] = updated.to(y.device, y.dtype)
    return y
