"""Sentence embeddings for the routers: body resolution, a per-process body cache, fast encode.

- ``resolve_body`` turns ``router.body`` (``null``, a config-relative dir, or a hub id) into
  something ``SentenceTransformer`` can load, and ``body_spec`` into the portable string a
  saved router records (the embedded default is stored as ``embedded:all-MiniLM-L6-v2``, not
  as a site-packages path, so a router survives a fresh venv).
- ``shared_body`` caches frozen bodies per ``(path, max_length, quantize)``, so several routers
  (centroid, logreg, kNN, an eval sweep) never load the same model twice in one process.
  SetFit fine-tunes its body, so it loads its own copy and never uses this cache.
- ``encode`` is the inference path every router shares: it calls the body's modules directly
  under ``torch.inference_mode`` instead of ``SentenceTransformer.encode``, skipping its
  per-call bookkeeping (modality inference, progress plumbing, conversions). That saves
  roughly 5-10% per single message (``coe bench router``: ``predict_proba`` vs
  ``setfit_predict_proba``); the body's forward pass itself is about 90% of routing time.
- ``quantize_body`` makes the optional int8 inference copy (``router.training.quantize``).

This module knows sentence-transformers and torch; it knows nothing about experts or labels.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from coe.config import CoeConfig
from coe.embedded import embedded_body_path
from coe.errors import RouterError

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

EMBEDDED_BODY = "embedded:all-MiniLM-L6-v2"
"""How a saved router records that it was trained on the embedded default body."""

_cache: dict[tuple[str, int | None, str], "SentenceTransformer"] = {}
_cache_lock = threading.Lock()
_encode_locks: "weakref.WeakKeyDictionary[SentenceTransformer, threading.Lock]" = weakref.WeakKeyDictionary()


def body_spec(config: CoeConfig) -> str:
    """The portable name of the config's body: ``EMBEDDED_BODY``, an absolute dir, or a hub id."""
    body = config.router.body
    if body is None:
        return EMBEDDED_BODY
    local = config.resolve_path(body)
    return str(local) if local.exists() else body


def resolve_body(spec: str) -> str:
    """What ``SentenceTransformer(...)`` loads for a ``body_spec`` string."""
    return embedded_body_path() if spec == EMBEDDED_BODY else spec


def load_body(spec: str, max_length: int | None = None) -> "SentenceTransformer":
    """Load a fresh (trainable) copy of the body named by ``spec`` on the CPU.

    Args:
        spec: a ``body_spec`` string.
        max_length: tokens per text kept by the tokenizer (``None``: the model's own limit).

    Raises:
        RouterError: the body cannot be loaded (missing dir, unknown hub id while offline).
    """
    from sentence_transformers import SentenceTransformer

    target = resolve_body(spec)
    try:
        body = SentenceTransformer(target, device="cpu")
    except Exception as exc:  # noqa: BLE001 - ST raises many types (OSError, ValueError, HF errors)
        hint = "" if Path(target).exists() else " (not a local dir; as a hub id it must be in the local HF cache, since coe runs offline)"
        raise RouterError(
            f"router.body: cannot load sentence-transformers model {target!r}{hint}: {exc}; "
            "set router.body to a sentence-transformers dir or null for the embedded all-MiniLM-L6-v2",
            param="router.body",
        ) from exc
    if max_length is not None:
        body.max_seq_length = max_length
    return body


def quantize_body(body: "SentenceTransformer") -> "SentenceTransformer":
    """An inference-only copy of ``body`` whose ``nn.Linear`` layers use dynamic int8 weights.

    Why: routing one short message is bound by streaming the body's float32 weights (about
    42 MB of linear weights for MiniLM-L6) from memory, not by arithmetic; int8 weights are a
    quarter of that. Activations stay float32 (quantized per call), so no calibration data is
    needed. The copy is deterministic given the weights, so a saved router stores the float32
    body and quantizes again at load.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, but works in the pinned torch
        # 2.13 and needs no extra dependency; the warning would repeat on every router load.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        q = torch.ao.quantization.quantize_dynamic(body, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    return q.eval()


def shared_body(spec: str, max_length: int | None = None, quantize: str = "none") -> "SentenceTransformer":
    """The process-wide frozen copy of the body named by ``spec`` (loaded once, in eval mode).

    Args:
        spec: a ``body_spec`` string.
        max_length: tokens per text; bodies are cached per ``(spec, max_length, quantize)``
            because the limit lives in the tokenizer, and a shared object must never be
            changed per call.
        quantize: ``none`` or ``int8`` (see ``quantize_body``).
    """
    key = (spec, max_length, quantize)
    with _cache_lock:
        body = _cache.get(key)
        if body is None:
            body = load_body(spec, max_length)
            body.eval()
            if quantize == "int8":
                body = quantize_body(body)
            _cache[key] = body
        return body


def embedding_dim(body: "SentenceTransformer") -> int:
    """The body's output dimension (the method was renamed in sentence-transformers 6)."""
    get = getattr(body, "get_embedding_dimension", None) or body.get_sentence_embedding_dimension
    return int(get() or 0)


def encode(
    body: "SentenceTransformer",
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    show_progress: bool = False,
) -> np.ndarray:
    """Embed ``texts`` with ``body`` (its own pooling and normalization modules included).

    Thread-safe: calls on the same body are serialized by a per-body lock, because a fast
    tokenizer shared between threads fails with "Already borrowed" when two calls overlap.
    The body is switched to eval mode (dropout off) on first use if it was left training.

    Args:
        body: a sentence-transformers model; its ``max_seq_length`` truncates the texts.
        texts: the texts; may be empty.
        batch_size: texts per forward pass; batches are formed after sorting by length so
            padding stays small.
        show_progress: a tqdm bar over batches (for training sets, not per request).

    Returns:
        ``[len(texts), dim]`` float32 embeddings, in the order of ``texts``.
    """
    import torch
    from tqdm.auto import tqdm

    dim = embedding_dim(body)
    if not texts:
        return np.zeros((0, dim), dtype=np.float32)
    texts = [str(t) for t in texts]
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), dim), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    bar = tqdm(starts, desc="encoding", unit="batch", disable=not show_progress or len(starts) < 2)
    with _body_lock(body), torch.inference_mode():
        if body.training:
            body.eval()
        for start in bar:
            idx = order[start : start + batch_size]
            features = body.preprocess([texts[i] for i in idx])
            out[idx] = body(features)["sentence_embedding"].float().numpy()
    return out


def _body_lock(body: "SentenceTransformer") -> threading.Lock:
    # Kept outside the module (not an attribute) so bodies stay deep-copyable and picklable.
    with _cache_lock:
        lock = _encode_locks.get(body)
        if lock is None:
            lock = _encode_locks[body] = threading.Lock()
        return lock
