"""The public surface of kernels/: the oracle itself, LoRAMeta, backend choice, and input checks."""

from __future__ import annotations

import re

import pytest
import torch
from lora_cases import Problem

import kernels
from kernels import LoRAMeta, add_lora, add_lora_packed, reference


def test_reference_equals_merged_weights():
    # independent of the oracle's code: y + x @ (W_delta)^T with W_delta = scale * B[s] @ A[s]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, dtype=torch.float64, generator=gen)
    A = torch.randn(3, 2, 10, dtype=torch.float64, generator=gen)
    B = torch.randn(3, 7, 2, dtype=torch.float64, generator=gen)
    slots = torch.tensor([2, -1, 0, 2])
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    y = torch.randn(4, 7, dtype=torch.float64, generator=gen)
    want = y.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want[t] += x[t] @ (scale[s] * B[s] @ A[s]).T
    got = reference.add_lora(y.clone(), x, A, B, slots, scale)
    torch.testing.assert_close(got, want)


def test_reference_packed_equals_separate_calls():
    slots = torch.tensor([1, 0, -1, 1])
    p = Problem(4, 2, 3, d_in=5, output_slices=(6, 2, 2), slots=slots, scale="slice")
    packed = reference.add_lora_packed(p.y.clone(), p.x, p.A, p.B, slots, p.scale, p.output_slices)
    off = 0
    for i, d in enumerate(p.output_slices):
        part = reference.add_lora(
            p.y[:, off : off + d].clone(), p.x, p.A[:, i * 3 : (i + 1) * 3], p.B[:, off : off + d], slots, p.scale[i]
        )
        torch.testing.assert_close(packed[:, off : off + d], part)
        off += d


def test_meta_fields():
    meta = LoRAMeta.build(torch.tensor([2, -1, 0, 2, -1, 0, 0], dtype=torch.int32), num_slots=4)
    assert meta.any_lora is True
    assert (meta.num_tokens, meta.num_slots, meta.num_lora_tokens) == (7, 4, 5)
    assert meta.active_slots_host == (0, 2)
    assert meta.tokens_per_slot_host == (3, 2)
    assert meta.slot_starts_host == (2, 5)
    assert meta.max_tokens_per_slot == 3 and meta.single_slot == -1
    assert meta.sorted_token_ids.tolist() == [1, 4, 2, 5, 6, 0, 3]  # -1 first, stable within a slot
    assert meta.sorted_token_ids_host == (1, 4, 2, 5, 6, 0, 3) and meta.slots_host == (2, -1, 0, 2, -1, 0, 0)
    assert meta.active_slots.tolist() == [0, 2] and meta.tokens_per_slot.tolist() == [3, 2]
    assert meta.slot_starts.tolist() == [2, 5]
    assert LoRAMeta.build(torch.tensor([3, 3]), 4).single_slot == 3


@pytest.mark.parametrize("slots", [torch.full((5,), -1), torch.empty(0, dtype=torch.int64)])
def test_meta_without_adapters(slots):
    meta = LoRAMeta.build(slots, 2)
    assert meta.any_lora is False and meta.num_lora_tokens == 0 and meta.active_slots_host == ()
    assert meta.slots_host == tuple(slots.tolist()) and meta.sorted_token_ids_host == tuple(range(len(slots)))


