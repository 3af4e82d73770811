"""coe's multi-LoRA kernels (draft: API stable, torch path being tuned)."""

from __future__ import annotations

import torch

from kernels.checks import check_args
from kernels.meta import LoRAMeta

__all__ = ["add_lora", "add_lora_packed", "LoRAMeta", "set_backend", "get_backend"]

_BACKENDS = ("reference", "torch", "triton")
_override: str | None = None


def set_backend(name: str | None) -> None:
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None; got {name!r}")
    global _override
    _override = name


def get_backend(device=None) -> str:
    if _override is not None:
        return _override
    return "torch"


def add_lora_packed(y, x, A, B, slots_or_meta, scale, output_slices, backend=None):
    meta, output_slices, rank = check_args(y, x, A, B, slots_or_meta, scale, output_slices)
    if not meta.any_lora:
        return y
    name = backend or get_backend(y.device)
    if name == "reference":
        from kernels import reference
        return reference.add_lora_packed(y, x, A, B, meta.slots, scale, output_slices)
    from kernels import torch_ops
    return torch_ops.add_lora_packed(y, x, A, B, meta, scale, output_slices, rank)


def add_lora(y, x, A, B, slots_or_meta, scale, backend=None):
    return add_lora_packed(y, x, A, B, slots_or_meta, scale, None, backend)
