"""The torch backend (the CPU production path) against the float64 oracle, over every strategy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_cases import Problem, slot_pattern

from kernels import LoRAMeta, add_lora, add_lora_packed, torch_ops


@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("rank", [4, 8, 16, 64])
@pytest.mark.parametrize("pattern", ["none", "one", "all_same", "many", "skewed"])
def test_add_lora_matches_reference(T, rank, pattern):
    S = 5
    slots = slot_pattern(pattern, T, S, seed=T + rank)
    # d not a multiple of any tile or vector width
    p = Problem(T, S, rank, d_in=129, output_slices=(77,), slots=slots, scale="slot", seed=rank)
    y = p.y.clone()
    out = add_lora(y, p.x, p.A, p.B, slots, p.scale, backend="torch")
    assert out is y
    p.check(y)


def test_odd_hidden_size_2049():
    slots = torch.tensor([0, -1, 2, 2, 1, 0, -1])
    p = Problem(7, 3, 16, d_in=2049, output_slices=(2049,), slots=slots)
    y = p.y.clone()
    add_lora(y, p.x, p.A, p.B, slots, p.scale, backend="torch")
    p.check(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", ["float", "slot", "slice"])
@pytest.mark.parametrize("pattern", ["one", "many", "skewed"])
def test_packed_unequal_slices(dtype, scale, pattern):
    # q/k/v of a GQA model: k and v narrower than q
    slots = slot_pattern(pattern, 40, 4, seed=3)
    p = Problem(40, 4, 8, d_in=96, output_slices=(96, 32, 32), slots=slots, dtype=dtype, scale=scale)
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="torch")
    p.check(y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_single_slot_paths(dtype):
    for slots in (torch.full((9,), 2), torch.tensor([2, -1, 2, 2, -1, 2, 2, 2, 2]), torch.tensor([-1] * 8 + [2])):
        p = Problem(9, 3, 16, d_in=64, output_slices=(48, 16), slots=slots, dtype=dtype, scale="slice")
        y = p.y.clone()
        add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="torch")
        p.check(y)


# Each strategy (and sub-path) of the torch path, with a mapping over S slots that selects it.
PLAN_CASES = {
    "single, every token": ("single", [1, 1, 1, 1, 1, 1], 4),
    "single, decode, one expand for all slices": ("single", [1, 1, 1, 1], 4),
    "single, decode, masked -1 row": ("single", [1, -1, 1, 1], 4),
    "single, masked -1 rows": ("single", [1, -1, 1, 1, 1, 1], 4),
    "single, gathered rows": ("single", [-1, -1, -1, -1, 1, -1], 4),
    "padded, all slots, one bmm expand": ("padded", [0, 1, 2, 3, 3, 2, 1, 0], 4),
    "padded, slot range view with idle slots": ("padded", [3, -1, 1, 3, 1, 1, -1, 3], 4),
    "padded, per-slice expand": ("padded", [2, 1] * 6 + [-1], 4),
    "padded, copied active slots": ("padded", [0, 7, 7, 0, -1], 8),
    "group, skewed counts": ("group", [0] * 90 + [1, 2, -1], 4),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
@pytest.mark.parametrize("scale", ["float", "slot", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_strategy(case, scale, dtype):
    strategy, slots, S = PLAN_CASES[case]
    slots = torch.tensor(slots)
    meta = LoRAMeta.build(slots, S)
    assert torch_ops.plan(meta) == strategy
    if "range view" in case:
        assert meta.cache["torch"].span == (1, 3)  # slots 1..3 as a view
    if "copied" in case:
        assert meta.cache["torch"].span is None and meta.cache["torch"].block_ids.tolist() == [0, 7]
    p = Problem(len(slots), S, 8, d_in=33, output_slices=(20, 9, 9), slots=slots, scale=scale, dtype=dtype)
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, meta, p.scale, p.output_slices, backend="torch")
    p.check(y)
    # and the one-slice op over the same step
    q = Problem(len(slots), S, 4, d_in=17, output_slices=(11,), slots=slots, scale="slot", dtype=dtype, seed=1)
    y = q.y.clone()
    add_lora(y, q.x, q.A, q.B, meta, q.scale, backend="torch")
    q.check(y)


def test_meta_reused_across_layers_shapes_and_dtypes():
    # one meta per step serves every layer: different widths, ranks, slices and dtypes
    slots = torch.tensor([2, 0, -1, 2, 1, 0, 2])
    meta = LoRAMeta.build(slots, 3)
    for i, (d_in, slices, rank, dtype) in enumerate(
        [(16, (16, 8, 8), 4, torch.float32), (16, (16,), 8, torch.float32), (24, (40, 40), 16, torch.float16),
         (40, (24,), 4, torch.bfloat16), (16, (16, 8, 8), 4, torch.float32)]
    ):  # fmt: skip
        p = Problem(7, 3, rank, d_in, slices, slots, dtype=dtype, scale="slot", seed=i)
        y = p.y.clone()
        add_lora_packed(y, p.x, p.A, p.B, meta, p.scale, slices, backend="torch")
        p.check(y)


@pytest.mark.parametrize("pattern", ["one", "many", "skewed"])
def test_permuting_tokens_permutes_the_result(pattern):
    T, S = 50, 4
    slots = slot_pattern(pattern, T, S, seed=5)
    p = Problem(T, S, 8, d_in=40, output_slices=(30, 10), slots=slots, scale="slice")
    y = add_lora_packed(p.y.clone(), p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="torch")
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1))
    y_perm = add_lora_packed(p.y[perm].clone(), p.x[perm], p.A, p.B, slots[perm], p.scale, p.output_slices, backend="torch")
    torch.testing.assert_close(y_perm, y[perm], atol=1e-6, rtol=1e-6)


def test_no_adapter_step_is_a_no_op():
    slots = torch.full((6,), -1)
    meta = LoRAMeta.build(slots, 2)
    assert meta.any_lora is False
    p = Problem(6, 2, 4, d_in=8, output_slices=(8,), slots=slots)
    y = p.y.clone()
    assert add_lora(y, p.x, p.A, p.B, meta, 2.0, backend="torch") is y
    assert torch.equal(y, p.y)


def test_strided_views_of_y_and_x():
    # y as a column range of a fused output, x as a column range of a wider activation
    slots = torch.tensor([1, -1, 0, 1, 1])
    p = Problem(5, 2, 4, d_in=12, output_slices=(10, 6), slots=slots, scale="slice")
    big_y = torch.randn(5, 30)
    big_y[:, 7:23] = p.y
    big_x = torch.randn(5, 20)
    big_x[:, 3:15] = p.x
    before = big_y.clone()
    add_lora_packed(big_y[:, 7:23], big_x[:, 3:15], p.A, p.B, slots, p.scale, p.output_slices, backend="torch")
    p.check(big_y[:, 7:23])
    assert torch.equal(big_y[:, :7], before[:, :7]) and torch.equal(big_y[:, 23:], before[:, 23:])
    # one slice into a column view, for every strategy
    for slots in (torch.tensor([1, -1, 0, 1, 1]), torch.tensor([1, 1, -1, 1, 1]), torch.tensor([0] * 5)):
        q = Problem(5, 2, 4, d_in=12, output_slices=(9,), slots=slots, scale="slot", seed=2)
        big_y = torch.randn(5, 30)
        big_y[:, 4:13] = q.y
        add_lora(big_y[:, 4:13], q.x, q.A, q.B, slots, q.scale, backend="torch")
        q.check(big_y[:, 4:13])


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 24),
    S=st.integers(1, 6),
    rank=st.sampled_from([1, 4, 8]),
    d_in=st.integers(1, 40),
    slices=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    scale=st.sampled_from(["float", "slot", "slice"]),
    data=st.data(),
)
def test_random_problems(T, S, rank, d_in, slices, scale, data):
    slots = torch.tensor(data.draw(st.lists(st.integers(-1, S - 1), min_size=T, max_size=T)))
    p = Problem(T, S, rank, d_in, slices, slots, scale=scale)
    y = p.y.clone()
    add_lora_packed(y, p.x, p.A, p.B, slots, p.scale, p.output_slices, backend="torch")
    p.check(y)


def test_scales_written_between_steps_are_seen_by_the_next_step():
    # per-step caches key on the scale tensor; the engine writes a slot's scale when it loads an
    # adapter, between steps, and the next step's meta must see the new value
    slots = torch.tensor([1, 1, 0, 1])
    p = Problem(4, 2, 4, d_in=8, output_slices=(6,), slots=slots, scale="slot")
    scale = p.scale.clone()
    for step in range(2):
        meta = LoRAMeta.build(slots, 2)
        p.scale = scale.clone()
        y = p.y.clone()
        add_lora(y, p.x, p.A, p.B, meta, scale, backend="torch")
        p.check(y)
        scale[1] = 3.0 + step  # "load another adapter into slot 1"


@pytest.mark.parametrize("inference_tensors", [False, True])
def test_writes_to_B_between_calls_are_seen(inference_tensors):
    # the torch path keeps a transposed copy of B while B is unchanged: every in-place write
    # (as the engine's adapter registry does, under inference_mode) must invalidate it
    slots = torch.tensor([0, 1, 1, -1])
    p = Problem(4, 2, 4, d_in=8, output_slices=(6, 3), slots=slots, scale="slot")
    with torch.inference_mode(inference_tensors):
        B = p.B.clone()
    meta = LoRAMeta.build(slots, 2)
    for step in range(3):
        with torch.inference_mode():
            y = add_lora_packed(p.y.clone(), p.x, p.A, B, meta, p.scale, p.output_slices, backend="torch")
            p.B = B.clone()
            p.check(y)
            B[1].copy_(torch.randn(B[1].shape))  # "load another adapter into slot 1"
            if step == 1:
                B.zero_()


def test_a_new_B_with_a_recycled_id_is_not_confused_with_the_old_one():
    slots = torch.tensor([0, 0, 1])
    meta = LoRAMeta.build(slots, 2)
    for seed in range(4):  # fresh tensors each round; CPython may hand out the same ids again
        p = Problem(3, 2, 4, d_in=8, output_slices=(5,), slots=slots, seed=seed)
        y = add_lora(p.y.clone(), p.x, p.A, p.B.clone(), meta, p.scale, backend="torch")
        p.check(y)


def _dense_b(B: torch.Tensor, output_slices: tuple[int, ...]) -> torch.Tensor:
    """[S, n*r, D]: slice i's rank rows hold B^T in slice i's columns only (block diagonal)."""
    S, D, r = B.shape
    out = torch.zeros(S, len(output_slices) * r, D, dtype=B.dtype)
    off = 0
    for i, d in enumerate(output_slices):
        out[:, i * r : (i + 1) * r, off : off + d] = B[:, off : off + d, :].transpose(1, 2)
        off += d
    return out


@pytest.mark.parametrize("output_slices", [(24,), (16, 8, 8), (20, 20)])
@pytest.mark.parametrize("slots,lo,k", [([0] * 5, 0, 1), ([2, -1, 2, 2], 2, 1), ([1, 2, -1, 2, 1, -1], 1, 2),
                                        ([0, 3, 1], 0, 4), ([-1, -1, 3], 3, 1)])
def test_add_lora_dense_matches_reference(output_slices, slots, lo, k):
    """The dense expand (h over slots lo..lo+k-1, masked to each token's own slot) equals the
    float64 oracle; rows without an adapter stay bit-identical."""
    from kernels import add_lora_dense

    S, rank, d_in = 4, 4, 12
    p = Problem(len(slots), S, rank, d_in, output_slices, slots, scale="float")
    p.scale = 1.0  # the dense path takes scales folded into A
    width = len(output_slices) * rank
    h = p.x @ p.A[lo : lo + k].reshape(k * width, d_in).t()
    B_dense = _dense_b(p.B, output_slices)[lo : lo + k].reshape(k * width, -1)
    meta = LoRAMeta.build(p.slots, S)
    y = add_lora_dense(p.y.clone(), h, B_dense, meta, width, lo)
    p.check(y)


def test_add_lora_dense_rejects_mismatched_shapes():
    from kernels import add_lora_dense

    meta = LoRAMeta.build(torch.tensor([0, 0]), 2)
    with pytest.raises(ValueError, match="do not line up"):
        add_lora_dense(torch.zeros(2, 8), torch.zeros(2, 6), torch.zeros(6, 8), meta, 4)

