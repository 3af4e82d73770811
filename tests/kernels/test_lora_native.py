"""The native backend (C, the CPU decode path) against the float64 oracle, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
from lora_cases import Problem, slot_pattern

from kernels import LoRAMeta, add_lora, add_lora_packed, native_ops

pytestmark = [pytest.mark.skipif(native_ops.library() is None, reason=f"native kernels unavailable: {native_ops.unavailable_reason()}"),
              pytest.mark.usefixtures("native_isa")]  # every test once per build the CPU runs (AVX2, AVX-512)


def _engine_layout(p: Problem) -> Problem:
    """B as the engine stores it: a transposed view of a contiguous [S, r, d_out] stack."""
    p.B = p.B.transpose(1, 2).contiguous().transpose(1, 2)
    return p


@pytest.mark.parametrize("T", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("rank", [4, 16, 64])
@pytest.mark.parametrize("pattern", ["one", "all_same", "many", "skewed"])
def test_packed_matches_reference(T, rank, pattern):
    slots = slot_pattern(pattern, T, 5, seed=T + rank)
    p = _engine_layout(Problem(T, 5, rank, d_in=131, output_slices=(77, 21, 21), slots=slots, scale="float", seed=rank))
    assert native_ops.covers(p.y, p.x, p.A, p.B, LoRAMeta.build(slots, 5), p.scale, p.output_slices)
    y = p.y.clone()
    assert add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native") is y
    p.check(y)


@pytest.mark.parametrize("scale", ["float", "slot", "slice"])
def test_scales(scale):
    slots = torch.tensor([0, 3, -1, 3, 1, 0, 2])
    p = _engine_layout(Problem(7, 4, 8, d_in=96, output_slices=(96, 32, 32), slots=slots, scale=scale, seed=1))
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    p.check(y)


@pytest.mark.parametrize("T", [3, 40])
def test_one_slot_expand_ranges_cross_slices(T):
    """One active slot: the expand's column ranges (one per thread) cut across slices, each part
    with its own slice's h and scale."""
    slots = torch.full((T,), 2)
    p = _engine_layout(Problem(T, 4, 8, d_in=96, output_slices=(77, 13, 30), slots=slots, scale="slice", seed=T))
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    p.check(y)


def test_single_projection_and_strided_views():
    slots = torch.tensor([1, -1, 0, 1])
    p = _engine_layout(Problem(4, 2, 16, d_in=64, output_slices=(40,), slots=slots, seed=2))
    big_y = torch.randn(4, 60)
    big_x = torch.randn(4, 80)
    big_y[:, 10:50] = p.y
    big_x[:, 5:69] = p.x
    before = big_y.clone()
    add_lora(big_y[:, 10:50], big_x[:, 5:69], p.A, p.B, slots, p.scale, backend="native")
    p.check(big_y[:, 10:50])
    assert torch.equal(big_y[:, :10], before[:, :10]) and torch.equal(big_y[:, 50:], before[:, 50:])


def test_zero_b_adds_exactly_nothing():
    slots = torch.tensor([0, 1, 1, -1])
    p = _engine_layout(Problem(4, 2, 16, d_in=64, output_slices=(48, 16), slots=slots, seed=3))
    p.B[1].zero_()
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    assert torch.equal(y[1:], p.y[1:])
    assert not torch.equal(y[0], p.y[0])


def test_prefill_sized_steps_over_many_slots():
    """Prompt chunks of several sequences (contiguous runs of one slot each), 300 tokens."""
    slots = torch.repeat_interleave(torch.tensor([2, -1, 0, 1, 2, 0]), torch.tensor([60, 20, 90, 40, 50, 40]))
    p = _engine_layout(Problem(300, 3, 16, d_in=96, output_slices=(96, 32, 32), slots=slots, seed=8))
    assert native_ops.covers(p.y, p.x, p.A, p.B, LoRAMeta.build(slots, 3), p.scale, p.output_slices)
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    p.check(y)


