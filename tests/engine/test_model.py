"""The engine's Llama against transformers (and transformers+PEFT): fp32 logits within 1e-4 for
whole prompts, chunked prefill and KV-cached decode; mixed batches equal separate runs."""

from __future__ import annotations

import pytest
import torch
from tinyllm import save_adapter, save_tiny_model, tiny_config

from coe.engine.batch import Decode, Prefill, build_step

TOL = 1e-4


def _lora_slot(engine, adapter):
    if adapter is None:
        return -1
    engine.registry.ensure_packed(adapter)
    return engine.registry.activate(adapter)


def prefill_logits(engine, ids, adapter=None, chunks=None):
    """Logits for every prompt position, prefilled in ``chunks`` (default: one chunk)."""
    slot = _lora_slot(engine, adapter)
    kv = engine.kv.allocate()
    out = []
    try:
        bounds = chunks or [len(ids)]
        start = 0
        for end in bounds:
            b = build_step([], [Prefill(kv, start, ids[start:end], slot, end == len(ids))],
                           num_lora_slots=engine.model.num_lora_slots, kv=engine.kv, device=engine.device, all_logits=True)
            out.append(engine.model.forward(b, engine.kv.k, engine.kv.v))
            start = end
    finally:
        engine.kv.release(kv)
    return torch.cat(out)


def decode_logits(engine, ids, n_prefill, adapter=None):
    """Prefill ``n_prefill`` tokens, then feed the rest one decode step at a time."""
    slot = _lora_slot(engine, adapter)
    kv = engine.kv.allocate()
    try:
        b = build_step([], [Prefill(kv, 0, ids[:n_prefill], slot, True)], num_lora_slots=engine.model.num_lora_slots,
                       kv=engine.kv, device=engine.device, all_logits=True)
        out = [engine.model.forward(b, engine.kv.k, engine.kv.v)]
        for p in range(n_prefill, len(ids)):
            b = build_step([Decode(kv, p, ids[p], slot)], [], num_lora_slots=engine.model.num_lora_slots, kv=engine.kv,
                           device=engine.device)
            out.append(engine.model.forward(b, engine.kv.k, engine.kv.v))
    finally:
        engine.kv.release(kv)
    return torch.cat(out)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66, 67, 68, 69, 70]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_base_logits_match_transformers(tmp_path, engine_factory, model_type, tie):
    ref = save_tiny_model(tmp_path, tiny_config(model_type, tie=tie), seed=3)
    engine = engine_factory(tmp_path)
    want = hf_logits(ref, IDS)
    assert (prefill_logits(engine, IDS) - want).abs().max() < TOL
    assert (prefill_logits(engine, IDS, chunks=[5, 6, 13, len(IDS)]) - want).abs().max() < TOL
    assert (decode_logits(engine, IDS, 7) - want).abs().max() < TOL


def test_rope_scaling_llama3_matches(tmp_path, engine_factory):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    ref = save_tiny_model(tmp_path, tiny_config(rope_parameters=rope), seed=4)
    engine = engine_factory(tmp_path)
    assert (decode_logits(engine, IDS, 4) - hf_logits(ref, IDS)).abs().max() < TOL


@pytest.mark.parametrize(
    "kw",
    [
        dict(r=4, alpha=8, targets=("q_proj", "v_proj")),
        dict(r=16, alpha=32, targets="all-linear"),
        dict(r=16, alpha=7, targets=("k_proj", "o_proj", "down_proj"), rslora=True),
        dict(r=4, alpha=4, targets=("gate_proj", "up_proj", "q_proj"), rslora=False),
        dict(r=8, alpha=16, targets="all-linear", rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
             alpha_pattern={"v_proj": 3}),
    ],
    ids=["r4-qv", "r16-all", "r16-rslora-kod", "r4-gu-q", "patterns"],
)
def test_lora_logits_match_peft(tmp_path, engine_factory, tiny_dir, tiny_hf, kw):
    from peft import PeftModel

    path = save_adapter(tiny_hf, tmp_path / "a", seed=5, **kw)
    ref = PeftModel.from_pretrained(tiny_hf, str(path)).eval()
    want = hf_logits(ref, IDS)
    ref.unload()  # give the session's base model back untouched
    engine = engine_factory()
    engine.load_adapter("a", path)
    assert (prefill_logits(engine, IDS, adapter="a") - want).abs().max() < TOL
    assert (decode_logits(engine, IDS, 9, adapter="a") - want).abs().max() < TOL
    # And the adapter really changes the output (it is not silently the base model).
    assert (prefill_logits(engine, IDS) - want).abs().max() > 1e-2


