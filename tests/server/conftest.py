"""Fixtures for the server tests.

Unit tests build the real ``Pipeline`` and app over ``fakes.FakeEngine``/``FakeChain`` and drive
them with Litestar's TestClient. Integration tests (``test_openai_*``) start a real uvicorn
server on 127.0.0.1 over the tiny random Llama of ``tests/tiny.py`` and use the official
``openai`` client.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/tiny.py and tests/server/fakes.py are imported as plain modules, whatever pytest's
# rootdir handling puts on sys.path.
_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent, _HERE.parent.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from fakes import FakeChain, FakeEngine, fake_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny model, its ``sql``/``json`` adapters and an experts.yaml (built once per session)."""
    from tiny import tiny_assets

    return tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fake_setup(tmp_path):
    """``(config, engine, pipeline)`` over the fakes."""
    from coe.pipeline import Pipeline

    cfg = fake_config(tmp_path)
    engine = FakeEngine(cfg)
    pipeline = Pipeline(cfg, engine, FakeChain(cfg))
    pipeline.validate()
    return cfg, engine, pipeline


@pytest.fixture
def client(fake_setup):
    """A Litestar TestClient over the fake pipeline (no auth)."""
    from litestar.testing import TestClient

    from coe.server.app import create_app
    from coe.server.auth import ApiKeys

    cfg, engine, pipeline = fake_setup
    app = create_app(cfg, pipeline=pipeline, api_keys=ApiKeys())
    with TestClient(app) as c:
        c.engine = engine
        c.pipeline = pipeline
        yield c
