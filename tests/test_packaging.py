"""Packaging invariants: our import roots are ours, and transformers doesn't mistake them."""

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_roots_are_this_repo():
    for name in ("coe", "routers", "kernels", "train", "eval"):
        mod = importlib.import_module(name)
        assert Path(mod.__file__).resolve().is_relative_to(ROOT), f"{name} resolves to {mod.__file__}, not this repo"


def test_transformers_does_not_see_pypi_kernels():
    # `kernels` is also a PyPI package that transformers probes for; ours must not look like it.
    from transformers.utils import import_utils

    assert not import_utils.is_kernels_available()
