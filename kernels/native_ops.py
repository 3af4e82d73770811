"""The ``"native"`` backend: ``add_lora_packed`` for few-token float32 steps on a CPU, in C.

One call is one ``coe_lora_add`` of ``native/lora.c`` (AVX2 + FMA, OpenMP over both cores): the
shrink and expand of every active slot, with each slot's A and B read once for all its tokens.
Steps it does not cover (more than ``MAX_TOKENS`` tokens, or more than ``SINGLE_SLOT_MAX_TOKENS``
on one slot, ranks above ``MAX_RANK``, half
precision, GPU tensors, strided columns, B stacks that are not transposed views of a contiguous
[S, r, d_out] tensor) go to the torch backend, as does everything where the library cannot be
built (``kernels.native``).

Why hand-written: a decode step's LoRA work is tiny (16 tokens of an r=16 adapter on a [576 ->
960] projection: ~1.5 MFLOP), so torch's path spends it in op dispatch and in gathered copies of
each token's A and B. Measured on the 2-core CPU (SmolLM2, r=16 all-linear, one decode step,
``python -m coe.engine.bench --steps``), see ``kernels/README.md`` for the numbers.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch

from kernels import native, torch_ops
from kernels.meta import LoRAMeta

# Steps up to MAX_TOKENS run in C; longer ones, and one-slot steps longer than
# SINGLE_SLOT_MAX_TOKENS, go to torch (one big GEMM per projection is MKL's best case). Measured
# on the 2-core CPU, 120 calls of SmolLM2's r=16 all-linear shapes (8 slots, weights out of
# cache), C vs torch ms, all tokens on one slot / spread over 8: 1 token 5.6 vs 12.8 / 5.3 vs
# 12.3; 16 tokens 8.9 vs 19.5 / 18.3 vs 42.0; 76 tokens 22.1 vs 40.8 / 31.3 vs 68.7; 480 tokens
# 110.6 vs 123.6 / 99.0 vs 361.8; 1024 tokens 228.9 vs 219.2 / 186.1 vs 389.6; 2048 tokens 495.4
# vs 383.9 / 373.3 vs 1172.1 (before the shrink and expand were register-tiled, one slot at 480
# tokens took 196-203 ms in C and this limit was 64).
MAX_TOKENS = 4096
SINGLE_SLOT_MAX_TOKENS = 768
MAX_RANK = 64  # the kernel keeps a few tokens' r scaled shrink values on the stack
MAX_SLICES = 8
_SRC = Path(__file__).with_name("native") / "lora.c"
_ABI = 6
_I64, _P = ctypes.c_int64, ctypes.c_void_p


class _Stack(ctypes.Structure):  # lora_stack in lora.c
    _fields_ = [("S", _I64), ("R", _I64), ("n", _I64), ("d_in", _I64), ("d_out", _I64),
                ("slices", _I64 * MAX_SLICES), ("A", _P), ("Bt", _P), ("scale", _P), ("alpha", ctypes.c_float)]


class _Step(ctypes.Structure):  # lora_step in lora.c
    _fields_ = [("T", _I64), ("U", _I64), ("order", _P), ("seg_slot", _P), ("seg_start", _P), ("seg_count", _P),
                ("h", _P), ("nthreads", _I64), ("row_slot", _P)]


def _setup(lib: ctypes.CDLL) -> bool:
    if lib.coe_lora_abi() != _ABI:
        return False
    lib.coe_lora_add.argtypes = [_P, _P, _P, ctypes.c_long, _P, ctypes.c_long]
    lib.coe_lora_add.restype = None
    lib.coe_lora_add_residual.argtypes = [_P, _P, _P, ctypes.c_long, _P, ctypes.c_long, _P, ctypes.c_long]
    lib.coe_lora_add_residual.restype = None
    _L = ctypes.c_long
    lib.coe_swiglu_lora.argtypes = [_P, _L, _L, _L, _P, _L, _P, _P, _P, _L, ctypes.c_int]
    lib.coe_swiglu_lora.restype = None
    lib.coe_rope_lora.argtypes = [_P, _L, _L, _L, _L, _P, _P, _P, _L, _P, _P, _P, _L, ctypes.c_int]
    lib.coe_rope_lora.restype = None
    return True


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be used (``unavailable_reason``)."""
    return native.load(_SRC, _setup)


def unavailable_reason() -> str | None:
    return None if library() is not None else native.unavailable_reason(_SRC)


# Per stacked projection: its C descriptor (or None: not covered), keyed by the tensors' storage
# and geometry. The weights are read live through the pointers (slot writes show), so an entry
# stays right for as long as a tensor with that address and geometry exists.
_stacks: dict[tuple, tuple[_Stack | None, ctypes.c_void_p | None, Any]] = {}


