"""Adapter faults against the real server: files that break after startup, half-written weights,
the wrong base model, a rank above the limit, and a hub id that cannot be fetched.

Every failure must name the adapter and the cause, fail only the requests that need that
adapter, leave the registry as it was, and never hang.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import copy_adapter, derive_config, serve, set_adapter_config, slice_rank

WEIGHTS = "adapter_model.safetensors"
TEXT = "Count the rows in the orders table."
HUB_ID = "nonexistent-coe-org/no-such-adapter"


def _error(r, status, code):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err["message"]


@pytest.fixture(scope="module")
def lazy(tiny):
    """A server whose experts' adapters are registered but not read (``preload: []``), each on its
    own copy of the ``sql`` adapter, plus one expert on a hub id that does not exist."""
    root = tiny.config_path.parent / "faults"
    dirs = {name: copy_adapter(tiny.adapters["sql"], root / name) for name in ("good", "gone", "garbled", "half", "badconfig", "nan")}
    experts = [{"name": "general", "description": "fallback"}]
    experts += [{"name": name, "description": name, "adapter": str(d)} for name, d in dirs.items()]
    experts.append({"name": "hub", "description": "not on any hub", "adapter": HUB_ID})
    path = derive_config(tiny.config_path, "faults.yaml", experts=experts, router="none", rules=[],
                         serving={"preload": []})
    with serve(path) as server:
        yield server, dirs, path


def test_adapters_broken_after_startup_fail_only_their_own_requests(lazy, tiny):
    server, dirs, _ = lazy
    assert {a["name"]: a["location"] for a in server.pipeline.list_adapters()}["gone"] == "disk"
    # Broken after startup, before their first (cold) load.
    shutil.rmtree(dirs["gone"])
    (dirs["garbled"] / WEIGHTS).write_bytes(os.urandom(4096))
    data = (dirs["half"] / WEIGHTS).read_bytes()
    (dirs["half"] / WEIGHTS).write_bytes(data[: len(data) // 2])  # a copy interrupted halfway
    config = (dirs["badconfig"] / "adapter_config.json").read_text()
    (dirs["badconfig"] / "adapter_config.json").write_text(config[: len(config) // 2])
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(dirs["nan"] / WEIGHTS))
    first = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[first][0, 0] = float("nan")  # bit rot in one weight
    save_file(tensors, str(dirs["nan"] / WEIGHTS))
    reference = server.answer("good", TEXT, max_tokens=12)

    why = {"gone": "does not exist", "garbled": "not a readable safetensors file",
           "half": "not a readable safetensors file", "badconfig": "adapter_config.json is not valid JSON",
           "nan": "contain NaN or inf"}
    with ThreadPoolExecutor(8) as pool:
        broken = {name: pool.submit(server.chat, name, TEXT, max_tokens=12) for name in why}
        healthy = [pool.submit(server.chat, "good", TEXT, max_tokens=12) for _ in range(4)]
    for name, cause in why.items():
        message = _error(broken[name].result(), 500, "generation_failed")
        assert f"adapter {name!r}" in message and cause in message, message
    for f in healthy:
        r = f.result()
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reference

    # A stream fails before its first token, so it still gets the HTTP status, not a 200.
    s = server.stream("half", TEXT, max_tokens=4)
    assert s.status == 500 and "not a readable safetensors file" in s.events[0]["error"]["message"]
    server.wait_idle()

    # Nothing is poisoned: the adapter stays registered (on disk) and is read again on the next
    # request, so repairing the folder is enough.
    assert {a["name"]: a["location"] for a in server.pipeline.list_adapters()}["gone"] == "disk"
    copy_adapter(tiny.adapters["sql"], dirs["gone"])
    assert server.answer("gone", TEXT, max_tokens=12) == reference


def test_hub_adapter_that_cannot_be_fetched_fails_fast(lazy, tiny):
    server, _, path = lazy
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: never touch the network
    t0 = time.monotonic()
    message = _error(server.chat("hub", TEXT, max_tokens=4), 500, "generation_failed")
    assert time.monotonic() - t0 < 30, "a failing hub load must not hang the request"
    assert HUB_ID in message and "hub id failed" in message, message
    assert server.answer("good", TEXT, max_tokens=4)  # others unaffected

    # Preloaded at startup, the same adapter stops the start with an error naming it.
    from coe.errors import AdapterNotFound
    from coe.pipeline import Pipeline

    preload = derive_config(path, "faults-preload-hub.yaml", serving={"preload": ["hub"]})
    t0 = time.monotonic()
    with pytest.raises(AdapterNotFound) as e:
        Pipeline.from_config(preload)
    assert time.monotonic() - t0 < 60
    assert HUB_ID in str(e.value) and "'hub'" in str(e.value)


@pytest.mark.parametrize("damage", ["half", "empty", "header-only", "garbage"])
def test_half_written_safetensors_is_refused_at_load_and_changes_nothing(real, tiny, damage):
    d = copy_adapter(tiny.adapters["sql"], tiny.config_path.parent / "broken" / damage)
    data = (d / WEIGHTS).read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    (d / WEIGHTS).write_bytes({"half": data[: len(data) // 2], "empty": b"", "header-only": data[:header],
                               "garbage": os.urandom(len(data))}[damage])
    before = server_state(real)
    r = real.http.post("/v1/load_lora_adapter", json={"lora_name": f"broken-{damage}", "lora_path": str(d)})
    message = _error(r, 422, "adapter_error")
    assert f"broken-{damage}" in message and WEIGHTS in message and "re-save" in message, message
    assert server_state(real) == before
    assert real.chat(f"broken-{damage}", TEXT).status_code == 404


def server_state(server):
    models = [m["id"] for m in server.http.get("/v1/models").json()["data"]]
    adapters = sorted(a["name"] for a in server.http.get("/v1/adapters").json()["data"])
    return models, adapters


def test_wrong_base_model_warns_and_still_serves(real, tiny, caplog):
    d = copy_adapter(tiny.adapters["json"], tiny.config_path.parent / "wrongbase" / "llama3")
    set_adapter_config(d, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    with caplog.at_level(logging.WARNING, logger="coe"):
        r = real.http.post("/v1/load_lora_adapter", json={"lora_name": "llama3", "lora_path": str(d)})
    assert r.status_code == 200, r.text
    warned = [rec.getMessage() for rec in caplog.records if "meta-llama/Llama-3.1-8B" in rec.getMessage()]
    assert warned and "strict_base_model" in warned[0], caplog.text
    try:
        assert real.chat("llama3", TEXT, max_tokens=4).status_code == 200
    finally:
        assert real.http.post("/v1/unload_lora_adapter", json={"lora_name": "llama3"}).status_code == 200


def test_adapter_for_another_architecture_is_refused(real, tiny):
    """Same name, other shapes (a hidden size the base model does not have): never served."""
    from safetensors.torch import load_file, save_file

    d = copy_adapter(tiny.adapters["json"], tiny.config_path.parent / "wrongbase" / "narrow")
    tensors = load_file(str(d / WEIGHTS))
    save_file({k: (v[:, :32].contiguous() if "lora_A" in k else v[:32].contiguous()) for k, v in tensors.items()},
              str(d / WEIGHTS))
    message = _error(real.http.post("/v1/load_lora_adapter", json={"lora_name": "narrow", "lora_path": str(d)}),
                     422, "adapter_error")
    assert "do not fit the base model" in message and "another base model" in message, message


@pytest.fixture(scope="module")
def limits(tiny):
    """A server with ``strict_base_model`` on and ``max_lora_rank: 2`` (the tiny adapters have r=4,
    so its experts' adapters are not preloaded)."""
    path = derive_config(tiny.config_path, "limits.yaml", router="none",
                         serving={"strict_base_model": True, "max_lora_rank": 2, "preload": []})
    with serve(path) as server:
        yield server, path


def test_strict_base_model_refuses_a_mismatch(limits, tiny):
    server, _ = limits
    root = tiny.config_path.parent / "strict"
    ok = slice_rank(tiny.adapters["json"], root / "r2", rank=2)
    assert server.http.post("/v1/load_lora_adapter", json={"lora_name": "r2", "lora_path": str(ok)}).status_code == 200
    bad = slice_rank(tiny.adapters["json"], root / "r2-llama", rank=2)
    set_adapter_config(bad, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    message = _error(server.http.post("/v1/load_lora_adapter", json={"lora_name": "r2-llama", "lora_path": str(bad)}),
                     422, "adapter_error")
    assert "meta-llama/Llama-3.1-8B" in message and "strict_base_model" in message, message


def test_rank_above_the_limit_is_refused_everywhere(limits, tiny):
    server, path = limits
    # runtime load
    message = _error(server.http.post("/v1/load_lora_adapter",
                                      json={"lora_name": "big", "lora_path": str(tiny.adapters["sql"])}),
                     422, "adapter_error")
    assert "rank 4 is above serving.max_lora_rank=2" in message, message
    # an expert's adapter read at its first request
    message = _error(server.chat("sql", TEXT, max_tokens=4), 500, "generation_failed")
    assert "rank 4 is above serving.max_lora_rank=2" in message and "'sql'" in message, message
    assert server.chat("general", TEXT, max_tokens=4).status_code == 200
    server.wait_idle()
    # preloaded at startup: the start fails, naming the adapter
    from coe.errors import AdapterError
    from coe.pipeline import Pipeline

    with pytest.raises(AdapterError) as e:
        Pipeline.from_config(derive_config(path, "limits-preload.yaml", serving={"preload": ["all"]}))
    assert "rank 4 is above serving.max_lora_rank=2" in str(e.value)
