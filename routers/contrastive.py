"""Few-shot fine-tuning of a sentence-transformers body with an in-batch supervised contrastive loss.

SetFit's default recipe (``CosineSimilarityLoss`` on sampled pairs) learns one pair at a time:
with 600 examples its default budget is 24,000 pairs (about 1,500 steps), which does not fit
the 10-minute CPU budget of ``coe train-router``. Here every step is a class-balanced batch
(``P`` classes x up to ``per_class`` examples each) and every example in it is contrasted
with every other one: the supervised contrastive loss of Khosla et al. 2020 ("Supervised
Contrastive Learning"; SetFit ships the same loss as ``setfit.losses.SupConLoss``), so a
few dozen steps move the body as far as thousands of sampled pairs.

Hand-written rather than run through SetFit's/sentence-transformers' trainers because:
- out-of-scope rows (the fallback expert's examples) must be negatives only: they share no
  meaning with each other, so pulling them together as one class would be wrong, and the
  library samplers (``GroupByLabelBatchSampler``) drop or group such rows;
- the batches are ``P x K`` by class (every class with all its few examples), which the
  library samplers do not form;
- the loop is a few lines, seeded, writes nothing to disk, and needs no ``datasets``/
  ``accelerate`` round trip per step.

Knows torch and a ``SentenceTransformer`` body; knows nothing about experts, heads or routing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer


@dataclass(frozen=True)
class ContrastiveSettings:
    """How to fine-tune (``router.training.finetune_*`` set steps, batch size, learning rate, temperature).

    Args:
        steps: optimizer steps (one class-balanced batch each), at most.
        batch_size: texts per step, negatives included.
        per_class: examples of each class per batch, at least (all of them when a class has
            fewer); with few classes it grows so that a batch still holds about ``batch_size``
            texts (3 experts of 16 examples: every example in every batch).
        max_epochs: fewer steps when the data is small: no more than this many passes over
            the non-negative rows (a 60-row config needs a handful of steps, not 60).
        learning_rate: AdamW peak learning rate (10% linear warm-up, then linear decay to 0).
        temperature: the loss's softmax temperature over cosine similarities.
        negatives_per_batch: negative-only rows per batch (when there are any).
    """

    steps: int = 60
    batch_size: int = 64
    per_class: int = 4
    max_epochs: float = 8.0
    learning_rate: float = 1e-4
    temperature: float = 0.1
    negatives_per_batch: int = 8


def supcon_loss(z, labels, temperature: float):
    """Supervised contrastive loss over one batch (Khosla et al. 2020, the "L_out" form).

    Args:
        z: ``[B, D]`` L2-normalized embeddings.
        labels: ``[B]`` int64 class ids; a negative id marks a negative-only row, which is
            never an anchor's positive (not even another negative-only row's).
        temperature: softmax temperature over cosine similarities.

    Returns:
        The mean over anchors that have at least one positive of
        ``-mean_{p in P(i)} log softmax_{a != i}(z_i . z_a / T)[p]``; 0 (with a gradient
        path) when no anchor has a positive.

    Semantics:
        for i in batch: P(i) = {p != i : labels[p] == labels[i] >= 0}
            loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip/T) / sum_{a != i} exp(s_ia/T) )
    """
    import torch

    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye & (labels[:, None] >= 0)
    anchors = positive.any(dim=1)
    if not bool(anchors.any()):
        return z.sum() * 0.0
    per_anchor = log_prob.masked_fill(~positive, 0.0).sum(dim=1)[anchors] / positive.sum(dim=1)[anchors]
    return -per_anchor.mean()


def class_balanced_batches(
    class_ids: Sequence[int], negatives: Sequence[int], settings: ContrastiveSettings, seed: int
) -> list[list[int]]:
    """Row indices of each step's batch: ``P`` classes with up to ``per_class`` rows each, plus negatives.

    Classes are visited in shuffled rounds (every class once per round, so with 150 classes
    and ``P`` = 16 a round is 10 steps); within a class, rows are drawn without replacement.
    There are ``settings.steps`` batches, or fewer when ``settings.max_epochs`` passes over
    the rows take fewer.

    Args:
        class_ids: ``class_ids[k]`` is the class id of row ``k``, or -1 for a negative-only row.
        negatives: row indices that are negatives only.
        settings: batch shape and step count.
        seed: the same seed gives the same batches.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for row, c in enumerate(class_ids):
        if c >= 0:
            by_class.setdefault(c, []).append(row)
    classes = sorted(by_class)
    n_neg = min(settings.negatives_per_batch, len(negatives)) if negatives else 0
    room = max(2, settings.batch_size - n_neg)
    per_class = max(settings.per_class, room // max(1, len(classes)))
    per_step = min(max(2, room // per_class), len(classes))
    n_rows = sum(len(v) for v in by_class.values())
    rows_per_step = sum(sorted((min(per_class, len(v)) for v in by_class.values()), reverse=True)[:per_step])
    steps = min(settings.steps, math.ceil(settings.max_epochs * n_rows / max(1, rows_per_step)))
    queue: list[int] = []
    batches = []
    for _ in range(steps):
        if len(queue) < per_step:
            queue += [classes[i] for i in rng.permutation(len(classes)) if classes[i] not in queue]
        picked, queue = queue[:per_step], queue[per_step:]
        batch: list[int] = []
        for c in picked:
            rows = by_class[c]
            take = min(per_class, len(rows))
            batch += [rows[i] for i in rng.choice(len(rows), take, replace=False)]
        if n_neg:
            batch += [int(negatives[i]) for i in rng.choice(len(negatives), n_neg, replace=False)]
        batches.append(batch)
    return batches


def fine_tune_body(
    body: "SentenceTransformer",
    texts: Sequence[str],
    classes: Sequence[str],
    *,
    negative_classes: Sequence[str] = (),
    settings: ContrastiveSettings = ContrastiveSettings(),
    seed: int = 42,
    show_progress: bool = True,
) -> dict[str, float]:
    """Fine-tune ``body`` in place so that rows of a class embed close together and apart from others.

    Args:
        body: a sentence-transformers model whose output is ``sentence_embedding``; it is left
            in eval mode.
        texts: training texts.
        classes: the class of each text (an expert, or ``expert::topic``).
        negative_classes: classes whose rows are negatives only (out-of-scope examples).
        settings: steps, batch shape, learning rate, temperature.
        seed: seeds the batches, dropout and initialisation of nothing else (the body is
            pre-trained); the same seed, data, torch threads and machine give the same body.
        show_progress: a tqdm bar over steps.

    Returns:
        ``{"steps", "seconds", "first_loss", "last_loss"}``.

    Example:
        >>> stats = fine_tune_body(body, ["hi", "hello", "select 1", "count rows"],
        ...                        ["chat", "chat", "sql", "sql"], settings=ContrastiveSettings(steps=2))  # doctest: +SKIP
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if len(texts) != len(classes):
        raise ValueError(f"fine_tune_body: {len(texts)} texts but {len(classes)} classes; expected equal lengths")
    negative = set(negative_classes)
    names = sorted({c for c in classes if c not in negative})
    index = {c: i for i, c in enumerate(names)}
    ids = [index.get(c, -1) for c in classes]
    negatives = [i for i, c in enumerate(classes) if c in negative]
    stats = {"steps": 0, "seconds": 0.0, "first_loss": float("nan"), "last_loss": float("nan")}
    if len(names) < 2 or settings.steps <= 0:
        body.eval()
        return stats

    batches = class_balanced_batches(ids, negatives, settings, seed)
    torch.manual_seed(seed)
    params = [p for p in body.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.01)
    total = len(batches)
    warmup = max(1, math.ceil(0.1 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total - s) / total)
    )
    started = time.perf_counter()
    body.train()
    bar = tqdm(batches, desc="fine-tuning body", unit="step", disable=not show_progress)
    for step, batch in enumerate(bar):
        features = body.preprocess([texts[i] for i in batch])
        z = F.normalize(body(features)["sentence_embedding"], dim=-1)
        labels = torch.tensor([ids[i] for i in batch], dtype=torch.long)
        loss = supcon_loss(z, labels, settings.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        if step == 0:
            stats["first_loss"] = value
        stats["last_loss"] = value
        bar.set_postfix(loss=f"{value:.3f}")
    body.eval()
    stats["steps"] = len(batches)
    stats["seconds"] = round(time.perf_counter() - started, 2)
    return stats
