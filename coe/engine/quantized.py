"""A GGUF model's own quantized blocks, kept beside its float32 weights for few-row steps on a CPU.

The embedded SmolLM2 is a Q4_1 GGUF: every projection matrix *is* ``d * q + m`` per block of 32
(q a 4-bit integer, d and m float16), and the token embeddings (the tied output head) are Q8_0,
``d * q`` (q 8-bit). The engine's float32 weights are those values, widened. A decode step on a
2-core CPU is bound by reading its weights (533 MB in float32 for SmolLM2, ~30 ms at the ~18
GB/s two cores read), so for steps of a few rows the engine multiplies by the blocks instead:
0.75 bytes a weight for Q4_1 and 1.125 for Q8_0 (scales widened to float32), 110 MB a step
in all. Each weight is formed in float32 as ``q * d`` then ``+ m``, the same two rounded
operations the GGUF dequantizer used to build the float32 checkpoint, so the weights are
bit-for-bit those of the float32 model (checked for every matrix when it is attached: one that
differs is not used); only the dot products' summation order differs from MKL's.

Why a hand-written kernel (``native/qmatmul.c``, AVX2 + FMA + OpenMP, with 16-float AVX-512
paths where the CPU has them, built once with the machine's C compiler into the cache by
``kernels.native``): torch has no fast CPU kernel for these layouts. Measured
on the 2-core AVX2 CPU (median over 60 distinct copies of a [1536, 576] matrix, so none is
cached): torch's ``_weight_int4pack_mm_for_cpu`` takes ~1 ms per row (10x float32's GEMV) and
``_weight_int8pack_mm`` 0.8 ms; our Q4_1 kernel 0.09 ms at 1 row and 0.33 ms at 16 rows against
0.31 and 0.48-0.58 ms for float32 ``bmm`` over column blocks (the engine's float32 path). The
library links the ``libgomp.so.1`` torch already loaded (same soname), so it shares torch's
OpenMP workers rather than starting a second pool (see ``coe.engine.threads``).

Without a C compiler, on a CPU without AVX2/FMA, off the CPU, in half precision, or with
``COE_NATIVE=0``, the engine runs float32 only (same results, slower decode).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels import native

logger = logging.getLogger("coe.engine")

QK = 32  # GGUF block size of Q4_1 and Q8_0
KINDS = ("q4_1", "q8_0")
_SRC = Path(__file__).with_name("native") / "qmatmul.c"
_KERNELS_C = Path(native.__file__).with_name("native")  # lora_shrink.h, shared with kernels' C backend
_ABI = 7
MAX_FUSED_ROWS = 16  # MAX_FUSED in qmatmul.c: the most rows a call with a fused LoRA may have
_P, _L, _I64 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int64
MAX_SLICES = 8


class LoRARows(ctypes.Structure):
    """``lora_rows`` of ``qmatmul.c``: one stacked projection's LoRA for the fused kernel."""

    _fields_ = [("A", _P), ("P", _P), ("R", _I64), ("n", _I64), ("bounds", _I64 * (MAX_SLICES + 1)), ("bf16", _I64)]


