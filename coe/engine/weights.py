"""Where a base model's files come from, and how they become a :class:`~coe.engine.model.Transformer`.

Three sources, one result (an HF-format folder: config.json, safetensors, tokenizer files):
- a local folder, used as is (single or sharded safetensors);
- a hub id, fetched with ``huggingface_hub.snapshot_download`` restricted to safetensors, JSON
  and tokenizer files, so no pickle is ever downloaded;
- a ``.gguf`` file, dequantized once by transformers' GGUF reader and cached as such a folder under
  ``$COE_CACHE_DIR`` (default ``~/.cache/coe``) in ``gguf/<sha256 prefix>/``, keyed by the file's
  content hash, so the second load reads plain safetensors in a second or two.

Only safetensors weights are read: a folder with pickled weights alone is refused.
This module knows nothing about adapters, requests or scheduling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from coe.errors import ConfigError

logger = logging.getLogger("coe.engine")

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Everything a model needs except weights in pickle formats.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class ModelFiles:
    """A resolved base model.

    Args:
        path: the HF-format folder holding config.json, safetensors and tokenizer files.
        source: what the user gave (folder, hub id or .gguf path; the embedded GGUF for None).
        names: names that identify this model, for checking an adapter's ``base_model_name_or_path``.
        gguf: the GGUF file ``path`` was converted from, or None (its quantized blocks serve
            few-row steps: ``coe.engine.quantized``).
    """

    path: Path
    source: str
    names: tuple[str, ...]
    gguf: Path | None = None


def cache_root() -> Path:
    """Root of coe's caches: ``$COE_CACHE_DIR`` or ``~/.cache/coe``."""
    return Path(os.environ.get("COE_CACHE_DIR") or Path.home() / ".cache" / "coe")


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> fp32 on CPU, bf16 on CUDA; else a ``torch.dtype`` or its name."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype: {dtype} is not supported; expected float32, bfloat16 or float16", param="dtype")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"dtype: {dtype!r} is not a dtype; expected 'auto', 'float32', 'bfloat16', 'float16' or a torch.dtype", param="dtype")


def resolve_device(device: Any) -> torch.device:
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device: {device!r} is not a device; expected 'auto', 'cpu', 'cuda' or 'cuda:N'", param="device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for CUDA but torch sees no GPU; use 'cpu' or 'auto'", param="device")
    return dev


def resolve_model(model: str | os.PathLike[str] | None, *, revision: str | None = None) -> ModelFiles:
    """Turn a folder, hub id, ``.gguf`` path or None (the embedded SmolLM2) into an HF folder.

    Raises:
        ConfigError: the path does not exist, holds no usable model, or the hub id cannot be fetched.
    """
    from coe.embedded import embedded_gguf_path

    if model is None:
        gguf = Path(embedded_gguf_path())
        return ModelFiles(gguf_to_hf_dir(gguf), str(gguf), ("SmolLM2-135M-Instruct", gguf.name), gguf)
    src = str(model)
    p = Path(os.path.expanduser(src))
    if p.is_file() and p.suffix.lower() == ".gguf":
        return ModelFiles(gguf_to_hf_dir(p), src, (p.name, _gguf_name(p)), p)
    if p.is_dir():
        _check_hf_dir(p, src)
        return ModelFiles(p, src, (p.name, _config_name(p)))
    if p.exists():
        raise ConfigError(f"base_model.model: {src!r} is a file but not a .gguf; give a model folder, a hub id or a .gguf file", param="base_model.model")
    if HUB_ID_RE.match(src) and not src.startswith((".", "/", "~")):
        return ModelFiles(_download(src, revision), src, (src,))
    raise ConfigError(
        f"base_model.model: {src!r} not found: expected a local folder with config.json and *.safetensors, "
        "a .gguf file, or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'",
        param="base_model.model",
    )


def _check_hf_dir(p: Path, src: str) -> None:
    if not (p / "config.json").is_file():
        raise ConfigError(f"base_model.model: {src!r} has no config.json; expected a transformers model folder", param="base_model.model")
    if not any(p.glob("*.safetensors")):
        pickles = [f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES]
        why = f"it only has pickled weights ({', '.join(sorted(pickles)[:3])}), which coe never loads" if pickles else "it has no weights"
        raise ConfigError(
            f"base_model.model: {src!r} has no *.safetensors: {why}; save the model with "
            "`model.save_pretrained(dir, safe_serialization=True)`",
            param="base_model.model",
        )


def _config_name(p: Path) -> str:
    try:
        return str(json.loads((p / "config.json").read_text()).get("_name_or_path") or p.name)
    except (OSError, ValueError):
        return p.name


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # hub errors come in many classes (offline, 404, auth, network)
        raise ConfigError(
            f"base_model.model: could not fetch hub model {repo_id!r}: {exc}. Check the id and network "
            "(HF_HUB_OFFLINE=1 allows only cached models), or give a local folder",
            param="base_model.model",
        ) from exc
    _check_hf_dir(path, repo_id)
    return path