def test_zero_b_adapter_is_exactly_base(engine_factory, adapter_factory):
    engine = engine_factory()
    engine.load_adapter("zero", adapter_factory("zero", r=8, targets="all-linear", zero_b=True))
    base = prefill_logits(engine, IDS)
    assert torch.equal(prefill_logits(engine, IDS, adapter="zero"), base)
    assert torch.equal(decode_logits(engine, IDS, 5, adapter="zero"), decode_logits(engine, IDS, 5))


def test_mixed_step_equals_separate_runs(engine_factory, adapter_factory):
    """Two adapters and the base in one step (decode + chunked prefill) give each its own logits."""
    engine = engine_factory()
    engine.load_adapter("a", adapter_factory("a", r=4, targets="all-linear", seed=11))
    engine.load_adapter("b", adapter_factory("b", r=16, targets=("q_proj", "down_proj"), seed=12))
    seqs = {"a": IDS[:12], "b": IDS[3:17], None: IDS[1:9]}
    alone = {k: decode_logits(engine, v, len(v) - 1, adapter=k)[-1] for k, v in seqs.items()}
    slots = {k: _lora_slot(engine, k) for k in seqs}
    kvs = {k: engine.kv.allocate() for k in seqs}
    # a and b prefill all but their last token; the base sequence prefills in two chunks.
    first = [Prefill(kvs[k], 0, v[:-1], slots[k], True) for k, v in seqs.items() if k is not None]
    first.append(Prefill(kvs[None], 0, seqs[None][:4], -1, False))
    b = build_step([], first, num_lora_slots=engine.model.num_lora_slots, kv=engine.kv, device=engine.device)
    engine.model.forward(b, engine.kv.k, engine.kv.v)
    decodes = [Decode(kvs[k], len(v) - 1, v[-1], slots[k]) for k, v in seqs.items() if k is not None]
    b = build_step(decodes, [Prefill(kvs[None], 4, seqs[None][4:], -1, True)],
                   num_lora_slots=engine.model.num_lora_slots, kv=engine.kv, device=engine.device)
    logits = engine.model.forward(b, engine.kv.k, engine.kv.v)
    assert (logits[0] - alone["a"]).abs().max() < TOL
    assert (logits[1] - alone["b"]).abs().max() < TOL
    assert (logits[2] - alone[None]).abs().max() < TOL


