"""Multi-LoRA as two fused Triton kernels: a gathered shrink and a gathered expand.

The design follows Punica's SGMV and vLLM's ``lora_shrink``/``lora_expand``: tokens are sorted by
slot once per step (``LoRAMeta``), and the grid has a slot axis, so each program multiplies a
tile of ONE slot's tokens by that slot's weights, gathered through ``sorted_token_ids`` instead
of copying activations or weights.

* ``_lora_shrink_kernel``: ``h[t, :] = x[t] @ A[s]^T`` for every packed slice at once (A's
  ``n*r`` rows are one matrix, so x is read once per packed call), fp32 accumulation, split-K over
  ``d_in`` with fp32 atomics when the grid would otherwise be too small to fill the GPU (decode).
* ``_lora_expand_kernel``: ``y[t, off_i + j] += scale[i, s] * h[t, i*r:(i+1)*r] @ B[s, off_i + j]``,
  read-modify-write of ``y`` in place; each element of ``y`` belongs to exactly one program, so
  no atomics. A slice axis in the grid handles unequal slice widths (GQA's narrow k/v).

Both kernels mask the token tail (slots with fewer tokens than BLOCK_M), the column tail (d not a
multiple of BLOCK_N), the K tail, and ranks below BLOCK_R, so any shape works. The grid is sized
from T and S, never from this step's counts, and programs with no work return at once: the
launch reads nothing back from the device. Tile sizes follow the step's host-side counts (which
only changes how much of a tile is masked), so a captured CUDA graph stays correct when replayed
with other counts, provided the engine keeps the metadata tensors static (see kernels/README.md).
No pointer arrays are loaded, so the kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors
(correct but slow: tests only).

Tile sizes come from ``_shrink_config``/``_expand_config``: heuristics written for Hopper-class
GPUs (H100/H200), not yet tuned on one (see kernels/README.md).

This module knows nothing about models; argument checks live in ``kernels.checks``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.meta import LoRAMeta

__all__ = ["add_lora", "add_lora_packed", "lora_shrink", "lora_expand"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [T, d_in]
    a_ptr,  # [S, N, d_in], N = n*r
    h_ptr,  # [T, N] float32: output (zeroed first when SPLIT_K > 1)
    sorted_ids_ptr,  # [T] int32: token indices grouped by slot
    slot_ids_ptr,  # [S] int32: active slots first, then -1
    slot_counts_ptr,  # [S] int32: tokens of each entry of slot_ids
    slot_starts_ptr,  # [S] int32: where each entry's tokens start in sorted_ids
    N,
    K,
    stride_xt,
    stride_xk,
    stride_as,
    stride_an,
    stride_ak,
    stride_ht,
    stride_hn,
    num_n_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.load(slot_ids_ptr + tl.program_id(2))
    if slot < 0:
        return
    count = tl.load(slot_counts_ptr + tl.program_id(2))
    pid_m = pid_mn // num_n_blocks
    pid_n = pid_mn % num_n_blocks
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(slot_starts_ptr + tl.program_id(2))

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = tl.load(sorted_ids_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_M, 1]
    a_cols = a_ptr + slot.to(tl.int64) * stride_as + offs_n[None, :] * stride_an  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        mask_k = k < K
        x_tile = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a_tile = tl.load(a_cols + k[:, None] * stride_ak, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if FP32_IEEE:
            acc += tl.dot(x_tile.to(tl.float32), a_tile.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x_tile, a_tile)

    h_ptrs = h_ptr + tokens[:, None] * stride_ht + offs_n[None, :] * stride_hn
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=mask)


@triton.jit
def _lora_expand_kernel(
    h_ptr,  # [T, n*r] float32
    b_ptr,  # [S, sum(d_i), r]
    y_ptr,  # [T, sum(d_i)]: updated in place
    scale_ptr,  # [n, S] any float dtype (read only when HAS_SCALE_TABLE)
    sorted_ids_ptr,  # [T] int32
    slot_ids_ptr,  # [S] int32
    slot_counts_ptr,  # [S] int32
    slot_starts_ptr,  # [S] int32
    slice_starts_ptr,  # [n+1] int32: column offsets of the slices in y and B
    scale_value,  # float: the scale when not HAS_SCALE_TABLE
    R,
    stride_ht,
    stride_hr,
    stride_bs,
    stride_bd,
    stride_br,
    stride_yt,
    stride_yd,
    stride_scale_i,
    stride_scale_s,
    num_n_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_SCALE_TABLE: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    piece = tl.program_id(1)  # which packed slice
    slot = tl.load(slot_ids_ptr + tl.program_id(2))
    if slot < 0:
        return
    count = tl.load(slot_counts_ptr + tl.program_id(2))
    pid_m = pid_mn // num_n_blocks
    pid_n = pid_mn % num_n_blocks
    col0 = tl.load(slice_starts_ptr + piece)
    width = tl.load(slice_starts_ptr + piece + 1) - col0
    if pid_m * BLOCK_M >= count or pid_n * BLOCK_N >= width:
        return
    start = tl.load(slot_starts_ptr + tl.program_id(2))

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = tl.load(sorted_ids_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    cols = col0 + offs_n

    h_tile = tl.load(
        h_ptr + tokens[:, None] * stride_ht + (piece * R + offs_r)[None, :] * stride_hr,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    )
    b_tile = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + cols[None, :] * stride_bd + offs_r[:, None] * stride_br,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    if FP32_IEEE:
        acc = tl.dot(h_tile, b_tile.to(tl.float32), input_precision="ieee")
    else:
        # half weights: h rounded to the weights' dtype feeds the tensor cores, fp32 accumulation
        acc = tl.dot(h_tile.to(b_tile.dtype), b_tile)
    if HAS_SCALE_TABLE:
        acc *= tl.load(scale_ptr + piece * stride_scale_i + slot * stride_scale_s).to(tl.float32)
    else:
        acc *= scale_value

    y_ptrs = y_ptr + tokens[:, None] * stride_yt + cols[None, :] * stride_yd
    mask = mask_m[:, None] & mask_n[None, :]
    y_tile = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=mask)


def _kernel_meta(meta: LoRAMeta) -> tuple[torch.Tensor, ...]:
    """int32 (sorted_ids [T], slot_ids [S], slot_counts [S], slot_starts [S]), once per step.

    Built from the meta's host tuples, so nothing is read back from the device; padded to S
    entries (slot -1, count 0) so the grid's slot axis is the same every step.
    """
    cached = meta.cache.get("triton.meta")
    if cached is None:
        pad = meta.num_slots - len(meta.active_slots_host)
        host = torch.tensor(
            [
                list(meta.active_slots_host) + [-1] * pad,
                list(meta.tokens_per_slot_host) + [0] * pad,
                list(meta.slot_starts_host) + [0] * pad,
            ],
            dtype=torch.int32,
        )
        table = host.to(meta.device, non_blocking=True)
        cached = (meta.sorted_token_ids.to(torch.int32), table[0], table[1], table[2])
        meta.cache["triton.meta"] = cached
    return cached


def _slice_starts(output_slices: tuple[int, ...], device: torch.device, cache: dict) -> torch.Tensor:
    key = ("triton.slices", output_slices)
    starts = cache.get(key)
    if starts is None:
        offs = [0]
        for d in output_slices:
            offs.append(offs[-1] + d)
        starts = torch.tensor(offs, dtype=torch.int32).to(device, non_blocking=True)
        cache[key] = starts
    return starts


def _block_m(tokens_per_slot: int) -> int:
    """Token tile from this step's largest slot (a host int: no sync). Any value is correct,
    since the grid covers T tokens per slot whatever the tile; it only sets how much of each
    tl.dot is masked padding."""
    return 16 if tokens_per_slot <= 16 else (32 if tokens_per_slot <= 32 else 64)


def _shrink_config(tokens_per_slot: int, num_active: int, n: int, k: int) -> dict:
    """Tiles for the shrink: [tokens of a slot] x [d_in] @ [d_in, n*r]. Memory bound on A and x."""
    block_m = _block_m(tokens_per_slot)
    block_n = max(16, min(triton.next_power_of_2(n), 128))
    block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(k))
    # split K until about 4 programs per SM (132 SMs on an H100/H200) do work; the token and slot
    # axes alone give too few in decode (16 tokens over 8 slots: 8 programs)
    programs = triton.cdiv(tokens_per_slot, block_m) * triton.cdiv(n, block_n) * num_active
    split_k = 1
    while split_k < 32 and programs * split_k < 512 and k >= 2 * block_k * split_k:
        split_k *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=3)


def _expand_config(tokens_per_slot: int, rank: int, width: int) -> dict:
    """Tiles for the expand: [tokens of a slot] x [r] @ [r, d_i]. Memory bound on B and y."""
    block_m = _block_m(tokens_per_slot)
    block_n = 128 if width >= 128 else max(16, triton.next_power_of_2(width))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=4, num_stages=2)


def _fp32_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot runs in exact fp32 (fp32 inputs; also bf16 under the interpreter, whose
    bf16 dot returns garbage in triton 3.9) rather than on half-precision tensor cores."""
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _check_device(t: torch.Tensor) -> None:
    if t.dtype == torch.float64:
        raise ValueError("the triton backend takes float32, float16 or bfloat16 tensors; use backend='torch' for float64")
    if not t.is_cuda and not _INTERPRET:
        raise ValueError(
            f"the triton backend needs CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 before "
            "importing triton to run it on CPU tensors, or use backend='torch'"
        )


