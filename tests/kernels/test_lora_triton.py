"""The Triton kernels against the float64 oracle.

Without CUDA they run under TRITON_INTERPRET=1 (tests/conftest.py sets it before triton is
imported), which simulates every program in numpy: correct but slow, so the shapes here are
small and few. They still cross every masked tail (tokens, columns, K, rank), split-K, packed
slices of unequal width, strided outputs and all three scale forms. With CUDA the same tests
run on the GPU, plus one at engine size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_cases import Problem, slot_pattern

from kernels import LoRAMeta, add_lora, add_lora_packed

triton = pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)
DEVICE = "cuda" if CUDA else "cpu"


def _run(p: Problem, slots, packed: bool) -> torch.Tensor:
    dev = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    y = dev(p.y.clone())
    meta = LoRAMeta.build(slots, p.A.shape[0], device=DEVICE)
    if packed:
        add_lora_packed(y, dev(p.x), dev(p.A), dev(p.B), meta, dev(p.scale), p.output_slices, backend="triton")
    else:
        add_lora(y, dev(p.x), dev(p.A), dev(p.B), meta, dev(p.scale), backend="triton")
    return y.cpu()


@pytest.mark.parametrize(
    "T, rank, d_in, d_out, pattern",
    [
        (1, 16, 40, 24, "one"),  # decode of a single request
        (7, 4, 33, 20, "many"),  # rank below the 16-wide dot tile, odd widths
        (37, 8, 300, 150, "skewed"),  # split-K (several K tiles) with a K tail; token tail over 2 blocks
        (20, 64, 16, 130, "all_same"),  # rank 64, output over two column tiles
    ],
)
def test_add_lora_matches_reference(T, rank, d_in, d_out, pattern):
    slots = slot_pattern(pattern, T, 3, seed=T)
    p = Problem(T, 3, rank, d_in, (d_out,), slots, scale="slot", seed=rank)
    p.check(_run(p, slots, packed=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", ["float", "slice"])
def test_packed_unequal_slices(dtype, scale):
    slots = torch.tensor([2, -1, 0, 2, 2, 1, -1, 0, 3])
    p = Problem(9, 4, 8, d_in=70, output_slices=(48, 16, 16), slots=slots, dtype=dtype, scale=scale)
    p.check(_run(p, slots, packed=True))


def test_no_adapter_rows_and_all_none():
    slots = torch.full((5,), -1)
    p = Problem(5, 2, 4, d_in=16, output_slices=(16,), slots=slots)
    assert torch.equal(_run(p, slots, packed=False), p.y)


def test_permuting_tokens_permutes_the_result():
    slots = torch.tensor([1, 0, -1, 1, 2, 2, 0, 1])
    p = Problem(8, 3, 8, d_in=24, output_slices=(20, 12), slots=slots, scale="slot")
    y = _run(p, slots, packed=True)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    q = Problem(8, 3, 8, d_in=24, output_slices=(20, 12), slots=slots, scale="slot")
    q.x, q.y = p.x[perm], p.y[perm]
    torch.testing.assert_close(_run(q, slots[perm], packed=True), y[perm], atol=1e-6, rtol=1e-6)


def test_strided_output_view():
    slots = torch.tensor([1, -1, 0])
    p = Problem(3, 2, 4, d_in=16, output_slices=(16, 8), slots=slots, scale="slice")
    big = torch.zeros(3, 40, device=DEVICE)
    big[:, 10:34] = p.y.to(DEVICE)
    meta = LoRAMeta.build(slots, 2, device=DEVICE)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    add_lora_packed(big[:, 10:34], dev(p.x), dev(p.A), dev(p.B), meta, dev(p.scale), (16, 8), backend="triton")
    p.check(big[:, 10:34].cpu())
    assert big[:, :10].eq(0).all() and big[:, 34:].eq(0).all()


def test_matches_torch_backend_on_one_meta():
    # both backends read the same step metadata; the GPU engine falls back to torch without Triton
    slots = torch.tensor([3, 3, 0, -1, 1, 3])
    p = Problem(6, 4, 16, d_in=48, output_slices=(32, 16), slots=slots, scale="slot")
    meta = LoRAMeta.build(slots, 4)
    y_torch = add_lora_packed(p.y.clone(), p.x, p.A, p.B, meta, p.scale, p.output_slices, backend="torch")
    torch.testing.assert_close(_run(p, slots, packed=True), y_torch, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_engine_sized_shapes_on_gpu(dtype):
    slots = slot_pattern("many", 300, 8, seed=1)
    p = Problem(300, 8, 16, d_in=2049, output_slices=(2049, 512, 512), slots=slots, dtype=dtype, scale="slot")
    p.check(_run(p, slots, packed=True))


@pytest.mark.skipif(CUDA, reason="with a GPU the tests above compile and run the kernels for real")
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    # the interpreter runs the kernels as Python; this compiles them for sm_90 down to a cubin
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"triton ships no ptxas here ({ptxas})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    script = Path(__file__).with_name("compile_sm90.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["shrink", "bf16", "ok", "expand", "bf16", "ok", "shrink", "fp32", "ok", "expand", "fp32", "ok"]


def test_float64_is_refused_with_a_pointer_to_torch():
    slots = torch.tensor([0])
    x, A, B, y = torch.randn(1, 4).double(), torch.randn(1, 2, 4).double(), torch.randn(1, 3, 2).double(), torch.zeros(1, 3).double()
    with pytest.raises(ValueError, match="use backend='torch' for float64"):
        add_lora(y, x, A, B, slots, 1.0, backend="triton")
