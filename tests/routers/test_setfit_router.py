"""The SetFit router: the class-order pitfall, a real (small) training, save/load, determinism."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest

from coe.config import RouterTrainingConfig
from routers import load_router, make_router
from routers.labels import expert_columns
from routers.setfit_router import SetFitRouter
from routing_helpers import HELD_OUT, LABELS, TEXTS, base_dict, make_config

# Small and fast: one pair per example and side, a handful of steps.
SMALL = {"num_iterations": 1, "batch_size": 16, "show_progress": False}


def small_config():
    return make_config(base_dict(seed=3, training=SMALL))


# ---------------------------------------------------------------- label mapping (no model)


class PermutedHead:
    """A sklearn-like head whose classes_ are in an order of its own choosing."""

    def __init__(self, classes, proba):
        self.classes_ = np.array(classes)
        self._proba = np.asarray(proba, dtype=float)

    def predict_proba(self, emb):
        return np.repeat(self._proba[None, :], len(emb), axis=0)


def fake_setfit(head, classes, experts):
    r = SetFitRouter()
    r.model = SimpleNamespace(model_head=head, normalize_embeddings=False)
    r.classes = tuple(classes)
    r.info = dataclasses.replace(r.info, experts=tuple(experts))
    r._columns = expert_columns(r._head_classes(), r.experts)
    r.embed = lambda texts: np.zeros((len(texts), 4), dtype=np.float32)
    return r


def test_columns_follow_the_heads_classes_not_the_label_order():
    # setfit issues 462/587: predict_proba columns are in classes_ order (sorted), whatever
    # order the labels were given in. Here "sql" is column 3 of the head, not column 0.
    head = PermutedHead(["general", "json", "math", "sql"], [0.1, 0.2, 0.0, 0.7])
    r = fake_setfit(head, classes=["sql", "json", "math", "general"], experts=["sql", "json", "math", "general"])
    p = r.predict_proba(["anything"])
    assert dict(zip(r.experts, p[0])) == pytest.approx({"sql": 0.7, "json": 0.2, "math": 0.0, "general": 0.1})


def test_topic_columns_are_summed_per_expert_in_head_order():
    head = PermutedHead(["general", "math::geometry", "math::word", "sql"], [0.1, 0.25, 0.35, 0.3])
    r = fake_setfit(head, classes=["sql", "math::word", "math::geometry", "general"], experts=["sql", "math", "general"])
    p = r.predict_proba(["x", "y"])
    assert p.shape == (2, 3)
    assert dict(zip(r.experts, p[1])) == pytest.approx({"sql": 0.3, "math": 0.6, "general": 0.1})


def test_integer_head_classes_index_the_class_list():
    # A head trained on integer ids (SetFit's differentiable head) maps id i -> classes[i].
    head = PermutedHead([2, 0, 1], [0.5, 0.3, 0.2])
    r = fake_setfit(head, classes=["sql", "json", "general"], experts=["sql", "json", "general"])
    assert dict(zip(r.experts, r.predict_proba(["x"])[0])) == pytest.approx({"general": 0.5, "sql": 0.3, "json": 0.2})


def test_a_head_class_of_no_known_expert_is_an_error():
    with pytest.raises(ValueError, match="'chat' belongs to no known expert"):
        expert_columns(["sql", "chat"], ["sql", "json"])


# ---------------------------------------------------------------- a real SetFit training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SetFit router trained once on the small set, from an empty cwd (to see what it writes)."""
    cwd = tmp_path_factory.mktemp("cwd")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        router = make_router("setfit", small_config()).fit(TEXTS, LABELS)
    finally:
        os.chdir(before)
    return router, cwd


def test_training_writes_nothing_into_the_cwd(trained):
    _, cwd = trained
    assert sorted(os.listdir(cwd)) == []  # no checkpoints/, runs/, logs


def test_routes_held_out_messages(trained):
    router, _ = trained
    assert router.experts == ("sql", "json", "math", "general")
    p = router.predict_proba(list(HELD_OUT))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    assert [router.experts[i] for i in p.argmax(axis=1)] == list(HELD_OUT.values())


def test_real_head_classes_are_sorted_and_mapped_explicitly(trained):
    router, _ = trained
    head_classes = list(router.model.model_head.classes_)
    assert head_classes == sorted(router.experts) != list(router.experts)  # the pitfall is live here
    texts = list(HELD_OUT)
    raw = router.head_proba(router.embed(texts))  # head column order
    ours = router.predict_proba(texts)
    for j, cls in enumerate(head_classes):
        np.testing.assert_allclose(ours[:, router.experts.index(cls)], raw[:, j])


def test_fast_inference_matches_setfits_own_predict_proba(trained):
    router, _ = trained
    texts = list(HELD_OUT)
    theirs = router.model.predict_proba(texts, as_numpy=True)  # columns in head order
    ours = router.predict_proba(texts)
    order = [list(router.model.model_head.classes_).index(e) for e in router.experts]
    np.testing.assert_allclose(ours, theirs[:, order], atol=1e-5)


def test_save_load_gives_identical_scores(trained, tmp_path):
    router, _ = trained
    router.save(str(tmp_path / "r"))
    assert (tmp_path / "r" / "router.json").is_file() and (tmp_path / "r" / "model_head.pkl").is_file()
    loaded = load_router(tmp_path / "r", small_config())
    assert isinstance(loaded, SetFitRouter)
    assert loaded.info == router.info
    texts = list(HELD_OUT) + TEXTS[:5]
    np.testing.assert_array_equal(loaded.predict_proba(texts), router.predict_proba(texts))


def test_training_is_deterministic_for_a_seed(trained):
    router, _ = trained
    again = make_router("setfit", small_config()).fit(TEXTS, LABELS)
    texts = list(HELD_OUT)
    np.testing.assert_allclose(again.predict_proba(texts), router.predict_proba(texts), atol=1e-6)


def test_training_settings_come_from_the_config():
    r = make_router("setfit", small_config(), seed=11)
    assert r.seed == 11 and r.training == RouterTrainingConfig(**SMALL)
    assert make_router("setfit", small_config()).seed == 3


def test_int8_router_refits_its_head_and_round_trips(tmp_path):
    cfg = make_config(base_dict(seed=3, training={**SMALL, "quantize": "int8"}))
    r = make_router("setfit", cfg).fit(TEXTS, LABELS)
    assert r._int8_body is not None
    p = r.predict_proba(list(HELD_OUT))
    # sql/json/math only: with one pair per example, general (4 examples) is a near tie even in float32
    assert [r.experts[i] for i in p[:3].argmax(axis=1)] == list(HELD_OUT.values())[:3]
    # the head was fitted on the int8 embeddings: refitting on them changes nothing
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=cfg.router.training.logreg_c, max_iter=1000, random_state=3).fit(r.embed(TEXTS).astype(np.float64), LABELS)
    np.testing.assert_allclose(r.model.model_head.coef_, ref.coef_, atol=1e-6)
    r.save(str(tmp_path / "r"))
    loaded = load_router(tmp_path / "r", cfg)
    np.testing.assert_array_equal(loaded.predict_proba(list(HELD_OUT)), p)
