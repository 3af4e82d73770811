"""Adapter admin (load/unload, adapter_roots) and API-key auth, over the fake backend."""

from __future__ import annotations


import pytest
from litestar.testing import TestClient

from coe.server.app import create_app
from coe.server.auth import ApiKeys


def chat(client, model, content="hi", headers=None):
    return client.post("/v1/chat/completions", headers=headers or {},
                       json={"model": model, "messages": [{"role": "user", "content": content}]})


def make_adapter_dir(root, name):
    d = root / "adapters" / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_runtime_load_is_usable_at_once_and_unload_removes_it(client, tmp_path):
    make_adapter_dir(tmp_path, "pirate")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "pirate", "lora_path": "adapters/pirate"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "pirate" and r.json()["source"] == str(tmp_path / "adapters" / "pirate")
    assert "pirate" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    r = chat(client, "pirate")
    assert r.status_code == 200
    assert r.json()["coe"] == {"expert": "pirate", "adapter": "pirate", "source": "explicit", "score": None,
                               "reason": "the request named runtime-loaded adapter 'pirate'"}
    assert client.engine.calls[-1]["adapter"] == "pirate"
    names = [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    assert "pirate" in names
    # loading the same name twice is refused
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "pirate", "lora_path": "adapters/pirate"})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 200
    assert chat(client, "pirate").status_code == 404
    assert "pirate" not in [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 404


def test_adapter_roots_are_enforced(client, tmp_path):
    outside = tmp_path / "elsewhere" / "evil"
    outside.mkdir(parents=True)
    (tmp_path / "adapters" / "link").symlink_to(outside)
    for path in ("adapters/../elsewhere/evil", str(outside), "adapters/link", "/etc"):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "adapter_path_forbidden" and err["param"] == "lora_path"
        assert "adapter_roots" in err["message"]
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "ghost", "lora_path": "adapters/ghost"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


@pytest.mark.parametrize("name, why", [("auto", "taken"), ("sql", "taken"), ("fake-base", "taken"), ("Bad Name", "not a valid")])
def test_reserved_and_invalid_names(client, tmp_path, name, why):
    make_adapter_dir(tmp_path, "ok")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "adapters/ok"})
    assert r.status_code == 400 and why in r.json()["error"]["message"]


def test_experts_adapters_cannot_be_unloaded(client):
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert r.status_code == 400 and "experts.yaml" in r.json()["error"]["message"]


def test_runtime_loading_disabled_without_roots(tmp_path):
    from coe.pipeline import Pipeline
    from fakes import FakeChain, FakeEngine, fake_config

    cfg = fake_config(tmp_path, adapter_roots=[])
    p = Pipeline(cfg, FakeEngine(cfg), FakeChain(cfg))
    p.validate()
    with TestClient(create_app(cfg, pipeline=p, api_keys=ApiKeys())) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "adapters"})
        assert r.status_code == 400 and "adapter_roots is empty" in r.json()["error"]["message"]


@pytest.fixture
def keyed(fake_setup):
    cfg, engine, pipeline = fake_setup
    app = create_app(cfg, pipeline=pipeline, api_keys=ApiKeys(["user-key", "other-key"], "admin-key"))
    with TestClient(app) as c:
        yield c


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_on_v1(keyed):
    r = chat(keyed, "sql")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert chat(keyed, "sql", headers=bearer("wrong")).status_code == 401
    assert chat(keyed, "sql", headers={"Authorization": "Basic user-key"}).status_code == 401
    assert chat(keyed, "sql", headers=bearer("user-key")).status_code == 200
    assert chat(keyed, "sql", headers=bearer("other-key")).status_code == 200
    assert chat(keyed, "sql", headers=bearer("admin-key")).status_code == 200
    assert keyed.get("/v1/models").status_code == 401
    # probes and metrics stay open
    assert keyed.get("/health").status_code == 200 and keyed.get("/ready").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_admin_endpoints_need_the_admin_key(keyed):
    for key in (None, "user-key"):
        r = keyed.get("/v1/adapters", headers=bearer(key) if key else {})
        assert r.status_code == 401, key
    assert keyed.get("/v1/adapters", headers=bearer("admin-key")).status_code == 200
    r = keyed.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=bearer("user-key"))
    assert r.status_code == 401


def test_admin_closed_when_only_api_keys_are_set(fake_setup):
    cfg, engine, pipeline = fake_setup
    with TestClient(create_app(cfg, pipeline=pipeline, api_keys=ApiKeys(["user-key"]))) as c:
        r = c.get("/v1/adapters", headers=bearer("user-key"))
        assert r.status_code == 401 and "COE_ADMIN_KEY" in r.json()["error"]["message"]


def test_keys_from_config_and_environment(fake_setup):
    cfg, _, _ = fake_setup
    keys = ApiKeys.from_config(cfg, environ={"COE_API_KEY": "a, b", "COE_ADMIN_KEY": "adm"})
    keys.check("Bearer a", admin=False)
    keys.check("Bearer b", admin=False)
    keys.check("Bearer adm", admin=True)
    from coe.errors import AuthError

    with pytest.raises(AuthError):
        keys.check("Bearer a", admin=True)
    assert not ApiKeys.from_config(cfg, environ={}).enabled
