"""Graceful shutdown: SIGTERM to a real ``coe serve`` process, and the end of the grace period.

After the signal the port stays open: new requests get a 503 with Retry-After, ``/ready`` says
503, and the requests already running finish normally; the process then exits 0. Requests
still running when the grace period ends get an error event, never a silently cut stream.
The model's steps are slowed down with a monkeypatch (in the child process, by a small wrapper
around ``coe.cli.main``) so that requests are surely still running when the signal arrives.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import StreamResult, derive_config

REPO = Path(__file__).resolve().parents[2]
SECRET_KEY = "sk-coe-test-9f8e7d6c5b4a"
SECRET_PROMPT = "zebra-quartz-lighthouse"  # must never reach the log at the default level
SLOW_SERVE = """
import sys, time
from coe.engine import scheduler
step = scheduler.Scheduler._step
def slow_step(self):
    time.sleep(SLEEP)
    return step(self)
scheduler.Scheduler._step = slow_step
from coe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _slow_serve(sleep_s: float) -> str:
    return SLOW_SERVE.replace("SLEEP", repr(sleep_s))


def _stream_in_thread(url, headers, body, results, started):
    """Stream ``body`` on a thread; ``started`` is released at the first content chunk."""
    def run():
        with httpx.stream("POST", url + "/chat/completions", json=body, headers=headers, timeout=120) as resp:
            results.append(StreamResult.read(resp, on_content=started.release))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tiny, tmp_path):
    grace = 20.0
    path = derive_config(tiny.config_path, "sigterm.yaml", router="none",
                         serving={"shutdown_grace_s": grace, "api_keys": [SECRET_KEY]})
    proc = subprocess.Popen([sys.executable, "-c", _slow_serve(0.03), "serve", "--config", str(path), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"ready on (http://127\.0\.0\.1:\d+/v1)", line)
            url = m.group(1) if m else None
        assert url, "".join(stderr)
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        headers = {"Authorization": f"Bearer {SECRET_KEY}"}
        body = {"model": "json", "stream": True, "max_tokens": 60, "temperature": 0.0,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Tell me about {SECRET_PROMPT}."}]}
        results: list[StreamResult] = []
        started = threading.Semaphore(0)
        threads = [_stream_in_thread(url, headers, body, results, started) for _ in range(3)]
        for _ in threads:
            assert started.acquire(timeout=60), "the in-flight requests did not start"

        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # let the signal be handled
        r = httpx.post(url + "/chat/completions", headers=headers, timeout=30,
                       json={"model": "json", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable" and r.headers["Retry-After"]
        base = url.removesuffix("/v1")
        assert httpx.get(base + "/ready", timeout=10).status_code == 503
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        assert proc.poll() is None, "the server exited while requests were still running"

        for t in threads:
            t.join(timeout=grace + 30)
        assert len(results) == 3
        for s in results:
            assert s.status == 200 and s.done and s.error is None, s.raw[-500:]
            finish = [c["finish_reason"] for e in s.events for c in e.get("choices") or [] if c.get("finish_reason")]
            assert finish == ["length"]
            assert s.events[-1]["usage"]["completion_tokens"] == 60
        assert proc.wait(timeout=grace + 30) == 0
        assert time.monotonic() - t_signal < grace, "the server waited for the whole grace period"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(stderr)
    assert "draining" in log
    assert SECRET_KEY not in log and SECRET_PROMPT not in log, log


def test_requests_still_running_after_the_grace_period_get_an_error(tiny, monkeypatch):
    """The in-process ``DrainingServer``: a 1 s grace period, requests that need several seconds."""
    import uvicorn

    from coe.engine.scheduler import Scheduler
    from coe.pipeline import Pipeline
    from coe.server.app import DrainingServer, create_app

    step = Scheduler._step
    monkeypatch.setattr(Scheduler, "_step", lambda self: (time.sleep(0.05), step(self))[1])
    path = derive_config(tiny.config_path, "grace.yaml", router="none", serving={"shutdown_grace_s": 1.0})
    pipeline = Pipeline.from_config(path)
    app = create_app(pipeline.config, pipeline=pipeline)
    server = DrainingServer(uvicorn.Config(app, log_level="warning", lifespan="on"), app=app, grace_s=1.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        body = {"model": "json", "stream": True, "max_tokens": 100, "temperature": 0.0,
                "messages": [{"role": "user", "content": "a long one"}]}
        results: list[StreamResult] = []
        started = threading.Semaphore(0)
        streams = [_stream_in_thread(url, {}, body, results, started) for _ in range(2)]
        for _ in streams:
            assert started.acquire(timeout=30)
        t0 = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        assert httpx.post(url + "/chat/completions", json={**body, "stream": False}, timeout=10).status_code == 503
        for t in streams:
            t.join(timeout=30)
        thread.join(timeout=30)
        assert not thread.is_alive() and time.monotonic() - t0 < 10
        assert len(results) == 2
        for s in results:
            assert s.status == 200 and s.text and not s.done
            assert s.error["code"] == "engine_unavailable", s.raw[-300:]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        pipeline.shutdown(0)
