"""The contrastive router (the default): loss, batches, a real short fine-tune, save/load."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from routers import load_router, make_router, train_router
from routers.contrastive import ContrastiveSettings, class_balanced_batches, fine_tune_body, supcon_loss
from routers.contrastive_router import BODY_DIR, ContrastiveRouter
from routers.embeddings import EMBEDDED_BODY, encode, load_body
from routing_helpers import GENERAL, HELD_OUT, LABELS, MATH, SQL, TEXTS, make_config



# ---------------------------------------------------------------- the loss, by hand


def test_supcon_loss_matches_the_formula_on_a_hand_made_batch():
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1, -1])  # row 3 is a negative only; row 2 has no positive
    t = 0.5
    s = (z @ z.T / t).numpy()
    # anchors with a positive: rows 0 and 1 (each other's only positive)
    expected = []
    for i, p in ((0, 1), (1, 0)):
        others = [a for a in range(4) if a != i]
        expected.append(-(s[i, p] - math.log(sum(math.exp(s[i, a]) for a in others))))
    assert float(supcon_loss(z, labels, t)) == pytest.approx(float(np.mean(expected)), rel=1e-5)


def test_supcon_loss_negatives_are_never_positives_and_no_anchor_gives_zero():
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    loss = supcon_loss(z, torch.tensor([-1, -1, 0, 1]), 0.1)  # two negatives alike: still no positive pair
    assert float(loss.detach()) == 0.0
    loss.backward()  # a gradient path exists, so a training step never crashes
    tight = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]]), dim=-1)
    loose = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [0.01, 1.0]]), dim=-1)
    y = torch.tensor([0, 0, 1, 1])
    assert float(supcon_loss(tight, y, 0.1)) < float(supcon_loss(loose, y, 0.1))


# ---------------------------------------------------------------- batches


def test_many_classes_make_p_by_k_batches_with_negatives():
    ids = [c for c in range(150) for _ in range(4)]
    negatives = list(range(600, 700))
    s = ContrastiveSettings(steps=60, batch_size=72, per_class=4)
    batches = class_balanced_batches(ids + [-1] * 100, negatives, s, seed=1)
    assert len(batches) == 60
    for b in batches:
        pos = [r for r in b if r < 600]
        assert len(b) == 72 and len(pos) == 64 and len({ids[r] for r in pos}) == 16
        assert all(sum(ids[r] == ids[q] for q in pos) == 4 for r in pos)
    seen = {ids[r] for b in batches[:10] for r in b if r < 600}
    assert len(seen) == 150  # one round visits every class before any repeats
    assert batches == class_balanced_batches(ids + [-1] * 100, negatives, s, seed=1)
    assert batches != class_balanced_batches(ids + [-1] * 100, negatives, s, seed=2)


def test_few_classes_fill_the_batch_and_small_data_takes_few_steps():
    ids = [0] * 16 + [1] * 16 + [2] * 18 + [-1] * 10
    s = ContrastiveSettings(steps=60, batch_size=72, per_class=4, max_epochs=8)
    batches = class_balanced_batches(ids, list(range(50, 60)), s, seed=0)
    # every example of the 3 classes in every batch (per_class grows to 21), 8 negatives
    assert all(len(b) == 50 + 8 for b in batches)
    assert len(batches) == math.ceil(8 * 50 / 50)


# ---------------------------------------------------------------- real body (a few steps)


def test_fine_tuning_pulls_a_class_together():
    body = load_body(EMBEDDED_BODY, 64)
    texts = SQL[:4] + MATH[:4] + GENERAL[:2]
    classes = ["sql"] * 4 + ["math"] * 4 + ["none"] * 2

    def gap(b):
        e = encode(b, texts)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        sims = e @ e.T
        same = np.mean([sims[i, j] for i in range(8) for j in range(8) if i != j and classes[i] == classes[j]])
        other = np.mean([sims[i, j] for i in range(8) for j in range(8) if classes[i] != classes[j]])
        return same - other

    before = gap(body)
    stats = fine_tune_body(body, texts, classes, negative_classes=["none"],
                           settings=ContrastiveSettings(steps=4, batch_size=16, learning_rate=1e-4), seed=0, show_progress=False)
    assert stats["steps"] == 4 and not body.training
    assert gap(body) > before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = make_config(type="contrastive")
    quick = dataclasses.replace(cfg.router.training, finetune_steps=3, show_progress=False)
    cfg = cfg.replace(router=dataclasses.replace(cfg.router, training=quick))
    out = tmp_path_factory.mktemp("contrastive") / "router"
    return cfg, train_router(cfg, out=out), out


def test_default_router_type_is_contrastive():
    from coe.config import RouterConfig

    assert RouterConfig().type == "contrastive"
    assert isinstance(make_router("contrastive", make_config()), ContrastiveRouter)
    assert make_router("contrastive", make_config()).fallback == "general"


def test_contrastive_router_routes_held_out_messages(trained):
    _, router, _ = trained
    assert router.experts == ("sql", "json", "math", "general")
    proba = router.predict_proba(list(HELD_OUT))
    assert proba.shape == (4, 4) and np.allclose(proba.sum(axis=1), 1.0)
    assert [router.experts[i] for i in proba.argmax(axis=1)] == list(HELD_OUT.values())
    assert router.info.extra["finetune"]["steps"] == 3 and router.info.extra["fallback"] == "general"


def test_contrastive_router_save_load_identical_scores(trained):
    cfg, router, out = trained
    assert (out / BODY_DIR / "modules.json").is_file() and (out / "head.npz").is_file()
    loaded = load_router(out, cfg)
    assert isinstance(loaded, ContrastiveRouter) and loaded.fallback == "general"
    np.testing.assert_allclose(loaded.predict_proba(list(HELD_OUT)), router.predict_proba(list(HELD_OUT)), atol=1e-6)


def test_fallback_rows_are_down_weighted_in_the_head(trained, monkeypatch):
    cfg, _, _ = trained
    seen = {}
    router = make_router("contrastive", cfg)
    real = ContrastiveRouter._fit_logreg

    def spy(self, emb, y, sample_weight=None):
        seen["w"] = sample_weight
        return real(self, emb, y, sample_weight)

    monkeypatch.setattr(ContrastiveRouter, "_fit_logreg", spy)
    monkeypatch.setattr("routers.contrastive_router.fine_tune_body", lambda *a, **k: {"steps": 0})
    router.fit(TEXTS, LABELS)
    w = seen["w"]
    assert w.tolist() == [0.3 if lab == "general" else 1.0 for lab in LABELS]


def test_missing_tuned_body_is_a_clear_error(trained, tmp_path):
    import shutil

    from coe.errors import RouterError

    cfg, _, out = trained
    broken = tmp_path / "r"
    shutil.copytree(out, broken)
    shutil.rmtree(broken / BODY_DIR)
    with pytest.raises(RouterError, match="tuned body .* is missing; retrain it with `coe train-router`"):
        load_router(broken, cfg)
