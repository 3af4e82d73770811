"""Security against the real server: keys (constant-time, a separate admin key), adapter_roots
(``..``, absolute paths, escaping symlinks), safetensors only (a pickle that would run code is
never loaded), no ``trust_remote_code`` or pickle loading in the code, and nothing secret in the
log at the default level. Request size limits are in ``test_bad_input.py``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import pytest

from helpers import RealServer, copy_adapter

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("coe", "routers", "kernels", "train", "eval")
USER_KEY = "sk-user-1b2c3d4e5f60718293a4"
ADMIN_KEY = "sk-admin-0f1e2d3c4b5a69788796"
SECRET_PROMPT = "violet-harbor-cipher-7731"


# --------------------------------------------------------------------------- keys


def test_api_keys_are_compared_in_constant_time(monkeypatch):
    """Every check compares fixed-size digests with ``hmac.compare_digest``, against every
    accepted key, whatever the presented key's length or position in the list."""
    import coe.server.auth as auth
    from coe.errors import AuthError

    calls: list[tuple[int, int]] = []
    real_compare = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real_compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = auth.ApiKeys(["k1-" + "a" * 30, "k2-short", "k3-" + "c" * 60], admin_key=ADMIN_KEY)
    for presented, ok in (("k1-" + "a" * 30, True), ("k3-" + "c" * 60, True), ("k1-" + "a" * 29 + "b", False),
                          ("x", False), ("y" * 500, False), (ADMIN_KEY, True)):
        calls.clear()
        if ok:
            keys.check(f"Bearer {presented}", admin=False)
        else:
            with pytest.raises(AuthError):
                keys.check(f"Bearer {presented}", admin=False)
        assert calls == [(32, 32)] * 4, (presented, calls)  # 3 API keys + the admin key, no early exit
    calls.clear()
    with pytest.raises(AuthError):
        keys.check(f"Bearer {USER_KEY}", admin=True)
    assert calls == [(32, 32)]
    # no plain comparison of secrets anywhere in the module
    source = Path(auth.__file__).read_text()
    assert not re.search(r"(token|key|presented)\s*==", source)


@pytest.fixture(scope="module")
def keyed(real):
    """A second server over the session's pipeline with a user key and an admin key."""
    from coe.server.auth import ApiKeys

    with RealServer(real.pipeline, api_keys=ApiKeys([USER_KEY], ADMIN_KEY)) as server:
        yield server


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_admin_endpoints_are_gated_by_their_own_key(keyed, tiny):
    h = keyed.http
    chat = {"model": "json", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert h.post("/v1/chat/completions", json=chat).status_code == 401
    assert h.post("/v1/chat/completions", json=chat, headers=_auth("sk-wrong")).status_code == 401
    assert h.post("/v1/chat/completions", json=chat, headers=_auth(USER_KEY)).status_code == 200
    assert h.post("/v1/chat/completions", json=chat, headers=_auth(ADMIN_KEY)).status_code == 200

    load = {"lora_name": "keyed", "lora_path": str(tiny.adapters["json"])}
    for key in (None, USER_KEY, "sk-wrong"):
        headers = _auth(key) if key else {}
        for method, path, body in (("GET", "/v1/adapters", None), ("POST", "/v1/load_lora_adapter", load),
                                   ("POST", "/v1/unload_lora_adapter", {"lora_name": "json"})):
            r = h.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (key, path, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer" and r.json()["error"]["code"] == "invalid_api_key"
            if key:
                assert key not in r.text  # the presented key is never echoed
    assert h.get("/v1/adapters", headers=_auth(ADMIN_KEY)).status_code == 200
    assert h.post("/v1/load_lora_adapter", json=load, headers=_auth(ADMIN_KEY)).status_code == 200
    assert h.post("/v1/unload_lora_adapter", json={"lora_name": "keyed"}, headers=_auth(ADMIN_KEY)).status_code == 200
    for path in ("/health", "/ready", "/metrics"):  # probes and scrapers need no key
        assert h.get(path).status_code == 200


def test_only_api_keys_configured_means_admin_is_closed(real):
    from coe.server.auth import ApiKeys

    with RealServer(real.pipeline, api_keys=ApiKeys([USER_KEY])) as server:
        r = server.http.get("/v1/adapters", headers=_auth(USER_KEY))
        assert r.status_code == 401 and "admin key" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- adapter_roots


def test_adapter_roots_are_enforced(real, tiny, tmp_path):
    root = tiny.config_path.parent  # the tiny config's only adapter root
    outside = copy_adapter(tiny.adapters["json"], tmp_path / "outside")
    sibling = copy_adapter(tiny.adapters["json"], Path(str(root) + "-evil") / "json")  # shares the root's prefix
    links = root / "links"
    links.mkdir(exist_ok=True)
    for name, target in (("dir-out", outside), ("dir-in", tiny.adapters["json"])):
        if not (links / name).is_symlink():
            (links / name).symlink_to(target)
    file_link = root / "links" / "file-out"
    file_link.mkdir(exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (file_link / f).exists():
            (file_link / f).symlink_to(outside / f)

    def load(name, path):
        return real.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})

    for path in (f"{root}/adapters/../../outside", "adapters/../../" + tmp_path.name, str(outside), str(sibling),
                 "/etc", "~", str(links / "dir-out"), str(file_link)):
        r = load("evil", path)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "adapter_path_forbidden" and err["param"] == "lora_path" and "adapter_roots" in err["message"]
    assert "evil" not in [m["id"] for m in real.http.get("/v1/models").json()["data"]]
    r = load("evil", "a\x00b")
    assert r.status_code == 400
    # a symlink that stays inside the roots is fine
    assert load("inside", links / "dir-in").status_code == 200
    assert real.http.post("/v1/unload_lora_adapter", json={"lora_name": "inside"}).status_code == 200


def test_remote_adapter_paths_are_checked_lexically(tiny):
    import dataclasses

    from coe.config import load_config
    from coe.errors import AdapterPathForbidden
    from coe.pipeline import Pipeline

    cfg = load_config(tiny.config_path)
    cfg = dataclasses.replace(cfg, base_model=dataclasses.replace(cfg.base_model, backend="remote", url="http://127.0.0.1:9/v1"),
                              serving=dataclasses.replace(cfg.serving, adapter_roots=("/srv/adapters",)))
    p = Pipeline(cfg, backend=None, chain=None)
    assert p._allowed_path("/srv/adapters/sql") == "/srv/adapters/sql"
    for path in ("/srv/adapters/../secrets", "/srv/adapters-evil/x", "srv/adapters/x", "/etc/passwd"):
        with pytest.raises(AdapterPathForbidden):
            p._allowed_path(path)


# --------------------------------------------------------------------------- pickles


class _Boom:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("filename", ["adapter_model.bin", "adapter_model.pt"])
def test_pickled_adapters_are_refused_unopened(real, tiny, tmp_path, filename):
    marker = tmp_path / "pwned"
    d = tiny.config_path.parent / "pickled" / filename.replace(".", "-")
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text((tiny.adapters["json"] / "adapter_config.json").read_text())
    (d / filename).write_bytes(pickle.dumps(_Boom(marker)))
    r = real.http.post("/v1/load_lora_adapter", json={"lora_name": "pickled", "lora_path": str(d)})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert filename in message and "pickles are refused" in message and "safe_serialization=True" in message
    assert not marker.exists()


def test_pickled_base_model_is_refused_unopened(tiny, tmp_path):
    import shutil

    from coe.errors import ConfigError
    from coe.pipeline import Pipeline
    from helpers import derive_config

    marker = tmp_path / "pwned"
    model = tmp_path / "pickled-model"
    model.mkdir()
    for f in tiny.model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model / f.name)
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    path = derive_config(tiny.config_path, "pickled-base.yaml", router="none")
    text = path.read_text().replace(str(tiny.model_dir.resolve()), str(model))
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        Pipeline.from_config(path)
    assert "pytorch_model.bin" in str(e.value) and "safetensors" in str(e.value)
    assert not marker.exists()


