"""Compile the LoRA kernels for Hopper (sm_90) without a GPU, through ptxas.

Run as a script by test_lora_triton.py with TRITON_INTERPRET unset (the interpreter replaces
@triton.jit functions with Python ones). Catches what the interpreter lets through but the GPU
compiler rejects: types, layouts, tl.dot shapes. Prints one line per kernel variant.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_ops  # noqa: E402

SHRINK = ["x_ptr", "a_ptr", "h_ptr", "sorted_ids_ptr", "slot_ids_ptr", "slot_counts_ptr", "slot_starts_ptr",
          "N", "K", "stride_xt", "stride_xk", "stride_as", "stride_an", "stride_ak", "stride_ht", "stride_hn",
          "num_n_blocks"]  # fmt: skip
EXPAND = ["h_ptr", "b_ptr", "y_ptr", "scale_ptr", "sorted_ids_ptr", "slot_ids_ptr", "slot_counts_ptr",
          "slot_starts_ptr", "slice_starts_ptr", "scale_value", "R", "stride_ht", "stride_hr", "stride_bs",
          "stride_bd", "stride_br", "stride_yt", "stride_yd", "stride_scale_i", "stride_scale_s", "num_n_blocks"]  # fmt: skip


def compile_one(fn, names, types, consts, **options):
    signature = dict(zip(names, types))
    signature.update({name: "constexpr" for name in consts})
    kernel = triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.asm["cubin"], "ptxas produced no cubin"
    return kernel


for dtype in ("bf16", "fp32"):
    fp32 = dtype == "fp32"
    compile_one(
        triton_ops._lora_shrink_kernel, SHRINK, [f"*{dtype}", f"*{dtype}", "*fp32"] + ["*i32"] * 4 + ["i32"] * 10,
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, FP32_IEEE=fp32), num_warps=4, num_stages=3,
    )  # fmt: skip
    print(f"shrink {dtype} ok")
    compile_one(
        triton_ops._lora_expand_kernel, EXPAND,
        ["*fp32", f"*{dtype}", f"*{dtype}", f"*{dtype}"] + ["*i32"] * 5 + ["fp32"] + ["i32"] * 11,
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_R=16, HAS_SCALE_TABLE=True, FP32_IEEE=fp32), num_warps=4, num_stages=2,
    )  # fmt: skip
    print(f"expand {dtype} ok")
