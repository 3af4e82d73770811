"""Multi-LoRA ops in plain torch: the production path on CPU, and the fallback on a GPU without Triton.

Why hand-written: PEFT runs one adapter at a time (gather rows, two small matmuls, scatter back,
per adapter, per layer), so a mixed batch pays the per-op overhead once per adapter. Here every
call is a fixed handful of tensor ops whatever the number of adapters, and everything derived
from the slot mapping (padded index tables, masks, the plan itself) is built once per step and
cached on the ``LoRAMeta``, so the per-layer cost is only the math.

Three strategies, picked per step from host-side counts (see ``kernels/README.md`` for the
measurements behind the choice):

* ``single``  one active slot (one request, or all requests on one adapter): two plain ``mm``
  against that slot's A and B views, no gather at all when every token uses it. Fastest by far.
* ``padded``  several slots, tokens spread evenly enough: tokens are gathered into a dense
  ``[U, M, d_in]`` block (U active slots, M = most tokens of any slot, short slots padded with a
  repeated token whose contribution is masked to zero), then ONE ``bmm`` shrink and ONE ``bmm``
  expand per slice over all slots at once, and one ``index_add_`` scatters the result back.
  Punica's SGMV in spirit, with padding instead of segments because torch has no segmented GEMM.
* ``group``   several slots, very uneven token counts (long prefill next to short ones), where
  padding would waste more work than a per-slot loop of ``mm`` costs: gather, ``mm``, ``mm``,
  ``index_add_`` per active slot.

What is fused: the shrink of a packed call (q/k/v, gate/up) reads x once for all slices, as one
``[n*r, d_in]`` matmul per token group; the per-slot scale and the padding mask are folded into
the small rank-sized intermediate (not the wide output); expand writes every slice of ``y`` in
place with one ``addmm_``/``index_add_`` each. The wide output is never materialized twice.

Half-precision inputs (fp16/bf16) are computed in float32 and rounded once into ``y``: CPUs have
no fast half GEMM to lose, and it gives the fp32 accumulation the contract asks for.

This module knows nothing about models or layers; argument checks live in ``kernels.checks``.
"""

from __future__ import annotations

import torch

from kernels.meta import LoRAMeta

__all__ = ["add_lora", "add_lora_packed", "plan"]

# padded is used while its rows (U * M) stay within this factor of the real LoRA tokens; past it
# the padding costs more than a per-slot loop (measured: kernels/README.md, "strategy choice").
_PAD_WASTE_LIMIT = 2.0


def plan(meta: LoRAMeta) -> str:
    """The strategy this step uses: ``"single"``, ``"padded"`` or ``"group"`` (cached on the meta)."""
    cached = meta.cache.get("torch.plan")
    if cached is None:
        num_active = len(meta.active_slots_host)
        if num_active == 1:
            cached = "single"
        elif num_active * meta.max_tokens_per_slot <= _PAD_WASTE_LIMIT * meta.num_lora_tokens:
            cached = "padded"
        else:
            cached = "group"
        meta.cache["torch.plan"] = cached
    return cached


