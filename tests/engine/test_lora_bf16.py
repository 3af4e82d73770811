"""The fused block kernel's opt-in bfloat16 LoRA (``serving.fused_lora_dtype: bfloat16``, LORA_BF16
in qmatmul.c): its panel layout, its products against a float64 oracle that rounds where the
kernel rounds, its independence from tiles, threads and batch, and the engine's use of it."""

from __future__ import annotations

import pytest
import torch
from tinyllm import quantize_blocks, save_tiny_block_model, tiny_config

from coe.engine import model as M
from coe.engine.quantized import lora_bf16_available, native_library, unavailable_reason
from coe.errors import ConfigError

needs_bf16 = pytest.mark.skipif(native_library() is None or not lora_bf16_available(),
                                reason=f"no bfloat16 LoRA in the block kernels here: {unavailable_reason() or 'no AVX512-BF16'}")


def _bf(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16 (nearest even, as the kernel's conversions round), as float64."""
    return t.float().bfloat16().double()


@pytest.mark.parametrize("n_out", [8, 16, 40, 152])
def test_bf16_panels_pair_two_rank_steps(n_out):
    """bfloat16 panels: output n's B^T rows 2k and 2k + 1 sit side by side in pair n // 16, row k,
    at columns 2 (n % 16) and 2 (n % 16) + 1 (the layout LORA_BF16 reads); same shape as the
    float16 panels; an odd last block's partner stays zero."""
    from coe.engine.quantized import lora_panels, panels_shape

    S, R = 2, 6
    Bt = torch.randn(S, R, n_out, generator=torch.Generator().manual_seed(n_out)).bfloat16().float()  # exact in bfloat16
    P = lora_panels(Bt, torch.bfloat16)
    assert P.dtype == torch.bfloat16 and tuple(P.shape) == panels_shape(S, n_out, R)
    V = P.view(S, P.shape[1], R // 2, 16, 2)
    n = torch.arange(n_out)
    for s in range(S):
        for k in range(R // 2):
            for j in range(2):
                assert torch.equal(V[s, n // 16, k, n % 16, j].float(), Bt[s, 2 * k + j])
    if n_out % 16:
        assert not V[:, -1, :, 8:].any()


def test_bf16_panels_need_an_even_rank():
    from coe.engine.quantized import write_panels

    with pytest.raises(ValueError, match="even rank, got 3"):
        write_panels(torch.zeros(1, 3, 16, dtype=torch.bfloat16), torch.zeros(3, 16))


def test_lora_rows_refuses_mixed_or_unavailable_bf16(monkeypatch):
    from coe.engine import quantized
    from coe.engine.quantized import lora_rows, panels_shape

    A = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="both in float16 or both in bfloat16"):
        lora_rows(A, torch.zeros(panels_shape(2, 48, 8), dtype=torch.float16), (48,))
    monkeypatch.setattr(quantized, "lora_bf16_available", lambda: False)
    with pytest.raises(ValueError, match="AVX512-BF16"):
        lora_rows(A, torch.zeros(panels_shape(2, 48, 8), dtype=torch.bfloat16), (48,))


@needs_bf16
def test_lora_rows_refuses_an_odd_bf16_rank():
    from coe.engine.quantized import lora_rows, panels_shape

    with pytest.raises(ValueError, match="even rank"):
        lora_rows(torch.zeros(2, 5, 64, dtype=torch.bfloat16), torch.zeros(panels_shape(2, 48, 5), dtype=torch.bfloat16), (48,))


def _bf16_case(T: int, rank: int, slots: list[int], slices: tuple[int, ...], k: int, S: int = 4, seed: int = 0):
    """Block weights, a bfloat16 stacked LoRA and the float64 oracle of ``x W^T`` plus each row's
    delta computed from x, A and B rounded to bfloat16 and h = A x rounded to bfloat16 (where the
    kernel rounds; its float32 sums are the only other difference)."""
    from kernels import LoRAMeta, native_ops
    from coe.engine.quantized import lora_panels, lora_rows

    g = torch.Generator().manual_seed(seed)
    n_out = sum(slices)
    w = quantize_blocks(torch.randn(n_out, k, generator=g), "q4_1")
    A = torch.randn(S, len(slices) * rank, k, generator=g) * 0.1
    B = torch.randn(S, n_out, rank, generator=g) * 0.1
    x = torch.randn(T, k, generator=g)
    want = x.double() @ w.dequantize().double().t()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        h = _bf((_bf(A[s]) @ _bf(x[t])).float())
        off = 0
        for i, d in enumerate(slices):
            want[t, off : off + d] += _bf(B[s, off : off + d]) @ h[i * rank : (i + 1) * rank]
            off += d
    panels = lora_panels(B.transpose(1, 2), torch.bfloat16)
    Ab = A.bfloat16()
    rows = lora_rows(Ab, panels, slices)

    def run(sel: list[int] | None = None, lora: bool = True) -> torch.Tensor:
        idx = list(range(T)) if sel is None else sel
        meta = LoRAMeta.build(torch.tensor([slots[i] for i in idx]), S)
        return w.matmul(x[idx], (rows, native_ops.step_descriptor(meta, Ab.shape[1])) if lora else None)

    return run, want, w, (Ab, panels)


@needs_bf16
@pytest.mark.parametrize("T", [1, 3, 5, 8, 16])
@pytest.mark.parametrize("rank", [4, 6, 16])
@pytest.mark.parametrize("pattern", ["one", "mixed", "with_base"])
def test_bf16_fused_kernel_against_rounded_oracle(T, rank, pattern):
    """Every token-tile size (1-8 tokens a slot), ranks of 2, 3 and 8 pairs, three slices whose
    blocks start on both halves of a pair, 1, 2 and 3 threads (bit for bit the same), and each
    row's LoRA part the same alone as in the batch."""
    slots = {"one": [2] * T, "mixed": [t % 4 for t in range(T)], "with_base": [(-1 if t % 3 == 1 else t % 4) for t in range(T)]}[pattern]
    run, want, w, _keep = _bf16_case(T, rank, slots, (72, 16, 24, 136), k=128, seed=T * 100 + rank)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            got = run()
            # float32 sums of bfloat16 products; an h that lands on a rounding boundary in float32
            # but not in float64 moves its delta by one bfloat16 step of h (~4e-3 x |B| x |h|)
            assert torch.allclose(got.double(), want, rtol=1e-4, atol=2e-3), (got.double() - want).abs().max()
            outs.append(got)
        for got in outs[1:]:
            assert torch.equal(outs[0], got)
        w.scales.zero_()  # the output is the LoRA delta alone: exactly the same alone as in the batch
        batch = run()
        for t in range(T):
            assert torch.equal(run([t])[0], batch[t])
    finally:
        torch.set_num_threads(threads)


@needs_bf16
def test_bf16_zero_b_adds_exactly_nothing():
    """Rows whose adapter's B is zero come out exactly as the base kernel computes them."""
    run, _want, _w, (_Ab, panels) = _bf16_case(5, 8, [0, 1, -1, 1, 0], (32, 16), k=96, seed=9)
    assert not torch.allclose(run(), run(lora=False), atol=1e-3)
    panels.zero_()
    assert torch.equal(run(), run(lora=False))


@pytest.fixture(scope="module")
def block_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-blocks-bf16")
    blocks = save_tiny_block_model(path, tiny_config(tie=True))
    return path, blocks


def _decode_rows(engine, names: list[str], **knobs) -> torch.Tensor:
    """One decode step of three 12-token sequences on ``names`` (None: the base model)."""
    from coe.engine.batch import Decode, Prefill, build_step

    net, kv = engine.model, engine.kv
    ids = list(range(40, 52))
    kvs = [kv.allocate() for _ in names]
    for s in kvs:
        net.forward(build_step([], [Prefill(s, 0, ids, -1, True)], num_lora_slots=net.num_lora_slots, kv=kv,
                               device=engine.device), kv.k, kv.v)
    slots = [-1 if n is None else engine.registry.slot_of(n) for n in names]
    old = {k: getattr(M, k) for k in knobs}
    for k, v in knobs.items():
        setattr(M, k, v)
    try:
        b = build_step([Decode(s, 12, 60, sl) for s, sl in zip(kvs, slots)], [], num_lora_slots=net.num_lora_slots, kv=kv,
                       device=engine.device)
        return net.forward(b, kv.k, kv.v)
    finally:
        for k, v in old.items():
            setattr(M, k, v)
        for s in kvs:
            kv.release(s)


@needs_bf16
@pytest.mark.parametrize("rank", [8, 5])
def test_engine_bf16_lora_agrees_with_separate_ops(engine_factory, block_model, tmp_path, rank):
    """``fused_lora_dtype='bfloat16'``: the engine's stacks are bfloat16 (an odd rank padded to
    even with a zero rank step) and a decode step's adapter rows agree with the float32
    separate-op path to bfloat16's rounding, a zero-B adapter's row is the base's exactly, and
    the float16 default stays within its own, tighter bound."""
    from tinyllm import save_adapter
    from transformers import AutoModelForCausalLM

    path, blocks = block_model
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    a = save_adapter(hf, tmp_path / "a", r=rank, targets="all-linear", seed=3)
    z = save_adapter(hf, tmp_path / "z", r=rank, targets="all-linear", seed=4, zero_b=True)
    errs = {}
    for dtype in ("bfloat16", "float16"):
        engine = engine_factory(path, fused_lora_dtype=dtype)
        engine.load_adapter("a", a)
        engine.load_adapter("z", z)
        engine.generate("warm", adapter="a", max_tokens=1)
        engine.generate("warm", adapter="z", max_tokens=1)
        engine.shutdown(0)
        assert engine.model.attach_blocks(blocks)["matrices"] > 0
        st = engine.model.layers[0].lora["qkv"]
        assert st.rows is not None
        assert st.A_half.dtype == st.B_panels.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float16)
        assert st.rank == rank + (rank % 2 if dtype == "bfloat16" else 0)
        fused = _decode_rows(engine, ["a", None, "z"])
        separate = _decode_rows(engine, ["a", None, "z"], FUSED_LORA=False)
        delta = (separate[0] - separate[1]).abs().max()
        assert delta > 1e-3  # the adapter does change its row
        errs[dtype] = ((fused - separate).abs().max() / delta).item()
        assert torch.equal(fused[2], _decode_rows(engine, ["a", None, None])[2])  # zero B: the base's row
    # x, A, h and B each rounded to 8 significant bits (relative 2^-9): a fraction of a percent of the delta
    assert errs["bfloat16"] < 1.5e-2, errs
    assert errs["float16"] < 2e-3, errs


def test_fused_lora_dtype_is_checked(engine_factory, monkeypatch):
    """A value outside the two is refused naming the field; ``bfloat16`` where the fused kernel
    runs without a bfloat16 LoRA is refused with what to use instead."""
    with pytest.raises(ConfigError, match="serving.fused_lora_dtype: 'auto' is not one of 'float16', 'bfloat16'"):
        engine_factory(fused_lora_dtype="auto")
    if native_library() is None:
        return
    monkeypatch.setattr(M, "lora_bf16_available", lambda: False)
    with pytest.raises(ConfigError, match="AVX512-BF16.*use 'float16'"):
        engine_factory(fused_lora_dtype="bfloat16")
