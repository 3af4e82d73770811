"""The embedded base model for training and measuring adapters, converted once and cached.

transformers loads ``SmolLM2-135M-Instruct.Q4_1.gguf`` with ``gguf_file=`` by dequantizing every
tensor (about 35-100 s on 2 shared cores). Training and scoring load the base many times, so the
first load writes a plain fp32 HF folder (config, safetensors, tokenizer with its chat template)
under a cache dir keyed by the GGUF's path, size and mtime; later loads read that folder in a
few seconds. The values are the dequantized GGUF weights bit for bit, so an adapter trained on
the cached copy serves identically on anything that dequantizes the same file (checked: the
engine's own GGUF cache, ``coe.engine.weights``, holds bit-identical tensors and tokenizer). It
is kept separate so that training never imports the engine package (and its kernels).

This module knows nothing about tasks, LoRA or training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted models are cached: ``$COE_CACHE_DIR`` or ``~/.cache/coe``."""
    return Path(os.environ.get("COE_CACHE_DIR") or Path.home() / ".cache" / "coe")


def _cache_dir_for(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "train-base" / f"{gguf_path.stem}-fp32-{key}"


def converted_base_dir(gguf_path: str | None = None) -> Path:
    """A plain HF folder holding the dequantized fp32 GGUF model; converts on first use.

    Args:
        gguf_path: the GGUF file (default: the embedded SmolLM2-135M-Instruct).

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer``.
    """
    from coe.embedded import embedded_gguf_path

    src = Path(gguf_path or embedded_gguf_path())
    out = _cache_dir_for(src)
    if (out / "done").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an fp32 HF folder in %s (once)", src.name, out)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # save_pretrained refuses a model that carries a GGUF quantization_config, so rebuild a
    # plain model from the same config and copy the (already dequantized) weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may be absent from the state dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    assert not missing and not unexpected, f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}"
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "done").write_text(str(src) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "done").is_file():
            raise
    return out


def load_base(model: str | None = None, *, dtype: torch.dtype = torch.float32):
    """Load a base model and its tokenizer.

    Args:
        model: ``None`` for the embedded SmolLM2-135M-Instruct, a ``.gguf`` file (both read
            through the converted fp32 cache), or a local HF dir / hub id.
        dtype: model dtype (default fp32, the serving dtype on CPU).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(converted_base_dir(model)) if model is None or str(model).endswith(".gguf") else str(model)
    tok = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    lm.eval()
    return lm, tok