def _stack(A: torch.Tensor, B: torch.Tensor, scale: float | torch.Tensor, output_slices: tuple[int, ...]):
    live_scale = isinstance(scale, torch.Tensor)
    key = (A.data_ptr(), B.data_ptr(), A.shape, B.shape, B.stride(), output_slices,
           scale.data_ptr() if live_scale else float(scale), scale.shape if live_scale else None)
    hit = _stacks.get(key)
    if hit is not None:
        return hit
    n = len(output_slices)
    S, R = A.shape[0], B.shape[2]
    ok = (A.dtype == torch.float32 and B.dtype == torch.float32 and A.device.type == "cpu" and R <= MAX_RANK
          and n <= MAX_SLICES and A.is_contiguous() and B.transpose(1, 2).is_contiguous())
    table = None
    if ok and live_scale:  # read live only when it is already the [n, S] float32 table
        ok = scale.dtype == torch.float32 and scale.is_contiguous() and tuple(scale.shape) in ((n, S), (S,) if n == 1 else (n, S))
        table = scale
    desc = None
    if ok:
        desc = _Stack(S, R, n, A.shape[2], B.shape[1], (_I64 * MAX_SLICES)(*output_slices), A.data_ptr(), B.data_ptr(),
                      table.data_ptr() if table is not None else None, 1.0 if live_scale else float(scale))
    if len(_stacks) > 4096:  # tensors come and go (tests, reallocation): keep the map bounded
        _stacks.clear()
    hit = _stacks[key] = (desc, ctypes.byref(desc) if desc is not None else None, (A, B, table))
    return hit


def step_descriptor(meta: LoRAMeta, width: int) -> Any:
    """The step's tokens grouped by slot, each token's slot, and a scratch of ``width`` floats per
    token, as a pointer to the C ``lora_step`` (``native/lora_shrink.h``), built once per step
    and width (in ``meta.cache``). Also what the engine's fused block kernel takes.

    The five int32 arrays are one ctypes buffer filled from the metadata's host tuples: with a
    torch tensor each (and two tensor casts) it took ~42 us a decode step of 16 tokens, ~1/4 of
    the Python time a LoRA adds to the engine's step (2-core EPYC)."""
    key = ("native", width)
    hit = meta.cache.get(key)
    if hit is None:
        T, U, L = meta.num_tokens, len(meta.active_slots_host), meta.num_lora_tokens
        skip = T - L  # tokens without a slot, first in sorted_token_ids
        # order, seg_slot, seg_start, seg_count, row_slot: L + 3U + T ints
        ints = (*meta.sorted_token_ids_host[skip:], *meta.active_slots_host, *(s - skip for s in meta.slot_starts_host),
                *meta.tokens_per_slot_host, *meta.slots_host)
        buf = (ctypes.c_int32 * len(ints))(*ints)
        h = torch.empty(T, width)
        at = ctypes.addressof(buf)
        desc = _Step(T, U, at, at + 4 * L, at + 4 * (L + U), at + 4 * (L + 2 * U), h.data_ptr(),
                     torch.get_num_threads(), at + 4 * (L + 3 * U))
        hit = meta.cache[key] = (ctypes.byref(desc), desc, (buf, h))
    return hit[0]


def add_lora_packed(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, meta: LoRAMeta,
                    scale: float | torch.Tensor, output_slices: tuple[int, ...]) -> torch.Tensor:
    """``kernels.add_lora_packed`` (arguments already checked): in C when :func:`covers` the
    call, else through the torch backend."""
    desc, ref, _ = _stack(A, B, scale, output_slices)
    lib = library()
    if desc is None or lib is None or not _step_fits(y, x, meta):
        return torch_ops.add_lora_packed(y, x, A, B, meta, scale, output_slices)
    lib.coe_lora_add(ref, step_descriptor(meta, desc.n * desc.R), y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0))
    return y


def add_lora_residual(res: torch.Tensor, y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      meta: LoRAMeta, scale: float | torch.Tensor, output_slices: tuple[int, ...]) -> torch.Tensor:
    """``res + add_lora_packed(y, x, ...)`` written into ``y`` (and returned): a projection's
    LoRA delta and the residual add that follows it in one pass over ``y`` (``coe_lora_add_residual``
    in ``native/lora.c``), bit for bit what the two give one after the other. ``res`` is [T,
    d_out] float32 with unit column stride. The caller checks :func:`covers`.

    Why: in a prompt step the base GEMM has just written ``y`` and it is out of the cores' L1/L2;
    the expand's read and write of it and then the residual add's read were two passes where one
    does (see ``kernels/README.md`` for the measured steps)."""
    _, ref, _ = _stack(A, B, scale, output_slices)
    library().coe_lora_add_residual(ref, step_descriptor(meta, A.shape[1]), y.data_ptr(), y.stride(0), x.data_ptr(),
                                    x.stride(0), res.data_ptr(), res.stride(0))
    return y


