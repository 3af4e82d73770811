"""The default router: a contrastively fine-tuned body with a logistic-regression head.

The recipe that scored best on CLINC150 val (``eval/README.md``, the ablation table):

1. fine-tune a private copy of the body for ``training.finetune_steps`` steps with the
   in-batch supervised contrastive loss of ``routers.contrastive`` (class-balanced batches over
   ``expert::topic`` classes; the fallback expert's rows are negatives only, because
   out-of-scope messages share no meaning with each other);
2. fit multinomial logistic regression (``training.logreg_c``) on the tuned embeddings, over
   the same classes, with the fallback's rows as one class weighted ``training.fallback_weight``
   (so a few out-of-scope examples teach the head where "none of these" lies without pulling
   in-scope messages towards the fallback);
3. sum class probabilities per expert, as every router here does.

It is SetFit's idea (contrastive fine-tuning, then a simple head) with a loss that contrasts
every pair in a batch at once, so a few dozen steps fit the CPU budget that SetFit's sampled
pairs do not (``routers.contrastive`` says why). The tuned body is saved next to the head
(``body/``, sentence-transformers format) and loaded from there; ``training.quantize: int8``
routes with an int8 copy of it, the head fitted on that copy's embeddings.

Knows the config's training fields and the fallback's name; nothing about rules or thresholds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from coe.config import RouterTrainingConfig
from coe.errors import RouterError
from routers.base import RouterInfo, read_info
from routers.baselines import LogRegRouter
from routers.contrastive import ContrastiveSettings, fine_tune_body
from routers.embeddings import EMBEDDED_BODY, encode, load_body, quantize_body
from routers.labels import class_label, ordered_unique

BODY_DIR = "body"


class ContrastiveRouter(LogRegRouter):
    """Contrastive body fine-tuning + logistic-regression head, behind the Router protocol.

    Args:
        body: the pre-trained body's ``body_spec`` string (recorded; the tuned copy is saved).
        training: ``router.training`` of the config.
        seed: seeds the batches, the optimizer's dropout and the head.
        fallback: the config's fallback expert: its rows are negatives while fine-tuning and
            weighted ``training.fallback_weight`` in the head. ``None``: no such rows.

    Example:
        >>> r = ContrastiveRouter(fallback="general").fit(texts, labels)   # doctest: +SKIP
        >>> r.predict_proba(["count the users table"])                     # doctest: +SKIP
    """

    kind = "contrastive"

    def __init__(
        self, body: str = EMBEDDED_BODY, training: RouterTrainingConfig | None = None, seed: int = 42, fallback: str | None = None
    ) -> None:
        super().__init__(body=body, training=training, seed=seed)
        self.fallback = fallback
        self._model: Any = None  # the tuned SentenceTransformer (float32)
        self._infer: Any = None  # what routing encodes with: the tuned body or its int8 copy
        self._sample_weight: np.ndarray | None = None

    def settings(self) -> ContrastiveSettings:
        """The fine-tuning settings from ``router.training``."""
        t = self.training
        return ContrastiveSettings(
            steps=t.finetune_steps,
            batch_size=t.finetune_batch_size,
            learning_rate=t.finetune_learning_rate,
            temperature=t.finetune_temperature,
        )

    @property
    def encoder(self) -> Any:
        """The sentence-transformers model that routing encodes with (the tuned body or its int8 copy)."""
        if self._infer is None:
            raise RouterError("contrastive router: not trained; call fit() or load a saved router")
        return self._infer

    def embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Normalized embeddings ``[n, dim]`` from the tuned body (int8 copy if configured)."""
        emb = encode(self.encoder, texts, show_progress=show_progress)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def fit(self, texts: Sequence[str], labels: Sequence[str], topics: Sequence[str | None] | None = None) -> "ContrastiveRouter":
        """Fine-tune a copy of the body on ``texts``, then fit the head on its embeddings.

        Args:
            texts: training messages.
            labels: the expert of each message (rows of ``fallback`` are out-of-scope examples).
            topics: the topic of each message, or ``None``.

        Returns:
            ``self``, trained.
        """
        t = self.training
        topic_list = list(topics) if topics is not None else [None] * len(texts)
        if not (len(texts) == len(labels) == len(topic_list)):
            raise ValueError(f"fit: {len(texts)} texts, {len(labels)} labels and {len(topic_list)} topics; expected equal lengths")
        classes = [class_label(e, tp, t.use_topics) for e, tp in zip(labels, topic_list)]
        if len(ordered_unique(classes)) < 2:
            raise RouterError(f"contrastive router: needs at least two classes to train, found {list(ordered_unique(classes))}")
        negatives = sorted({c for c, e in zip(classes, labels) if e == self.fallback})
        started = time.perf_counter()
        model = load_body(self.body, t.max_length)
        stats = fine_tune_body(
            model, list(texts), classes, negative_classes=negatives, settings=self.settings(), seed=self.seed, show_progress=t.show_progress
        )
        self._set_body(model)
        self._sample_weight = np.array([t.fallback_weight if e == self.fallback else 1.0 for e in labels])
        try:
            super().fit(texts, labels, topics)
        finally:
            self._sample_weight = None
        self.info = dataclasses.replace(
            self.info,
            extra={
                **self.info.extra,
                "fallback": self.fallback,
                "finetune": stats,
                "train_seconds": round(time.perf_counter() - started, 2),
            },
        )
        return self

    def _set_body(self, model: Any) -> None:
        model.eval()
        self._model = model
        self._infer = quantize_body(model) if self.training.quantize == "int8" else model

    def _fit_head(self, emb: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        return self._fit_logreg(emb, y, self._sample_weight)

    def save(self, path: str) -> None:
        """Save the head (``head.npz``), ``router.json`` and the tuned body (``body/``)."""
        if self._model is None:
            raise RouterError("contrastive router: nothing to save; train it first")
        super().save(path)
        self._model.save(str(Path(path) / BODY_DIR))

    @classmethod
    def load(cls, path: str, info: RouterInfo | None = None) -> "ContrastiveRouter":
        """Load a router saved by ``save`` (the tuned body from ``path/body``, local files only)."""
        info = info or read_info(path)
        body_dir = Path(path) / BODY_DIR
        if not (body_dir / "modules.json").is_file():
            raise RouterError(f"router at {path}: the tuned body {body_dir} is missing; retrain it with `coe train-router`")
        router = super().load(path, info)
        router.fallback = info.extra.get("fallback")
        router._set_body(load_body(str(body_dir), router.training.max_length))
        return router