def lora_shrink(
    x: torch.Tensor,  # [T, d_in]
    A: torch.Tensor,  # [S, N, d_in], N = n*r
    meta: LoRAMeta,
) -> torch.Tensor:
    """Gathered shrink into a float32 rank buffer, all packed slices at once.

    Semantics:
        for t in range(T):
            s = slots[t]
            if s >= 0: h[t] = A[s] @ x[t]        # [N], fp32 accumulation
        # rows of h for tokens without a slot are left unset (never read by lora_expand)

    Returns:
        h: float32 [T, N].
    """
    _check_device(x)
    num_tokens, k = x.shape
    num_slots, n, _ = A.shape
    sorted_ids, slot_ids, slot_counts, slot_starts = _kernel_meta(meta)
    cfg = _shrink_config(meta.max_tokens_per_slot, len(meta.active_slots_host), n, k)
    alloc = torch.zeros if cfg["SPLIT_K"] > 1 else torch.empty
    h = alloc(num_tokens, n, dtype=torch.float32, device=x.device)
    num_n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_M"]) * num_n_blocks, cfg["SPLIT_K"], num_slots)
    _lora_shrink_kernel[grid](
        x, A, h, sorted_ids, slot_ids, slot_counts, slot_starts,
        n, k,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2),
        h.stride(0), h.stride(1),
        num_n_blocks,
        FP32_IEEE=_fp32_dot(x.dtype),
        **cfg,
    )  # fmt: skip
    return h