def _step_fits(y: torch.Tensor, x: torch.Tensor, meta: LoRAMeta) -> bool:
    """The per-call half of :func:`covers` (the stack's half is cached by ``_stack``)."""
    return (meta.num_tokens <= MAX_TOKENS
            and not (meta.num_tokens > SINGLE_SLOT_MAX_TOKENS and len(meta.active_slots_host) == 1)
            and y.dtype == torch.float32 and x.dtype == torch.float32 and y.device.type == "cpu"
            and x.stride(1) == 1 and y.stride(1) == 1)


def covers(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, meta: LoRAMeta,
           scale: float | torch.Tensor, output_slices: tuple[int, ...]) -> bool:
    """Whether this call runs in C (else it goes to the torch backend)."""
    return _stack(A, B, scale, tuple(output_slices))[0] is not None and library() is not None and _step_fits(y, x, meta)


def swiglu(gu: torch.Tensor, lora: tuple | None = None) -> torch.Tensor:
    """SwiGLU of a stacked gate/up output: ``silu(g) * u`` for ``g, u = gu[:, :I], gu[:, I:]``
    ([T, 2I] float32 on the CPU, unit column stride) -> a new [T, I]; with ``lora`` = (x, A, B,
    meta, scale), the gate/up projection's input and LoRA stack (two slices of I, as
    :func:`add_lora_packed` takes them), each token's gate/up LoRA delta is added to g and u
    inside the same pass (``coe_swiglu_lora`` in ``native/lora.c``): the result is what
    ``add_lora_packed`` then the activation give, without writing the deltas into ``gu`` and
    reading it again. The caller checks :func:`library` and, with a LoRA, :func:`covers` (with
    ``output_slices`` (I, I)).

    Why in C: the activation is two passes over memory in torch (``silu`` then ``mul_``), the
    LoRA's expand a third; measured on the 2-core AVX-512 EPYC (SmolLM2's I = 1536, 30 distinct
    inputs, median of 15): 512 tokens 0.31 -> 0.23 ms without a LoRA, 0.83 -> 0.42 ms with one
    (``add_lora_packed`` + ``silu`` + ``mul_``); 76 tokens 0.034 -> 0.022, 0.135 -> 0.077.
    """
    lib = library()
    T, I2 = gu.shape
    I = I2 // 2
    act = torch.empty(T, I, dtype=gu.dtype)
    if lora is None:
        lib.coe_swiglu_lora(gu.data_ptr(), gu.stride(0), T, I, act.data_ptr(), I, None, None, None, 0,
                            torch.get_num_threads())
        return act
    x, A, B, meta, scale = lora
    _, ref, _ = _stack(A, B, scale, (I, I))
    lib.coe_swiglu_lora(gu.data_ptr(), gu.stride(0), T, I, act.data_ptr(), I, ref, step_descriptor(meta, A.shape[1]),
                        x.data_ptr(), x.stride(0), torch.get_num_threads())
    return act


def rope(y: torch.Tensor, n_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
         lora: tuple | None = None) -> torch.Tensor:
    """Rotary embedding of the first ``n_heads`` heads of each row of ``y`` (the stacked q/k/v
    output, [T, >= n_heads * head_dim] float32 on the CPU, unit column stride) -> a new [T,
    n_heads * head_dim]: ``q * cos + rotate_half(q) * sin`` per head, with ``cos`` and ``sin``
    [T, head_dim] contiguous and ``sin``'s first half negated (the engine's tables), rounded as
    torch's ``q * cos`` plus ``roll(q) * sin`` (two products, then their sum). With ``lora`` =
    (x, A, B, meta, scale, output_slices), ``y`` first gets its q/k/v LoRA deltas in place, as
    :func:`add_lora_packed` adds them (bit for bit), in the same pass (``coe_rope_lora`` in
    ``native/lora.c``). The caller checks :func:`library` and, with a LoRA, :func:`covers`.

    Why in C: torch's rotation is four passes over q/k and three temporaries (and four
    dispatches per layer in a decode step); with a LoRA its expand is one more read and write of
    ``y`` (measured in ``kernels/README.md``)."""
    T = y.shape[0]
    qk = torch.empty(T, n_heads * head_dim, dtype=y.dtype)
    ref = step = x_ptr = None
    ldx = 0
    if lora is not None:
        x, A, B, meta, scale, output_slices = lora
        ref, step, x_ptr, ldx = _stack(A, B, scale, output_slices)[1], step_descriptor(meta, A.shape[1]), x.data_ptr(), x.stride(0)
    library().coe_rope_lora(y.data_ptr(), y.stride(0), T, n_heads, head_dim, cos.data_ptr(), sin.data_ptr(), qk.data_ptr(),
                            qk.stride(0), ref, step, x_ptr, ldx, torch.get_num_threads())
    return qk


def add_lora(y, x, A, B, meta, scale) -> torch.Tensor:
    """``kernels.add_lora``: one slice."""
    return add_lora_packed(y, x, A, B, meta, scale, (y.shape[1],))
