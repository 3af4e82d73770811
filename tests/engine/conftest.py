"""Fixtures for the engine tests (helpers in ``tinyllm.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from tinyllm import save_adapter, save_tiny_model, tiny_config


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(path, tiny_config())
    return path


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory, tiny_hf) -> Callable[..., Path]:
    """``make(name, **save_adapter_kwargs)`` -> an adapter folder for the session's tiny model."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, Path] = {}

    def make(name: str, **kw: Any) -> Path:
        key = name + json.dumps(kw, sort_keys=True, default=str)
        if key not in made:
            made[key] = save_adapter(tiny_hf, root / name, **kw)
        return made[key]

    return make


@pytest.fixture()
def engine_factory(tiny_dir):
    """``make(**serving_overrides)`` -> an Engine on the tiny model; shut down after the test."""
    from coe.engine import Engine

    engines = []

    def make(path: Path | None = None, **kw: Any):
        kw.setdefault("max_seq_len", 256)
        kw.setdefault("max_batch", 4)
        kw.setdefault("request_timeout_s", 120.0)  # a hang fails the test instead of stalling the suite
        e = Engine.from_pretrained(str(path or tiny_dir), dtype="float32", device="cpu", **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown(0)
