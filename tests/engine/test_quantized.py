"""The GGUF block kernels (``coe.engine.quantized``): exact weights, products within float32
rounding of the float32 model's, and an engine that decodes on them with the same outputs,
adapters and batching guarantees as on float32."""

from __future__ import annotations

import pytest
import torch
from tinyllm import quantize_blocks, save_tiny_block_model, tiny_config

from coe.engine import model as M
from coe.engine.quantized import BlockWeight, native_library, unavailable_reason

needs_native = pytest.mark.skipif(native_library() is None, reason=f"block kernels unavailable: {unavailable_reason()}")


@pytest.fixture(scope="module")
def block_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-blocks")
    blocks = save_tiny_block_model(path, tiny_config(tie=True))
    return path, blocks


def _random_blocks(kind: str, n: int, k: int, seed: int) -> BlockWeight:
    g = torch.Generator().manual_seed(seed)
    return quantize_blocks(torch.randn(n, k, generator=g), kind)


@needs_native
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 19])
def test_product_matches_dequantized_matrix(kind, rows, native_isa):
    w = _random_blocks(kind, 37, 96, seed=rows)  # odd N; K = 3 blocks
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(100 + rows))
    want = x.double() @ w.dequantize().double().t()
    got = w.matmul(x)
    assert got.shape == (rows, 37) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_kernel_forms_the_float32_weights_bit_for_bit(kind, native_isa):
    """One-hot rows read single weights back out of the kernel: each must equal the float32
    matrix exactly (the products' sums are then the only place rounding can differ)."""
    w = _random_blocks(kind, 24, 64, seed=7)
    got = w.matmul(torch.eye(64)).t()  # [N, K], 8-row tiles of one-hot rows
    assert torch.equal(got, w.dequantize())


