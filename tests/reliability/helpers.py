"""Helpers for the reliability tests: derived configs, a real server with an HTTP client, SSE reading.

``RealServer`` runs ``create_app(pipeline)`` under uvicorn on 127.0.0.1 (``tests/server/live.py``)
and adds the few calls the tests make: chat (streaming or not), engine statistics, and waiting
until the engine is idle with every KV slot free.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import yaml

from live import LiveServer

GREEDY = {"temperature": 0.0}
# The session server's serving.max_body_bytes (small, so the 413 checks stay cheap).
BODY_LIMIT = 64_000


def derive_config(base: Path, filename: str, *, serving: dict | None = None, experts: list | None = None,
                  router: str | None = None, rules: list | None = None) -> Path:
    """A copy of the tiny experts.yaml next to it (so relative paths and the router dir are shared),
    with ``serving`` merged in and ``experts`` / ``router.type`` / ``rules`` replaced when given."""
    data = yaml.safe_load(Path(base).read_text())
    data["serving"].update(serving or {})
    if experts is not None:
        data["experts"] = experts
    if router is not None:
        data["router"]["type"] = router
    if rules is not None:
        data["rules"] = rules
    path = Path(base).parent / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def copy_adapter(src: Path, dst: Path) -> Path:
    """A fresh copy of an adapter folder (tests break copies, never the shared originals)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


class RealServer(LiveServer):
    """A live uvicorn server over ``pipeline`` with a plain httpx client.

    Args:
        pipeline: a ready ``Pipeline`` (not shut down on exit: its owner does that).
        api_keys: ``ApiKeys`` to enforce (default: none, an open server).
    """

    def __init__(self, pipeline: Any, api_keys: Any = None) -> None:
        from coe.server.app import create_app
        from coe.server.auth import ApiKeys

        self.pipeline = pipeline
        super().__init__(create_app(pipeline.config, pipeline=pipeline, api_keys=api_keys or ApiKeys()))

    def __enter__(self) -> "RealServer":
        super().__enter__()
        self.http = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.close()
        super().__exit__(*exc)

    # ------------------------------------------------------------------ requests

    def chat(self, model: str, text: str, headers: dict | None = None, **body: Any) -> httpx.Response:
        """A chat completion on its own connection (safe to call from several threads at once)."""
        payload = {"model": model, "messages": [{"role": "user", "content": text}], **GREEDY, **body}
        return httpx.post(self.base_url + "/chat/completions", json=payload, headers=headers or {}, timeout=60)

    def answer(self, model: str, text: str, **body: Any) -> str:
        r = self.chat(model, text, **body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def stream(self, model: str, text: str, **body: Any) -> "StreamResult":
        payload = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True, **GREEDY, **body}
        with httpx.stream("POST", self.base_url + "/chat/completions", json=payload, timeout=60) as resp:
            return StreamResult.read(resp)

    # ------------------------------------------------------------------ engine state

    def stats(self) -> dict[str, Any]:
        return self.pipeline.stats()

    def wait_idle(self, timeout_s: float = 20.0) -> dict[str, Any]:
        """Wait until nothing runs or waits and every KV slot is free; returns the stats."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.stats()
            idle = s.get("running") == 0 and s.get("queue_depth") == 0 and s.get("kv_slots_free") == s.get("max_batch")
            pinned = [a["name"] for a in self.pipeline.list_adapters() if a["in_flight"]]
            if idle and not pinned:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine did not go idle: {s}, pinned adapters: {pinned}")
            time.sleep(0.02)


class StreamResult:
    """A finished SSE response: status, the JSON events, and whether ``[DONE]`` came."""

    def __init__(self, status: int, events: list[dict], done: bool, raw: str) -> None:
        self.status = status
        self.events = events
        self.done = done
        self.raw = raw

    @classmethod
    def read(cls, resp: httpx.Response, on_content: Any = None) -> "StreamResult":
        """Read the whole response; ``on_content()`` is called once, at the first text chunk."""
        if resp.status_code != 200:
            resp.read()
            return cls(resp.status_code, [resp.json()], False, resp.text)
        events, done, lines = [], False, []
        for line in resp.iter_lines():
            lines.append(line)
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if on_content is not None and any((c.get("delta") or {}).get("content") for c in events[-1].get("choices") or []):
                    on_content()
                    on_content = None
        return cls(200, events, done, "\n".join(lines))

    @property
    def text(self) -> str:
        return "".join((c.get("delta") or {}).get("content") or c.get("text") or ""
                       for e in self.events for c in e.get("choices") or [])

    @property
    def error(self) -> dict | None:
        return next((e["error"] for e in self.events if "error" in e), None)


def slice_rank(src: Path, dst: Path, rank: int) -> Path:
    """A copy of a PEFT adapter cut to a smaller ``rank`` (its first ``rank`` A rows / B columns)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(r=rank, lora_alpha=2 * rank)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    cut = {k: (v[:rank].contiguous() if "lora_A" in k else v[:, :rank].contiguous()) for k, v in tensors.items()}
    save_file(cut, str(dst / "adapter_model.safetensors"))
    return dst


def set_adapter_config(adapter_dir: Path, **fields: Any) -> None:
    """Overwrite fields of an adapter's ``adapter_config.json``."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


@contextlib.contextmanager
def serve(config_path: Path, **server_kw: Any) -> Iterator[RealServer]:
    """A pipeline from ``config_path`` (its router must be ``none`` or trained) under a live server;
    both are stopped on exit."""
    from coe.pipeline import Pipeline

    pipeline = Pipeline.from_config(config_path)
    try:
        with RealServer(pipeline, **server_kw) as server:
            yield server
    finally:
        pipeline.shutdown(0)