def _padded_tables(meta: LoRAMeta, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(pad_ids int64 [U*M], valid [U, M, 1] of ``dtype``), built once per step and dtype."""
    key = ("torch.padded", dtype)
    cached = meta.cache.get(key)
    if cached is None:
        counts = meta.tokens_per_slot  # [U]
        rows = torch.arange(meta.max_tokens_per_slot, device=meta.device)  # [M]
        valid = rows.unsqueeze(0) < counts.unsqueeze(1)  # [U, M]
        # a padding row repeats its slot's last real token: a valid index, masked to zero below
        src = meta.slot_starts.unsqueeze(1) + torch.minimum(rows.unsqueeze(0), counts.unsqueeze(1) - 1)
        pad_ids = meta.sorted_token_ids[src.flatten()]
        cached = (pad_ids, valid.unsqueeze(2).to(dtype))
        meta.cache[key] = cached
    return cached


def _token_mask(meta: LoRAMeta, dtype: torch.dtype) -> torch.Tensor:
    """[T, 1] of ``dtype``: 1 where the token has a slot, else 0 (once per step and dtype)."""
    key = ("torch.mask", dtype)
    cached = meta.cache.get(key)
    if cached is None:
        cached = (meta.slots >= 0).to(dtype).unsqueeze(1)
        meta.cache[key] = cached
    return cached


def _lora_rows(meta: LoRAMeta) -> torch.Tensor:
    """int64 [N]: the tokens that have a slot (the tail of sorted_token_ids)."""
    return meta.sorted_token_ids[meta.num_tokens - meta.num_lora_tokens :]


def _scale_rows(h, scale, rank, slots_index, num_slices):
    """Multiply the rank-sized intermediate ``h`` [..., n*r] in place by each row's slot scale.

    ``slots_index`` selects the scale entries for h's leading dims: an int for one slot, or an
    index tensor [U] whose entries broadcast over h's dim 0 (padded layout [U, M, n*r]).
    """
    if scale.dim() == 1:
        if isinstance(slots_index, int):
            return h.mul_(scale[slots_index])
        return h.mul_(scale.index_select(0, slots_index).view(-1, *([1] * (h.dim() - 1))))
    # per-slice scales [n, S]: view h's last dim as [n, r]
    hv = h.view(*h.shape[:-1], num_slices, rank)
    if isinstance(slots_index, int):
        hv.mul_(scale[:, slots_index].unsqueeze(1))
    else:
        hv.mul_(scale.index_select(1, slots_index).t().reshape(-1, *([1] * (hv.dim() - 3)), num_slices, 1))
    return h


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def add_lora_packed(
    y: torch.Tensor,  # [T, sum(output_slices)], updated in place
    x: torch.Tensor,  # [T, d_in]
    A: torch.Tensor,  # [S, n*r, d_in]
    B: torch.Tensor,  # [S, sum(output_slices), r]
    meta: LoRAMeta,
    scale: float | torch.Tensor,  # float | [S] | [n, S]
    output_slices: tuple[int, ...],
) -> torch.Tensor:
    """Packed multi-LoRA in torch; arguments already checked (``kernels.checks.check_args``).

    Semantics:
        for t in range(T):
            s = slots[t]
            if s < 0: continue
            for i, (off, d) in enumerate(slices):             # off = sum(output_slices[:i])
                y[t, off:off+d] += scale[i, s] * B[s, off:off+d] @ (A[s, i*r:(i+1)*r] @ x[t])

    Returns:
        ``y``.
    """
    if not meta.any_lora:
        return y
    num_slices = len(output_slices)
    rank = A.shape[1] // num_slices
    strategy = plan(meta)
    if strategy == "single":
        return _single(y, x, A, B, meta, scale, output_slices, rank)
    if strategy == "padded":
        return _padded(y, x, A, B, meta, scale, output_slices, rank)
    return _group(y, x, A, B, meta, scale, output_slices, rank)


def add_lora(
    y: torch.Tensor,  # [T, d_out], updated in place
    x: torch.Tensor,  # [T, d_in]
    A: torch.Tensor,  # [S, r, d_in]
    B: torch.Tensor,  # [S, d_out, r]
    meta: LoRAMeta,
    scale: float | torch.Tensor,  # float | [S]
) -> torch.Tensor:
    """One-slice multi-LoRA in torch: ``add_lora_packed`` with ``output_slices=(d_out,)``.

    Semantics:
        for t in range(T):
            s = slots[t]
            if s >= 0: y[t] += scale[s] * B[s] @ (A[s] @ x[t])
    """
    return add_lora_packed(y, x, A, B, meta, scale, (y.shape[1],))


def _expand_into(y, rows, h, B_s, scale, output_slices, rank):
    """y[rows, slice_i] += h[:, slice_i] @ B_s[slice_i]^T for each slice; rows None = all rows.

    ``B_s`` is one slot's B [sum(output_slices), r]; ``scale`` a float (tensor scales were
    already folded into ``h``).
    """
    alpha = scale if not isinstance(scale, torch.Tensor) else 1.0
    off = 0
    for i, d in enumerate(output_slices):
        y_i = y[:, off : off + d] if len(output_slices) > 1 else y
        h_i = h[:, i * rank : (i + 1) * rank] if len(output_slices) > 1 else h
        B_i = B_s[off : off + d] if len(output_slices) > 1 else B_s
        if rows is None:
            y_i.addmm_(h_i, B_i.t(), alpha=alpha)
        else:
            y_i.index_add_(0, rows, torch.mm(h_i, B_i.t()), alpha=alpha)
        off += d


def _single(y, x, A, B, meta, scale, output_slices, rank):
    """One active slot: mm against the slot's own A/B views (no gather when every token uses it)."""
    s = meta.single_slot
    cdtype = _compute_dtype(y.dtype)
    A_s, B_s = A[s], B[s]
    if cdtype != y.dtype:
        A_s, B_s = A_s.to(cdtype), B_s.to(cdtype)
    num_tokens, num_lora = meta.num_tokens, meta.num_lora_tokens
    if num_lora == num_tokens or 2 * num_lora >= num_tokens:
        # every (or most) token(s) use the slot: compute all rows, zero the rest's rank vector
        h = torch.mm(x if cdtype == x.dtype else x.to(cdtype), A_s.t())  # [T, n*r]
        if num_lora != num_tokens:
            h.mul_(_token_mask(meta, cdtype))
        rows = None
    else:
        rows = _lora_rows(meta)
        h = torch.mm(x.index_select(0, rows).to(cdtype), A_s.t())  # [N, n*r]
    if isinstance(scale, torch.Tensor):
        _scale_rows(h, scale.to(cdtype), rank, s, len(output_slices))
    if cdtype == y.dtype:
        _expand_into(y, rows, h, B_s, scale, output_slices, rank)
    else:
        out = torch.zeros(h.shape[0], y.shape[1], dtype=cdtype, device=y.device)
        _expand_into(out, None, h, B_s, scale, output_slices, rank)
        if rows is None:
            y.add_(out.to(y.dtype))
        else:
            y.index_add_(0, rows, out.to(y.dtype))
    return y


