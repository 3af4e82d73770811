"""Memory: load, use and unload 100 adapters through the admin API of a real server; the process's
RSS must come back within 5% of its baseline (and within a quarter of what keeping the 100 packed
copies would add, so that a large baseline left by earlier tests in the same process cannot
hide a leak) and no slot, registry entry or packed copy may leak.

The model is a wider tiny Llama (hidden 256, 4 layers) with rank-64 adapters of about 4 MB
each, so that leaking the 100 packed copies would be far above the 5% margin (the test checks
that it has this power). Ten distinct adapter folders are cycled under 100 distinct names: each
load reads, validates and packs its folder afresh.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os

import psutil
import pytest

from helpers import serve

CYCLES = 100
WARMUP = 10
MAX_GROWTH = 0.05


def _rss_mb() -> float:
    gc.collect()
    try:  # give freed heap pages back to the OS, so RSS measures live memory, not malloc's cache
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def _packed_adapters() -> int:
    from coe.engine.adapters import PackedAdapter

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is PackedAdapter)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    import torch
    from safetensors.torch import load_file, save_file

    from tiny import build_tiny_model, make_tiny_adapter, tiny_experts_yaml

    root = tmp_path_factory.mktemp("wide")
    model = build_tiny_model(root / "model", hidden=256, intermediate=512, num_layers=4, heads=4, kv_heads=2)
    first = make_tiny_adapter(model, root / "adapters" / "a0", r=64, alpha=64, seed=11)
    tensors = load_file(str(first / "adapter_model.safetensors"))
    sources = [first]
    for i in range(1, WARMUP):  # nine more with other weights, written directly (PEFT is slow)
        d = root / "adapters" / f"a{i}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text((first / "adapter_config.json").read_text())
        g = torch.Generator().manual_seed(100 + i)
        save_file({k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in tensors.items()},
                  str(d / "adapter_model.safetensors"))
        sources.append(d)
    path = tiny_experts_yaml(root, model, {}, router="none", serving={"max_loras": 4, "max_batch": 4})
    return path, sources


@pytest.mark.slow
def test_load_unload_100_adapters_leaks_nothing(wide):
    path, sources = wide
    with serve(path) as server:
        h = server.http
        models0 = h.get("/v1/models").json()["data"]
        adapters0 = h.get("/v1/adapters").json()["data"]

        def cycle(i: int) -> int:
            name = f"m{i:03d}"
            r = h.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(sources[i % len(sources)])})
            assert r.status_code == 200, r.text
            size = r.json()["bytes"]
            r = h.post("/v1/chat/completions", json={"model": name, "max_tokens": 2, "temperature": 0.0,
                                                     "messages": [{"role": "user", "content": "hello there"}]})
            assert r.status_code == 200 and r.json()["coe"]["adapter"] == name, r.text
            assert h.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
            return size

        sizes = [cycle(i) for i in range(WARMUP)]  # warm-up: stacks at rank 64, allocator pools, caches
        server.wait_idle()
        baseline_mb = _rss_mb()
        packed0 = _packed_adapters()
        for i in range(WARMUP, WARMUP + CYCLES):
            cycle(i)
        stats = server.wait_idle()
        after_mb = _rss_mb()

        growth = (after_mb - baseline_mb) / baseline_mb
        leak_if_kept_mb = CYCLES * min(sizes) / 2**20
        report = {"baseline_mb": round(baseline_mb, 1), "after_mb": round(after_mb, 1), "growth_pct": round(100 * growth, 2),
                  "adapter_mb": round(min(sizes) / 2**20, 2), "leak_if_kept_mb": round(leak_if_kept_mb, 1)}
        print("memory:", json.dumps(report))
        allowed_mb = min(MAX_GROWTH * baseline_mb, leak_if_kept_mb / 4)
        assert leak_if_kept_mb > 2 * allowed_mb, f"the test could not see a leak: {report}"
        assert after_mb - baseline_mb <= allowed_mb, report
        # no slot, registry or packed-copy leak
        assert h.get("/v1/adapters").json()["data"] == adapters0
        assert h.get("/v1/models").json()["data"] == models0
        assert stats["registered_adapters"] == len(adapters0) and stats["resident_adapters"] == []
        assert stats["running"] == 0 and stats["kv_slots_free"] == stats["max_batch"]
        assert _packed_adapters() == packed0