@pytest.mark.parametrize(
    "slots, num_slots, message",
    [
        (torch.tensor([0, 4]), 4, "slots must lie in [-1, 4)"),
        (torch.tensor([-2, 0]), 4, "got [-2]"),
        (torch.tensor([[0, 1]]), 4, "1-D integer tensor"),
        (torch.tensor([0.0, 1.0]), 4, "integer dtype"),
        ([0, 1], 4, "1-D integer tensor"),
        (torch.tensor([0]), 0, "num_slots must be a positive int"),
    ],
)
def test_meta_rejects_bad_slots(slots, num_slots, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoRAMeta.build(slots, num_slots)


def _args(T=3, S=2, r=4, d_in=8, d_out=6):
    return dict(
        y=torch.zeros(T, d_out),
        x=torch.randn(T, d_in),
        A=torch.randn(S, r, d_in),
        B=torch.randn(S, d_out, r),
        slots=torch.tensor([0, -1, 1])[:T],
        scale=1.0,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(3, 9)), "A must be [S, n*r, d_in] with d_in=9"),
        (dict(x=torch.randn(4, 8)), "same number of tokens"),
        (dict(y=torch.zeros(3, 5)), "B must be [S, sum(output_slices), r]"),
        (dict(B=torch.randn(2, 6, 3)), "B must be [S, sum(output_slices), r] = (2, 6, 4)"),
        (dict(B=torch.randn(3, 6, 4)), "B must be"),
        (dict(A=torch.randn(2, 4, 8, 1)), "A [S, r, d_in]"),
        (dict(x=torch.randn(3, 8, dtype=torch.float64)), "x has dtype torch.float64 but y has torch.float32"),
        (dict(A=torch.randn(2, 4, 8).half()), "A has dtype torch.float16"),
        (dict(scale=torch.ones(3)), "scale must be a float, a tensor [S]=[2]"),
        (dict(scale="big"), "scale must be a float or a tensor"),
        (dict(slots=torch.tensor([0, 2, 1])), "slots must lie in [-1, 2)"),
        (dict(slots=torch.tensor([0, 1])), "covers 2 tokens but x has T=3"),
        (dict(y=torch.zeros(3, 6, dtype=torch.int32)), "y must be float32, float16, bfloat16"),
    ],
)
def test_bad_input_raises_value_error_naming_the_tensor(change, message):
    args = _args()
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        add_lora(args["y"], args["x"], args["A"], args["B"], args["slots"], args["scale"])


def test_meta_built_for_other_slot_count_is_rejected():
    args = _args()
    meta = LoRAMeta.build(args["slots"], 5)
    with pytest.raises(ValueError, match="built for num_slots=5"):
        add_lora(args["y"], args["x"], args["A"], args["B"], meta, 1.0)


def test_packed_checks_slices():
    args = _args(r=4)
    with pytest.raises(ValueError, match="split evenly into 3 slices"):
        add_lora_packed(args["y"], args["x"], args["A"], args["B"], args["slots"], 1.0, (2, 2, 2))
    with pytest.raises(ValueError, match="positive ints"):
        add_lora_packed(args["y"], args["x"], args["A"], args["B"], args["slots"], 1.0, (6, 0))
    B2 = torch.randn(2, 6, 2)  # two slices of rank 2
    with pytest.raises(ValueError, match=re.escape("or [n, S]=[2, 2]; got a tensor of shape [3, 2]")):
        add_lora_packed(args["y"], args["x"], args["A"], B2, args["slots"], torch.ones(3, 2), (3, 3))
    add_lora_packed(args["y"], args["x"], args["A"], B2, args["slots"], torch.ones(2, 2), (3, 3))


def test_backend_selection_and_override():
    assert kernels.get_backend() in ("torch", "triton")
    args = _args()
    try:
        kernels.set_backend("reference")
        assert kernels.get_backend() == "reference"
        y = add_lora(args["y"], args["x"], args["A"], args["B"], args["slots"], 1.0)
        assert y is args["y"] and not torch.equal(y[0], torch.zeros(6))
    finally:
        kernels.set_backend(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        add_lora(args["y"], args["x"], args["A"], args["B"], args["slots"], 1.0, backend="fast")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_every_backend_returns_y_and_skips_no_adapter_steps(backend):
    args = _args()
    meta = LoRAMeta.build(torch.full((3,), -1), 2)
    y = args["y"]
    assert add_lora(y, args["x"], args["A"], args["B"], meta, 1.0, backend=backend) is y
    assert torch.equal(y, torch.zeros(3, 6))


def test_docstring_examples_run():
    import doctest

    import kernels.meta

    for module in (kernels, kernels.meta):
        result = doctest.testmod(module)
        assert result.attempted and not result.failed, module.__name__