def test_uncovered_calls_fall_back_to_torch():
    # one slot over many tokens (MKL's GEMMs win), a contiguous [S, d_out, r] B, half precision:
    # still correct (torch path)
    T = native_ops.SINGLE_SLOT_MAX_TOKENS + 40
    slots = slot_pattern("one", T, 3, seed=4)
    p = _engine_layout(Problem(T, 3, 8, d_in=64, output_slices=(32, 32), slots=slots, seed=4))
    assert not native_ops.covers(p.y, p.x, p.A, p.B, LoRAMeta.build(slots, 3), p.scale, p.output_slices)
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    p.check(y)
    slots = slot_pattern("many", 10, 3, seed=4)
    p = Problem(10, 3, 8, d_in=64, output_slices=(32, 32), slots=slots, seed=4)  # B not in the engine's layout
    assert not native_ops.covers(p.y, p.x, p.A, p.B, LoRAMeta.build(slots, 3), p.scale, p.output_slices)
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    p.check(y)
    q = _engine_layout(Problem(5, 3, 8, d_in=64, output_slices=(32,), slots=torch.tensor([0, 1, 2, -1, 0]),
                               dtype=torch.bfloat16, seed=5))
    y = q.y.clone()
    add_lora(y, q.x, q.A, q.B, q.slots, q.scale, backend="native")
    q.check(y)


def test_token_order_does_not_change_a_token_result():
    """Each token's delta depends only on its own row and slot (isolation), in any step order."""
    slots = torch.tensor([2, 0, -1, 2, 1, 0, 2, 1])
    p = _engine_layout(Problem(8, 3, 16, d_in=64, output_slices=(48, 16), slots=slots, seed=6))
    y = add_lora_packed(p.y.clone(), p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    y_perm = add_lora_packed(p.y[perm].clone(), p.x[perm], p.A, p.B, slots[perm], p.scale, p.output_slices, backend="native")
    assert torch.equal(y[perm], y_perm)
    alone = add_lora_packed(p.y[:1].clone(), p.x[:1], p.A, p.B, slots[:1], p.scale, p.output_slices, backend="native")
    assert torch.equal(alone[0], y[0])


@pytest.mark.parametrize("T", [33, 100])
@pytest.mark.parametrize("slices", [(48, 16, 16), (13, 77, 30)])
def test_prompt_sized_slots_give_each_token_its_alone_result(T, slices):
    """A slot with more than 32 tokens takes the shrink's token tasks (lora_shrink_tokens) and the
    expand's row tiles (4 tokens over whole rows), a lone token the (slot, rows) tasks and a
    column range per thread that cuts across slices: the same sums, so every token's row is bit
    for bit the same, also in the columns past a slice's last whole vector (the scalar tail's
    FMA chain)."""
    slots = torch.cat([torch.zeros(T - 3, dtype=torch.long), torch.tensor([1, -1, 1])])
    p = _engine_layout(Problem(T, 2, 16, d_in=80, output_slices=slices, slots=slots, seed=T))
    y = add_lora_packed(p.y.clone(), p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    p.check(y)
    for t in (0, T // 2, T - 4, T - 1):
        alone = add_lora_packed(p.y[t:t + 1].clone(), p.x[t:t + 1], p.A, p.B, slots[t:t + 1], p.scale, p.output_slices,
                                backend="native")
        assert torch.equal(alone[0], y[t]), t


def test_isa_choice_follows_the_cpu_and_coe_native_isa(monkeypatch):
    """``kernels.native.isa``: the best build the CPU runs, ``COE_NATIVE_ISA`` to force one, a
    clear refusal of an unknown value or of AVX-512 on a CPU without it."""
    from pathlib import Path

    from kernels import native

    monkeypatch.delenv("COE_NATIVE_ISA", raising=False)
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert native.isa() == "avx2" and "-mavx512f" not in native.build_flags()
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}) | native.AVX512_CPU)
    assert native.isa() == "avx512" and "-mavx512f" in native.build_flags() and "-mavx512bf16" not in native.build_flags()
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512_bf16"}) | native.AVX512_CPU)
    assert "-mavx512bf16" in native.build_flags()  # the AVX-512 build's bfloat16 LoRA where the CPU has it
    monkeypatch.setenv("COE_NATIVE_ISA", "AVX2")
    assert "-mavx512bf16" not in native.build_flags()
    assert native.isa() == "avx2"
    monkeypatch.setenv("COE_NATIVE_ISA", "sse4")
    with pytest.raises(ValueError, match="COE_NATIVE_ISA='sse4'.*avx2, avx512"):
        native.isa()
    src = Path(native_ops.__file__).with_name("native") / "lora.c"
    assert native.load(src, lambda lib: True) is None and "COE_NATIVE_ISA='sse4'" in native.unavailable_reason(src)
    monkeypatch.setenv("COE_NATIVE_ISA", "avx512")
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert native.load(src, lambda lib: True) is None
    assert "lacks AVX-512" in native.unavailable_reason(src) and "avx2" in native.unavailable_reason(src)


