"""Multi-LoRA ops in plain torch: the production path on CPU, and the fallback on a GPU without Triton.

Why hand-written: PEFT runs one adapter at a time (gather rows, two small matmuls, scatter back,
per adapter, per layer), so a mixed batch pays the per-op overhead once per adapter. Here every
call is a fixed handful of tensor ops whatever the number of adapters, and everything derived
from the slot mapping (padded index tables, masks, the plan itself) is built once per step and
cached on the ``LoRAMeta``, so the per-layer cost is only the math.

Three strategies, picked per step from host-side counts (``kernels/README.md`` has the
measurements behind each choice):

* ``single``  one active slot (one request, or every request on one adapter): ``F.linear``
  against that slot's A, ``addmm_`` of that slot's B straight into ``y``; no gather when most
  tokens use the slot (the others' rank vectors are zeroed). Fastest by far.
* ``padded``  several slots, tokens spread evenly enough: tokens are gathered into a dense
  ``[blocks, M, d_in]`` grid (one block per slot, M = most tokens of any slot, short slots padded
  with a repeated token whose contribution is masked to zero), then ONE ``bmm`` shrink and one
  ``bmm`` expand over all slots at once. The blocks are the slot range lo..hi of the active slots
  when it is dense enough, so A and B are read through a view instead of being copied. Punica's
  SGMV in spirit, with padding instead of segments: torch's CPU ``grouped_mm`` measured slower
  than ``bmm`` here.
* ``group``   several slots, very uneven counts (a long prefill next to short ones), where the
  padding would cost more than per-slot ops: the LoRA tokens are gathered once in slot order,
  each slot's run of rows goes through two ``mm`` into one contiguous delta, and one
  ``index_add_`` adds it into ``y``.

What is fused: the shrink of a packed call (q/k/v, gate/up) reads x once for all slices, as one
``[n*r, d_in]`` matmul per token group; the row mask and the per-slot (per-slice) scales are one
factor, built once per step, applied to the small rank-sized intermediate, never to the wide
output; in decode, the expand of all slices is one matmul against all of B (B read once; n times
the FLOPs, which cost nothing next to reading B), after which a run of equal-width slices keeps
its own columns through one strided view (gate/up: one ``add_``; q/k/v: two). The padded expand
writes into a per-step scratch buffer with a zero row past the grid, so the result comes back in
token order with one ``index_select`` (tokens without a slot read the zero row) and one dense
``add_``; ``index_add_`` is used only where both sides are contiguous, since otherwise it falls
back to an elementwise ``scatter_add_`` ~10x slower. B is read through a cached [S, r, d_out]
copy (``transposed_b``): MKL's few-row GEMM is 2-4x slower on B's own layout.

Why so few ops matters: on the 2-core CPU this serves from, each torch op costs microseconds of
dispatch even on a tiny tensor, and the engine makes ~120 LoRA calls per decode step. A call
here is about 10 ops plus ~5 us of argument checks; per-step tables, masks, scale factors and
scratch buffers live on the ``LoRAMeta`` (``meta.cache["torch"]``).

Half-precision inputs (fp16/bf16) are computed in float32 and rounded once into ``y``: CPUs have
no fast half GEMM to lose, and it gives the fp32 accumulation the contract asks for.

This module knows nothing about models or layers; argument checks live in ``kernels.checks``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from kernels.meta import LoRAMeta

__all__ = ["add_lora", "add_lora_packed", "plan", "transposed_b"]

# padded is used while its padding rows (blocks * M - N) stay within max(64, N / 4); past that the
# padding costs more than group's per-slot ops (measured: kernels/README.md, "strategy choice").
_PAD_WASTE_ROWS = 64
_PAD_WASTE_FRACTION = 0.25
# padded reads the weights through a view of the slot range lo..hi of the active slots when that
# range has at most this many times the active slots; otherwise it copies the active slots out
# (index_select). Reading an idle slot costs about what copying an active one does.
_SPAN_LIMIT = 2.0
# packed expand: one matmul against all of B for every slice while (tokens of a slot) * n rows
# stay this few (the matmul is then bound by reading B, so n times the FLOPs cost nothing); else
# one matmul per slice (prefill).
_REPLICATE_MAX_ROWS = 16

_HALF = (torch.float16, torch.bfloat16)


class _TransposedB:
    """B stacks in the [S, r, d_out] layout, copied once and kept while the stack is unchanged.

    Why: the expand multiplies a few rows of h by B^T. With B as the contract stores it,
    [S, d_out, r], MKL's small-M GEMM runs 2-4x slower than on a contiguous [r, d_out] (measured
    on the AVX2 CI machine: 8 slots, 2 tokens each, d_out 11008: 682 vs 344 us; one token,
    d_out 3072: 19 vs 8 us). The copy costs one extra B in memory per stack.

    Staleness: an entry is reused only while B is the same live tensor with the same storage
    pointer and version counter. Every in-place write to B or to a view of it (``B[s].copy_``,
    ``index_copy_``, ``zero_``), also under ``torch.inference_mode``, bumps the version. Writes
    through ``B.data`` do not, so don't load adapter weights that way. Inference tensors (made
    inside ``torch.inference_mode``) track no version, so they are never cached: those stacks
    take the slower transposed view. CPU tensors only (on a GPU, the Triton path is the fast one).
    """

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def __call__(self, B: torch.Tensor) -> torch.Tensor:
        """B^T as [S, r, d_out]: the cached contiguous copy, or a transposed view of B."""
        if B.is_cuda or B.is_inference() or B.requires_grad:
            return B.transpose(1, 2)
        key = id(B)
        hit = self._entries.get(key)
        version, ptr = B._version, B.data_ptr()
        if hit is not None and hit[0]() is B and hit[1] == version and hit[2] == ptr:
            return hit[3]
        Bt = B.transpose(1, 2).contiguous()
        ref = weakref.ref(B, lambda _ref, key=key: self._entries.pop(key, None))
        self._entries[key] = (ref, version, ptr, Bt)
        return Bt

    def clear(self) -> None:
        self._entries.clear()


transposed_b = _TransposedB()


class _Plan:
    """What the torch path does this step, with its tables; built once per step, cached on the meta.

    kind: "single" | "padded" | "group".
    single: ``slot``; ``rows`` int64 [N], the LoRA tokens, or None when most tokens use the slot
        (then all T rows are computed, and ``masked`` says whether some must be zeroed).
    padded: the tokens of each weight block laid out as a dense [num_blocks, M] grid: ``pad_ids``
        int64 [num_blocks*M] (padding rows repeat a real token), ``valid`` bool [num_blocks, M, 1],
        ``inv`` int64 [T] (each token's grid row; tokens without a slot point past the grid, at a
        zero row). The blocks are the slots ``span = (lo, count)`` (weights read through a view),
        or, when that range is too sparse, the active slots ``block_ids`` int64 [U] (copied).
    cache: per-step derived tensors (row factors, gather indices, scratch buffers).
    """

    __slots__ = (
        "kind", "slot", "rows", "masked", "pad_ids", "valid", "inv", "block_ids", "span", "num_blocks",
        "max_tokens", "cache", "padding",
    )  # fmt: skip

    def __init__(self, meta: LoRAMeta):
        self.cache = {}
        self.rows = self.pad_ids = self.valid = self.inv = self.block_ids = self.span = None
        self.masked = self.padding = False
        active = meta.active_slots_host
        num_active, max_tokens, num_lora = len(active), meta.max_tokens_per_slot, meta.num_lora_tokens
        if num_active == 1:
            self.kind, self.slot = "single", active[0]
            if num_lora != meta.num_tokens:
                if 2 * num_lora >= meta.num_tokens:
                    self.masked = True
                else:
                    self.rows = meta.sorted_token_ids[meta.num_tokens - num_lora :]
            return
        lo, hi = active[0], active[-1]
        use_span = hi - lo + 1 <= _SPAN_LIMIT * num_active
        num_blocks = hi - lo + 1 if use_span else num_active
        if num_blocks * max_tokens - num_lora > max(_PAD_WASTE_ROWS, _PAD_WASTE_FRACTION * num_lora):
            self.kind = "group"
            return
        self.kind, self.num_blocks, self.max_tokens = "padded", num_blocks, max_tokens
        if use_span:  # blocks are the slots lo..hi; idle ones get no tokens
            self.span = (lo, num_blocks)
            block_of = {s: s - lo for s in active}
        else:
            self.block_ids = meta.active_slots
            block_of = {s: i for i, s in enumerate(active)}
        # plain Python over at most 2*N entries: cheaper than a dozen tiny tensor ops
        grid_rows = num_blocks * max_tokens
        self.padding = grid_rows != num_lora  # some grid rows are padding (masked to zero)
        order = meta.sorted_token_ids.tolist()  # host memory on the CPU; a GPU copy syncs once per step
        pad_ids = [order[meta.num_tokens - num_lora]] * grid_rows  # padding repeats a real token...
        valid = [0] * grid_rows  # ...whose contribution is masked to zero
        inv = [grid_rows] * meta.num_tokens  # tokens without a slot read the zero row past the grid
        for s, start, count in zip(active, meta.slot_starts_host, meta.tokens_per_slot_host):
            row0 = block_of[s] * max_tokens
            for k in range(count):
                token = order[start + k]
                pad_ids[row0 + k], valid[row0 + k], inv[token] = token, 1, row0 + k
        table = torch.tensor([pad_ids, valid], dtype=torch.int64)
        inv = torch.tensor(inv, dtype=torch.int64)
        if meta.device_index >= 0:
            table, inv = table.to(meta.device, non_blocking=True), inv.to(meta.device, non_blocking=True)
        self.pad_ids, self.inv = table[0], inv
        self.valid = table[1].view(num_blocks, max_tokens, 1).bool()

    def scaling(self, meta, scale, dtype, num_slices, rank, fold):
        """(factor, alpha): h is multiplied by ``factor`` (the row mask times the slot scales) and
        the expand result by the float ``alpha``.

        ``factor`` broadcasts to h ([T or N, n*r] single, [blocks, M, n*r] padded), or is None
        when there is nothing to multiply. ``fold`` puts a float scale into ``factor`` too (half
        precision: scale in fp32, before the rounding). On the CPU, one slot's scalar scale becomes
        ``alpha`` (read once per step: free inside addmm_/add_, where a tensor would cost a mul_).
        Built once per step per scale tensor, so a scale tensor must not change between the calls
        of one step (the engine writes scales when it loads an adapter, between steps).
        """
        is_tensor = isinstance(scale, torch.Tensor)
        key = ("scaling", dtype, id(scale) if is_tensor else scale, num_slices, rank, fold)
        hit = self.cache.get(key)
        if hit is not None and (not is_tensor or hit[0] is scale):
            return hit[1]
        if self.kind == "padded":  # [blocks, M, 1]; nothing to mask on a grid without padding
            mask = self.valid.to(dtype) if self.padding or is_tensor else None
        elif self.masked:
            mask = (meta.slots >= 0).to(dtype).unsqueeze(1)  # [T, 1]
        else:
            mask = None
        alpha = 1.0
        if not is_tensor:
            if fold and scale != 1.0:
                factor = torch.full((), float(scale), dtype=dtype, device=meta.device) if mask is None else mask * scale
            else:
                factor, alpha = mask, float(scale)
        elif self.kind == "padded":
            sc = scale.to(dtype)
            if self.span is not None:
                sc = sc.narrow(sc.dim() - 1, *self.span)
            else:
                sc = sc.index_select(sc.dim() - 1, self.block_ids)
            if sc.dim() == 1:  # [blocks] -> [blocks, 1, 1]
                factor = mask * sc.view(-1, 1, 1)
            else:  # [n, blocks] -> [blocks, 1, n*r]
                factor = mask * sc.t().repeat_interleave(rank, dim=1).unsqueeze(1)
        elif scale.dim() == 1 and not fold and meta.device_index < 0:
            factor, alpha = mask, float(scale[self.slot])  # host memory: no sync
        else:
            sc = scale.to(dtype)
            sc = sc[self.slot] if sc.dim() == 1 else sc[:, self.slot].repeat_interleave(rank)
            factor = sc if mask is None else mask * sc
        self.cache[key] = (scale, (factor, alpha))
        return factor, alpha

    def out_buffer(self, rows, cols, zero_rows, shape, dtype, device):
        """(buf [rows + zero_rows, cols] with zero tail rows, view of buf[:rows] as ``shape``).

        Reused by every layer of the step: layers run one after another and each consumes its
        result before returning; only the first use pays the allocation and zeroing.
        """
        key = ("buf", rows, cols, zero_rows, shape, dtype)
        hit = self.cache.get(key)
        if hit is None:
            buf = torch.zeros(rows + zero_rows, cols, dtype=dtype, device=device)
            hit = self.cache[key] = (buf, buf[:rows].view(shape))
        return hit


def _plan(meta: LoRAMeta) -> _Plan:
    p = meta.cache.get("torch")
    if p is None:
        p = meta.cache["torch"] = _Plan(meta)
    return p


def plan(meta: LoRAMeta) -> str:
    """The strategy this step uses: ``"single"``, ``"padded"`` or ``"group"`` (cached on the meta)."""
    return _plan(meta).kind


def _slice_runs(output_slices: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
    """Group consecutive slices of equal width: (first slice, count, width, column offset) per run."""
    runs, i, off = [], 0, 0
    while i < len(output_slices):
        d, j = output_slices[i], i
        while j < len(output_slices) and output_slices[j] == d:
            j += 1
        runs.append((i, j - i, d, off))
        off += d * (j - i)
        i = j
    return tuple(runs)


def _add_diagonal_blocks(y, full, output_slices, alpha):
    """y[t, off_i:off_i+d_i] += alpha * full[t, i, off_i:off_i+d_i] for every slice i.

    ``full`` [T, n, D] holds every slice's h against all of B; slice i needs only its own
    columns of row i. A run of equal-width slices is one strided view (stepping D + d from one
    slice's block to the next), so gate/up is one ``add_`` and q/k/v two; ``torch.gather`` does
    the same in one op but measured ~40x slower on CPU.
    """
    num_tokens, num_slices, d_total = full.shape
    for first, count, d, off in _slice_runs(output_slices):
        src = full.as_strided(
            (num_tokens, count, d),
            (num_slices * d_total, d_total + d, 1),
            full.storage_offset() + first * d_total + off,
        )
        y_s0, y_s1 = y.stride()
        dst = y.as_strided((num_tokens, count, d), (y_s0, d * y_s1, y_s1), y.storage_offset() + off * y_s1)
        dst.add_(src, alpha=alpha)
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
    """Packed multi-LoRA in torch; arguments already checked (``kernels.checks.check_args``).

    Not differentiable (scratch buffers are written with ``out=``): inference only.

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
    p = meta.cache.get("torch") or _plan(meta)
    rank = A.shape[1] // len(output_slices)
    if p.kind == "single":
        return _single(y, x, A, B, meta, p, scale, output_slices, rank)
    if p.kind == "padded":
        return _padded(y, x, A, B, meta, p, scale, output_slices, rank)
    return _group(y, x, A, B, meta, p, scale, output_slices, rank)


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


def _single(y, x, A, B, meta, p, scale, output_slices, rank):
    """One active slot: F.linear against the slot's own A/B views; no gather when most tokens use it."""
    half = y.dtype in _HALF
    A_s, Bt_s = A.select(0, p.slot), transposed_b(B).select(0, p.slot)  # [n*r, d_in], [r, D]
    if half:
        A_s, Bt_s, x = A_s.float(), Bt_s.float(), x.float()
    rows = p.rows
    h = F.linear(x if rows is None else x.index_select(0, rows), A_s)  # [T or N, n*r]
    factor, alpha = p.scaling(meta, scale, h.dtype, len(output_slices), rank, fold=half)
    if factor is not None:
        h.mul_(factor)
    num_slices = len(output_slices)
    if rows is None and not half:  # the hot path: y updated in place, no intermediate of y's size
        if num_slices == 1:
            return y.addmm_(h, Bt_s, alpha=alpha)
        if h.shape[0] * num_slices <= _REPLICATE_MAX_ROWS:
            # decode: every slice's h against all of B in one call ([T, n, D]; B read once), then
            # each slice keeps its own columns of its own row
            full = torch.mm(h.view(-1, rank), Bt_s).view(h.shape[0], num_slices, y.shape[1])
            return _add_diagonal_blocks(y, full, output_slices, alpha)
        off = 0
        for i, d in enumerate(output_slices):
            y.narrow(1, off, d).addmm_(h.narrow(1, i * rank, rank), Bt_s.narrow(1, off, d), alpha=alpha)
            off += d
        return y
    # half precision, or a few LoRA rows among many: the delta in the compute dtype, added once
    pieces, off = [], 0
    for i, d in enumerate(output_slices):
        pieces.append(torch.mm(h if num_slices == 1 else h.narrow(1, i * rank, rank), Bt_s.narrow(1, off, d)))
        off += d
    delta = pieces[0] if num_slices == 1 else torch.cat(pieces, 1)
    if half:
        delta = delta.to(y.dtype)
    if rows is None:
        return y.add_(delta, alpha=alpha)
    return _add_rows(y, rows, delta, alpha)


def _padded(y, x, A, B, meta, p, scale, output_slices, rank):
    """Several slots: a dense [blocks, M, .] grid, one bmm shrink, one bmm expand (or one per slice).

    Measured and dropped: expanding packed slices in one bmm against a block-diagonal copy of B
    (4 ops instead of 8) was no faster for 16 tokens over 8 slots (170 vs 166 ms a SmolLM2 step):
    it reads n times B's bytes, which the saved ops do not pay for."""
    num_blocks, max_tokens, num_slices = p.num_blocks, p.max_tokens, len(output_slices)
    if p.span is not None:
        A_b, Bt_b = A.narrow(0, *p.span), transposed_b(B).narrow(0, *p.span)  # views: no weight copy
    else:
        A_b, Bt_b = A.index_select(0, p.block_ids), transposed_b(B).index_select(0, p.block_ids)
    xp = x.index_select(0, p.pad_ids).view(num_blocks, max_tokens, x.shape[1])  # [blocks, M, d_in]
    half = y.dtype in _HALF
    if half:
        xp, A_b, Bt_b = xp.float(), A_b.float(), Bt_b.float()
    h = torch.bmm(xp, A_b.transpose(1, 2))  # [blocks, M, n*r]
    factor, alpha = p.scaling(meta, scale, h.dtype, num_slices, rank, fold=half)
    if factor is not None:
        h.mul_(factor)
    rows, d_total = num_blocks * max_tokens, y.shape[1]
    if num_slices == 1 or max_tokens * num_slices <= _REPLICATE_MAX_ROWS:
        # one bmm for every slice (each slice's h against all of B), into a buffer with zero
        # tail rows for the tokens without a slot; then one gather back into token order
        k = max_tokens * num_slices
        buf, out = p.out_buffer(rows * num_slices, d_total, num_slices, (num_blocks, k, d_total), h.dtype, h.device)
        torch.bmm(h.view(num_blocks, k, rank), Bt_b, out=out)
        if num_slices == 1 and not half and y.is_contiguous():
            # index_add_ of contiguous rows is a row copy-add: one pass instead of gather + add;
            # padding rows are exact zeros (their h was masked), added to their own slot's token
            return y.index_add_(0, p.pad_ids, buf.narrow(0, 0, rows), alpha=alpha)
        if num_slices == 1:
            delta = buf.index_select(0, p.inv)  # [T, d_out]
            return y.add_(delta.to(y.dtype) if half else delta, alpha=alpha)
        full = buf.view(rows + 1, num_slices, d_total).index_select(0, p.inv)  # [T, n, D]
        return _add_diagonal_blocks(y, full.to(y.dtype) if half else full, output_slices, alpha)
    off = 0
    for i, d in enumerate(output_slices):
        buf, out = p.out_buffer(rows, d, 1, (num_blocks, max_tokens, d), h.dtype, h.device)
        torch.bmm(h.narrow(2, i * rank, rank), Bt_b.narrow(2, off, d), out=out)
        delta = buf.index_select(0, p.inv)
        y.narrow(1, off, d).add_(delta.to(y.dtype) if half else delta, alpha=alpha)
        off += d
    return y


def _add_rows(y, rows, delta, alpha):
    """y[rows] += alpha * delta for unique ``rows`` (int64 [N]) and a contiguous delta [N, D].

    ``index_add_`` is a fast row copy only when both y and delta are contiguous; on a strided y
    (a column range of a wider output) it falls back to an elementwise scatter ~10x slower, where
    ``index_put_`` with accumulate measured ~4x faster.
    """
    if y.is_contiguous():
        return y.index_add_(0, rows, delta, alpha=alpha)
    if alpha != 1.0:
        delta = delta.mul(alpha)
    return y.index_put_((rows,), delta, accumulate=True)


def _group(y, x, A, B, meta, p, scale, output_slices, rank):
    """Several slots, uneven counts (prefill): per active slot, linear and linear on its run of
    the slot-sorted tokens into one contiguous delta, then one row scatter-add into y."""
    half = y.dtype in _HALF
    num_slices, num_lora = len(output_slices), meta.num_lora_tokens
    num_none = meta.num_tokens - num_lora
    rows = meta.sorted_token_ids.narrow(0, num_none, num_lora)  # LoRA tokens, grouped by slot
    xs = x.index_select(0, rows)  # [N, d_in]
    cdtype = torch.float32 if half else y.dtype
    if half:
        xs = xs.float()
    delta = torch.empty(num_lora, y.shape[1], dtype=cdtype, device=y.device)
    Bt = transposed_b(B)  # [S, r, D]
    alpha, alpha_h = 1.0, None
    if not isinstance(scale, torch.Tensor):
        if half:
            alpha_h = float(scale)  # in fp32, before the rounding into y
        else:
            alpha = float(scale)
    for s, start, count in zip(meta.active_slots_host, meta.slot_starts_host, meta.tokens_per_slot_host):
        A_s, Bt_s = A.select(0, s), Bt.select(0, s)
        if half:
            A_s, Bt_s = A_s.float(), Bt_s.float()
        r0 = start - num_none
        h = F.linear(xs.narrow(0, r0, count), A_s)  # [count, n*r]
        if isinstance(scale, torch.Tensor):
            sc = scale.to(cdtype)
            h.mul_(sc[s] if sc.dim() == 1 else sc[:, s].repeat_interleave(rank))
        elif alpha_h is not None:
            h.mul_(alpha_h)
        if num_slices == 1:
            torch.mm(h, Bt_s, out=delta.narrow(0, r0, count))  # rows of one slot are contiguous
            continue
        off = 0
        for i, d in enumerate(output_slices):
            delta.narrow(0, r0, count).narrow(1, off, d).copy_(torch.mm(h.narrow(1, i * rank, rank), Bt_s.narrow(1, off, d)))
            off += d
    return _add_rows(y, rows, delta.to(y.dtype) if half else delta, alpha)


def _dense_factor(meta: LoRAMeta, lo: int, k: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """[T, k*width] 0/1: token t keeps the columns of its own slot's block among slots lo..lo+k-1;
    built once per step per (lo, k, width) and shared by every layer. None when nothing needs
    masking (one slot computed, and every token on it)."""
    if k == 1 and meta.single_slot == lo and meta.num_lora_tokens == meta.num_tokens:
        return None
    key = ("dense", lo, k, width, dtype)
    hit = meta.cache.get(key)
    if hit is None:
        own = meta.slots.unsqueeze(1) == torch.arange(lo, lo + k, device=meta.device).unsqueeze(0)  # [T, k]
        hit = meta.cache[key] = own.to(dtype).repeat_interleave(width, dim=1)
    return hit


def add_lora_dense(y: torch.Tensor, h: torch.Tensor, B_dense: torch.Tensor, meta: LoRAMeta, width: int,
                   lo: int = 0) -> torch.Tensor:
    """The expand of multi-LoRA after a dense shrink of slots ``lo..``; see ``kernels.add_lora_dense``."""
    factor = _dense_factor(meta, lo, h.shape[1] // width, width, h.dtype)
    if factor is not None:
        h.mul_(factor)
    return y.addmm_(h, B_dense)
