"""Time a server start: from the command to ``coe serve``'s ready line, then stop it.

``python -m eval.serve_start [--cmd "make serve PORT=8011"] [--cwd DIR] [--timeout 1800] [--json OUT]``

Runs the command in its own process group, echoes its output, stops the clock at the first
line starting with ``coe serve: ready`` (recording the CPU seconds the process tree used so
far), checks ``GET /ready`` answers 200 on the printed URL, then sends SIGINT to the group
(coe drains and exits) and prints one JSON object with the seconds to ready. Run it twice in a row to measure a cold and a warm ``make serve``.

This is a benchmark program (it prints numbers); it knows nothing about coe's internals.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

READY = re.compile(r"^coe serve: ready on (http://\S+?)/v1\b")


def time_start(cmd: str, cwd: str | None = None, timeout_s: float = 1800.0, echo: bool = True) -> dict:
    """Run ``cmd`` until its ready line; returns ``{"seconds_to_ready", "url", "ready_status", ...}``.

    Raises:
        RuntimeError: the command exited, or timed out, before printing a ready line.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=True, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # a thread, so that waiting for output can time out
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    url, seen, ready_at, cpu_s = None, [], None, None
    try:
        while url is None and time.perf_counter() - t0 < timeout_s:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if echo:
                sys.stderr.write(line)
            m = READY.match(line)
            if m:
                ready_at, url = time.perf_counter() - t0, m.group(1)
                cpu_s = _tree_cpu_seconds(proc.pid)
        if url is None:
            raise RuntimeError(f"`{cmd}` printed no ready line within {timeout_s:.0f} s "
                               f"(exit code {proc.poll()}); last output:\n{''.join(seen[-20:])}")
        while True:  # the example lines follow the ready line at once; keep them for the record
            try:
                line = lines.get(timeout=2.0)
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if echo:
                sys.stderr.write(line)
        with urllib.request.urlopen(f"{url}/ready", timeout=30) as resp:
            status = resp.status
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    ready_idx = next(i for i, ln in enumerate(seen) if READY.match(ln))
    return {"command": cmd, "cwd": str(Path(cwd or ".").resolve()), "seconds_to_ready": round(ready_at, 1),
            "cpu_seconds_to_ready": cpu_s,
            "url": url, "ready_status": status, "ready_lines": [ln.rstrip("\n") for ln in seen[ready_idx:] if ln.startswith(("coe serve: ready", "  "))],
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _tree_cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds of ``pid`` and its descendants (finished ones included).

    Start-up is mostly single-threaded imports and file reads, so on a quiet machine its wall
    time is close to this number; on a shared machine it is the load-independent figure.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return round(total, 1)
    except psutil.Error:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.serve_start", description="seconds from a command to coe's ready line")
    p.add_argument("--cmd", default="make serve", help='command to time (default: "make serve")')
    p.add_argument("--cwd", default=None, help="run it here (default: the current directory)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the ready line (default: 1800)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    args = p.parse_args(argv)
    try:
        result = time_start(args.cmd, args.cwd, args.timeout)
    except RuntimeError as exc:
        print(f"serve_start: {exc}", file=sys.stderr)
        return 1
    result["invocation"] = shlex.join(["python", "-m", "eval.serve_start", *(argv if argv is not None else sys.argv[1:])])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
