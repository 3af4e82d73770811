"""RemoteBackend: request shapes and the mapping of remote failures to coe errors.

The end-to-end test against a second real coe server over HTTP is in
``test_openai_server.py``; here an httpx MockTransport plays servers that misbehave in
ways a real one is hard to make misbehave on demand.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from coe import errors as E
from coe.config import config_from_dict
from coe.remote import RemoteBackend


def remote_config(tmp_path, url="http://remote.test/v1"):
    return config_from_dict({
        "version": 1,
        "base_model": {"backend": "remote", "url": url, "id": "base-llm", "api_key": "k1", "timeout_s": 5},
        "router": {"type": "none", "fallback": "general"},
        "experts": [{"name": "sql", "adapter": "adapters/sql"}, {"name": "general"}],
    }, source_path=str(tmp_path / "experts.yaml"))


def backend(tmp_path, handler):
    return RemoteBackend(remote_config(tmp_path), transport=httpx.MockTransport(handler),
                         async_transport=httpx.MockTransport(handler))


MSG = [{"role": "user", "content": "hi"}]


def test_generate_forwards_model_and_sampling(tmp_path):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "SELECT 1"},
                                                      "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 3}})

    out = backend(tmp_path, handler).generate(messages=MSG, adapter="sql", max_tokens=8, temperature=0.0,
                                              top_p=1.0, top_k=0, seed=3, stop=[";"], stop_token_ids=[])
    assert seen["url"] == "http://remote.test/v1/chat/completions" and seen["auth"] == "Bearer k1"
    assert seen["body"] == {"model": "sql", "stream": False, "messages": MSG, "max_tokens": 8, "temperature": 0.0,
                            "top_p": 1.0, "seed": 3, "stop": [";"]}
    assert (out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens) == ("SELECT 1", "stop", 5, 3)
    backend(tmp_path, handler).generate("raw", adapter=None, max_tokens=2)
    assert seen["url"].endswith("/completions") and seen["body"]["model"] == "base-llm"


def test_astream_passes_deltas_through(tmp_path):
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "SEL"}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": "ECT"}, "finish_reason": None}]},
        {"choices": [{"delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handler(request):
        assert json.loads(request.content)["stream_options"] == {"include_usage": True}
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def main():
        return [i async for i in backend(tmp_path, handler).astream(messages=MSG, adapter="sql", max_tokens=2)]

    items = asyncio.run(main())
    assert [i.text for i in items[:-1]] == ["SEL", "ECT"]
    final = items[-1]
    assert (final.text, final.finish_reason, final.prompt_tokens, final.completion_tokens) == ("SELECT", "length", 4, 2)
    sync_items = list(backend(tmp_path, handler).stream(messages=MSG, adapter="sql", max_tokens=2))
    assert [i.text for i in sync_items] == ["SEL", "ECT", "SELECT"]


def error(status, message="nope", headers=None):
    return lambda request: httpx.Response(status, json={"error": {"message": message, "param": "max_tokens"}},
                                          headers=headers or {})


@pytest.mark.parametrize("handler, cls, words", [
    (error(400, "max_tokens too big"), E.InvalidRequest, ("max_tokens too big",)),
    (error(401), E.RemoteBackendError, ("credentials", "api_key_env")),
    (error(404, "The model `sql` does not exist."), E.RemoteBackendError, ("--lora-modules sql=",)),
    (error(429, "busy", {"retry-after": "7"}), E.QueueFull, ("busy",)),
    (error(503), E.EngineUnavailable, ("unavailable",)),
    (error(500, "CUDA OOM"), E.RemoteBackendError, ("HTTP 500", "CUDA OOM")),
])
def test_status_errors_are_mapped(tmp_path, handler, cls, words):
    b = backend(tmp_path, handler)
    with pytest.raises(cls) as e:
        b.generate(messages=MSG, adapter="sql", max_tokens=2)
    for w in words:
        assert w in str(e.value)
    if cls is E.QueueFull:
        assert e.value.retry_after_s == 7

    async def main():
        async for _ in b.astream(messages=MSG, adapter="sql", max_tokens=2):
            pass

    with pytest.raises(cls):
        asyncio.run(main())


def test_transport_errors_are_mapped(tmp_path):
    def timeout(request):
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request):
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(E.RequestTimeout):
        backend(tmp_path, timeout).generate(messages=MSG, max_tokens=2)
    with pytest.raises(E.RemoteBackendError) as e:
        backend(tmp_path, refused).generate(messages=MSG, max_tokens=2)
    assert "http://remote.test/v1" in str(e.value)


def test_truncated_or_failing_streams_are_errors(tmp_path):
    truncated = "data: " + json.dumps({"choices": [{"delta": {"content": "x"}, "finish_reason": None}]}) + "\n\n"
    failing = truncated + "data: " + json.dumps({"error": {"message": "sequence failed"}}) + "\n\n"
    for body, words in ((truncated, "truncated"), (failing, "sequence failed")):
        b = backend(tmp_path, lambda r, body=body: httpx.Response(200, text=body))
        with pytest.raises(E.RemoteBackendError) as e:
            list(b.stream(messages=MSG, max_tokens=2))
        assert words in str(e.value)


def test_list_and_admin_forwarding(tmp_path):
    posted = []

    def handler(request):
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": "base-llm"}, {"id": "sql", "root": "/srv/sql"}]})
        posted.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, text="Success")

    b = backend(tmp_path, handler)
    assert [(a.name, a.source, a.location) for a in b.list_adapters()] == [("sql", "/srv/sql", "remote")]
    b.load_adapter("pirate", "/srv/pirate")
    b.unload_adapter("pirate")
    assert posted == [("/v1/load_lora_adapter", {"lora_name": "pirate", "lora_path": "/srv/pirate"}),
                      ("/v1/unload_lora_adapter", {"lora_name": "pirate"})]


def test_vllm_command_mirrors_the_config(tmp_path):
    from coe.remote import vllm_command

    (tmp_path / "adapters" / "sql").mkdir(parents=True)
    cfg = remote_config(tmp_path)
    cmd = vllm_command(cfg, port=9000)
    assert "--served-model-name base-llm" in cmd and "--enable-lora" in cmd and "--port 9000" in cmd
    assert f"--lora-modules sql={tmp_path / 'adapters' / 'sql'}" in cmd
    assert "general=" not in cmd  # no adapter, served by the base model
    assert "--max-lora-rank 64" in cmd and "--max-loras 8" in cmd
