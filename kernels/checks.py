"""Argument checks shared by every backend: shapes, dtypes, devices, slices, scale forms.

Only metadata of tensors is read (shape, dtype, device), never their values, so a check never
syncs a GPU. The common case runs one flat chain of comparisons (a few microseconds: the engine
makes about 120 calls per step); only when it fails does ``_diagnose`` work out which argument is
wrong and say so. Slot values are range-checked once per step, when the
``LoRAMeta`` is built. Every failure is a ``ValueError`` that names the tensor and the shapes seen.
"""

from __future__ import annotations

import torch

from kernels.meta import LoRAMeta

__all__ = ["check_args", "as_meta"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_meta(slots_or_meta: torch.Tensor | LoRAMeta, num_slots: int) -> LoRAMeta:
    """Return the step metadata, building it from a raw slots tensor when that is what was passed."""
    if isinstance(slots_or_meta, LoRAMeta):
        if slots_or_meta.num_slots != num_slots:
            raise ValueError(
                f"LoRAMeta was built for num_slots={slots_or_meta.num_slots}, but A and B stack "
                f"{num_slots} slots (A.shape[0]); build the meta with num_slots=A.shape[0]"
            )
        return slots_or_meta
    return LoRAMeta.build(slots_or_meta, num_slots)


def check_args(y, x, A, B, slots_or_meta, scale, output_slices) -> tuple[LoRAMeta, tuple[int, ...], int]:
    """Validate one call and return ``(meta, output_slices, rank)``.

    Args mirror :func:`kernels.add_lora_packed`; ``output_slices`` None means one slice covering
    all of ``y``'s columns (plain ``add_lora``).

    Raises:
        ValueError: naming the offending argument and the shapes/dtypes/devices seen.
    """
    try:
        num_tokens, d_in = x.shape
        y_tokens, d_out = y.shape
        num_slots, packed_rank, a_d_in = A.shape
        b_slots, b_d_out, rank = B.shape
        if output_slices is None:
            slices, ok = (d_out,), True
        else:
            slices = output_slices if type(output_slices) is tuple else tuple(output_slices)
            ok = sum(slices) == d_out and min(slices) >= 1 and all(type(d) is int for d in slices)
        dtype, device = y.dtype, y.get_device()  # get_device: an int (-1 = CPU), cheaper than .device
        ok = (
            ok
            and y_tokens == num_tokens
            and a_d_in == d_in
            and b_slots == num_slots
            and b_d_out == d_out
            and packed_rank == len(slices) * rank
            and x.dtype is dtype
            and A.dtype is dtype
            and B.dtype is dtype
            and dtype in _FLOAT_DTYPES
            and x.get_device() == device
            and A.get_device() == device
            and B.get_device() == device
        )
        if ok and type(scale) is not float:
            if isinstance(scale, torch.Tensor):
                ok = scale.get_device() == device and (
                    scale.shape == (num_slots,) or scale.shape == (len(slices), num_slots)
                )
            else:
                ok = type(scale) is int
        if ok and type(slots_or_meta) is LoRAMeta:
            meta = slots_or_meta
            ok = meta.num_slots == num_slots and meta.num_tokens == num_tokens and (
                not meta.any_lora or meta.device_index == device
            )
            if ok:
                return meta, slices, rank
    except (AttributeError, TypeError, ValueError):
        ok = False
    if ok:  # a raw slots tensor: build the step metadata (this checks the slot values)
        meta = LoRAMeta.build(slots_or_meta, num_slots)
        if meta.num_tokens == num_tokens and (not meta.any_lora or meta.device_index == device):
            return meta, slices, rank
    return _diagnose(y, x, A, B, slots_or_meta, scale, output_slices)


def _diagnose(y, x, A, B, slots_or_meta, scale, output_slices):
    """check_args found something wrong: raise a ValueError that says exactly what."""
    for name, t in (("y", y), ("x", x), ("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if y.dim() != 2 or x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            "expected y [T, d_out], x [T, d_in], A [S, r, d_in], B [S, d_out, r]; got "
            f"y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    num_tokens, d_in = x.shape
    num_slots, packed_rank, a_d_in = A.shape
    if output_slices is None:
        output_slices = (y.shape[1],)
    else:
        output_slices = tuple(output_slices)
        if not output_slices or any(type(d) is not int or d < 1 for d in output_slices):
            raise ValueError(f"output_slices must be a non-empty sequence of positive ints; got {output_slices!r}")
    num_slices = len(output_slices)
    d_out = sum(output_slices)
    if y.shape[0] != num_tokens:
        raise ValueError(f"y and x must have the same number of tokens T; got y {tuple(y.shape)}, x {tuple(x.shape)}")
    if y.shape[1] != d_out:
        raise ValueError(f"y must have sum(output_slices)={d_out} columns {output_slices}; got y {tuple(y.shape)}")
    if a_d_in != d_in:
        raise ValueError(f"A must be [S, n*r, d_in] with d_in={d_in} (from x {tuple(x.shape)}); got A {tuple(A.shape)}")
    if packed_rank % num_slices:
        raise ValueError(
            f"A's rows ({packed_rank}) must split evenly into {num_slices} slices of rank r; got A {tuple(A.shape)}"
        )
    rank = packed_rank // num_slices
    if B.shape != (num_slots, d_out, rank):
        raise ValueError(
            f"B must be [S, sum(output_slices), r] = {(num_slots, d_out, rank)} to match A {tuple(A.shape)} "
            f"and y {tuple(y.shape)}; got B {tuple(B.shape)}"
        )
    dtype, device = y.dtype, y.device
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"y must be float32, float16, bfloat16 (or float64); got {dtype}")
    for name, t in (("x", x), ("A", A), ("B", B)):
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but y has {dtype}; all of y, x, A, B must share one dtype")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but y is on {device}; all tensors must be on one device")
    if isinstance(scale, torch.Tensor):
        if scale.shape not in ((num_slots,), (num_slices, num_slots)):
            raise ValueError(
                f"scale must be a float, a tensor [S]={[num_slots]} or [n, S]={[num_slices, num_slots]}; "
                f"got a tensor of shape {list(scale.shape)}"
            )
        if scale.device != device:
            raise ValueError(f"scale is on {scale.device} but y is on {device}")
    elif type(scale) not in (int, float):
        raise ValueError(f"scale must be a float or a tensor; got {type(scale).__name__}")
    meta = as_meta(slots_or_meta, num_slots)
    if meta.num_tokens != num_tokens:
        raise ValueError(
            f"the slot mapping covers {meta.num_tokens} tokens but x has T={num_tokens} rows {tuple(x.shape)}"
        )
    if meta.any_lora and meta.device != device:
        raise ValueError(f"LoRAMeta tensors are on {meta.device} but y is on {device}; build it with device=y.device")
    raise AssertionError(f"check_args rejected a call that _diagnose accepts: {output_slices}, {rank}")
