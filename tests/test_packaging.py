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


def test_hugging_face_kernels_beside_coe_is_a_clear_error(monkeypatch):
    # transformers >= 5.25 pulls in Hugging Face's `kernels`, whose import name is our kernels/.
    import coe
    from importlib import metadata

    class Dist:
        version = "0.19.1"
        metadata = {"Name": "kernels"}

        def locate_file(self, _):
            return "/venv/site-packages"

    def fake(name):
        if name == "kernels":
            return Dist()
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", fake)
    try:
        coe._refuse_foreign_kernels()
    except ImportError as exc:
        msg = str(exc)
    else:
        raise AssertionError("no error beside Hugging Face's kernels")
    assert "'kernels' 0.19.1" in msg and "pip uninstall kernels" in msg and "transformers < 5.25" in msg
    monkeypatch.undo()
    coe._refuse_foreign_kernels()  # this venv has none