def lora_expand(
    y: torch.Tensor,  # [T, sum(output_slices)], updated in place
    h: torch.Tensor,  # [T, n*r] float32, from lora_shrink
    B: torch.Tensor,  # [S, sum(output_slices), r]
    meta: LoRAMeta,
    scale: float | torch.Tensor,  # float | [S] | [n, S]
    output_slices: tuple[int, ...],
) -> torch.Tensor:
    """Gathered expand of every packed slice, added into ``y`` in place.

    Semantics:
        for t in range(T):
            s = slots[t]
            if s < 0: continue
            for i, d in enumerate(output_slices):
                off = sum(output_slices[:i])
                y[t, off:off+d] += scale[i, s] * B[s, off:off+d] @ h[t, i*r:(i+1)*r]

    Returns:
        ``y``.
    """
    _check_device(y)
    num_tokens = y.shape[0]
    num_slots, _, rank = B.shape
    sorted_ids, slot_ids, slot_counts, slot_starts = _kernel_meta(meta)
    slice_starts = _slice_starts(output_slices, y.device, meta.cache)
    cfg = _expand_config(meta.max_tokens_per_slot, rank, max(output_slices))
    num_n_blocks = triton.cdiv(max(output_slices), cfg["BLOCK_N"])
    if isinstance(scale, torch.Tensor):
        table = scale if scale.dim() == 2 else scale.unsqueeze(0)
        scale_args = (table, 0.0, table.stride(0) if table.shape[0] > 1 else 0, table.stride(1))
    else:
        scale_args = (h, float(scale), 0, 0)  # h is a placeholder pointer, never read
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_M"]) * num_n_blocks, len(output_slices), num_slots)
    _lora_expand_kernel[grid](
        h, B, y, scale_args[0], sorted_ids, slot_ids, slot_counts, slot_starts, slice_starts,
        scale_args[1], rank,
        h.stride(0), h.stride(1),
        B.stride(0), B.stride(1), B.stride(2),
        y.stride(0), y.stride(1),
        scale_args[2], scale_args[3],
        num_n_blocks,
        HAS_SCALE_TABLE=isinstance(scale, torch.Tensor),
        FP32_IEEE=_fp32_dot(B.dtype),
        **cfg,
    )  # fmt: skip
    return y


def add_lora_packed(
    y: torch.Tensor,  # [T, sum(output_slices)], updated in place
    x: torch.Tensor,  # [T, d_in]
    A: torch.Tensor,  # [S, n*r, d_in]
    B: torch.Tensor,  # [S, sum(output_slices), r]
    meta: LoRAMeta,
    scale: float | torch.Tensor,  # float | [S] | [n, S]
    output_slices: tuple[int, ...],
) -> torch.Tensor:
    """Packed multi-LoRA on the GPU: one shrink launch for all slices, one expand launch.

    Same signature and semantics as ``kernels.torch_ops.add_lora_packed``; arguments already checked.

    Semantics:
        for t in range(T):
            s = slots[t]
            if s < 0: continue
            for i, (off, d) in enumerate(slices):
                y[t, off:off+d] += scale[i, s] * B[s, off:off+d] @ (A[s, i*r:(i+1)*r] @ x[t])
    """
    if not meta.any_lora:
        return y
    h = lora_shrink(x, A, meta)
    return lora_expand(y, h, B, meta, scale, output_slices)


def add_lora(
    y: torch.Tensor,  # [T, d_out], updated in place
    x: torch.Tensor,  # [T, d_in]
    A: torch.Tensor,  # [S, r, d_in]
    B: torch.Tensor,  # [S, d_out, r]
    meta: LoRAMeta,
    scale: float | torch.Tensor,  # float | [S]
) -> torch.Tensor:
    """One-slice multi-LoRA on the GPU (``add_lora_packed`` with one slice).

    Semantics:
        for t in range(T):
            s = slots[t]
            if s >= 0: y[t] += scale[s] * B[s] @ (A[s] @ x[t])
    """
    return add_lora_packed(y, x, A, B, meta, scale, (y.shape[1],))