@needs_native
def test_strided_rows_and_threads(native_isa):
    w = _random_blocks("q4_1", 40, 64, seed=3)
    x = torch.randn(6, 128)[:, ::2]  # non-contiguous input
    want = x @ w.dequantize().t()
    torch_threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.allclose(w.matmul(x), want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(torch_threads)


@needs_native
@pytest.mark.parametrize("slots", [[0] * 16, [0, 2, 1, 2, 0, 0, 1, 2, 2, 0, 1, 1, 0, 2, 1, 0], [1, 1, 1], [2]])
def test_fused_lora_kernel_matches_reference_and_ignores_batch(slots, native_isa):
    """The block kernel with its LoRA fused in (``coe_q41_matmul_lora``), in each build: within
    float32 rounding of x W^T + B (A x) in float64, and each row's output bit for bit the same
    computed alone as in the batch for the LoRA's part (output slices of 9, 7 and 3 blocks of 8
    exercise every expand tile, paired and single). The base part's sum may differ in its last
    bits: its number of partial sums depends on the row tile (see ``q41_row``), so that check
    runs on zero blocks, whose base part is exactly 0."""
    from kernels import LoRAMeta, native_ops

    from coe.engine.quantized import lora_panels, lora_rows

    g = torch.Generator().manual_seed(len(slots))
    slices, S, R, K = (72, 56, 24), 3, 16, 96
    N = sum(slices)
    w = _random_blocks("q4_1", N, K, seed=len(slots))
    A = (torch.randn(S, len(slices) * R, K, generator=g) * 0.1).half()
    B = (torch.randn(S, N, R, generator=g) * 0.1).half()  # B[s, n, r]
    P = lora_panels(B.transpose(1, 2))  # B^T's panels
    desc = lora_rows(A, P, slices)
    x = torch.randn(len(slots), K, generator=g)

    def run(rows: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
        meta = LoRAMeta.build(torch.tensor(row_slots), S)
        return w.matmul(rows, (desc, native_ops.step_descriptor(meta, A.shape[1])))

    got = run(x, slots)
    want = x.double() @ w.dequantize().double().t()
    off = 0
    for i, d in enumerate(slices):
        for t, s in enumerate(slots):
            h = A[s, i * R:(i + 1) * R].double() @ x[t].double()
            want[t, off:off + d] += B[s, off:off + d].double() @ h
        off += d
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    w.scales.zero_()  # every weight d * q + m = 0: the output is the LoRA delta alone
    delta = run(x, slots)
    for t, s in enumerate(slots):
        assert torch.equal(run(x[t:t + 1], [s])[0], delta[t])


@needs_native
def test_tiny_engine_attaches_every_matrix_and_agrees_with_float32(engine_factory, block_model):
    from coe.engine.batch import Decode, Prefill, build_step

    path, blocks = block_model
    engine = engine_factory(path)
    report = engine.model.attach_blocks(blocks)
    layers = engine.model.layers
    assert report["rejected"] == [] and report["matrices"] == 4 * len(layers) + 1
    assert all(L.wqkv_q is not None and L.w2_q is not None for L in layers) and engine.model.head.q is not None
    if layers[0].wqkv_p is not None:  # oneDNN copies serve the longer steps: the float32 matrices are dropped
        assert all(L.wqkv_t is None and L.wqkv_c is None and L.w2_t is None for L in layers)

    net, kv = engine.model, engine.kv
    slot = kv.allocate()
    ids = list(range(40, 60))
    step = build_step([], [Prefill(slot, 0, ids, -1, True)], num_lora_slots=net.num_lora_slots, kv=kv, device=engine.device)
    net.forward(step, kv.k, kv.v)  # 20 rows: float32 path (oneDNN's copy where it exists)

    def decode() -> torch.Tensor:
        b = build_step([Decode(slot, len(ids), 61, -1)], [], num_lora_slots=net.num_lora_slots, kv=kv, device=engine.device)
        return net.forward(b, kv.k, kv.v)

    on_blocks = decode()
    old = M.BLOCK_MAX_ROWS
    M.BLOCK_MAX_ROWS = 0
    try:
        on_float32 = decode()
    finally:
        M.BLOCK_MAX_ROWS = old
    kv.release(slot)
    assert (on_blocks - on_float32).abs().max() < 1e-4


@needs_native
def test_mismatched_blocks_are_rejected_not_used(engine_factory, block_model):
    path, blocks = block_model
    engine = engine_factory(path)
    name = "model.layers.1.mlp.down_proj.weight"
    bad = dict(blocks)
    scales = blocks[name].scales.clone()
    scales[0, 0, 0] *= 2  # one block's d differs from the checkpoint
    bad[name] = BlockWeight("q4_1", blocks[name].qs, scales)
    report = engine.model.attach_blocks(bad)
    assert report["rejected"] == [name]
    assert engine.model.layers[1].w2_q is None and engine.model.layers[1].w13_q is not None


@needs_native
def test_greedy_outputs_with_adapters_match_float32_and_batching(engine_factory, block_model, adapter_factory):
    """Requests on two adapters and the base, alone and concurrently, on blocks: each gets the
    same tokens as on the float32 weights (same weights; only summation order differs), and a
    neighbour never changes a request's output."""
    import threading

    path, blocks = block_model
    from tinyllm import save_adapter
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ad = {n: save_adapter(hf, path.parent / f"blk-{n}", r=4, targets="all-linear", seed=s) for n, s in (("a", 1), ("b", 2))}
    prompts = [("hello there", "a"), ("the sea is", "b"), ("numbers 1 2 3", None)]

    def run(engine, concurrent: bool) -> list[list[int]]:
        outs: list[list[int] | None] = [None] * len(prompts)

        def one(i: int) -> None:
            p, a = prompts[i]
            outs[i] = engine.generate(p, adapter=a, max_tokens=12, temperature=0.0, ignore_eos=True).token_ids

        if concurrent:
            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for i in range(len(prompts)):
                one(i)
        return outs

    results = {}
    for blocks_on in (True, False):
        engine = engine_factory(path)
        for n, p in ad.items():
            engine.load_adapter(n, p)
        if blocks_on:
            assert engine.model.attach_blocks(blocks)["matrices"] > 0
        results[blocks_on] = (run(engine, False), run(engine, True))
    alone, together = results[True]
    assert alone == together
    assert alone == results[False][0]


def test_unavailable_kernels_leave_float32(monkeypatch, engine_factory, block_model):
    path, blocks = block_model
    monkeypatch.setenv("COE_NATIVE", "0")
    native_library.cache_clear()
    try:
        assert native_library() is None and "COE_NATIVE" in unavailable_reason()
        engine = engine_factory(path)
        assert engine.model.attach_blocks(blocks)["matrices"] == 0
        assert engine.model.layers[0].wqkv_q is None
        assert engine.generate("hi", max_tokens=3).completion_tokens == 3
    finally:
        monkeypatch.delenv("COE_NATIVE")
        native_library.cache_clear()


def test_config_rejects_unknown_gguf_blocks_value(tmp_path):
    from coe.config import load_config
    from coe.errors import ConfigError

    cfg = tmp_path / "experts.yaml"
    cfg.write_text("base_model:\n  gguf_blocks: always\nexperts:\n  - name: base\n    adapter: null\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "gguf_blocks" in str(err.value) and "auto" in str(err.value)


@needs_native
def test_fused_lora_matches_separate_ops_and_zero_b_is_exact(engine_factory, block_model, tmp_path):
    """A decode step over two adapters and the base: the LoRA fused into the block kernel agrees
    with the separate-op paths (to its float16 A's and B's rounding), and a zero-B adapter leaves its rows
    bit-identical to the base."""
    from tinyllm import save_adapter
    from transformers import AutoModelForCausalLM

    from coe.engine.batch import Decode, Prefill, build_step

    path, blocks = block_model
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    engine = engine_factory(path)
    engine.load_adapter("a", save_adapter(hf, tmp_path / "a", r=8, targets="all-linear", seed=3))
    engine.load_adapter("z", save_adapter(hf, tmp_path / "z", r=8, targets="all-linear", seed=4, zero_b=True))
    engine.generate("warm", adapter="a", max_tokens=1)
    engine.generate("warm", adapter="z", max_tokens=1)
    engine.shutdown(0)
    net, kv = engine.model, engine.kv
    assert net.attach_blocks(blocks)["matrices"] > 0 and net.layers[0].lora["qkv"].rows is not None
    sa, sz = engine.registry.slot_of("a"), engine.registry.slot_of("z")
    ids = list(range(40, 52))
    kvs = [kv.allocate() for _ in range(3)]
    for s in kvs:  # the same 12-token context in each sequence
        net.forward(build_step([], [Prefill(s, 0, ids, -1, True)], num_lora_slots=net.num_lora_slots, kv=kv,
                               device=engine.device), kv.k, kv.v)

    def decode(last: int = sz, **knobs) -> torch.Tensor:
        old = {k: getattr(M, k) for k in knobs}
        for k, v in knobs.items():
            setattr(M, k, v)
        try:
            b = build_step([Decode(kvs[0], 12, 60, sa), Decode(kvs[1], 12, 60, -1), Decode(kvs[2], 12, 60, last)], [],
                           num_lora_slots=net.num_lora_slots, kv=kv, device=engine.device)
            return net.forward(b, kv.k, kv.v)
        finally:
            for k, v in old.items():
                setattr(M, k, v)

    fused, separate, f32 = decode(), decode(FUSED_LORA=False), decode(BLOCK_MAX_ROWS=0)
    assert (separate - f32).abs().max() < 1e-4
    # The fused kernel reads A and B rounded to float16 (relative 2^-11 a weight): its row moves by a
    # fraction of the adapter's delta on top of float32's summation-order differences.
    delta = (separate[0] - separate[1]).abs().max()
    assert delta > 1e-3  # the adapter does change its row
    assert (fused - separate).abs().max() < 1e-4 + 2e-3 * delta, ((fused - separate).abs().max(), delta)
    # zero B: exactly the base model's row. Compared in the same row of the same step (the base
    # model's output there, the last row without an adapter): two rows of one batch with the same
    # inputs can differ in the last bit (seen on an AVX-512 EPYC, float32 path too, no LoRA).
    assert torch.equal(fused[2], decode(-1)[2])


@needs_native
def test_adapter_beyond_float16_runs_unfused(engine_factory, block_model, tmp_path, caplog):
    """An adapter with a B weight beyond float16's range (the fused kernel's panels) is told
    about and its steps take the float32 path: the same step's rows as with fusing switched
    off, bit for bit, and finite; an ordinary adapter's steps stay fused."""
    import logging

    from safetensors.torch import load_file, save_file
    from tinyllm import save_adapter
    from transformers import AutoModelForCausalLM

    from coe.engine.batch import Decode, Prefill, build_step

    path, blocks = block_model
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    big = save_adapter(hf, tmp_path / "big", r=8, targets="all-linear", seed=5)
    weights = load_file(str(big / "adapter_model.safetensors"))
    name = next(k for k in sorted(weights) if "lora_B" in k and "v_proj" in k)
    weights[name][0, 0] = 7e4  # float16 holds at most 65504
    save_file(weights, str(big / "adapter_model.safetensors"))
    engine = engine_factory(path)
    with caplog.at_level(logging.WARNING, logger="coe.engine"):
        engine.load_adapter("big", big)
        engine.load_adapter("a", save_adapter(hf, tmp_path / "a", r=8, targets="all-linear", seed=3))
        engine.generate("warm", adapter="big", max_tokens=1)
        engine.generate("warm", adapter="a", max_tokens=1)
    assert any("'big'" in r.getMessage() and "float16" in r.getMessage() for r in caplog.records)
    engine.shutdown(0)
    net, kv = engine.model, engine.kv
    assert net.attach_blocks(blocks)["matrices"] > 0
    sb, sa = engine.registry.slot_of("big"), engine.registry.slot_of("a")
    assert net._unfused_slots == {sb}
    kvs = [kv.allocate() for _ in range(2)]
    for s in kvs:
        net.forward(build_step([], [Prefill(s, 0, list(range(40, 52)), -1, True)], num_lora_slots=net.num_lora_slots,
                               kv=kv, device=engine.device), kv.k, kv.v)
    calls = []
    real = BlockWeight.matmul

    def spy(self, x, lora=None):
        calls.append(lora is not None)
        return real(self, x, lora)

    def decode(slots: list[int], **knobs) -> torch.Tensor:
        old = {k: getattr(M, k) for k in knobs}
        for k, v in knobs.items():
            setattr(M, k, v)
        try:
            b = build_step([Decode(kv_slot, 12, 60, s) for kv_slot, s in zip(kvs, slots)], [],
                           num_lora_slots=net.num_lora_slots, kv=kv, device=engine.device)
            return net.forward(b, kv.k, kv.v)
        finally:
            for k, v in old.items():
                setattr(M, k, v)

    BlockWeight.matmul = spy
    try:
        mixed = decode([sb, sa])
        assert not any(calls)  # a step with the misfit adapter never fuses
        calls.clear()
        decode([sa, sa])
        assert any(calls)  # the ordinary adapter's steps still do
    finally:
        BlockWeight.matmul = real
    assert torch.isfinite(mixed).all()
    assert torch.equal(mixed, decode([sb, sa], FUSED_LORA=False))


def _fused_case(T: int, rank: int, slots: list[int], slices: tuple[int, ...], k: int = 96, S: int = 4, seed: int = 0):
    """Block weights, a stacked LoRA in the fused kernel's layout (A [S, n*R, K], B as its panels
    (``lora_panels``), both float16 and drawn exactly representable in it) and the float64 reference of
    ``x @ W.T`` plus each row's delta."""
    from kernels import LoRAMeta, native_ops
    from coe.engine.quantized import lora_panels, lora_rows

    g = torch.Generator().manual_seed(seed)
    n_out = sum(slices)
    w = quantize_blocks(torch.randn(n_out, k, generator=g), "q4_1")
    A = (torch.randn(S, len(slices) * rank, k, generator=g) * 0.1).half().float()  # the kernel holds A and B in float16
    B = (torch.randn(S, n_out, rank, generator=g) * 0.1).half().float()
    x = torch.randn(T, k, generator=g)
    want = x.double() @ w.dequantize().double().t()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        h = A[s].double() @ x[t].double()
        off = 0
        for i, d in enumerate(slices):
            want[t, off : off + d] += B[s, off : off + d].double() @ h[i * rank : (i + 1) * rank]
            off += d
    panels = lora_panels(B.transpose(1, 2))
    A = A.half()
    rows = lora_rows(A, panels, slices)
    meta = LoRAMeta.build(torch.tensor(slots), S)

    def run(sel: list[int] | None = None, lora: bool = True) -> torch.Tensor:
        idx = list(range(T)) if sel is None else sel
        m = meta if sel is None else LoRAMeta.build(torch.tensor([slots[i] for i in idx]), S)
        return w.matmul(x[idx], (rows, native_ops.step_descriptor(m, A.shape[1])) if lora else None)

    return run, want, (A, panels)  # A and panels kept alive with the descriptor


@needs_native
@pytest.mark.parametrize("T", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("rank", [4, 6, 16])
@pytest.mark.parametrize("pattern", ["one", "mixed", "with_base"])
def test_fused_kernel_against_float64(T, rank, pattern):
    """The fused block kernel (base + each row's LoRA in one call) against a float64 oracle, for
    tiles of every token count, ranks not a multiple of the kernel's tiles, three slices, 1, 2, 3
    or 5 threads (bit-identical: the split over threads changes no sum; with more threads than
    this machine's cores, some are descheduled and others take over their shrink tasks, and some
    threads have no task or block at all). A row alone agrees with the batch to float32 rounding
    (the base kernel's accumulators per row depend on the tile)."""
    slots = {"one": [2] * T, "mixed": [t % 4 for t in range(T)], "with_base": [(-1 if t % 3 == 1 else t % 4) for t in range(T)]}[pattern]
    run, want, _keep = _fused_case(T, rank, slots, (64, 16, 24), seed=T * 100 + rank)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3, 5):
            torch.set_num_threads(nt)
            got = run()
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4), (got.double() - want).abs().max()
            outs.append(got)
        for got in outs[1:]:
            assert torch.equal(outs[0], got)
        torch.set_num_threads(threads)
        for t in range(T):
            assert torch.allclose(run([t])[0], outs[1][t], rtol=1e-6, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_fused_kernel_zero_b_rows_equal_base_exactly():
    """Adapters whose B is zero leave every row exactly as the base kernel computes it."""
    slots = [0, 1, -1, 1, 0]
    run, want, (A, panels) = _fused_case(5, 8, slots, (32, 16), seed=9)
    assert not torch.allclose(run(), run(lora=False), atol=1e-3)
    panels.zero_()
    assert torch.equal(run(), run(lora=False))


@pytest.mark.parametrize("n_out", [8, 16, 40, 152])
def test_panels_put_two_blocks_side_by_side(n_out):
    """``lora_panels``: output n's row r of B^T sits in pair n // 16 at row r, column n % 16 (the
    layout ``lora_rows`` in qmatmul.c reads); an odd last block's partner stays zero."""
    from coe.engine.quantized import lora_panels, panels_shape

    S, R = 2, 4
    Bt = torch.arange(S * R * n_out, dtype=torch.float32).view(S, R, n_out)  # exact in float16
    P = lora_panels(Bt)
    assert P.dtype == torch.float16 and tuple(P.shape) == panels_shape(S, n_out, R) == (S, (n_out // 8 + 1) // 2, R, 16)
    n = torch.arange(n_out)
    for s in range(S):
        for r in range(R):
            assert torch.equal(P[s, n // 16, r, n % 16].float(), Bt[s, r])
    if n_out % 16:
        assert not P[:, -1, :, 8:].any()


def test_lora_rows_rejects_panels_of_another_layout():
    """Panels shaped the old way ([S, N/8, R, 8]) are refused with the expected shape named,
    never read in the wrong layout."""
    from coe.engine.quantized import lora_rows

    A = torch.zeros(2, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"panels_shape\(S, 48, R\).*\(2, 6, 8, 8\)"):
        lora_rows(A, torch.zeros(2, 6, 8, 8, dtype=torch.float16), (48,))
