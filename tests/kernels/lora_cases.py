"""Shared builders for the kernel tests: random LoRA problems and the float64 oracle's answer."""

from __future__ import annotations

import torch

from kernels import reference

# Tolerances against the float64 oracle, relative to the output's magnitude (the error of one
# rounding of y plus fp32/half accumulation over d_in and r).
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


class Problem:
    """One random add_lora(_packed) call: inputs, and the expected output in float64."""

    def __init__(self, T, S, rank, d_in, output_slices, slots, dtype=torch.float32, scale="float", seed=0):
        gen = torch.Generator().manual_seed(seed)
        n = len(output_slices)
        d_out = sum(output_slices)
        self.output_slices = tuple(output_slices)
        self.slots = torch.as_tensor(slots, dtype=torch.int64)
        # weights scaled like a trained adapter so the delta is comparable to y, not dominating it
        self.x = torch.randn(T, d_in, generator=gen).to(dtype)
        self.A = (torch.randn(S, n * rank, d_in, generator=gen) / d_in**0.5).to(dtype)
        self.B = (torch.randn(S, d_out, rank, generator=gen) / rank**0.5).to(dtype)
        self.y = torch.randn(T, d_out, generator=gen).to(dtype)
        if scale == "float":
            self.scale = 0.75
        elif scale == "slot":
            self.scale = (torch.rand(S, generator=gen) + 0.5).to(dtype)
        elif scale == "slice":
            self.scale = (torch.rand(n, S, generator=gen) + 0.5).to(dtype)
        else:
            raise AssertionError(scale)
        self.dtype = dtype

    def expected(self) -> torch.Tensor:
        delta = reference.lora_delta(self.x, self.A, self.B, self.slots, self.scale, self.output_slices)
        return self.y.double() + delta

    def check(self, got: torch.Tensor) -> None:
        want = self.expected()
        torch.testing.assert_close(got.double(), want, **TOLERANCES[self.dtype], check_dtype=False)
        # rows without an adapter are bit-identical to the input
        none = self.slots < 0
        assert torch.equal(got[none], self.y[none]), "rows with slot -1 were modified"


def slot_pattern(name: str, T: int, S: int, seed: int = 0) -> torch.Tensor:
    """Mappings the tests cover: all -1, one slot, many slots (with -1), skewed, all the same."""
    gen = torch.Generator().manual_seed(seed)
    if name == "none":
        return torch.full((T,), -1)
    if name == "one":  # one slot, some tokens without adapter
        slots = torch.full((T,), S - 1)
        slots[torch.rand(T, generator=gen) < 0.3] = -1
        return slots
    if name == "all_same":
        return torch.full((T,), S // 2)
    if name == "many":
        return torch.randint(-1, S, (T,), generator=gen)
    if name == "skewed":  # one long sequence next to a few short ones (prefill)
        slots = torch.zeros(T, dtype=torch.int64)
        k = max(1, T // 10)
        slots[torch.randperm(T, generator=gen)[:k]] = torch.randint(-1, S, (k,), generator=gen)
        return slots
    raise AssertionError(name)
