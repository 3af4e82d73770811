"""coe's multi-LoRA kernels: many adapters applied to one batch in a fixed number of ops.

Every LoRA linear of the engine adds ``scale * B[s] @ (A[s] @ x[t])`` to its base output for the
adapter slot ``s`` of each token ``t``. ``add_lora`` does this for one projection and
``add_lora_packed`` for packed projections (q/k/v, gate/up) that share one input, reading it once.
``add_lora_dense`` is the expand half for a caller that computed the shrink densely over one or
two adjacent slots (the engine's CPU decode path for one or two adapters).
Tokens are grouped by slot once per step in a ``LoRAMeta`` that every layer reuses; a step where
no token has an adapter returns at once, before any check (``meta.any_lora`` is a host bool, so
there is no sync; shapes are then checked on the first step that uses an adapter).

Backends (``kernels/README.md`` has the measurements):
    ``"native"``     C (AVX2 + FMA + OpenMP) for few-token float32 CPU steps, the decode path:
                     ``kernels.native_ops``; built once with the machine's C compiler
                     (``kernels.native``), other calls and machines fall through to "torch".
    ``"torch"``      CPU path for prefill-sized steps (and fallback on GPU): ``kernels.torch_ops``.
    ``"triton"``     fused gathered shrink/expand GPU kernels: ``kernels.triton_ops``. Also runs on
                     CPU tensors under ``TRITON_INTERPRET=1`` (slowly: for tests only).
    ``"reference"``  float64 per-token oracle: ``kernels.reference``.
The default (``backend=None``) is chosen once, on first use: "triton" if CUDA and Triton are
available, else "torch"; CPU tensors always go to "native" (hence "torch" where it does not
apply) under the default. Override it per
call with ``backend=`` or for the process with :func:`set_backend` (tests do).

Contract with the caller (the engine):
    * Build one ``LoRAMeta`` per step and pass it to every call of that step.
    * Write adapter weights and scales only between steps (loading an adapter into a slot), in
      place (``A[s].copy_(...)``, ``scale[:, s] = ...``), never through ``.data``: per-step
      caches hold derived scale factors, and the CPU path keeps a transposed copy of each B stack
      that it revalidates by the tensor's version counter. Stacks allocated outside
      ``torch.inference_mode`` get that copy; inference tensors track no version and take a
      slower path.
    * Inference only: the ops are not differentiable.

This package knows nothing about models, adapters on disk, or slot allocation: the engine stacks
adapter weights into ``A``/``B`` slot tensors and maps tokens to slots.

Example:
    >>> import torch
    >>> from kernels import add_lora, LoRAMeta
    >>> T, S, r, d_in, d_out = 3, 2, 4, 8, 6
    >>> x, y = torch.randn(T, d_in), torch.zeros(T, d_out)
    >>> A, B = torch.randn(S, r, d_in), torch.randn(S, d_out, r)
    >>> meta = LoRAMeta.build(torch.tensor([1, -1, 0]), num_slots=S)
    >>> y = add_lora(y, x, A, B, meta, 0.5)
    >>> bool(y[1].eq(0).all())   # token 1 has no adapter: untouched
    True
"""

from __future__ import annotations

import torch

from kernels import torch_ops
from kernels.checks import check_args
from kernels.meta import LoRAMeta

__all__ = ["add_lora", "add_lora_packed", "add_lora_dense", "LoRAMeta", "set_backend", "get_backend", "BACKENDS"]

BACKENDS = ("reference", "native", "torch", "triton")

_override: str | None = None  # set_backend()
_auto: str | None = None  # resolved once, on first use


def set_backend(name: str | None) -> None:
    """Force one backend for every call that passes ``backend=None`` (``None`` restores auto).

    Args:
        name: ``"reference"``, ``"native"``, ``"torch"``, ``"triton"`` or ``None``.

    Raises:
        ValueError: an unknown name.
    """
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {name!r}")
    _override = name


def get_backend() -> str:
    """The backend ``backend=None`` resolves to for CUDA tensors (CPU tensors use "native" under auto)."""
    global _auto
    if _override is not None:
        return _override
    if _auto is None:
        _auto = "torch"
        if torch.cuda.is_available():
            try:
                import triton  # noqa: F401

                _auto = "triton"
            except ImportError:
                pass
    return _auto


