"""The SetFit router: a few-shot classifier over a fine-tuned sentence-transformers body.

Training is SetFit's own (``setfit.Trainer``): contrastive fine-tuning of the body on pairs
of examples, then a logistic-regression head on the tuned embeddings (Tunstall et al. 2022,
"Efficient Few-Shot Learning Without Prompts"). What this module adds around it:

- labels are expert names; with topics, rows train as ``expert::topic`` classes and the
  router sums their probabilities per expert (``routers.labels``);
- ``predict_proba`` columns are mapped from the head's ``classes_`` explicitly, never assumed
  to follow the order labels were given in (setfit issues 462/587);
- training is seeded (``transformers.set_seed`` + the head's ``random_state``) and writes
  nothing to the cwd: the Trainer's ``output_dir`` is a temporary dir, with no checkpoints;
- with ``training.quantize: int8`` routing runs an int8 copy of the tuned body and the head
  is refitted on its embeddings (the saved body stays float32; it is quantized again at load);
- inference skips ``SetFitModel.predict_proba`` and ``SentenceTransformer.encode`` in
  favour of ``routers.embeddings.encode`` (same modules, less per-call overhead), then the
  sklearn head, so routing costs little more than the body's own forward pass.

Saved with SetFit's ``save_pretrained`` plus ``router.json`` (``RouterInfo``); loaded with
``SetFitModel.from_pretrained``. This module knows nothing about rules or thresholds.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from coe.config import RouterTrainingConfig
from coe.errors import RouterError
from routers.base import RouterInfo, read_info, save_info
from routers.embeddings import EMBEDDED_BODY, embedding_dim, encode, load_body, quantize_body
from routers.labels import class_label, expert_columns, expert_of, ordered_unique

logger = logging.getLogger(__name__)


class SetFitRouter:
    """SetFit (contrastive body fine-tuning + logistic-regression head) behind the Router protocol.

    Args:
        body: the body's ``body_spec`` string (``embedded:all-MiniLM-L6-v2``, a dir or a hub id).
        training: hyper-parameters (``router.training`` of the config).
        seed: training seed; the same seed, data and machine give the same router.

    Example:
        >>> r = SetFitRouter(seed=0).fit(["select all rows", "hi!"], ["sql", "general"])
        >>> r.experts, r.predict_proba(["count the users table"]).shape
        (('sql', 'general'), (1, 2))
    """

    kind = "setfit"

    def __init__(self, body: str = EMBEDDED_BODY, training: RouterTrainingConfig | None = None, seed: int = 42) -> None:
        self.body = body
        self.training = training or RouterTrainingConfig()
        self.seed = seed
        self.model: Any = None  # setfit.SetFitModel once trained or loaded
        self.classes: tuple[str, ...] = ()
        self.info = RouterInfo(kind=self.kind, experts=(), body=body, seed=seed)
        self._columns: np.ndarray | None = None  # [n_head_classes, n_experts]
        self._int8_body: Any = None  # inference copy when training.quantize == "int8"

    @property
    def experts(self) -> tuple[str, ...]:
        return self.info.experts

    # ------------------------------------------------------------------ training

    def fit(self, texts: Sequence[str], labels: Sequence[str], topics: Sequence[str | None] | None = None) -> "SetFitRouter":
        """Train on ``texts`` labelled with expert names (and optional per-row topics).

        Args:
            texts: training messages.
            labels: the expert of each message.
            topics: the topic of each message (``None`` for none); used when
                ``training.use_topics`` is set.

        Returns:
            ``self``, trained.
        """
        from datasets import Dataset
        from setfit import SetFitModel, Trainer, TrainingArguments
        from sklearn.linear_model import LogisticRegression
        from transformers import set_seed

        t = self.training
        topics = list(topics) if topics is not None else [None] * len(texts)
        if not (len(texts) == len(labels) == len(topics)):
            raise ValueError(f"fit: {len(texts)} texts, {len(labels)} labels and {len(topics)} topics; expected equal lengths")
        classes_per_row = [class_label(e, tp, t.use_topics) for e, tp in zip(labels, topics)]
        experts = ordered_unique(labels)
        classes = ordered_unique(classes_per_row)
        if len(classes) < 2:
            raise RouterError(f"setfit router: needs at least two classes to train, found {list(classes)}")

        started = time.perf_counter()
        set_seed(self.seed)
        body = load_body(self.body, t.max_length)
        if t.end_to_end:
            # SetFit's differentiable head trains on integer ids; column i is classes[i].
            from setfit.modeling import SetFitHead

            head = SetFitHead(in_features=embedding_dim(body), out_features=len(classes), device="cpu")
            model = SetFitModel(model_body=body, model_head=head, labels=list(classes))
            y: list[Any] = [classes.index(c) for c in classes_per_row]
        else:
            head = LogisticRegression(C=t.logreg_c, max_iter=1000, random_state=self.seed)
            model = SetFitModel(model_body=body, model_head=head)
            y = classes_per_row
        with tempfile.TemporaryDirectory(prefix="coe-setfit-") as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                num_iterations=t.num_iterations,
                num_epochs=t.num_epochs,
                batch_size=t.batch_size,
                body_learning_rate=t.body_learning_rate,
                head_learning_rate=t.head_learning_rate,
                sampling_strategy=t.sampling_strategy,
                max_steps=t.max_steps,
                max_length=t.max_length,
                end_to_end=t.end_to_end,
                seed=self.seed,
                show_progress_bar=t.show_progress,
                save_strategy="no",
                eval_strategy="no",
                report_to="none",
                logging_strategy="no",
                load_best_model_at_end=False,
            )
            trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": list(texts), "label": y}))
            trainer.train()
        model.model_body.eval()
        self.model = model
        if t.quantize == "int8":
            # Refit the head on the int8 body's embeddings: those are what it sees when routing.
            self._int8_body = quantize_body(model.model_body)
            model.model_head.fit(self.embed(texts, show_progress=t.show_progress), y)
        self.classes = classes
        self.info = RouterInfo(
            kind=self.kind,
            experts=experts,
            body=self.body,
            seed=self.seed,
            n_train=len(texts),
            extra={
                "classes": list(classes),
                "training": dataclasses.asdict(t),
                "train_seconds": round(time.perf_counter() - started, 2),
            },
        )
        self._columns = expert_columns(self._head_classes(), experts)
        return self

    # ------------------------------------------------------------------ inference

    def _head_classes(self) -> list[str]:
        """The class of each head probability column, in the head's own order."""
        head = self.model.model_head
        raw = getattr(head, "classes_", None)
        if raw is None:  # SetFit's differentiable head: column i is integer label i
            raw = range(len(self.classes))
        return [self.classes[int(c)] if isinstance(c, (int, np.integer)) else str(c) for c in raw]

    def head_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Raw head probabilities ``[n, n_head_classes]`` in the head's own column order."""
        head = self.model.model_head
        if hasattr(head, "classes_"):
            # float64 in, so rows sum to 1 to double precision (sklearn keeps float32 inputs' dtype)
            return np.asarray(head.predict_proba(embeddings.astype(np.float64)), dtype=np.float64)
        import torch

        with torch.inference_mode():
            return head.predict_proba(torch.from_numpy(embeddings)).double().numpy()

    @property
    def encoder(self) -> Any:
        """The sentence-transformers model that routing encodes with (the tuned body or its int8 copy)."""
        if self.model is None:
            raise RouterError("setfit router: not trained; call fit() or load a saved router")
        return self._int8_body if self._int8_body is not None else self.model.model_body

    def embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """The tuned body's embeddings of ``texts`` (what the head sees)."""
        emb = encode(self.encoder, texts, show_progress=show_progress)
        if self.model.normalize_embeddings:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), len(self.experts)]`` per-expert probabilities (rows sum to 1)."""
        if self.model is None or self._columns is None:
            raise RouterError("setfit router: not trained; call fit() or load a saved router")
        if len(texts) == 0:
            return np.zeros((0, len(self.experts)))
        return self.head_proba(self.embed(texts)) @ self._columns

    # ------------------------------------------------------------------ persistence

    def save(self, path: str) -> None:
        """Save with SetFit's ``save_pretrained`` plus ``router.json``."""
        if self.model is None:
            raise RouterError("setfit router: nothing to save; train it first")
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        save_info(path, self.info)

    @classmethod
    def load(cls, path: str, info: RouterInfo | None = None) -> "SetFitRouter":
        """Load a router saved by ``save`` (SetFit's ``from_pretrained``, local files only)."""
        from setfit import SetFitModel

        info = info or read_info(path)
        training = RouterTrainingConfig(**{
            k: v for k, v in info.extra.get("training", {}).items() if k in {f.name for f in dataclasses.fields(RouterTrainingConfig)}
        })
        router = cls(body=info.body, training=training, seed=info.seed)
        router.model = SetFitModel.from_pretrained(str(path), local_files_only=True, device="cpu")
        router.model.model_body.max_seq_length = training.max_length
        router.model.model_body.eval()
        if training.quantize == "int8":
            router._int8_body = quantize_body(router.model.model_body)
        router.classes = tuple(info.extra.get("classes") or info.experts)
        router.info = info
        head_classes = router._head_classes()
        unknown = sorted({expert_of(c) for c in head_classes} - set(info.experts))
        if unknown:
            raise RouterError(f"router at {path}: its classifier has classes for {unknown}, which router.json does not list; retrain it")
        router._columns = expert_columns(head_classes, info.experts)
        return router

