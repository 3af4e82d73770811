"""Fixtures for the reliability tests: the real server (uvicorn + real engine + real router) on the
tiny random Llama of ``tests/tiny.py``, on 127.0.0.1.

``real`` is one session-wide server over the centroid router (the same config as the server
tests, with a 64 kB body limit so the 413 checks stay cheap). Tests that need another config
(faults, limits) build their own small pipeline with ``router: none`` (no encoder to load) via
``helpers.serve``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/tiny.py, tests/server/live.py and tests/reliability/helpers.py are plain modules.
_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent, _HERE.parent / "server"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from helpers import BODY_LIMIT, RealServer, derive_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny model, its ``sql``/``json`` adapters and experts.yaml (built once per session)."""
    from tiny import tiny_assets

    return tiny_assets(tmp_path_factory.mktemp("tiny-reliability"))


@pytest.fixture(scope="session")
def real(tiny):
    """The session's real server: centroid router, both adapters, limits from the tiny config."""
    from coe.pipeline import Pipeline

    path = derive_config(tiny.config_path, "reliability.yaml", serving={"max_body_bytes": BODY_LIMIT})
    pipeline = Pipeline.from_config(path, train_router_if_missing=True)
    with RealServer(pipeline) as server:
        yield server
    pipeline.shutdown(0)