def _padded(y, x, A, B, meta, scale, output_slices, rank):
    """Several slots: dense [U, M, .] blocks, one bmm shrink, one bmm expand per slice."""
    cdtype = _compute_dtype(y.dtype)
    pad_ids, valid = _padded_tables(meta, cdtype)
    num_active, max_tokens = len(meta.active_slots_host), meta.max_tokens_per_slot
    if num_active == meta.num_slots:
        A_u, B_u = A, B  # every slot is active: the stacks themselves, no weight copy
    else:
        A_u, B_u = A.index_select(0, meta.active_slots), B.index_select(0, meta.active_slots)
    if cdtype != y.dtype:
        A_u, B_u = A_u.to(cdtype), B_u.to(cdtype)
    xp = x.index_select(0, pad_ids).view(num_active, max_tokens, -1)  # [U, M, d_in]
    if cdtype != xp.dtype:
        xp = xp.to(cdtype)
    h = torch.bmm(xp, A_u.transpose(1, 2))  # [U, M, n*r]
    h.mul_(valid)
    alpha = 1.0
    if isinstance(scale, torch.Tensor):
        _scale_rows(h, scale.to(cdtype), rank, meta.active_slots, len(output_slices))
    elif cdtype != y.dtype:
        h.mul_(scale)  # scale in float32 before the one rounding into y's half dtype
    else:
        alpha = scale  # free inside index_add_
    off = 0
    for i, d in enumerate(output_slices):
        if len(output_slices) > 1:
            h_i, B_i, y_i = h[:, :, i * rank : (i + 1) * rank], B_u[:, off : off + d], y[:, off : off + d]
        else:
            h_i, B_i, y_i = h, B_u, y
        out = torch.bmm(h_i, B_i.transpose(1, 2)).view(num_active * max_tokens, d)  # [U*M, d]
        y_i.index_add_(0, pad_ids, out if cdtype == y.dtype else out.to(y.dtype), alpha=alpha)
        off += d
    return y


def _group(y, x, A, B, meta, scale, output_slices, rank):
    """Several slots, uneven counts: per active slot, gather its tokens and run ``_single``'s math."""
    cdtype = _compute_dtype(y.dtype)
    sorted_ids = meta.sorted_token_ids
    scale_c = scale.to(cdtype) if isinstance(scale, torch.Tensor) else scale
    for s, start, count in zip(meta.active_slots_host, meta.slot_starts_host, meta.tokens_per_slot_host):
        rows = sorted_ids[start : start + count]
        A_s, B_s = A[s], B[s]
        if cdtype != y.dtype:
            A_s, B_s = A_s.to(cdtype), B_s.to(cdtype)
        h = torch.mm(x.index_select(0, rows).to(cdtype), A_s.t())  # [count, n*r]
        if isinstance(scale_c, torch.Tensor):
            _scale_rows(h, scale_c, rank, s, len(output_slices))
        if cdtype == y.dtype:
            _expand_into(y, rows, h, B_s, scale_c, output_slices, rank)
        else:
            out = torch.zeros(count, y.shape[1], dtype=cdtype, device=y.device)
            _expand_into(out, None, h, B_s, scale_c, output_slices, rank)
            y.index_add_(0, rows, out.to(y.dtype))
    return y
