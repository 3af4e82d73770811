"""coe: a Composition-of-Experts LLM server.

Public API (imported lazily, so ``import coe`` stays light)::

    from coe import Engine, Pipeline, load_config
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "Pipeline", "load_config", "__version__"]


def _refuse_foreign_kernels() -> None:
    """Stop with what to do when Hugging Face's ``kernels`` distribution is installed.

    Its import name is ``kernels``, the name of coe's own multi-LoRA kernels package. With both
    present one of them shadows the other: from this repository's folder transformers imports
    ours and fails (``cannot import name 'CUDAProperties' from 'kernels'``), elsewhere coe imports
    theirs (``cannot import name 'LoRAMeta'``). transformers >= 5.25 requires it, so coe pins
    transformers below 5.25, and ``make install`` removes it from coe's venv."""
    from importlib import metadata

    try:
        dist = metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"coe cannot run beside the PyPI package 'kernels' {dist.version} (Hugging Face's hub kernels, installed in "
        f"{dist.locate_file('')}): its import name 'kernels' is also coe's own kernels package, and each would load "
        f"the other's code. Remove it with `python -m pip uninstall kernels` (coe needs transformers < 5.25, which "
        f"does not require it; `make install` does both)."
    )


_refuse_foreign_kernels()


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
