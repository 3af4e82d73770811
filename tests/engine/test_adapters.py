"""Adapter reading and the registry: every bad-adapter case is an AdapterError naming the adapter
and leaving the registry untouched; slots, CPU tier, pinning, unloading, rank growth."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from coe.errors import AdapterError, AdapterNotFound, UnknownModel


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _bad_adapters(tmp_path, good):
    """name -> (folder, words the message must contain)."""
    out = {"missing": (tmp_path / "nope", ["does not exist"])}

    p = _copy(good, tmp_path / "nosafetensors")
    (p / "adapter_model.safetensors").unlink()
    out["no-weights"] = (p, ["no adapter_model.safetensors"])

    p = _copy(good, tmp_path / "pickle")
    (p / "adapter_model.safetensors").unlink()
    torch.save({}, p / "adapter_model.bin")
    out["pickle-only"] = (p, ["pickle", "refused"])

    p = _copy(good, tmp_path / "corrupt")
    data = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    out["corrupt"] = (p, ["not a readable safetensors"])

    p = _copy(good, tmp_path / "shapes")
    sd = load_file(str(p / "adapter_model.safetensors"))
    key = next(k for k in sd if "lora_A" in k)
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 3)
    save_file(sd, str(p / "adapter_model.safetensors"))
    out["wrong-shape"] = (p, ["do not fit the base model", "lora_A"])

    p = _copy(good, tmp_path / "target")
    _rewrite_config(p, target_modules=["q_proj", "not_a_module"])
    out["unknown-target"] = (p, ["not_a_module", "does not exist"])

    p = _copy(good, tmp_path / "lmhead")
    _rewrite_config(p, target_modules=["q_proj", "lm_head"])
    out["lm-head-target"] = (p, ["lm_head", "not supported"])

    p = _copy(good, tmp_path / "notjson")
    (p / "adapter_config.json").write_text("{not json")
    out["bad-config"] = (p, ["not valid JSON"])

    p = _copy(good, tmp_path / "dora")
    _rewrite_config(p, use_dora=True)
    out["dora"] = (p, ["DoRA"])

    p = _copy(good, tmp_path / "nan")
    sd = load_file(str(p / "adapter_model.safetensors"))
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, str(p / "adapter_model.safetensors"))
    out["nan"] = (p, ["NaN"])
    return out


def test_every_bad_adapter_is_a_clear_error_and_disturbs_nothing(tmp_path, engine_factory, adapter_factory):
    good = adapter_factory("good", r=4, targets=("q_proj", "v_proj"))
    engine = engine_factory()
    engine.load_adapter("ok", good)
    before = engine.generate("hello", adapter="ok", max_tokens=5)
    for case, (path, words) in _bad_adapters(tmp_path, good).items():
        with pytest.raises(AdapterError) as info:
            engine.load_adapter(case, path)
        msg = str(info.value)
        assert repr(case) in msg, (case, msg)
        for w in words:
            assert w in msg, (case, msg)
        assert info.value.adapter == case
        assert case not in [a.name for a in engine.list_adapters()]
    with pytest.raises(AdapterNotFound):
        engine.load_adapter("again", tmp_path / "nope")
    assert [a.name for a in engine.list_adapters()] == ["ok"]
    assert engine.generate("hello", adapter="ok", max_tokens=5).token_ids == before.token_ids


def test_rank_over_limit_refused(engine_factory, adapter_factory):
    engine = engine_factory(max_lora_rank=8)
    with pytest.raises(AdapterError, match=r"rank 16 is above serving.max_lora_rank=8"):
        engine.load_adapter("big", adapter_factory("big", r=16, targets=("q_proj",)))


def test_failed_reload_keeps_the_old_adapter(tmp_path, engine_factory, adapter_factory):
    engine = engine_factory()
    good = adapter_factory("good", r=4, targets=("q_proj", "v_proj"))
    engine.load_adapter("x", good)
    out = engine.generate("abc", adapter="x", max_tokens=4)
    with pytest.raises(AdapterError):
        engine.load_adapter("x", tmp_path / "missing")
    assert engine.generate("abc", adapter="x", max_tokens=4).token_ids == out.token_ids


def test_base_model_mismatch_warns_or_refuses(tmp_path, engine_factory, adapter_factory, caplog):
    p = _copy(adapter_factory("good", r=4, targets=("q_proj",)), tmp_path / "other")
    _rewrite_config(p, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    with caplog.at_level(logging.WARNING, logger="coe.engine"):
        engine_factory().load_adapter("w", p)
    assert "Llama-3.1-8B" in caplog.text
    with pytest.raises(AdapterError, match="strict_base_model"):
        engine_factory(strict_base_model=True).load_adapter("s", p)


def test_unknown_adapter_never_falls_back_to_base(engine_factory):
    engine = engine_factory()
    with pytest.raises(UnknownModel, match="'sql' is not loaded"):
        engine.generate("hello", adapter="sql", max_tokens=3)


def test_unload_frees_the_slot(engine_factory, adapter_factory):
    engine = engine_factory(max_loras=2)
    engine.load_adapter("a", adapter_factory("a", r=4, seed=1))
    engine.load_adapter("b", adapter_factory("b", r=4, seed=2))
    assert {a.name: a.location for a in engine.list_adapters()} == {"a": "device", "b": "device"}
    assert engine.registry.free_or_evictable_slot(exclude=lambda n: True) is None
    engine.unload_adapter("a")
    assert [a.name for a in engine.list_adapters()] == ["b"]
    assert engine.registry.free_or_evictable_slot(exclude=lambda n: True) is not None
    with pytest.raises(UnknownModel):
        engine.generate("hi", adapter="a", max_tokens=2)
    with pytest.raises(UnknownModel):
        engine.unload_adapter("a")
    engine.load_adapter("c", adapter_factory("c", r=4, seed=3))
    assert {a.name: a.location for a in engine.list_adapters()} == {"b": "device", "c": "device"}


def test_lru_eviction_cpu_tier_and_pinning(engine_factory, adapter_factory):
    engine = engine_factory(max_loras=1, max_cpu_loras=1)
    reg = engine.registry
    for i, n in enumerate("abc"):
        reg.register(n, str(adapter_factory(n, r=4, seed=10 + i)))
    assert {a.location for a in engine.list_adapters()} == {"disk"}
    outs = {n: engine.generate("xyz", adapter=n, max_tokens=6).token_ids for n in "abc"}
    where = {a.name: a.location for a in engine.list_adapters()}
    # one slot: c is resident; the CPU tier keeps one more (b, the most recent), a is back on disk.
    assert where == {"a": "disk", "b": "cpu", "c": "device"}
    assert {a.name: a.bytes > 0 for a in engine.list_adapters()} == {"a": False, "b": True, "c": True}
    # A pinned adapter is never evicted: with c pinned, making a resident fails clearly.
    lease = reg.pin("c")
    reg.ensure_packed("a")
    with pytest.raises(AdapterError, match="in use by running requests"):
        reg.activate("a")
    assert [a.pinned for a in engine.list_adapters() if a.name == "c"] == [True]
    reg.unpin(lease)
    # Re-reading from disk and reactivating gives the same outputs.
    assert {n: engine.generate("xyz", adapter=n, max_tokens=6).token_ids for n in "abc"} == outs


def test_stacks_grow_to_the_largest_rank(engine_factory, adapter_factory):
    engine = engine_factory()
    engine.load_adapter("small", adapter_factory("small", r=4, targets="all-linear", seed=21))
    assert engine.model.lora_rank == 4
    before = engine.generate("grow", adapter="small", max_tokens=6).token_ids
    engine.load_adapter("large", adapter_factory("large", r=16, targets=("q_proj",), seed=22))
    assert engine.model.lora_rank == 16
    assert engine.generate("grow", adapter="small", max_tokens=6).token_ids == before
    info = {a.name: a for a in engine.list_adapters()}
    assert (info["small"].rank, info["large"].rank) == (4, 16)


def test_a_slot_written_in_pieces_is_reserved_until_its_last_layer(engine_factory, adapter_factory):
    """A write spread over several calls (``activate``'s ``budget_s``, as the step loop does while
    sequences run): the slot is neither free nor evictable nor resident meanwhile, the adapter is
    usable once the last layer is in (the same output as written at once), a rank growth
    mid-write starts the write again in the new stacks, and unloading mid-write frees the slot.
    (Called here on the test's thread while the engine's loop sleeps: a woken loop with nothing
    running finishes a write at once.)"""
    engine = engine_factory(max_loras=2)
    reg = engine.registry
    n_layers = len(engine.model.layers)
    assert n_layers >= 2
    paths = {n: adapter_factory(n, r=4, targets="all-linear", seed=80 + i) for i, n in enumerate("wxy")}
    engine.load_adapter("w", paths["w"])
    want = engine.generate("pieces", adapter="w", max_tokens=6).token_ids
    engine.unload_adapter("w")
    big = adapter_factory("big", r=16, targets="all-linear", seed=84)
    for n in ("w", "x", "big"):
        reg.load(n, str(paths.get(n, big)))

    assert reg.activate("w", budget_s=0.0) is None  # one layer, no more
    assert reg.writing("w") and reg.slot_of("w") is None and reg.resident() == []
    assert {a.name: a.location for a in engine.list_adapters()}["w"] == "cpu"
    # the one other slot is free; the reserved one is offered to nobody, even as "evictable"
    free = reg.free_or_evictable_slot()
    assert reg.activate("x") == free
    assert reg.free_or_evictable_slot() == free  # x (unpinned), never w's
    # a larger rank reallocates the stacks mid-write (x gives way to big): w starts again
    reg.activate("big", slot=free)
    assert engine.model.lora_rank == 16 and reg.writing("w")
    pieces = 0
    while reg.continue_writes(0.0) == []:
        pieces += 1
    assert pieces == n_layers - 1  # one layer a call, all of them after the restart
    assert not reg.writing("w") and reg.slot_of("w") is not None and reg.wait_written("w")
    assert engine.generate("pieces", adapter="w", max_tokens=6).token_ids == want
    # unloading an adapter whose write is under way calls it off and frees its slot
    engine.unload_adapter("big")
    reg.load("y", str(paths["y"]))
    assert reg.activate("y", budget_s=0.0) is None and reg.pending_writes()
    engine.unload_adapter("y")
    assert not reg.pending_writes() and not reg.wait_written("y", timeout=0)
    assert reg.free_or_evictable_slot(exclude=lambda n: True) is not None