def add_lora_packed(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots_or_meta: torch.Tensor | LoRAMeta,
    scale: float | torch.Tensor,
    output_slices: tuple[int, ...] | list[int],
    backend: str | None = None,
) -> torch.Tensor:
    """Add the LoRA deltas of packed projections (q/k/v or gate/up) into ``y``, in place.

    The ``n = len(output_slices)`` projections share the input ``x``; each has its own rank-``r``
    A and B. The shrink of all slices is one ``[n*r, d_in]`` matmul per token group (x is read
    once), and each slice's expand adds into its column range of ``y``.

    Semantics:
        for t in range(T):
            s = slots[t]
            if s < 0: continue                                  # row t of y untouched
            for i, d in enumerate(output_slices):
                off = sum(output_slices[:i])
                h = A[s, i*r:(i+1)*r, :] @ x[t]                  # [r], fp32 accumulation
                y[t, off:off+d] += scale[i, s] * B[s, off:off+d, :] @ h

    Args:
        y: [T, sum(output_slices)], the base output; updated in place. May be a strided view.
        x: [T, d_in], the layer input.
        A: [S, n*r, d_in], stacked slots; slice i's A is rows ``i*r:(i+1)*r``. Ranks below r are
            zero-padded.
        B: [S, sum(output_slices), r]; slice i's B is rows ``off_i:off_i+d_i``.
        slots_or_meta: the step's ``LoRAMeta`` (build once per step: cheapest), or an int tensor
            [T] of slots (-1 = no adapter), from which one is built on the spot.
        scale: a float, a tensor [S] (per slot), or a tensor [n, S] (per slice and slot).
        output_slices: the widths ``d_i`` of the packed projections, e.g. (576, 192, 192).
        backend: None (auto), "reference", "native", "torch" or "triton".

    Returns:
        ``y``, the same tensor, updated.

    Raises:
        ValueError: a shape, dtype or device mismatch, or a slot outside [-1, S), naming the
            tensor and the shapes seen.
    """
    if type(slots_or_meta) is LoRAMeta and not slots_or_meta.any_lora:
        return y  # a step without adapters costs one attribute read per layer
    meta, output_slices, _ = check_args(y, x, A, B, slots_or_meta, scale, output_slices)
    if not meta.any_lora:
        return y
    return _dispatch(backend, y).add_lora_packed(y, x, A, B, meta, scale, output_slices)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots_or_meta: torch.Tensor | LoRAMeta,
    scale: float | torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Add each token's adapter delta ``scale[s] * B[s] @ (A[s] @ x[t])`` into ``y``, in place.

    Semantics:
        for t in range(T):
            s = slots[t]
            if s >= 0:
                y[t] += scale[s] * B[s] @ (A[s] @ x[t])         # fp32 accumulation
        # rows with s == -1 are untouched; all -1 is a no-op

    Args:
        y: [T, d_out], the base output; updated in place. May be a strided view.
        x: [T, d_in].
        A: [S, r, d_in], stacked adapter slots, ranks zero-padded to r.
        B: [S, d_out, r].
        slots_or_meta: the step's ``LoRAMeta``, or an int tensor [T] of slots (-1 = no adapter).
        scale: a float, or a tensor [S] (``lora_alpha / r`` per slot, or rsLoRA's ``alpha / sqrt(r)``).
        backend: None (auto), "reference", "native", "torch" or "triton".

    Returns:
        ``y``, the same tensor, updated.

    Raises:
        ValueError: a shape, dtype or device mismatch, or a slot outside [-1, S).
    """
    if type(slots_or_meta) is LoRAMeta and not slots_or_meta.any_lora:
        return y  # a step without adapters costs one attribute read per layer
    meta, output_slices, _ = check_args(y, x, A, B, slots_or_meta, scale, None)
    if not meta.any_lora:
        return y
    return _dispatch(backend, y).add_lora_packed(y, x, A, B, meta, scale, output_slices)


def add_lora_dense(y: torch.Tensor, h: torch.Tensor, B_dense: torch.Tensor, meta: LoRAMeta, width: int,
                   lo: int = 0) -> torch.Tensor:
    """The expand half of multi-LoRA when the caller computed the shrink densely: every token
    against the ``k`` slots ``lo..lo+k-1``, usually inside its base projection's GEMM (the engine's
    CPU decode path appends ``A[:k]`` to the base weight's rows, so one matmul yields the base
    output and ``h``). This masks ``h`` in place to each token's own slot and adds
    ``h @ B_dense`` into ``y``: one ``mul_`` and one ``addmm_`` whatever the mix of adapters.

    Why a dense path: on a CPU, a decode step's LoRA cost is per-op overhead, not FLOPs (16 tokens
    times a rank-16 A are a few MFLOP); computing every computed slot for every token and masking
    costs ``k*width`` extra GEMM columns but no gathers, scatters or per-slot ops.

    Semantics:
        for t in range(T):
            j = slots[t] - lo
            h[t, :] = 0 outside columns j*width:(j+1)*width  (all of it when j is not in [0, k))
        y += h @ B_dense

    Args:
        y: [T, D], the base output (may be a row-strided view); updated in place.
        h: [T, k*width], ``x @ A[lo:lo+k].reshape(k*width, d_in).T`` with each slot's scaling
            already folded into its A rows; masked in place.
        B_dense: [k*width, D]: slot lo+j's rows ``j*width:(j+1)*width``; for packed projections,
            slice i's rank rows hold that slice's B^T in the slice's own columns and zeros elsewhere.
        meta: the step's ``LoRAMeta`` (the mask is built once per step per ``(k, width)``).
        width: rows per slot (``n * r``).
        lo: the first computed slot.

    Returns:
        ``y``.

    Raises:
        ValueError: shapes that do not line up.
    """
    T, cols = h.shape
    if cols % width or y.shape[0] != T or meta.num_tokens != T or B_dense.shape != (cols, y.shape[1]):
        raise ValueError(f"add_lora_dense: y {tuple(y.shape)}, h {tuple(h.shape)}, B_dense {tuple(B_dense.shape)}, "
                         f"width {width}, {meta.num_tokens} tokens in the meta do not line up")
    if not meta.any_lora:
        return y
    return torch_ops.add_lora_dense(y, h, B_dense, meta, width, lo)


def _dispatch(backend: str | None, y: torch.Tensor):
    """The backend module for this call (each exposes ``add_lora_packed`` with one signature)."""
    if backend is None:
        backend = _override if _override is not None else (get_backend() if y.is_cuda else "native")
    if backend == "torch":
        return torch_ops
    if backend == "native":
        from kernels import native_ops

        return native_ops
    if backend == "triton":
        from kernels import triton_ops

        return triton_ops
    if backend == "reference":
        from kernels import reference

        return reference
    raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