def test_no_remote_code_and_no_pickle_loading_in_the_source():
    forbidden = re.compile(r"trust_remote_code|torch\.load\(|pickle\.loads?\(|joblib\.load\(|allow_pickle\s*=\s*True"
                           r"|weights_only\s*=\s*False|(?<![.\w])(eval|exec)\(")
    hits = []
    for root in SOURCE_ROOTS:
        for path in (REPO / root).rglob("*.py"):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if forbidden.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# --------------------------------------------------------------------------- logs


def test_no_keys_or_prompts_in_the_log_at_the_default_level(keyed, caplog, monkeypatch):
    from coe.engine.sequence import Sequence

    h = keyed.http
    user = _auth(USER_KEY)

    def chat(content, **kw):
        return h.post("/v1/chat/completions", headers=kw.pop("headers", user),
                      json={"model": kw.pop("model", "auto"), "max_tokens": 3, "temperature": 0.0,
                            "messages": [{"role": kw.pop("role", "user"), "content": content}], **kw})

    append = Sequence.append

    def faulty(self, token):  # a 500 whose request carries the secret prompt
        if self.request.seed == 99:
            raise RuntimeError("injected fault")
        return append(self, token)

    monkeypatch.setattr(Sequence, "append", faulty)
    caplog.set_level(logging.INFO)  # `coe serve`'s default level
    assert chat(f"Please extract JSON: {SECRET_PROMPT}").status_code == 200
    assert chat(f"SELECT {SECRET_PROMPT} FROM t", stream=True).status_code == 200
    assert chat(SECRET_PROMPT, headers=_auth(USER_KEY + "x")).status_code == 401
    assert chat(SECRET_PROMPT, headers={"Authorization": USER_KEY}).status_code == 401
    assert chat(SECRET_PROMPT, role="wizard").status_code == 400
    assert chat(f"{SECRET_PROMPT} " * 300).status_code == 400
    assert chat(SECRET_PROMPT, model=f"x-{SECRET_PROMPT}").status_code == 404
    assert chat(SECRET_PROMPT, seed=99, model="json").status_code == 500
    assert h.post("/v1/route", headers=user, json={"text": SECRET_PROMPT}).status_code == 200
    assert h.post("/v1/load_lora_adapter", headers=_auth(ADMIN_KEY),
                  json={"lora_name": "x", "lora_path": f"/{SECRET_PROMPT}"}).status_code == 400
    text = "\n".join(r.getMessage() + "\n" + (r.exc_text or "") for r in caplog.records)
    assert caplog.records, "nothing was logged: the capture is broken"
    assert "injected fault" in text  # the 500 is logged, with its cause...
    for secret in (USER_KEY, ADMIN_KEY, SECRET_PROMPT):
        assert secret not in text, secret  # ...but no key and no prompt
    assert os.environ.get("COE_API_KEY", "") not in (USER_KEY, ADMIN_KEY)
