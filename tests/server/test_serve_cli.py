"""``coe serve`` as a user runs it: a subprocess that loads everything, prints a ready line,
serves, and exits cleanly on SIGTERM; config and router problems exit with 2 and 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from tiny import tiny_experts_yaml

COE = [sys.executable, "-m", "coe.cli"]


def run_coe(*args, timeout=120):
    return subprocess.run([*COE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_bad_config_exits_2(tmp_path):
    bad = tmp_path / "experts.yaml"
    bad.write_text("version: 1\nexperts: [{name: sql, adapterr: x}]\n")
    r = run_coe("serve", "--config", str(bad))
    assert r.returncode == 2
    assert "adapterr" in r.stderr and "did you mean 'adapter'" in r.stderr


def test_missing_router_with_no_train_exits_1(tmp_path, tiny):
    path = tiny_experts_yaml(tmp_path, tiny.model_dir, tiny.adapters)  # its router.path is empty
    r = run_coe("serve", "--config", str(path), "--no-train")
    assert r.returncode == 1
    assert "coe train-router" in r.stderr and "no trained router" in r.stderr


@pytest.mark.slow
def test_serve_prints_ready_serves_and_stops_on_sigterm(tmp_path, tiny):
    # no router to train: the rules and the fallback decide (keeps this test fast)
    path = tiny_experts_yaml(tmp_path, tiny.model_dir, tiny.adapters, router="none")
    proc = subprocess.Popen([*COE, "serve", "--config", str(path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ready on" in line:
                break
        ready = "".join(lines)
        m = re.search(r"ready on (http://127\.0\.0\.1:\d+/v1)", ready)
        assert m, (ready, "".join(stderr))
        more = [proc.stdout.readline(), proc.stdout.readline()]
        assert more[0].strip().startswith("curl ") and "/chat/completions" in more[0]
        assert "from openai import OpenAI" in more[1]
        client = openai.OpenAI(base_url=m.group(1), api_key="none", max_retries=0)
        r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "SELECT a FROM b"}],
                                           max_tokens=4, temperature=0.0)
        assert r.model_extra["coe"]["expert"] == "sql"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
