"""Embedding baselines behind the Router protocol, for the evaluation to compare SetFit against.

All three embed with a frozen, shared body (``routers.embeddings.shared_body``: loaded once
per process however many routers use it) and differ only in the head:

- ``CentroidRouter``: one normalized mean embedding per class, softmax over cosine
  similarities divided by ``training.temperature`` (semantic-router's route-by-similarity,
  made into probabilities so the same threshold logic applies);
- ``LogRegRouter``: scikit-learn logistic regression on the embeddings (SetFit without the
  contrastive fine-tuning: the ablation that shows what fine-tuning buys);
- ``KnnRouter``: the ``training.knn_k`` most similar training examples vote, weighted by
  ``exp(similarity / temperature)``.

With topics, classes are ``expert::topic`` and probabilities are summed per expert, exactly
as in the SetFit router. Heads are saved as plain arrays (``head.npz``, no pickle) next to
``router.json``; the body is referenced by its ``body_spec``, never copied.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from coe.config import RouterTrainingConfig
from coe.errors import RouterError
from routers.base import RouterInfo, read_info, save_info
from routers.embeddings import EMBEDDED_BODY, encode, shared_body
from routers.labels import class_label, expert_columns, ordered_unique, softmax

HEAD_FILE = "head.npz"


class EmbeddingRouter:
    """Shared machinery: labels, the frozen body, persistence. Subclasses implement the head.

    Args:
        body: the body's ``body_spec`` string.
        training: ``router.training`` of the config (``temperature``, ``knn_k``, ``logreg_c``,
            ``max_length``, ``use_topics``, ``show_progress``, ``quantize`` are read here).
        seed: recorded, and used by heads that have randomness.
    """

    kind = "embedding"

    def __init__(self, body: str = EMBEDDED_BODY, training: RouterTrainingConfig | None = None, seed: int = 42) -> None:
        self.body = body
        self.training = training or RouterTrainingConfig()
        self.seed = seed
        self.classes: tuple[str, ...] = ()
        self.arrays: dict[str, np.ndarray] = {}
        self.info = RouterInfo(kind=self.kind, experts=(), body=body, seed=seed)
        self._columns: np.ndarray | None = None

    @property
    def experts(self) -> tuple[str, ...]:
        return self.info.experts

    @property
    def encoder(self):
        """The sentence-transformers model that routing encodes with (the shared frozen body)."""
        return shared_body(self.body, self.training.max_length, self.training.quantize)

    def embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Normalized embeddings ``[n, dim]`` from the shared frozen body."""
        emb = encode(self.encoder, texts, show_progress=show_progress)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def fit(self, texts: Sequence[str], labels: Sequence[str], topics: Sequence[str | None] | None = None) -> "EmbeddingRouter":
        """Embed ``texts`` and fit the head on their (expert or ``expert::topic``) classes.

        Args:
            texts: training messages.
            labels: the expert of each message.
            topics: the topic of each message, or ``None``.

        Returns:
            ``self``, trained.
        """
        topics = list(topics) if topics is not None else [None] * len(texts)
        if not (len(texts) == len(labels) == len(topics)):
            raise ValueError(f"fit: {len(texts)} texts, {len(labels)} labels and {len(topics)} topics; expected equal lengths")
        y = [class_label(e, tp, self.training.use_topics) for e, tp in zip(labels, topics)]
        classes = ordered_unique(y)
        if len(classes) < 2:
            raise RouterError(f"{self.kind} router: needs at least two classes to train, found {list(classes)}")
        started = time.perf_counter()
        emb = self.embed(texts, show_progress=self.training.show_progress)
        self.classes = classes
        self.arrays = self._fit_head(emb, np.array([classes.index(c) for c in y]))
        experts = ordered_unique(labels)
        self.info = RouterInfo(
            kind=self.kind, experts=experts, body=self.body, seed=self.seed, n_train=len(texts),
            extra={
                "classes": list(classes),
                "training": dataclasses.asdict(self.training),
                "train_seconds": round(time.perf_counter() - started, 2),
            },
        )
        self._columns = expert_columns(self.classes, experts)
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), len(self.experts)]`` per-expert probabilities (rows sum to 1)."""
        if self._columns is None:
            raise RouterError(f"{self.kind} router: not trained; call fit() or load a saved router")
        if len(texts) == 0:
            return np.zeros((0, len(self.experts)))
        return self._head_proba(self.embed(texts)) @ self._columns

    def save(self, path: str) -> None:
        """Save the head arrays (``head.npz``) and ``router.json``; the body is referenced."""
        if self._columns is None:
            raise RouterError(f"{self.kind} router: nothing to save; train it first")
        Path(path).mkdir(parents=True, exist_ok=True)
        np.savez(Path(path) / HEAD_FILE, **self.arrays)
        save_info(path, self.info)

    @classmethod
    def load(cls, path: str, info: RouterInfo | None = None) -> "EmbeddingRouter":
        """Load a router saved by ``save``."""
        info = info or read_info(path)
        fields = {f.name for f in dataclasses.fields(RouterTrainingConfig)}
        training = RouterTrainingConfig(**{k: v for k, v in info.extra.get("training", {}).items() if k in fields})
        router = cls(body=info.body, training=training, seed=info.seed)
        with np.load(Path(path) / HEAD_FILE, allow_pickle=False) as data:
            router.arrays = {k: data[k] for k in data.files}
        router.classes = tuple(info.extra.get("classes") or info.experts)
        router.info = info
        router._columns = expert_columns(router.classes, info.experts)
        return router

    # Subclasses: arrays from (normalized embeddings [n, dim], class ids [n]); probabilities from arrays.
    def _fit_head(self, emb: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _head_proba(self, emb: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class CentroidRouter(EmbeddingRouter):
    """Nearest centroid: softmax over cosine similarity to each class's mean embedding."""

    kind = "centroid"

    def _fit_head(self, emb: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        centroids = np.stack([emb[y == k].mean(axis=0) for k in range(len(self.classes))])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        return {"centroids": centroids.astype(np.float32)}

    def _head_proba(self, emb: np.ndarray) -> np.ndarray:
        sims = emb @ self.arrays["centroids"].T
        return softmax(sims.astype(np.float64) / self.training.temperature)


class LogRegRouter(EmbeddingRouter):
    """Multinomial logistic regression on frozen embeddings (scikit-learn, lbfgs).

    Only the learned ``coef_``/``intercept_`` are kept; probabilities are recomputed with
    the same softmax scikit-learn uses for multinomial models, so no estimator is pickled.
    Class ids are ``0..K-1`` in ``self.classes`` order, and ``classes_`` (sorted ids) is
    checked to be exactly that, so columns cannot be permuted.
    """

    kind = "logreg"

    def _fit_head(self, emb: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        return self._fit_logreg(emb, y)

    def _fit_logreg(self, emb: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=self.training.logreg_c, max_iter=2000, random_state=self.seed)
        clf.fit(emb, y, sample_weight=sample_weight)
        if list(clf.classes_) != list(range(len(self.classes))):
            raise AssertionError(f"logreg head classes {clf.classes_} are not 0..{len(self.classes) - 1}")
        coef, intercept = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:  # binary: sklearn keeps one row for class 1; make it a 2-way softmax
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        return {"coef": coef.astype(np.float64), "intercept": intercept.astype(np.float64)}

    def _head_proba(self, emb: np.ndarray) -> np.ndarray:
        return softmax(emb.astype(np.float64) @ self.arrays["coef"].T + self.arrays["intercept"])


class KnnRouter(EmbeddingRouter):
    """k nearest training examples vote, each with weight ``exp(cosine / temperature)``."""

    kind = "knn"

    def _fit_head(self, emb: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        return {"embeddings": emb.astype(np.float32), "class_ids": y.astype(np.int64)}

    def _head_proba(self, emb: np.ndarray) -> np.ndarray:
        train, ids = self.arrays["embeddings"], self.arrays["class_ids"]
        k = min(self.training.knn_k, len(ids))
        sims = (emb @ train.T).astype(np.float64)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / self.training.temperature)
        out = np.zeros((len(emb), len(self.classes)))
        np.add.at(out, (np.repeat(np.arange(len(emb)), k), ids[top].ravel()), weights.ravel())
        return out / out.sum(axis=1, keepdims=True)