def _swiglu64(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.double().chunk(2, dim=1)
    return g * torch.sigmoid(g) * u


@pytest.mark.parametrize("T", [1, 5, 16, 77])
@pytest.mark.parametrize("I", [8, 37, 96])
def test_swiglu_matches_float64_as_closely_as_torch(T, I):
    g = torch.Generator().manual_seed(T * 100 + I)
    gu = torch.randn(T, 2 * I, generator=g) * 4
    gu[0, :2] = torch.tensor([-120.0, 95.0])  # exp's clamps: silu -> -0, silu -> g
    got = native_ops.swiglu(gu)
    want = _swiglu64(gu)
    ours = (got.double() - want).abs().max().item()
    gt, ut = gu.chunk(2, dim=1)
    theirs = (torch.nn.functional.silu(gt) * ut).double().sub(want).abs().max().item()
    assert ours <= 2 * theirs + 1e-30, (ours, theirs)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 4, 9, 40])
@pytest.mark.parametrize("pattern", ["one", "all_same", "many", "skewed"])
@pytest.mark.parametrize("scale", ["float", "slice"])
def test_swiglu_with_gate_up_lora(T, pattern, scale):
    I = 72
    slots = slot_pattern(pattern, T, 5, seed=T)
    p = _engine_layout(Problem(T, 5, 16, d_in=64, output_slices=(I, I), slots=slots, scale=scale, seed=T))
    meta = LoRAMeta.build(slots, 5)
    assert native_ops.covers(p.y, p.x, p.A, p.B, meta, p.scale, p.output_slices)
    gu = p.y.clone()
    got = native_ops.swiglu(gu, (p.x, p.A, p.B, meta, p.scale))
    assert torch.equal(gu, p.y), "the input was modified"
    torch.testing.assert_close(got.double(), _swiglu64(p.expected()), rtol=1e-5, atol=1e-5)
    # the same deltas as add_lora_packed's (summed alike), so the same act as add + activation
    added = p.y.clone()
    add_lora_packed(added, p.x, p.A, p.B, meta, p.scale, p.output_slices, backend="native")
    assert torch.equal(got, native_ops.swiglu(added))


def test_swiglu_token_result_does_not_depend_on_the_batch():
    I = 48
    slots = torch.tensor([2, 2, -1, 0, 2, 2, 2, 0, -1])
    p = _engine_layout(Problem(9, 3, 8, d_in=32, output_slices=(I, I), slots=slots, seed=4))
    meta = LoRAMeta.build(slots, 3)
    full = native_ops.swiglu(p.y, (p.x, p.A, p.B, meta, p.scale))
    for t in range(9):
        one = LoRAMeta.build(slots[t : t + 1], 3)
        alone = native_ops.swiglu(p.y[t : t + 1].clone(), (p.x[t : t + 1].clone(), p.A, p.B, one, p.scale))
        assert torch.equal(alone[0], full[t]), t


