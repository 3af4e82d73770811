"""A Llama-family decoder (Llama, Mistral, SmolLM, TinyLlama; Qwen2's qkv bias) with multi-LoRA layers.

One forward pass runs one engine step: a flat batch of T tokens from many sequences (decode tokens
first, one per sequence, then prefill chunks), each token carrying its own adapter slot. Every
LoRA-capable projection (q, k, v, o, gate, up, down) adds its adapter delta through ``kernels``,
with one ``LoRAMeta`` per step shared by all layers.

Why hand-written rather than transformers' modules: on a 2-core CPU the per-op Python overhead of a
decode step matters as much as its FLOPs, so this model
- fuses q/k/v into one ``wqkv`` matmul and gate/up into one ``w13`` matmul (packed LoRA calls too);
- applies RoPE to q and k together, with cos/sin gathered once per step;
- runs the projections of small steps as one ``bmm`` over column-block views of each weight, so
  that both cores stream it (``_proj``; MKL runs a few-row GEMM on one core), keeps the
  vocabulary head in the layouts fastest per row count (``OutputHead``), and writes RMSNorm with
  0-dim tensor constants (Python scalars cost a wrapping dispatch);
- adds the LoRA of steps on one or two adjacent adapter slots with ``kernels.add_lora_dense`` (a
  shrink ``mm`` and one ``addmm_``), and of other steps with ``kernels.add_lora_packed``;
- keeps weights as plain tensor attributes (no ``nn.Module.__getattr__`` per weight per layer);
- writes K/V for all T tokens with one ``index_put_`` per layer and reads a decode batch's cache
  as a view when its sequences sit in consecutive KV slots.

Its arithmetic follows transformers op for op where rounding depends on it (rotate-half RoPE,
residual added after the projection and its LoRA delta, as PEFT does), so fp32 hidden states
match transformers+PEFT to rounding (the column-block projections gave bit-identical SmolLM2
decode steps), and logits within 1e-4 (the oneDNN vocabulary GEMM sums in another order). Faster variants (complex-multiply RoPE, residual folded into ``addmm``) were measured
and cost that agreement (3e-4 on SmolLM2's logits) for ~2 ops per layer.

``torch.compile`` was measured too: compiling the whole decode step cuts a 30-layer step's
dispatch overhead ~2.7x (cpp wrapper, dynamic shapes), but the multi-LoRA kernels are Python
functions over a per-step ``LoRAMeta`` and cannot sit inside a compiled graph, and compiling the
pieces between them costs more per call (~70 us of guards and wrapper) than it saves. So the
step runs eagerly.

Shape letters: T tokens in the step, Bd decode sequences, H query heads, K kv heads, G = H/K,
D head dim, L context length, S adapter slots, R stacked LoRA rank.

This module knows nothing about tokenizers, files, requests or scheduling: ``weights.py`` hands it
tensors by checkpoint name, ``adapters.py`` fills its LoRA stacks, ``batch.py`` builds its steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from coe.engine.quantized import (MAX_FUSED_ROWS, BlockWeight, lora_bf16_available, lora_rows, native_library, panels_shape,
                                  write_panels)
from coe.errors import ConfigError
from kernels import LoRAMeta, add_lora_dense, add_lora_packed, native_ops

# The aten op takes None for a full slice in its index list (the Python method does not).
index_put_ = torch.ops.aten.index_put_

# Projections an adapter may target, in PEFT's module names, grouped as the model fuses them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
GROUP_BITS = {"qkv": 1, "o": 2, "gate_up": 4, "down": 8}
# Steps of at most this many tokens run their LoRA through the dense path (``Transformer._lora_proj``)...
DENSE_LORA_MAX_ROWS = 64
# ...when their active slots span at most this many (every token computes every slot of the span,
# so past it the wasted GEMM columns cost more than the gathers of ``add_lora_packed``). Measured per
# decode step on the 2-core CPU, SmolLM2, r=16 all-linear (dense vs add_lora_packed, ms):
# 2/8/16 tokens over 2 slots 116/163/199 vs 128/173/216; over 4 slots 8/16 tokens 186/215 vs
# 167/197; 16 tokens over 8 slots 268 vs 215.
DENSE_LORA_MAX_SLOTS = 2
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    """The architecture, read from a transformers config.

    Args:
        model_type: ``llama``, ``mistral`` or ``qwen2``.
        vocab_size / dim / n_layers / n_heads / n_kv_heads / head_dim / intermediate_size: sizes.
        norm_eps: RMSNorm epsilon.
        max_position_embeddings: the model's context; the engine caps its max_seq_len at this.
        tie_word_embeddings: the output projection is the embedding matrix.
        qkv_bias / o_bias / mlp_bias: which projections carry a bias (Qwen2: qkv).
        sliding_window: Mistral-style window, or None; the engine caps max_seq_len at it.
    """

    model_type: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def module_shape(self, target: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of one LoRA-capable projection."""
        return {
            "q_proj": (self.dim, self.q_size),
            "k_proj": (self.dim, self.kv_size),
            "v_proj": (self.dim, self.kv_size),
            "o_proj": (self.q_size, self.dim),
            "gate_proj": (self.dim, self.intermediate_size),
            "up_proj": (self.dim, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.dim),
        }[target]

    @classmethod
    def from_hf(cls, config: Any) -> "ModelArgs":
        """Read a ``transformers`` ``PretrainedConfig``.

        Raises:
            ValueError: the architecture is not a supported Llama-family model.
        """
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; coe's engine runs {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Llama, Mistral, SmolLM, TinyLlama, Qwen2) checkpoints"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; the engine implements SwiGLU (silu)")
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        window = getattr(config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            norm_eps=float(config.rms_norm_eps),
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048) or 2048),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_window=int(window) if window else None,
        )