def _setup(lib: ctypes.CDLL) -> bool:
    if lib.coe_native_abi() != _ABI:
        return False
    for fn in (lib.coe_q41_matmul, lib.coe_q80_matmul):
        fn.argtypes = [_P, _L, _P, _P, _P, _L, _L, _L, _L, ctypes.c_int]
        fn.restype = None
    lib.coe_q41_matmul_lora.argtypes = [_P, _L, _P, _P, _P, _L, _L, _L, _L, ctypes.c_int, _P, _P]
    lib.coe_q41_matmul_lora.restype = None
    lib.coe_native_lora_bf16.restype = ctypes.c_int
    return True


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The compiled block kernels (built once into the cache by ``kernels.native``), or None
    when they cannot be used here (the reason is in :func:`unavailable_reason`)."""
    return native.load(_SRC, _setup, include=(_KERNELS_C,))


def lora_bf16_available() -> bool:
    """Whether the fused kernel was built with its bfloat16 LoRA (an AVX512-BF16 CPU)."""
    lib = native_library()
    return lib is not None and bool(lib.coe_native_lora_bf16())


def panels_shape(num_slots: int, d_out: int, rank: int) -> tuple[int, int, int, int]:
    """The fused kernel's B panels for ``num_slots`` slots of a [d_out, rank] B: B^T cut into
    blocks of 8 outputs, two blocks side by side per panel row (see ``lora_rows`` in
    qmatmul.c): [S, ceil(d_out / 16), rank, 16]."""
    return num_slots, (d_out // 8 + 1) // 2, rank, 16


def write_panels(dst: torch.Tensor, bt: torch.Tensor) -> None:
    """Copy one slot's B^T ``bt`` [R, N] into its panels ``dst`` [ceil(N/16), R, 16] (float16,
    rounded to nearest as every cast to float16 is). An odd last block's partner columns are
    left as they are: the kernel never reads them. torch's strided copy, not numpy's: for an
    adapter of SmolLM2 at r=16 (120 stacks) 2.2-4.8 ms against numpy's 7.8 (bit for bit the same),
    time the loop thread spends between two steps when a load takes a free slot.

    bfloat16 panels (the kernel's bfloat16 LoRA, R even) hold the same values in another order:
    row k of a pair is its 16 outputs' (B[o, 2k], B[o, 2k + 1]), i.e. ``dst`` read as
    [ceil(N/16), R/2, 16, 2] (see LORA_BF16 in qmatmul.c)."""
    R, N = bt.shape
    full = N // 16
    if dst.dtype == torch.bfloat16:
        if R % 2:
            raise ValueError(f"bfloat16 panels need an even rank, got {R}")
        d = dst.view(dst.shape[0], R // 2, 16, 2)
        d[:full].copy_(bt[:, : 16 * full].reshape(R // 2, 2, full, 16).permute(2, 0, 3, 1))
        if N % 16:
            d[full, :, : N % 16].copy_(bt[:, 16 * full :].reshape(R // 2, 2, N % 16).permute(0, 2, 1))
        return
    dst[:full].copy_(bt[:, : 16 * full].reshape(R, full, 16).permute(1, 0, 2))
    if N % 16:
        dst[full, :, : N % 16].copy_(bt[:, 16 * full :])


def lora_panels(Bt: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The panels of ``Bt`` [S, R, N] (every slot) in ``dtype`` (float16, or bfloat16 for the
    kernel's bfloat16 LoRA), for :func:`lora_rows`."""
    S, R, N = Bt.shape
    out = torch.zeros(panels_shape(S, N, R), dtype=dtype)
    for s in range(S):
        write_panels(out[s], Bt[s])
    return out


def lora_rows(A: torch.Tensor, B_panels: torch.Tensor, output_slices: tuple[int, ...]) -> Any:
    """A pointer to the C descriptor of one stacked projection's LoRA (A [S, n*R, K] with the
    scaling folded in, B_panels as :func:`panels_shape`; both float16, or both bfloat16 for the
    kernel's bfloat16 LoRA: see ``LoRAStack`` in coe.engine.model), for
    :meth:`BlockWeight.matmul`; None where the kernel cannot fuse it (a slice width that is not a
    multiple of 8). The caller keeps the tensors alive (read live: slot writes show)."""
    bf16 = A.dtype == torch.bfloat16
    if A.dtype not in (torch.float16, torch.bfloat16) or B_panels.dtype != A.dtype:
        raise ValueError(f"lora_rows needs A and B_panels both in float16 or both in bfloat16, got {A.dtype} and "
                         f"{B_panels.dtype}")
    if bf16 and not lora_bf16_available():
        raise ValueError("lora_rows got bfloat16 A and B_panels, but this build of the kernel has no bfloat16 LoRA "
                         "(it needs a CPU with AVX512-BF16); pass float16 copies")
    if bf16 and B_panels.shape[2] % 2:
        raise ValueError(f"lora_rows needs an even rank for bfloat16 panels, got {B_panels.shape[2]}")
    shape = tuple(B_panels.shape)
    if len(shape) != 4 or shape != panels_shape(shape[0], sum(output_slices), shape[2]):
        raise ValueError(f"lora_rows needs B_panels shaped as panels_shape(S, {sum(output_slices)}, R), "
                         f"got {tuple(B_panels.shape)}")
    if any(d % 8 for d in output_slices) or len(output_slices) > MAX_SLICES:
        return None
    bounds = [0]
    for d in output_slices:
        bounds.append(bounds[-1] + d)
    desc = LoRARows(A.data_ptr(), B_panels.data_ptr(), B_panels.shape[2], len(output_slices),
                    (_I64 * (MAX_SLICES + 1))(*bounds), int(bf16))
    return ctypes.pointer(desc)


def unavailable_reason() -> str | None:
    """Why :func:`native_library` returned None, or None when it is available."""
    return None if native_library() is not None else native.unavailable_reason(_SRC)


@dataclass
class BlockWeight:
    """One [N, K] matrix in GGUF blocks of 32 along K.

    Attributes:
        kind: ``q4_1`` (``qs`` uint8 [N, K/2], byte j of a block holds elements j (low nibble)
            and j+16 (high); ``scales`` float32 [N, K/32, 2] = (d, m)) or ``q8_0`` (``qs`` int8
            [N, K]; ``scales`` float32 [N, K/32] = d).
    """

    kind: str
    qs: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        n = self.qs.shape[0]
        return (n, self.qs.shape[1] * 2) if self.kind == "q4_1" else (n, self.qs.shape[1])

    def nbytes(self) -> int:
        return self.qs.numel() * self.qs.element_size() + self.scales.numel() * 4

    def matmul(self, x: torch.Tensor, lora: tuple[Any, Any] | None = None) -> torch.Tensor:
        """``x @ W.T``: float32 [M, K] -> [M, N], on the native kernel (the caller checks
        :func:`native_library`). ``lora`` = (:func:`lora_rows` pointer, the step's
        ``kernels.native_ops.step_descriptor``) adds each row's adapter delta in the same pass
        (``q4_1`` only, at most ``MAX_FUSED_ROWS`` rows)."""
        lib = native_library()
        n, k = self.shape
        x = x.contiguous()
        m = x.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        if lora is not None:
            lib.coe_q41_matmul_lora(x.data_ptr(), k, self.qs.data_ptr(), self.scales.data_ptr(), y.data_ptr(), n, m, n, k,
                                    torch.get_num_threads(), lora[0], lora[1])
            return y
        fn = lib.coe_q41_matmul if self.kind == "q4_1" else lib.coe_q80_matmul
        fn(x.data_ptr(), k, self.qs.data_ptr(), self.scales.data_ptr(), y.data_ptr(), n, m, n, k, torch.get_num_threads())
        return y

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix, formed as the GGUF dequantizer forms it (``q * d (+ m)``)."""
        n, k = self.shape
        if self.kind == "q4_1":
            q = self.qs.view(n, k // QK, QK // 2)
            q = torch.cat([q & 0x0F, q >> 4], dim=-1).float()  # [N, K/32, 32]
            return (q * self.scales[..., :1] + self.scales[..., 1:]).view(n, k)
        return (self.qs.view(n, k // QK, QK).float() * self.scales[..., None]).view(n, k)

    @classmethod
    def cat(cls, parts: list["BlockWeight"]) -> "BlockWeight":
        """Rows of several matrices of one kind and width, stacked (a fused projection)."""
        return cls(parts[0].kind, torch.cat([p.qs for p in parts]).contiguous(), torch.cat([p.scales for p in parts]).contiguous())


# --------------------------------------------------------------------------- GGUF

# GGUF tensor names of a llama-architecture file -> transformers checkpoint names.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
BLOCKS_FILE = "coe-blocks.safetensors"


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation, as transformers' GGUF loader does
    (``reshape(n_head, rows/n_head/2, 2).swapaxes(1, 2)``): row i of the checkpoint is row
    ``order[i]`` of the file. A row permutation keeps each row's blocks whole."""
    return torch.arange(n_rows).view(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(n_rows)


def read_gguf_blocks(gguf: Path) -> dict[str, BlockWeight]:
    """Every Q4_1 / Q8_0 matrix of a llama-architecture GGUF file, by transformers checkpoint
    name, rows in the checkpoint's order. Other tensors and architectures give an empty dict."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.parts[f.data[0]]

    arch = field("general.architecture")
    arch = bytes(arch).decode() if arch is not None else None
    if arch != "llama":  # transformers un-permutes q/k for llama only; other layouts are not mapped
        return {}
    n_head = int(field("llama.attention.head_count")[0])
    kv = field("llama.attention.head_count_kv")
    n_kv = int(kv[0]) if kv is not None else n_head
    out: dict[str, BlockWeight] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name.lower()
        name = _hf_name(t.name)
        if kind not in KINDS or name is None:
            continue
        raw = np.ascontiguousarray(t.data)  # [N, bytes per row], memory-mapped
        n = raw.shape[0]
        per = 20 if kind == "q4_1" else 34
        blocks = raw.reshape(n, -1, per)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        if kind == "q4_1":
            m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
            qs = torch.from_numpy(blocks[..., 4:].reshape(n, -1).copy())
            bw = BlockWeight(kind, qs, torch.stack([d, m], dim=-1).contiguous())
        else:
            qs = torch.from_numpy(blocks[..., 2:].reshape(n, -1).copy().view(np.int8))
            bw = BlockWeight(kind, qs, d.contiguous())
        if ".attn_q." in t.name or ".attn_k." in t.name:
            order = _unpermute_rows(n, n_head if ".attn_q." in t.name else n_kv)
            bw = BlockWeight(kind, bw.qs[order].contiguous(), bw.scales[order].contiguous())
        out[name] = bw
    return out


def gguf_blocks(gguf: Path, cache_dir: Path) -> dict[str, BlockWeight]:
    """:func:`read_gguf_blocks`, cached in ``cache_dir`` (the GGUF's conversion folder) as
    safetensors: reading the GGUF takes ~5 s, the cached file well under one."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / BLOCKS_FILE
    if path.is_file():
        try:
            parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
            for key, t in load_file(str(path)).items():
                name, kind, part = key.rsplit(":", 2)
                parts.setdefault((name, kind), {})[part] = t
            return {name: BlockWeight(kind, p["qs"], p["scales"]) for (name, kind), p in parts.items()}
        except Exception as exc:  # a damaged cache file is rebuilt, never trusted
            logger.warning("rebuilding %s: %s", path, exc)
    logger.info("reading %s's quantized blocks once (a few seconds); cached in %s", gguf.name, path)
    blocks = read_gguf_blocks(gguf)
    if blocks:
        flat = {f"{n}:{b.kind}:{part}": getattr(b, part) for n, b in blocks.items() for part in ("qs", "scales")}
        fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=cache_dir)
        os.close(fd)
        try:
            save_file(flat, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return blocks
