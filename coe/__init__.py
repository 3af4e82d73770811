"""coe: a Composition-of-Experts LLM server.

Public API (imported lazily, so ``import coe`` stays light)::

    from coe import Engine, Pipeline, load_config
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "Pipeline", "load_config", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from coe.engine import Engine

        return Engine
    if name == "Pipeline":
        from coe.pipeline import Pipeline

        return Pipeline
    if name == "load_config":
        from coe.config import load_config

        return load_config
    raise AttributeError(f"module 'coe' has no attribute {name!r}")