@pytest.mark.parametrize("T", [1, 9, 40, 100])
@pytest.mark.parametrize("pattern", ["none", "one", "many", "skewed"])
@pytest.mark.parametrize("slices", [(96,), (13, 77, 30)])
def test_lora_with_the_residual_add_is_add_then_residual(T, pattern, slices):
    """``add_lora_residual``: y = res + (y + delta) in one pass, bit for bit ``res + add_lora_packed``
    (also rows without a slot, scalar tails past a slice's last vector, per-slice scales), and
    the same result for a token alone as in the batch."""
    slots = slot_pattern(pattern, T, 5, seed=T)
    p = _engine_layout(Problem(T, 5, 16, d_in=72, output_slices=slices, slots=slots, scale="slice", seed=T + 3))
    meta = LoRAMeta.build(slots, 5)
    assert native_ops.covers(p.y, p.x, p.A, p.B, meta, p.scale, p.output_slices)
    res = torch.randn(T, sum(slices), generator=torch.Generator().manual_seed(T))
    want = res + add_lora_packed(p.y.clone(), p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="native")
    y = p.y.clone()
    assert native_ops.add_lora_residual(res, y, p.x, p.A, p.B, meta, p.scale, p.output_slices) is y
    assert torch.equal(y, want)
    torch.testing.assert_close(y.double(), res.double() + p.expected(), rtol=1e-5, atol=1e-5)
    for t in {0, T // 2, T - 1}:
        one = LoRAMeta.build(slots[t:t + 1], 5)
        alone = native_ops.add_lora_residual(res[t:t + 1], p.y[t:t + 1].clone(), p.x[t:t + 1], p.A, p.B, one, p.scale,
                                             p.output_slices)
        assert torch.equal(alone[0], y[t]), t


def _torch_rope(y: torch.Tensor, nqk: int, D: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The engine's torch rotation (coe.engine.model): qk * cos + roll(qk, D/2) * sin."""
    T = y.shape[0]
    qk = y[:, : nqk * D].view(T, nqk, D)
    rot = qk.roll(D // 2, -1).mul_(sin.unsqueeze(1))
    return (qk * cos.unsqueeze(1)).add_(rot).view(T, nqk * D)


def _rope_tables(T: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(T, D // 2, generator=gen) * 100
    emb = torch.cat([angle, angle], -1)
    sin = emb.sin()
    return emb.cos(), torch.cat([-sin[:, : D // 2], sin[:, D // 2:]], -1)


@pytest.mark.parametrize("T", [1, 5, 40])
@pytest.mark.parametrize("D", [64, 48, 20])
def test_rope_is_torchs_rotation_bit_for_bit(T, D):
    """``native_ops.rope``: the vector widths that divide D/2 (16, 8) and the scalar tail all round
    as torch's two products and their sum (no fused multiply-add); v's heads are left alone."""
    nqk, nv = 5, 2
    y = torch.randn(T, (nqk + nv) * D, generator=torch.Generator().manual_seed(T + D))
    before = y.clone()
    cos, sin = _rope_tables(T, D, T)
    got = native_ops.rope(y, nqk, D, cos, sin)
    assert torch.equal(got, _torch_rope(y, nqk, D, cos, sin))
    assert torch.equal(y, before)


@pytest.mark.parametrize("T", [1, 9, 40, 100])
@pytest.mark.parametrize("pattern", ["none", "one", "many", "skewed"])
def test_rope_with_qkv_lora_is_add_then_rope(T, pattern):
    """``rope`` with the q/k/v LoRA: y gets exactly ``add_lora_packed``'s deltas (v's too) and
    q/k are rotated from them, bit for bit; a token alone gives the same row."""
    D, nqk, slices = 32, 6, (128, 64, 64)
    slots = slot_pattern(pattern, T, 5, seed=T)
    p = _engine_layout(Problem(T, 5, 16, d_in=40, output_slices=slices, slots=slots, scale="slice", seed=T + 7))
    meta = LoRAMeta.build(slots, 5)
    cos, sin = _rope_tables(T, D, T)
    want_y = add_lora_packed(p.y.clone(), p.x, p.A, p.B, slots, p.scale, slices, backend="native")
    y = p.y.clone()
    got = native_ops.rope(y, nqk, D, cos, sin, (p.x, p.A, p.B, meta, p.scale, slices))
    assert torch.equal(y, want_y)
    assert torch.equal(got, _torch_rope(want_y, nqk, D, cos, sin))
    t = T // 2
    alone_y = p.y[t:t + 1].clone()
    alone = native_ops.rope(alone_y, nqk, D, cos[t:t + 1], sin[t:t + 1],
                            (p.x[t:t + 1], p.A, p.B, LoRAMeta.build(slots[t:t + 1], 5), p.scale, slices))
    assert torch.equal(alone[0], got[t]) and torch.equal(alone_y[0], y[t])