# --------------------------------------------------------------------------- GGUF


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_cache_dir(gguf: Path) -> Path:
    """The cache folder for one GGUF file, named after its content hash."""
    return cache_root() / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:20]}"


def gguf_to_hf_dir(gguf: Path) -> Path:
    """The HF folder converted from ``gguf``: read from the cache, or converted once and cached.

    The conversion is transformers' own GGUF loader (dequantized to fp32), written with
    safetensors plus the tokenizer and its chat template. It is atomic (a temporary folder renamed
    into place), so an interrupted conversion is never mistaken for a finished one.
    """
    out = gguf_cache_dir(gguf)
    if (out / "coe-gguf.json").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting %s to safetensors once (about a minute on 2 cores); cached in %s", gguf.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tied = bool(getattr(hf.config, "tie_word_embeddings", False))
        state = {k: v.detach().contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = _gguf_name(gguf)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        hf.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "coe-gguf.json").write_text(json.dumps({"source": str(gguf), "sha256": file_sha256(gguf)}))
        del hf, state
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "coe-gguf.json").is_file():
                raise
    except Exception as exc:
        raise ConfigError(f"base_model.model: could not convert GGUF {str(gguf)!r}: {exc}", param="base_model.model") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _gguf_name(gguf: Path) -> str:
    return re.sub(r"([.-](q\d\w*|f16|f32|bf16))?$", "", gguf.stem, flags=re.I)


# --------------------------------------------------------------------------- tensors


def tensor_reader(path: Path) -> tuple[Callable[[str], torch.Tensor | None], Callable[[], None]]:
    """A ``get(name)`` over the folder's safetensors (sharded index or all ``*.safetensors``).

    Returns ``(get, close)``; files are memory-mapped and each tensor is read on demand.
    """
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
        weight_map = None
    handles = {}
    where: dict[str, str] = {}
    for f in files:
        try:
            handles[f] = safe_open(str(path / f), framework="pt")
        except Exception as exc:
            raise ConfigError(f"base_model.model: {path / f} is not a readable safetensors file: {exc}", param="base_model.model") from exc
        if weight_map is None:
            for k in handles[f].keys():
                where[k] = f
    if weight_map is not None:
        where = dict(weight_map)

    def get(name: str) -> torch.Tensor | None:
        f = where.get(name)
        return None if f is None else handles[f].get_tensor(name)

    def close() -> None:
        handles.clear()

    return get, close


def load_model(path: Path, *, dtype: torch.dtype, device: torch.device, max_seq_len: int | None = None,
               gguf: Path | None = None, block_weights: bool = True) -> tuple[Any, Any]:
    """Build the engine's model from an HF folder.

    Args:
        path: the folder (config.json + safetensors).
        dtype / device: of the weights.
        max_seq_len: positions to support; capped at the model's context (and sliding window).
        gguf: the GGUF file ``path`` was converted from (``path`` is then its cache folder).
        block_weights: with ``gguf``, on a CPU in float32, also keep the file's Q4_1/Q8_0
            blocks for few-row steps (``Transformer.attach_blocks``; the same weights).

    Returns:
        ``(model, hf_config)``: a :class:`~coe.engine.model.Transformer` and the transformers config.

    Raises:
        ConfigError: unsupported architecture, missing or mis-shaped tensors.
    """
    from transformers import AutoConfig

    from coe.engine.model import ModelArgs, Transformer, rope_inv_freq

    try:
        hf_config = AutoConfig.from_pretrained(str(path))
        args = ModelArgs.from_hf(hf_config)
        inv_freq, rope_scaling = rope_inv_freq(hf_config)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"base_model.model: {path}/config.json: {exc}", param="base_model.model") from exc
    limit = model_context(args)
    max_len = min(max_seq_len or limit, limit)
    get, close = tensor_reader(path)
    try:
        model = Transformer.from_state(args, get, inv_freq=inv_freq, rope_scaling=rope_scaling,
                                       max_seq_len=-(-max_len // 8) * 8, dtype=dtype, device=device)
    except ValueError as exc:
        raise ConfigError(f"base_model.model: {path}: {exc}", param="base_model.model") from exc
    finally:
        close()
    if gguf is not None and block_weights and model._cpu32:
        from coe.engine.quantized import gguf_blocks, unavailable_reason

        why = unavailable_reason()
        if why is not None:
            logger.warning("decode steps run on float32 weights only: the block kernels are unavailable (%s)", why)
        else:
            report = model.attach_blocks(gguf_blocks(gguf, path))
            if report["rejected"]:
                logger.warning("%d matrices of %s did not match their float32 weights bit for bit and run in float32: %s",
                               len(report["rejected"]), gguf.name, ", ".join(report["rejected"][:4]))
            logger.info("%d matrices also kept as GGUF blocks for few-row steps (%.0f MB)", report["matrices"], report["bytes"] / 2**20)
    return model, hf_config


def model_context(args: Any) -> int:
    """The longest sequence the model supports: its context, or its sliding window if smaller
    (the engine does not implement windowed attention, so it stops at the window)."""
    limit = args.max_position_embeddings
    if args.sliding_window:
        limit = min(limit, args.sliding_window)
    return limit