@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "torch-only"])
@pytest.mark.parametrize("adapters", [("a", "b", None), ("b",), ("a", "b", "c")])
def test_large_decode_batch_equals_separate_runs(engine_factory, adapter_factory, adapters, native, monkeypatch):
    """A decode step of 10 ragged sequences (the written-out attention from 8 rows, its padding
    mask, chunked projections) gives every sequence the logits it gets alone. Adapter mixes: two
    adjacent slots and the base (the dense LoRA path), one adapter on a slot above 0 (dense, no
    mask), three slots (add_lora_packed). With the C kernels built (``c-kernels``) every mix runs
    kernels' C backend instead of the dense path; ``torch-only`` is a machine without them."""
    import kernels
    from coe.engine import model as M
    from kernels import native_ops

    if native and native_ops.library() is None:
        pytest.skip(f"C kernels unavailable: {native_ops.unavailable_reason()}")
    if not native:
        monkeypatch.setattr(M, "native_library", lambda: None)
        monkeypatch.setattr(kernels, "_override", "torch")  # set_backend("torch"), undone after the test
    assert M.MANUAL_ATTENTION_MIN_ROWS <= 10 and M.DENSE_LORA_MAX_SLOTS == 2
    engine = engine_factory(max_batch=12)
    engine.load_adapter("c", adapter_factory("c", r=8, targets="all-linear", seed=13))  # slot 0 when loaded first
    engine.load_adapter("a", adapter_factory("a", r=4, targets="all-linear", seed=11))
    engine.load_adapter("b", adapter_factory("b", r=16, targets=("q_proj", "down_proj"), seed=12))
    seqs = [(adapters[i % len(adapters)], IDS[i % 5 : 8 + i]) for i in range(10)]
    alone = [decode_logits(engine, ids, len(ids) - 1, adapter=name)[-1] for name, ids in seqs]
    kvs = [engine.kv.allocate() for _ in seqs]
    slots = [_lora_slot(engine, name) for name, _ in seqs]
    prefills = [Prefill(kv, 0, ids[:-1], slot, True) for kv, slot, (_, ids) in zip(kvs, slots, seqs)]
    engine.model.forward(build_step([], prefills, num_lora_slots=engine.model.num_lora_slots, kv=engine.kv,
                                    device=engine.device), engine.kv.k, engine.kv.v)
    decodes = [Decode(kv, len(ids) - 1, ids[-1], slot) for kv, slot, (_, ids) in zip(kvs, slots, seqs)]
    b = build_step(decodes, [], num_lora_slots=engine.model.num_lora_slots, kv=engine.kv, device=engine.device)
    assert b.decode_mask is not None  # ragged: the mask is exercised
    # the 10-row projections: oneDNN's packed copies where torch has oneDNN, else column blocks
    L0 = engine.model.layers[0]
    assert L0.wqkv_p is not None if torch.backends.mkldnn.is_available() else L0.wqkv_c is not None
    dense_calls = []
    real_dense = M.add_lora_dense
    monkeypatch.setattr(M, "add_lora_dense", lambda *a: dense_calls.append(1) or real_dense(*a))
    logits = engine.model.forward(b, engine.kv.k, engine.kv.v)
    assert bool(dense_calls) == ("c" not in adapters and not native)
    for i, want in enumerate(alone):
        assert (logits[i] - want).abs().max() < TOL, (i, seqs[i][0])
    for kv in kvs:
        engine.kv.release(kv)


def test_chunked_projection_equals_mm():
    """``_proj``'s bmm over column blocks gives what one mm gives, for 1..300 rows, with a bias."""
    from coe.engine.model import _proj, chunk_view

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g)  # [out, in]
    b = torch.randn(96, generator=g)
    w_t = w.t()
    w_c = chunk_view(w_t)
    assert w_c is not None and w_c.shape == (4, 40, 24) and w_c.data_ptr() == w.data_ptr()  # a view
    assert chunk_view(torch.randn(90, 40).t()) is None  # 90 columns do not split into 4 blocks
    for T in (1, 3, 16, 300):
        x = torch.randn(T, 40, generator=g)
        torch.testing.assert_close(_proj(x, w_t, w_c, None), x @ w_t, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(_proj(x, w_t, w_c, b), torch.addmm(b, x, w_t), rtol=1e-6, atol=1e-5)


def test_packed_projection_equals_mm():
    """``_proj`` on a oneDNN-packed copy (``w_p``) gives what one mm gives, for 1..300 rows, with
    a bias; from ``PACKED_MIN_ROWS`` rows, or at any row count once the float32 matrix is gone."""
    from coe.engine import model as M
    from coe.engine.model import _mkldnn_pack, _proj, chunk_view

    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 40, generator=g)
    b = torch.randn(96, generator=g)
    w_p = _mkldnn_pack(w)
    if w_p is None:
        pytest.skip("torch has no oneDNN linear here")
    w_t = w.t()
    w_c = chunk_view(w_t)
    for T in (1, 2, 3, 16, 300):
        x = torch.randn(T, 40, generator=g)
        for wt, wc in ((w_t, w_c), (None, None)):
            torch.testing.assert_close(_proj(x, wt, wc, None, None, w_p), x @ w_t, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(_proj(x, wt, wc, b, None, w_p), torch.addmm(b, x, w_t), rtol=1e-5, atol=1e-5)
    assert M.PACKED_MIN_ROWS is not None and M.PACKED_MIN_ROWS >= 2  # one row keeps the column blocks