def rope_inv_freq(config: Any) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies [D/2] and attention scaling, exactly as transformers computes them
    (default, linear, llama3, yarn, longrope...; ``dynamic`` equals default within the model's context)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type == "default":
        base = params.get("rope_theta") if isinstance(params, dict) and "rope_theta" in params else getattr(config, "rope_theta", 10000.0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported (known: default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: torch.Tensor, dim: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm, bit for bit (mean == sum / n; pow(2) == x * x), in fewer
    dispatches than ``F.rms_norm``'s composite (measured ~1.5x faster per call on the CPU).

    ``eps`` and ``dim`` are 0-dim float32 tensors: a Python scalar operand costs a wrapping
    dispatch (measured 2x the cost of the op itself on a [1, 576] tensor).
    """
    if x.dtype != torch.float32:  # transformers normalizes in fp32 and rounds once
        xf = x.float()
        return w * (xf * (xf * xf).sum(-1, keepdim=True).div_(dim).add_(eps).rsqrt_()).to(x.dtype)
    return (x * (x * x).sum(-1, keepdim=True).div_(dim).add_(eps).rsqrt_()).mul_(w)


def _linear(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` given ``w_t = w.t()``: the same mm/addmm kernel, fewer dispatches."""
    return torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)


# Steps of at most this many rows multiply by a projection as column blocks (``_proj``: decode steps
# and short prefill chunks); longer ones through one ``mm``, which MKL already spreads over the cores.
CHUNK_MAX_ROWS = 256
# Steps of at least this many rows (and more than BLOCK_MAX_ROWS where a projection has GGUF
# blocks) multiply by a oneDNN-packed copy of the weight on a CPU in float32 (None: no copies).
# Measured (2-core AVX-512 EPYC, [T, 576] x [576, 3072], best of 5 x 10 calls, ms): T = 16:
# mm 0.47, column-block bmm 0.38, oneDNN 0.14; 64: 1.23 / 1.12 / 0.48; 512: 8.7 / 8.7 / 3.7 (250
# GMAC/s: MKL's sgemm stays on AVX2 on this AMD CPU, oneDNN takes AVX-512). With oneDNN held to
# AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) it still led, 7.6 ms against 10.1 at 512 rows. At one row the
# column blocks are as fast (0.059 vs 0.060), and GGUF blocks beat it up to 16 rows out of
# cache (0.19 vs 0.24 ms a [16, 576] x [576, 3072] product).
PACKED_MIN_ROWS: int | None = 2
# Steps of at most this many rows multiply by a projection's GGUF blocks when it has them
# (``_proj``). Measured per [1536, 576] matrix (60 distinct copies, 2 cores), Q4_1 kernel vs
# float32 column-block bmm, us: 1 row 92 vs 314, 4 rows 126 vs 403, 8 rows 185 vs 479, 16 rows
# 333 vs 484.
BLOCK_MAX_ROWS = 16
# ...and add their LoRA in the same kernel call (``Transformer._lora_proj``).
FUSED_LORA = True
# Steps of prompt tokens only, on one adapter, in kernels' torch backend, whose GEMMs sum in the
# order transformers+PEFT does: prefill logits within ~2e-5 of PEFT's on SmolLM2, against
# ~2.6e-4 in C (equally accurate against float64, summed in another order), for ~10% of the
# step's LoRA time (a 480-token prompt, 120 LoRA calls: torch 123.6 ms, C 110.6). Steps that
# mix decode rows with prompt chunks take C, where torch costs most (12 decodes + 64 prompt
# tokens: 40.8 vs 22.1 ms) and the decode rows never summed in PEFT's order anyway (GGUF blocks).
# Off where the projections are oneDNN-packed (PACKED_MIN_ROWS): the base GEMM no longer sums in
# PEFT's order, so the torch LoRA buys no closeness (SmolLM2 prompt logits 3.6e-4 from PEFT's
# with it, 3.2e-4 with C; PEFT itself is 3.2e-4 from float64) and costs time (a 512-token
# prompt's LoRA, 16 paired steps: +34 ms over the base with torch, +25 with C).
PEFT_ORDER_PROMPTS = True
# SwiGLU (silu(g) * u) in kernels' C backend on CPU float32 steps, with gate/up's LoRA inside it
# on steps that do not fuse that LoRA into the block kernel (native_ops.swiglu): a 512-token
# prompt's activation 0.31 -> 0.23 ms a layer, with one adapter's gate/up LoRA 0.83 -> 0.42; a
# 16-row decode step's 11.6 -> 5.4 us (two torch ops and their dispatch -> one call).
NATIVE_SWIGLU = True
# RoPE in C (native_ops.rope) where the C kernels run, with q/k/v's LoRA expand in the same pass
# on steps whose LoRA runs in kernels' C backend; and o's and down's LoRA expand in the residual
# add's pass (native_ops.add_lora_residual). Flags so that a benchmark can compare both ways.
NATIVE_ROPE = True
LORA_RESIDUAL = True
# The largest finite float16 (65504): LoRAStack.A_half and B_panels hold A and B in float16.
F16_MAX = float(torch.finfo(torch.float16).max)
# Decode batches of at least this many rows compute attention with plain matmuls on a CPU.
MANUAL_ATTENTION_MIN_ROWS = 8


def chunk_view(w_t: torch.Tensor) -> torch.Tensor | None:
    """``w_t`` ([in, out], the transpose of a contiguous [out, in] weight) as blocks of output
    columns, [C, in, out/C]: a view, no copy. C is 8 for 2048 columns or more (a [16, 576] x
    [576, 3072] product: 1.15-1.3 ms with 8 blocks, 1.4-1.7 with 4), else 4. None where the
    columns do not divide, or off the CPU (a GPU's GEMM fills its cores on its own)."""
    d_in, d_out = w_t.shape
    chunks = 8 if d_out >= 2048 else 4
    if d_out % chunks or w_t.device.type != "cpu" or w_t.stride() != (1, d_in):
        return None
    return w_t.t().view(chunks, d_out // chunks, d_in).transpose(1, 2)


def _proj(x: torch.Tensor, w_t: torch.Tensor, w_c: torch.Tensor | None, b: torch.Tensor | None,
          w_q: BlockWeight | None = None, w_p: Any = None) -> torch.Tensor:
    """``x @ w_t (+ b)``. Steps of up to ``BLOCK_MAX_ROWS`` rows multiply by the GGUF blocks
    ``w_q`` when the model has them (``coe.engine.quantized``: the same weights in 0.75 bytes
    each); steps of ``PACKED_MIN_ROWS`` rows or more by the oneDNN-packed copy ``w_p`` where
    there is one (on a CPU in float32; also every step once ``w_t`` was dropped, see
    ``Transformer.attach_blocks``); other few-row steps through ``bmm`` over the weight's column
    blocks ``w_c``, the rest through one ``mm``.

    Why: with a handful of rows (a decode step) the product is a matrix-vector product bound by
    reading the weight, and MKL's GEMM runs it on one core: measured on this 2-core CPU, a
    [1, 576] x [576, 3072] fp32 product reads its 7 MB at ~8 GB/s, against ~20 GB/s for a 2-core
    sweep of memory. ``bmm`` over 4 column blocks hands the blocks to both cores: 2.0-2.4x faster
    at 1 row, ~3x at 16 rows (median of 200 calls cycling through 30 copies of the weight, so
    none is cached); a SmolLM2 decode step 80 -> 53 ms at 1 row, 206 -> 143 ms at 16. Each
    output element is still one dot product over the whole input, so only the kernel's
    accumulation order can differ from ``mm`` (within fp32 rounding).
    """
    T = x.shape[0]
    if w_q is not None and T <= BLOCK_MAX_ROWS:
        y = w_q.matmul(x)
        return y if b is None else y.add_(b)
    if w_p is not None and (w_t is None or (PACKED_MIN_ROWS is not None and T >= PACKED_MIN_ROWS)):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w_p, b, "none", [], "")
    if w_c is None or T > CHUNK_MAX_ROWS:
        return _linear(x, w_t, b)
    C = w_c.shape[0]
    xe = x.expand(C, T, x.shape[1])
    y = torch.bmm(xe, w_c) if b is None else torch.baddbmm(b.view(C, 1, -1), xe, w_c)  # [C, T, out/C]
    return y.transpose(0, 1).reshape(T, C * y.shape[2])


def _mkldnn_pack(w: torch.Tensor) -> Any:
    """``w`` [out, in] reordered for oneDNN's fp32 linear, or None where that op is missing."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)  # layout tuned for ~16-row inputs
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, w.shape[1], dtype=w.dtype), packed, None, "none", [], "")
        return packed
    except (AttributeError, RuntimeError):
        return None


class OutputHead:
    """The output projection (and, when tied, the token embeddings) [V, dim], in the layouts
    that are fastest on a CPU.

    Why: the vocabulary projection is the largest single matmul of a decode step (SmolLM2: 49152
    x 576, 113 MB in fp32), and no one layout serves every row count. Measured on the 2-core CPU,
    [N, 576] x [576, 49152] (median of 20-40 calls alternating two copies of the matrix):
    - 1 row: ``bmm`` over 4 contiguous [576, V/4] column blocks 4.4 ms; ``mm`` 13-15 ms; ``bmm``
      over transposed views of the [V, 576] rows (``_proj``'s trick) 8-9 ms; oneDNN 8.5 ms;
    - 16 rows: oneDNN's packed fp32 linear 15-17 ms; ``mm`` 45 ms; column-block ``bmm`` 29-38 ms.
    So on a CPU in float32 the head keeps the column blocks (``blocks``) and a oneDNN-packed copy
    (``packed``), and drops the [V, dim] original: a tied model's embedding rows are gathered
    from the blocks. Net cost: one extra copy of the matrix. Elsewhere (GPU, half precision) it
    is the plain matrix and ``mm``.
    """

    BLOCK_MAX_ROWS = 2  # rows up to this go through the column blocks, more through oneDNN
    CHUNKS = 4

    def __init__(self, w: torch.Tensor) -> None:
        self.vocab, self.dim = w.shape
        self.w: torch.Tensor | None = None
        self.blocks: torch.Tensor | None = None
        self.packed: Any = None
        self.q: BlockWeight | None = None  # the GGUF's blocks, for up to BLOCK_MAX_ROWS rows (attach_blocks)
        if w.device.type != "cpu" or w.dtype != torch.float32 or self.vocab % self.CHUNKS:
            self.w = w
            return
        C = self.CHUNKS
        self.blocks = w.t().reshape(self.dim, C, self.vocab // C).permute(1, 0, 2).contiguous()  # [C, dim, V/C]
        self._rows = self.blocks.permute(0, 2, 1)  # [C, V/C, dim]: row v is [v // (V/C), v % (V/C)]
        self.packed = _mkldnn_pack(w)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T``: [N, dim] -> [N, V]."""
        if self.blocks is None:
            return torch.mm(x, self.w.t())
        N = x.shape[0]
        if self.q is not None and N <= BLOCK_MAX_ROWS:
            return self.q.matmul(x)
        if self.packed is not None and N > self.BLOCK_MAX_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")
        C = self.blocks.shape[0]
        return torch.bmm(x.expand(C, N, self.dim), self.blocks).transpose(0, 1).reshape(N, self.vocab)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``W[ids]``: [T] -> [T, dim]."""
        if self.blocks is None:
            return F.embedding(ids, self.w)
        per = self.vocab // self.blocks.shape[0]
        block = torch.div(ids, per, rounding_mode="floor")
        return self._rows[block, ids - block * per]

    def nbytes(self) -> int:
        extra = 0 if self.q is None else self.q.nbytes()
        if self.blocks is None:
            return self.w.numel() * self.w.element_size() + extra
        return self.blocks.numel() * self.blocks.element_size() * (2 if self.packed is not None else 1) + extra


class LoRAStack:
    """One fused projection's stacked adapter weights, filled slot by slot by the registry.

    Attributes:
        A: [S, n*R, d_in], slice i is rows ``i*R:(i+1)*R``; zero rows pad smaller ranks.
        Bt: [S, R, sum(output_slices)], contiguous: B stored transposed.
        B: ``Bt.transpose(1, 2)``, the [S, sum(output_slices), R] view the kernels' contract
            names. The kernels' CPU path multiplies by B^T, so storing it this way spares them a
            transposed copy of every stack (which they would rebuild after each adapter load).
        scale: [n, S] per-slice, per-slot scaling (alpha / r, or alpha / sqrt(r) with rsLoRA).
        output_slices: the fused outputs, e.g. (H*D, K*D, K*D) for q/k/v.
        folded: in float32 the scaling is folded into A when a slot is written (slice i's rows
            times ``scale[i, s]``), and the kernels get ``kernel_scale = 1.0``. Why: a per-slot
            scale tensor differs per layer and group, so the kernels' per-step scaling cache
            missed on every call and rebuilt the per-row factor (``repeat_interleave`` and
            friends) 120 times a step: measured on a 30-layer tiny model (cProfile, one
            adapter, single stream), ~30% of the time inside the LoRA calls; folding measured
            1.3x faster per decoded token there (interleaved A/B, median of 5 rounds of 30
            tokens, 1 thread, busy machine). The rounding moves
            from ``s * (A @ x)`` to ``(s * A) @ x``, exact for power-of-two scales, ~1 ulp
            otherwise. Half precision keeps the tensor (scaled in fp32 inside the kernels).
        kernel_scale: what the model passes to the kernels: ``1.0`` when folded, else ``scale``.
        B_dense: [S, n*R, d_out], B^T with packed slices laid block-diagonally (slice i's rank
            rows only in slice i's columns; ``Bt`` itself when n == 1): the expand of the dense
            path, one ``addmm_`` for all slices. Costs (n-1) times ``Bt``'s memory.
        A_half, B_panels: ``A`` in float16 (or bfloat16, below), and ``Bt`` as the fused kernel's panels (float16,
            ``coe.engine.quantized.panels_shape``: blocks of 8 output columns, two side by side),
            and ``rows``, the C descriptor of the two: the LoRA the GGUF block kernel
            fuses into a few-row projection (``coe.engine.quantized``; CPU float32 with the
            kernels built, slice widths multiples of 8). Costs half of ``A``'s and ``Bt``'s
            memory more. Why float16: half the bytes a decode step over many adapters reads.
            Measured (the ``--kernel`` setup of ``coe.engine.bench``, 16 rows, 40 interleaved
            rounds, both builds in one process, 2-core EPYC): 8 adapters over the base +6.11 /
            +4.57 ms (two runs) with float32 A, +3.01 / +2.65 with float16 A (B in float16 in
            both; see ``lora_rows`` in qmatmul.c for B); one adapter +1.60 / +1.47 and +1.38 /
            +1.00. Outputs moved by at most 1.2e-5 (|y| ~ 5). A slot whose A or B does not fit
            float16 (a value beyond 65504) is left out of the fused kernel (:meth:`refresh`).
            With ``bf16`` (``serving.fused_lora_dtype``) both copies are bfloat16, in the
            kernel's bfloat16 layout (LORA_BF16 in qmatmul.c): no range to check, 8 significant
            bits instead of 11, and x and A x rounded to bfloat16 too inside the kernel.
    """

    __slots__ = ("A", "Bt", "B", "scale", "output_slices", "d_in", "folded", "kernel_scale", "B_dense", "_dense_ops",
                 "A_half", "B_panels", "rows")

    def __init__(self, d_in: int, output_slices: tuple[int, ...]) -> None:
        self.d_in = d_in
        self.output_slices = output_slices
        self.A = self.Bt = self.B = self.scale = None  # allocated by ``Transformer.allocate_lora``
        self.folded = False
        self.kernel_scale: float | torch.Tensor | None = None
        self.B_dense: torch.Tensor | None = None
        self._dense_ops: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.A_half: torch.Tensor | None = None
        self.B_panels: torch.Tensor | None = None
        self.rows: Any = None

    def allocate(self, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device, dense: bool = False,
                 fused: bool = False, bf16: bool = False) -> None:
        """Allocate zeroed slots; ``dense`` also allocates ``B_dense`` (CPU float32 stacks), and
        ``fused`` ``A_half``, ``B_panels`` and the descriptor ``rows`` (in bfloat16 with ``bf16``,
        which needs an even ``rank``)."""
        n = len(self.output_slices)
        d_out = sum(self.output_slices)
        self.A = torch.zeros(num_slots, n * rank, self.d_in, dtype=dtype, device=device)
        self.Bt = torch.zeros(num_slots, rank, d_out, dtype=dtype, device=device)
        self.B = self.Bt.transpose(1, 2)
        self.scale = torch.zeros(n, num_slots, dtype=dtype, device=device)
        self.folded = dtype == torch.float32
        self.kernel_scale = 1.0 if self.folded else self.scale
        self.B_dense = None
        self._dense_ops = {}
        self.A_half = self.B_panels = self.rows = None
        if dense and self.folded:
            self.B_dense = self.Bt if n == 1 else torch.zeros(num_slots, n * rank, d_out, dtype=dtype, device=device)
        if fused and self.folded and d_out % 8 == 0:
            half = torch.bfloat16 if bf16 else torch.float16
            self.A_half = torch.zeros(num_slots, n * rank, self.d_in, dtype=half, device=device)
            self.B_panels = torch.zeros(panels_shape(num_slots, d_out, rank), dtype=half, device=device)
            self.rows = lora_rows(self.A_half, self.B_panels, self.output_slices)
            if self.rows is None:
                self.A_half = self.B_panels = None

    def dense_operands(self, lo: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots lo..lo+k-1 as the dense path's two matrices: A^T [d_in, k*n*R] and B_dense
        [k*n*R, d_out]. Views of the stacks (slot writes show through), built once per (lo, k)
        per allocation rather than 120 times a step."""
        ops = self._dense_ops.get((lo, k))
        if ops is None:
            width = self.A.shape[1]
            ops = self._dense_ops[(lo, k)] = (self.A[lo : lo + k].view(k * width, self.d_in).t(),
                                              self.B_dense[lo : lo + k].view(k * width, -1))
        return ops

    def refresh(self, slot: int) -> bool:
        """Rebuild slot ``slot`` of ``A_half``, ``B_panels`` and ``B_dense`` from ``A`` and ``Bt``
        after the slot was written (``B_dense`` of packed projections: slice i's rank rows keep
        only slice i's columns).

        Returns:
            Whether the fused kernel may run this slot: False when its A or B has a value beyond
            float16's range (the fused copies' type), so that steps using it take the float32 path.
        """
        fits = True
        if self.B_panels is not None:
            # the range check in numpy (1.9 ms an adapter, torch's 4.3), the casts in torch (A 0.7 ms, numpy's
            # 6.8; panels see write_panels); a misfit slot (inf after the cast) is never read from these copies
            fits = self.B_panels.dtype == torch.bfloat16 or all(m.size == 0 or (m.max() <= F16_MAX and m.min() >= -F16_MAX)
                                                                for m in (self.A[slot].numpy(), self.Bt[slot].numpy()))
            self.A_half[slot].copy_(self.A[slot])
            write_panels(self.B_panels[slot], self.Bt[slot])
        if self.B_dense is None or self.B_dense is self.Bt:
            return fits
        r = self.rank
        dst = self.B_dense[slot]
        dst.zero_()
        off = 0
        for i, d in enumerate(self.output_slices):
            dst[i * r : (i + 1) * r, off : off + d].copy_(self.Bt[slot, :, off : off + d])
            off += d
        return fits

    @property
    def rank(self) -> int:
        return 0 if self.Bt is None else self.Bt.shape[1]


class Layer:
    """One decoder block's weights (plain attributes: see the module docstring)."""

    __slots__ = ("attn_norm", "wqkv_t", "bqkv", "wo_t", "bo", "ffn_norm", "w13_t", "b13", "w2_t", "b2", "lora",
                 "wqkv_c", "wo_c", "w13_c", "w2_c", "wqkv_q", "wo_q", "w13_q", "w2_q", "wqkv_p", "wo_p", "w13_p", "w2_p")

    def __init__(self) -> None:
        self.lora: dict[str, LoRAStack] = {}
        self.wqkv_q = self.wo_q = self.w13_q = self.w2_q = None  # GGUF blocks (Transformer.attach_blocks)
        self.wqkv_p = self.wo_p = self.w13_p = self.w2_p = None  # oneDNN-packed copies (see PACKED_MIN_ROWS)


@dataclass
class StepBatch:
    """The tensors and host facts of one forward step (built by ``batch.py``).

    Attributes:
        token_ids: int64 [T], decode tokens first (one per decode sequence), then prefill chunks.
        positions: int64 [T], each token's position in its sequence.
        kv_slots: int64 [T], each token's KV cache slot.
        meta: the step's LoRA metadata (slots per token).
        num_decode: Bd, the number of leading decode tokens.
        decode_slot_range: ``(lo, hi)`` when the decode tokens' KV slots are ``lo..hi-1`` in order
            (the cache is then read as a view), else None (gathered).
        decode_kv_slots: int64 [Bd] (the first Bd entries of ``kv_slots``).
        decode_len: L, the longest decode context (cache length read this step).
        decode_mask: bool [Bd, 1, 1, L] (True = attend), or None when every decode context is L long.
        prefills: ``(kv_slot, start, length, row)`` per prefill chunk: ``length`` tokens at
            positions ``start..`` occupying rows ``row..row+length-1`` of the step.
        logit_rows: int64 [N], the rows whose next-token logits are wanted.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    kv_slots: torch.Tensor
    meta: LoRAMeta
    num_decode: int
    decode_slot_range: tuple[int, int] | None
    decode_kv_slots: torch.Tensor
    decode_len: int
    decode_mask: torch.Tensor | None
    prefills: tuple[tuple[int, int, int, int], ...]
    logit_rows: torch.Tensor


class Transformer:
    """The decoder: weights, RoPE table and LoRA stacks; ``forward`` runs one step.

    Build it with :meth:`from_state` (weights by transformers checkpoint name).
    """

    def __init__(self, args: ModelArgs, dtype: torch.dtype, device: torch.device) -> None:
        self.args = args
        self.dtype = dtype
        self.device = device
        self.layers: list[Layer] = []
        self.tok_embeddings: torch.Tensor | None = None  # None when tied and kept in ``head``'s layouts
        self.norm: torch.Tensor | None = None
        self.head: OutputHead | None = None
        self.rope_cos: torch.Tensor | None = None  # [max_len, D]
        self.rope_sin: torch.Tensor | None = None  # [max_len, D], first half negated (see from_state)
        self.num_lora_slots = 0
        self._dense_lora = False  # the stacks have B_dense (allocate_lora)
        self._lora_width = 0  # the widest stack's n*rank where the stacks are laid out for the fused kernel
        self._unfused_slots: set[int] = set()  # see set_slot_fused
        self.slot_groups: list[list[int]] = []  # per slot, per layer: GROUP_BITS mask of its weights
        self._eps = torch.tensor(args.norm_eps, dtype=torch.float32, device=device)
        self._dim = torch.tensor(float(args.dim), dtype=torch.float32, device=device)
        self._attn_scale = torch.tensor(args.head_dim ** -0.5, dtype=dtype, device=device)
        self._cpu32 = device.type == "cpu" and dtype == torch.float32  # the CPU fast paths' precondition
        self.fused_lora_bf16 = False  # the fused kernel's LoRA in bfloat16 (set_fused_lora_dtype)
        self._native_swiglu = NATIVE_SWIGLU and self._cpu32 and native_ops.library() is not None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_state(
        cls,
        args: ModelArgs,
        get: Callable[[str], torch.Tensor | None],
        *,
        inv_freq: torch.Tensor,
        rope_scaling: float,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> "Transformer":
        """Assemble the model from checkpoint tensors.

        Args:
            args: the architecture.
            get: returns the tensor stored under a transformers checkpoint name
                (``model.layers.0.self_attn.q_proj.weight``...), or None when absent.
            inv_freq: RoPE inverse frequencies [D/2] (see :func:`rope_inv_freq`).
            rope_scaling: RoPE attention scaling factor (1.0 for most models).
            max_seq_len: positions the RoPE table covers.
            dtype: weight dtype.
            device: where the weights live.

        Raises:
            ValueError: a required tensor is missing or has the wrong shape.
        """
        self = cls(args, dtype, device)
        a = args

        def need(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            t = get(name)
            if t is None:
                raise ValueError(f"checkpoint has no tensor {name!r} (expected shape {list(shape)})")
            if tuple(t.shape) != shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {list(t.shape)}; expected {list(shape)} from config.json")
            return t.to(device=device, dtype=dtype)

        def maybe(name: str, shape: tuple[int, ...], present: bool) -> torch.Tensor | None:
            return need(name, shape) if present else None

        emb = need("model.embed_tokens.weight", (a.vocab_size, a.dim)).contiguous()
        self.norm = need("model.norm.weight", (a.dim,))
        if a.tie_word_embeddings or get("lm_head.weight") is None:
            self.head = OutputHead(emb)
            self.tok_embeddings = None if self.head.w is None else emb  # gathered from the head's layouts
        else:
            self.head = OutputHead(need("lm_head.weight", (a.vocab_size, a.dim)).contiguous())
            self.tok_embeddings = emb
        del emb
        D, H, K = a.head_dim, a.n_heads, a.n_kv_heads
        for i in range(a.n_layers):
            p = f"model.layers.{i}."
            L = Layer()
            L.attn_norm = need(p + "input_layernorm.weight", (a.dim,))
            wq = need(p + "self_attn.q_proj.weight", (a.q_size, a.dim))
            wk = need(p + "self_attn.k_proj.weight", (a.kv_size, a.dim))
            wv = need(p + "self_attn.v_proj.weight", (a.kv_size, a.dim))
            # Weights are kept [out, in] as in the checkpoint and used through transposed views:
            # mm(x, W.t()) is what F.linear runs, minus two dispatch layers per call.
            L.wqkv_t = torch.cat([wq, wk, wv]).contiguous().t()
            L.bqkv = None
            if a.qkv_bias:
                L.bqkv = torch.cat([need(p + f"self_attn.{n}_proj.bias", (d,)) for n, d in
                                    (("q", a.q_size), ("k", a.kv_size), ("v", a.kv_size))]).contiguous()
            L.wo_t = need(p + "self_attn.o_proj.weight", (a.dim, a.q_size)).contiguous().t()
            L.bo = maybe(p + "self_attn.o_proj.bias", (a.dim,), a.o_bias)
            L.ffn_norm = need(p + "post_attention_layernorm.weight", (a.dim,))
            I = a.intermediate_size
            wg = need(p + "mlp.gate_proj.weight", (I, a.dim))
            wu = need(p + "mlp.up_proj.weight", (I, a.dim))
            L.w13_t = torch.cat([wg, wu]).contiguous().t()
            L.b13 = None
            if a.mlp_bias:
                L.b13 = torch.cat([need(p + "mlp.gate_proj.bias", (I,)), need(p + "mlp.up_proj.bias", (I,))])
            L.w2_t = need(p + "mlp.down_proj.weight", (a.dim, I)).contiguous().t()
            L.b2 = maybe(p + "mlp.down_proj.bias", (a.dim,), a.mlp_bias)
            L.wqkv_c, L.wo_c, L.w13_c, L.w2_c = (chunk_view(w) for w in (L.wqkv_t, L.wo_t, L.w13_t, L.w2_t))
            if self._cpu32 and PACKED_MIN_ROWS is not None:
                L.wqkv_p, L.wo_p, L.w13_p, L.w2_p = (_mkldnn_pack(w.t()) for w in (L.wqkv_t, L.wo_t, L.w13_t, L.w2_t))
            L.lora = {
                "qkv": LoRAStack(a.dim, (a.q_size, a.kv_size, a.kv_size)),
                "o": LoRAStack(a.q_size, (a.dim,)),
                "gate_up": LoRAStack(a.dim, (I, I)),
                "down": LoRAStack(I, (a.dim,)),
            }
            self.layers.append(L)
        # transformers' cos/sin: the same fp32 product (positions x inv_freq), so they match bit for bit.
        # rotate_half(x) * sin == flip_halves(x) * [-sin, sin] exactly (negation is exact).
        freqs = torch.arange(max_seq_len, dtype=torch.int64).float()[:, None] * inv_freq.float()[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        half = D // 2
        sin = emb.sin() * rope_scaling
        self.rope_cos = (emb.cos() * rope_scaling).to(device=device, dtype=dtype)
        self.rope_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(device=device, dtype=dtype)
        return self

    def set_fused_lora_dtype(self, choice: str) -> None:
        """``serving.fused_lora_dtype``: ``float16`` or ``bfloat16`` (see ServingConfig), for the
        LoRA stacks allocated from now on (:meth:`allocate_lora`). Only CPU float32 models with
        the C kernels fuse their LoRA; elsewhere the choice changes nothing.

        Raises:
            ConfigError: ``bfloat16`` where the fused kernel runs but has no bfloat16 LoRA.
        """
        fused = self._cpu32 and native_library() is not None
        if choice == "bfloat16" and fused and not lora_bf16_available():
            raise ConfigError("serving.fused_lora_dtype: 'bfloat16' needs a CPU with AVX512-BF16 (vdpbf16ps) and the "
                              "AVX-512 build of the C kernels, which this machine lacks; use 'float16'",
                              param="serving.fused_lora_dtype")
        self.fused_lora_bf16 = fused and choice == "bfloat16"

    def allocate_lora(self, num_slots: int, rank: int) -> None:
        """(Re)allocate every layer's LoRA stacks as zeros: ``num_slots`` slots of rank ``rank``
        (rounded up to even for the fused kernel's bfloat16 LoRA: a zero rank row adds nothing)."""
        # With the C kernels, steps of up to 16 rows fuse their LoRA into the block kernel and other
        # decode steps run kernels' C backend, as fast as the dense path (16 rows on one adapter:
        # 94.2 vs 92.8 ms a step): B_dense would only cost memory and slot-write time.
        native = self._cpu32 and native_library() is not None
        bf16 = self.fused_lora_bf16  # set only where the fused kernel runs (set_fused_lora_dtype)
        rank += rank % 2 if bf16 else 0
        self._dense_lora = self._cpu32 and not native
        for layer in self.layers:
            for stack in layer.lora.values():
                stack.allocate(num_slots, rank, self.dtype, self.device, dense=self._dense_lora, fused=native, bf16=bf16)
        # the widest stack's n*rank: one fused-kernel step descriptor (its h scratch) serves every call of a step
        self._lora_width = max((st.A.shape[1] for layer in self.layers for st in layer.lora.values()), default=0) if native else 0
        self.num_lora_slots = num_slots
        self.slot_groups = [[0] * len(self.layers) for _ in range(num_slots)]
        self._unfused_slots = set()  # slots whose A or B does not fit the fused kernel's float16 copies

    def set_slot_fused(self, slot: int, ok: bool) -> None:
        """Record whether slot ``slot``'s adapter may run in the fused kernel (see
        :meth:`LoRAStack.refresh`); steps using a slot that may not take the unfused path."""
        if ok:
            self._unfused_slots.discard(slot)
        else:
            self._unfused_slots.add(slot)

    def set_slot_groups(self, slot: int, groups_per_layer: list[int]) -> None:
        """Record which fused groups slot ``slot`` has weights for: per layer, a bit mask over
        ``GROUP_BITS``. A step skips the LoRA call of a group no active adapter touches (PEFT's
        default q/v-only adapters then cost two calls per layer, not four)."""
        self.slot_groups[slot] = list(groups_per_layer)

    def _step_groups(self, meta: LoRAMeta) -> list[int]:
        active = meta.active_slots_host
        masks = self.slot_groups
        if len(active) == 1:
            return masks[active[0]]
        out = [0] * len(self.layers)
        for s in active:
            out = [a | b for a, b in zip(out, masks[s])]
        return out

    @property
    def lora_rank(self) -> int:
        return self.layers[0].lora["qkv"].rank if self.layers else 0

    def attach_blocks(self, blocks: dict[str, BlockWeight]) -> dict[str, Any]:
        """Use a GGUF's own quantized blocks (``coe.engine.quantized``) for steps of up to
        ``BLOCK_MAX_ROWS`` rows, beside the float32 weights that longer steps use (where a
        projection also has a oneDNN copy, that copy serves the longer steps and the plain
        float32 matrix is dropped).

        Each fused projection (q/k/v, o, gate/up, down; the output head) takes its blocks only
        when they dequantize bit for bit to the float32 weights the model holds, so the model
        computes with the same weights either way. Nothing is attached off the CPU, outside
        float32, or without the native kernels.

        Returns:
            ``{"matrices": attached, "bytes": their size, "rejected": names that did not match}``.
        """
        report: dict[str, Any] = {"matrices": 0, "bytes": 0, "rejected": []}
        if not self._cpu32 or native_library() is None or not blocks:
            return report

        def take(names: list[str], w: torch.Tensor) -> BlockWeight | None:
            parts = [blocks.get(n) for n in names]
            if any(p is None for p in parts) or len({p.kind for p in parts}) != 1:
                return None
            bw = parts[0] if len(parts) == 1 else BlockWeight.cat(parts)
            if bw.shape != tuple(w.shape) or not torch.equal(bw.dequantize(), w):
                report["rejected"].append("+".join(names))
                return None
            report["matrices"] += 1
            report["bytes"] += bw.nbytes()
            return bw

        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            L.wqkv_q = take([p + f"self_attn.{n}_proj.weight" for n in "qkv"], L.wqkv_t.t())
            L.wo_q = take([p + "self_attn.o_proj.weight"], L.wo_t.t())
            L.w13_q = take([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], L.w13_t.t())
            L.w2_q = take([p + "mlp.down_proj.weight"], L.w2_t.t())
            # A projection with blocks (steps of up to BLOCK_MAX_ROWS rows) and a oneDNN copy (longer
            # ones) never reads its float32 matrix again: drop it (SmolLM2: 424 MB). _proj then
            # sends every step the blocks do not take to the oneDNN copy.
            for name in ("wqkv", "wo", "w13", "w2"):
                if getattr(L, name + "_q") is not None and getattr(L, name + "_p") is not None:
                    setattr(L, name + "_t", None)
                    setattr(L, name + "_c", None)
        head = self.head
        if head.blocks is not None:  # the CPU float32 layouts; rows [V, dim] rebuilt to compare
            name = "model.embed_tokens.weight" if self.tok_embeddings is None else "lm_head.weight"
            head.q = take([name], head._rows.reshape(head.vocab, head.dim))
        return report

    def weight_bytes(self) -> int:
        """Bytes held by the base weights (tied embeddings counted once; the output head's extra
        CPU layout and any GGUF blocks counted)."""
        seen: set[int] = set()
        total = self.head.nbytes()
        if self.head.w is not None:  # a tied embedding is the head's matrix: counted once
            seen.add(self.head.w.data_ptr())
        tensors = [self.tok_embeddings, self.norm]
        for L in self.layers:
            tensors += [L.attn_norm, L.wqkv_t, L.bqkv, L.wo_t, L.bo, L.ffn_norm, L.w13_t, L.b13, L.w2_t, L.b2]
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        for L in self.layers:  # GGUF blocks kept beside the float32 weights (attach_blocks), oneDNN copies
            total += sum(q.nbytes() for q in (L.wqkv_q, L.wo_q, L.w13_q, L.w2_q) if q is not None)
            total += sum(p.numel() * p.element_size() for p in (L.wqkv_p, L.wo_p, L.w13_p, L.w2_p) if p is not None)
        return total

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, batch: StepBatch, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> torch.Tensor:
        """Run one step and return float32 logits [N, vocab] for ``batch.logit_rows``.

        Args:
            batch: the step (see :class:`StepBatch`).
            k_cache / v_cache: per layer [max_batch, K, max_len, D]; the step's K/V are written in.
        """
        a = self.args
        H, K, D = a.n_heads, a.n_kv_heads, a.head_dim
        G = H // K
        T = batch.token_ids.shape[0]
        eps, dim = self._eps, self._dim
        q_size, kv_size = a.q_size, a.kv_size
        meta = batch.meta
        use_lora = meta.any_lora
        groups = self._step_groups(meta) if use_lora else None
        # dense LoRA (see _lora_proj): small steps whose adapters sit in at most 2 adjacent slots
        dense = None  # (lo, k): this step's LoRA runs densely over slots lo..lo+k-1
        if use_lora and self._dense_lora and T <= DENSE_LORA_MAX_ROWS:
            lo = meta.active_slots_host[0]
            k = meta.active_slots_host[-1] - lo + 1
            if k <= DENSE_LORA_MAX_SLOTS:
                dense = (lo, k)
        Bd = batch.num_decode
        # Step-level work, shared by every layer.
        cos_rows = self.rope_cos[batch.positions]  # [T, D]
        sin_rows = self.rope_sin[batch.positions]
        kv_index = [batch.kv_slots, None, batch.positions]  # cache[slot_t, :, pos_t] = k_t
        if Bd:
            Ld = batch.decode_len
            rng = batch.decode_slot_range
            mask = batch.decode_mask
            slots_d = batch.decode_kv_slots
            # written-out attention (see _decode_attention): decided once per step, with ~mask
            manual = Bd >= MANUAL_ATTENTION_MIN_ROWS and self._cpu32
            neg_mask = ~mask if manual and mask is not None else None
            scale = self._attn_scale
        decode_only = Bd == T
        # Prompt-only steps on one adapter sum their LoRA in PEFT's order (PEFT_ORDER_PROMPTS);
        # every other step takes kernels' default backend (C on a CPU: faster at every step
        # shape measured, kernels.native_ops.MAX_TOKENS).
        lora_backend = ("torch" if PEFT_ORDER_PROMPTS and Bd == 0 and self._cpu32 and len(meta.active_slots_host) == 1
                        and self.layers[0].wqkv_p is None else None)
        # Steps the block kernel can take with their LoRA fused (see _lora_proj): the step's token
        # grouping, built once for all of its calls (one scratch, sized for the widest stack).
        fused = (native_ops.step_descriptor(meta, self._lora_width)
                 if use_lora and FUSED_LORA and T <= min(BLOCK_MAX_ROWS, MAX_FUSED_ROWS) and self._lora_width
                 and self.layers[0].wqkv_q is not None
                 and self._unfused_slots.isdisjoint(meta.active_slots_host) else None)
        NQK = H + K
        I = a.intermediate_size
        # SwiGLU in C (native_ops.swiglu) wherever the C kernels run: every CPU float32 step;
        # with gate/up's LoRA inside it where that LoRA is not fused into the block kernel and
        # runs in kernels' C backend (prompt and mixed steps).
        native_act = self._native_swiglu
        native_rope = native_act and NATIVE_ROPE
        swiglu_lora = native_act and use_lora and lora_backend is None
        # q/k/v's LoRA inside the C rotation, o's and down's inside the residual add (where a
        # projection's LoRA is neither fused into the block kernel nor dense)
        rope_lora = native_rope and lora_backend is None
        residual_lora = native_act and LORA_RESIDUAL and lora_backend is None

        x = self.head.embed(batch.token_ids) if self.tok_embeddings is None else F.embedding(batch.token_ids, self.tok_embeddings)
        for li, layer in enumerate(self.layers):
            lora = layer.lora
            lmask = groups[li] if use_lora else 0
            # ---- attention
            h = _rms_norm(x, layer.attn_norm, eps, dim)
            if lmask & 1:
                qkv, qk = self._lora_qkv_rope(h, layer, meta, dense, lora_backend, fused, rope_lora, native_rope,
                                              NQK, D, cos_rows, sin_rows)
            else:
                qkv = _proj(h, layer.wqkv_t, layer.wqkv_c, layer.bqkv, layer.wqkv_q, layer.wqkv_p)  # [T, (H+2K)*D]
                qk = self._rope(qkv, NQK, D, cos_rows, sin_rows, native_rope)
            k = qk[:, q_size:].view(T, K, D)
            v = qkv[:, q_size + kv_size :].view(T, K, D)
            kc, vc = k_cache[li], v_cache[li]
            index_put_(kc, kv_index, k)
            index_put_(vc, kv_index, v)
            if decode_only:
                attn = self._decode_attention(qk, kc, vc, Bd, Ld, rng, slots_d, mask, K, G, D, manual, neg_mask, scale)
            else:
                attn = torch.empty(T, q_size, dtype=x.dtype, device=x.device)
                if Bd:
                    attn[:Bd] = self._decode_attention(qk[:Bd], kc, vc, Bd, Ld, rng, slots_d, mask, K, G, D, manual, neg_mask, scale)
                for slot, start, n, row in batch.prefills:
                    q = qk[row : row + n, :q_size].view(n, H, D).transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
                    kk = kc[slot : slot + 1, :, : start + n]
                    vv = vc[slot : slot + 1, :, : start + n]
                    if start == 0:
                        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=G > 1)
                    else:
                        causal = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)
                        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal, enable_gqa=G > 1)
                    attn[row : row + n] = o[0].transpose(0, 1).reshape(n, q_size)
            if lmask & 2:
                x = self._lora_proj_residual(x, attn, layer.wo_t, layer.wo_c, layer.bo, lora["o"], meta, dense, layer.wo_q,
                                             lora_backend, fused, layer.wo_p, residual_lora)
            else:
                x = x + _proj(attn, layer.wo_t, layer.wo_c, layer.bo, layer.wo_q, layer.wo_p)
            # ---- feed-forward (SwiGLU)
            h = _rms_norm(x, layer.ffn_norm, eps, dim)
            if lmask & 4 and swiglu_lora and not self._fuses(lora["gate_up"], layer.w13_q, fused):
                gu = _proj(h, layer.w13_t, layer.w13_c, layer.b13, layer.w13_q, layer.w13_p)
                act = self._swiglu_lora(gu, h, lora["gate_up"], meta)
            else:
                if lmask & 4:
                    gu = self._lora_proj(h, layer.w13_t, layer.w13_c, layer.b13, lora["gate_up"], meta, dense, layer.w13_q, lora_backend, fused, layer.w13_p)
                else:
                    gu = _proj(h, layer.w13_t, layer.w13_c, layer.b13, layer.w13_q, layer.w13_p)  # [T, 2I]
                if native_act:
                    act = native_ops.swiglu(gu)
                else:
                    g, u = gu.view(T, 2, I).unbind(1)
                    act = F.silu(g).mul_(u)
            if lmask & 8:
                x = self._lora_proj_residual(x, act, layer.w2_t, layer.w2_c, layer.b2, lora["down"], meta, dense, layer.w2_q,
                                             lora_backend, fused, layer.w2_p, residual_lora)
            else:
                x = x + _proj(act, layer.w2_t, layer.w2_c, layer.b2, layer.w2_q, layer.w2_p)

        if batch.logit_rows.shape[0] != T:
            x = x.index_select(0, batch.logit_rows)
        x = _rms_norm(x, self.norm, eps, dim)
        return self.head.logits(x).float()

    @staticmethod
    def _rope(qkv: torch.Tensor, nqk: int, D: int, cos_rows: torch.Tensor, sin_rows: torch.Tensor,
              native: bool) -> torch.Tensor:
        """RoPE on q and k at once: qk * cos + rotate_half(qk) * sin, rounded as transformers
        does -> [T, nqk * D] (cos/sin: the step's rows of the tables, [T, D]). In C where the C
        kernels run (``native_ops.rope``: one pass, bit for bit these torch ops; a decode step's
        four dispatches a layer become one call), else torch."""
        if native and qkv.stride(1) == 1:
            return native_ops.rope(qkv, nqk, D, cos_rows, sin_rows)
        T = qkv.shape[0]
        qk = qkv[:, : nqk * D].view(T, nqk, D)
        rot = qk.roll(D // 2, -1).mul_(sin_rows.unsqueeze(1))  # [x2, x1] * [-sin, sin] == rotate_half(qk) * sin
        return (qk * cos_rows.unsqueeze(1)).add_(rot).view(T, nqk * D)

    @classmethod
    def _lora_qkv_rope(cls, h: torch.Tensor, layer: Layer, meta: LoRAMeta, dense: tuple[int, int] | None,
                       backend: str | None, fused: Any, in_rope: bool, native_rope: bool, nqk: int, D: int,
                       cos_rows: torch.Tensor, sin_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q/k/v with their LoRA, and the rotated q/k: (qkv, qk). With ``in_rope`` (C kernels, no
        forced backend) a LoRA neither fused into the block kernel nor dense is expanded inside
        the C rotation (``native_ops.rope``, bit for bit the same as adding it first)."""
        st = layer.lora["qkv"]
        if cls._fuses(st, layer.wqkv_q, fused):
            qkv = cls._block_lora(h, layer.bqkv, st, layer.wqkv_q, fused)
        elif in_rope and dense is None:
            qkv = _proj(h, layer.wqkv_t, layer.wqkv_c, layer.bqkv, layer.wqkv_q, layer.wqkv_p)
            lora = (h, st.A, st.B, meta, st.kernel_scale, st.output_slices)
            if native_ops.covers(qkv, *lora):
                return qkv, native_ops.rope(qkv, nqk, D, cos_rows, sin_rows, lora)
            qkv = add_lora_packed(qkv, *lora)
        else:
            qkv = cls._lora_proj(h, layer.wqkv_t, layer.wqkv_c, layer.bqkv, st, meta, dense, layer.wqkv_q, backend, fused,
                                 layer.wqkv_p)
        return qkv, cls._rope(qkv, nqk, D, cos_rows, sin_rows, native_rope)

    @classmethod
    def _lora_proj_residual(cls, res: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, w_c: torch.Tensor | None,
                            b: torch.Tensor | None, st: LoRAStack, meta: LoRAMeta, dense: tuple[int, int] | None,
                            w_q: BlockWeight | None, backend: str | None, fused: Any, w_p: Any,
                            in_residual: bool) -> torch.Tensor:
        """``res + _lora_proj(x, ...)``: a projection that only feeds the residual stream (o, down).
        With ``in_residual`` (C kernels, no forced backend), a LoRA neither fused into the block
        kernel nor dense and the residual add are one C pass over the projection's output
        (``native_ops.add_lora_residual``), bit for bit the same sum: in a 512-token prompt step
        the output has just left the cores' caches, and the expand then the add read it twice
        (measured in ``kernels/README.md``)."""
        if cls._fuses(st, w_q, fused):
            return res + cls._block_lora(x, b, st, w_q, fused)
        if in_residual and dense is None:
            y = _proj(x, w_t, w_c, b, w_q, w_p)
            lora = (x, st.A, st.B, meta, st.kernel_scale, st.output_slices)
            if native_ops.covers(y, *lora) and res.stride(1) == 1:
                return native_ops.add_lora_residual(res, y, *lora)
            return res + add_lora_packed(y, *lora)
        return res + cls._lora_proj(x, w_t, w_c, b, st, meta, dense, w_q, backend, fused, w_p)

    @staticmethod
    def _swiglu_lora(gu: torch.Tensor, h: torch.Tensor, st: LoRAStack, meta: LoRAMeta) -> torch.Tensor:
        """The activation of the base gate/up output ``gu`` with gate/up's LoRA (input ``h``):
        added inside the C activation (``native_ops.swiglu``) where kernels' C backend covers
        the call and the stack is two slices of I, else added to ``gu`` first."""
        I = gu.shape[1] // 2
        if st.output_slices == (I, I) and native_ops.covers(gu, h, st.A, st.B, meta, st.kernel_scale, st.output_slices):
            return native_ops.swiglu(gu, (h, st.A, st.B, meta, st.kernel_scale))
        return native_ops.swiglu(add_lora_packed(gu, h, st.A, st.B, meta, st.kernel_scale, st.output_slices))

    @staticmethod
    def _fuses(st: LoRAStack, w_q: BlockWeight | None, fused: Any) -> bool:
        """Whether this step's projection takes its LoRA inside the block kernel (``_lora_proj``)."""
        return fused is not None and st.rows is not None and w_q is not None and w_q.kind == "q4_1"

    @staticmethod
    def _block_lora(x: torch.Tensor, b: torch.Tensor | None, st: LoRAStack, w_q: BlockWeight, fused: Any) -> torch.Tensor:
        """``x @ W.T (+ b)`` with the LoRA inside the block kernel (where :meth:`_fuses`)."""
        y = w_q.matmul(x, (st.rows, fused))
        return y if b is None else y.add_(b)

    @staticmethod
    def _lora_proj(x: torch.Tensor, w_t: torch.Tensor, w_c: torch.Tensor | None, b: torch.Tensor | None,
                   st: LoRAStack, meta: LoRAMeta, dense: tuple[int, int] | None,
                   w_q: BlockWeight | None = None, backend: str | None = None, fused: Any = None,
                   w_p: Any = None) -> torch.Tensor:
        """A projection plus its multi-LoRA delta: ``x @ w_t (+ b)`` + each token's adapter.

        Small steps whose active slots span at most ``DENSE_LORA_MAX_SLOTS`` (``dense`` = (lo, k))
        take the dense path on CPU float32 stacks: every token's shrink against slots lo..lo+k-1
        in one matmul, then ``add_lora_dense`` masks it to each token's own slot and adds the
        expand (one ``mul_`` when slots are mixed, one ``addmm_``): 2-3 ops where the
        gather/bmm/scatter of ``add_lora_packed``'s torch backend takes ~10. Other steps use
        ``add_lora_packed``: decode steps and prompts over several adapters in its C backend
        (``kernels.native_ops``, one call that reads each slot's A and B once), prompts on one
        adapter in torch (PEFT's summation order). Where the C kernels exist, no stack has a
        ``B_dense`` and this dense path is off: steps of up to 16 rows fuse their LoRA into the
        block kernel, and the C backend was as fast as the dense path at 16 rows (94.2 vs 92.8 ms
        a decode step, interleaved A/B, SmolLM2, r=16 all-linear, 2 cores).

        Measured: appending A's rows to the base weight so that one matmul yields both (one op
        less) saved ~2% of a step but made the base columns' rounding depend on how many slots
        were computed (a zero-B adapter was no longer bit-identical to the base model), so the
        shrink stays a matmul of its own.
        """
        if Transformer._fuses(st, w_q, fused):
            return Transformer._block_lora(x, b, st, w_q, fused)
        y = _proj(x, w_t, w_c, b, w_q, w_p)
        if dense is not None and st.B_dense is not None:
            A_t, B_dense = st.dense_operands(*dense)
            return add_lora_dense(y, torch.mm(x, A_t), B_dense, meta, st.A.shape[1], dense[0])
        return add_lora_packed(y, x, st.A, st.B, meta, st.kernel_scale, st.output_slices, backend=backend)

    @staticmethod
    def _decode_attention(qk, kc, vc, Bd, L, rng, slots, mask, K, G, D, manual, neg_mask, scale):
        """Attention of Bd single-token queries over their cached contexts -> [Bd, H*D].

        GQA without repeating K/V: the G query heads sharing a kv head become G query rows.
        With ``manual`` (from ``MANUAL_ATTENTION_MIN_ROWS`` decode rows, CPU float32) it is written
        out (two batched matmuls and a softmax): measured on the 2-core CPU, 16 rows over 61
        positions take ~210 us against ~350 us in SDPA's flash kernel, which wins for a single row
        (~47 vs ~95 us). ``neg_mask`` is ``~mask``, built once per step.
        """
        q = qk[:, : K * G * D].reshape(Bd, K, G, D)
        if rng is not None:
            kk, vv = kc[rng[0] : rng[1], :, :L], vc[rng[0] : rng[1], :, :L]
        else:
            kk, vv = kc[:, :, :L].index_select(0, slots), vc[:, :, :L].index_select(0, slots)
        if manual:
            s = torch.matmul(q, kk.transpose(-1, -2)).mul_(scale)  # [Bd, K, G, L]
            if neg_mask is not None:
                s.masked_fill_(neg_mask, float("-inf"))
            o = torch.matmul(s.softmax(-1), vv)
        else:
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # [Bd, K, G, D]
        return o.reshape(Bd, K * G * D)
