"""Fixtures for the routing tests (helpers live in ``routing_helpers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from routing_helpers import make_config  # noqa: E402


@pytest.fixture
def cfg():
    return make_config()
