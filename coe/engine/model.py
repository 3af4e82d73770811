"""A Llama-family decoder (Llama, Mistral, SmolLM, TinyLlama; Qwen2's qkv bias) with multi-LoRA layers.

One forward pass runs one engine step: a flat batch of T tokens from many sequences (decode tokens
first, one per sequence, then prefill chunks), each token carrying its own adapter slot. Every
LoRA-capable projection (q, k, v, o, gate, up, down) adds its adapter delta through ``kernels``,
with one ``LoRAMeta`` per step shared by all layers.

Why hand-written rather than transformers' modules: on a 2-core CPU the per-op Python overhead of a
decode step matters as much as its FLOPs, so this model
- fuses q/k/v into one ``wqkv`` matmul and gate/up into one ``w13`` matmul (packed LoRA calls too);
- applies RoPE to q and k together, with cos/sin gathered once per step;
- calls ``mm`` on pre-transposed weight views and writes RMSNorm with 0-dim tensor constants
  (each saves dispatches that ``F.linear`` / ``F.rms_norm`` / Python scalars cost);
- keeps weights as plain tensor attributes (no ``nn.Module.__getattr__`` per weight per layer);
- writes K/V for all T tokens with one ``index_put_`` per layer and reads a decode batch's cache
  as a view when its sequences sit in consecutive KV slots.

Its arithmetic follows transformers op for op where rounding depends on it (rotate-half RoPE,
residual added after the projection and its LoRA delta, as PEFT does), so fp32 logits match
transformers+PEFT bit for bit on the base model (prefill; SmolLM2 measured) and to ~1e-5 with
adapters. Faster variants (complex-multiply RoPE, residual folded into ``addmm``) were measured
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

from kernels import LoRAMeta, add_lora_packed

# The aten op takes None for a full slice in its index list (the Python method does not).
index_put_ = torch.ops.aten.index_put_

# Projections an adapter may target, in PEFT's module names, grouped as the model fuses them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
GROUP_BITS = {"qkv": 1, "o": 2, "gate_up": 4, "down": 8}
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
    """

    __slots__ = ("A", "Bt", "B", "scale", "output_slices", "d_in", "folded", "kernel_scale")

    def __init__(self, d_in: int, output_slices: tuple[int, ...]) -> None:
        self.d_in = d_in
        self.output_slices = output_slices
        self.A = self.Bt = self.B = self.scale = None  # allocated by ``Transformer.allocate_lora``
        self.folded = False
        self.kernel_scale: float | torch.Tensor | None = None

    def allocate(self, num_slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        n = len(self.output_slices)
        self.A = torch.zeros(num_slots, n * rank, self.d_in, dtype=dtype, device=device)
        self.Bt = torch.zeros(num_slots, rank, sum(self.output_slices), dtype=dtype, device=device)
        self.B = self.Bt.transpose(1, 2)
        self.scale = torch.zeros(n, num_slots, dtype=dtype, device=device)
        self.folded = dtype == torch.float32
        self.kernel_scale = 1.0 if self.folded else self.scale

    @property
    def rank(self) -> int:
        return 0 if self.Bt is None else self.Bt.shape[1]


class Layer:
    """One decoder block's weights (plain attributes: see the module docstring)."""

    __slots__ = ("attn_norm", "wqkv_t", "bqkv", "wo_t", "bo", "ffn_norm", "w13_t", "b13", "w2_t", "b2", "lora")

    def __init__(self) -> None:
        self.lora: dict[str, LoRAStack] = {}


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
        self.tok_embeddings: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.output_t: torch.Tensor | None = None
        self.rope_cos: torch.Tensor | None = None  # [max_len, D]
        self.rope_sin: torch.Tensor | None = None  # [max_len, D], first half negated (see from_state)
        self.num_lora_slots = 0
        self.slot_groups: list[list[int]] = []  # per slot, per layer: GROUP_BITS mask of its weights
        self._eps = torch.tensor(args.norm_eps, dtype=torch.float32, device=device)
        self._dim = torch.tensor(float(args.dim), dtype=torch.float32, device=device)

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

        self.tok_embeddings = need("model.embed_tokens.weight", (a.vocab_size, a.dim)).contiguous()
        self.norm = need("model.norm.weight", (a.dim,))
        if a.tie_word_embeddings or get("lm_head.weight") is None:
            self.output = self.tok_embeddings
        else:
            self.output = need("lm_head.weight", (a.vocab_size, a.dim)).contiguous()
        self.output_t = self.output.t()
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

    def allocate_lora(self, num_slots: int, rank: int) -> None:
        """(Re)allocate every layer's LoRA stacks as zeros: ``num_slots`` slots of rank ``rank``."""
        for layer in self.layers:
            for stack in layer.lora.values():
                stack.allocate(num_slots, rank, self.dtype, self.device)
        self.num_lora_slots = num_slots
        self.slot_groups = [[0] * len(self.layers) for _ in range(num_slots)]

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

    def weight_bytes(self) -> int:
        """Bytes held by the base weights (tied embeddings counted once)."""
        seen: set[int] = set()
        total = 0
        tensors = [self.tok_embeddings, self.norm, self.output]
        for L in self.layers:
            tensors += [L.attn_norm, L.wqkv_t, L.bqkv, L.wo_t, L.bo, L.ffn_norm, L.w13_t, L.b13, L.w2_t, L.b2]
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
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
        Bd = batch.num_decode
        # Step-level work, shared by every layer.
        cos = self.rope_cos[batch.positions].unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin[batch.positions].unsqueeze(1)
        kv_index = [batch.kv_slots, None, batch.positions]  # cache[slot_t, :, pos_t] = k_t
        if Bd:
            Ld = batch.decode_len
            rng = batch.decode_slot_range
            mask = batch.decode_mask
            slots_d = batch.decode_kv_slots
        decode_only = Bd == T
        NQK = H + K
        half = D // 2
        I = a.intermediate_size

        x = F.embedding(batch.token_ids, self.tok_embeddings)  # [T, dim]
        for li, layer in enumerate(self.layers):
            lora = layer.lora
            lmask = groups[li] if use_lora else 0
            # ---- attention
            h = _rms_norm(x, layer.attn_norm, eps, dim)
            qkv = _linear(h, layer.wqkv_t, layer.bqkv)  # [T, (H+2K)*D]
            if lmask & 1:
                st = lora["qkv"]
                add_lora_packed(qkv, h, st.A, st.B, meta, st.kernel_scale, st.output_slices)
            # RoPE on q and k at once: qk * cos + rotate_half(qk) * sin, rounded as transformers does.
            qk = qkv[:, : q_size + kv_size].view(T, NQK, D)
            rot = qk.roll(half, -1).mul_(sin)  # [x2, x1] * [-sin, sin] == rotate_half(qk) * sin
            qk = (qk * cos).add_(rot).view(T, NQK * D)
            k = qk[:, q_size:].view(T, K, D)
            v = qkv[:, q_size + kv_size :].view(T, K, D)
            kc, vc = k_cache[li], v_cache[li]
            index_put_(kc, kv_index, k)
            index_put_(vc, kv_index, v)
            if decode_only:
                attn = self._decode_attention(qk, kc, vc, Bd, Ld, rng, slots_d, mask, K, G, D)
            else:
                attn = torch.empty(T, q_size, dtype=x.dtype, device=x.device)
                if Bd:
                    attn[:Bd] = self._decode_attention(qk[:Bd], kc, vc, Bd, Ld, rng, slots_d, mask, K, G, D)
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
            o = _linear(attn, layer.wo_t, layer.bo)
            if lmask & 2:
                st = lora["o"]
                add_lora_packed(o, attn, st.A, st.B, meta, st.kernel_scale, st.output_slices)
            x = x + o
            # ---- feed-forward (SwiGLU)
            h = _rms_norm(x, layer.ffn_norm, eps, dim)
            gu = _linear(h, layer.w13_t, layer.b13)  # [T, 2I]
            if lmask & 4:
                st = lora["gate_up"]
                add_lora_packed(gu, h, st.A, st.B, meta, st.kernel_scale, st.output_slices)
            g, u = gu.view(T, 2, I).unbind(1)
            act = F.silu(g).mul_(u)
            d = _linear(act, layer.w2_t, layer.b2)
            if lmask & 8:
                st = lora["down"]
                add_lora_packed(d, act, st.A, st.B, meta, st.kernel_scale, st.output_slices)
            x = x + d

        if batch.logit_rows.shape[0] != T:
            x = x.index_select(0, batch.logit_rows)
        x = _rms_norm(x, self.norm, eps, dim)
        return torch.mm(x, self.output_t).float()

    @staticmethod
    def _decode_attention(qk, kc, vc, Bd, L, rng, slots, mask, K, G, D):
        """Attention of Bd single-token queries over their cached contexts -> [Bd, H*D].

        GQA without repeating K/V: the G query heads sharing a kv head become G query rows.
        """
        q = qk[:, : K * G * D].reshape(Bd, K, G, D)
        if rng is not None:
            kk, vv = kc[rng[0] : rng[1], :, :L], vc[rng[0] : rng[1], :, :L]
        else:
            kk, vv = kc[:, :, :L].index_select(0, slots), vc[:, :, :L].index_select(0, slots)
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # [Bd, K, G, D]
        return o.reshape(Bd, K * G * D)
