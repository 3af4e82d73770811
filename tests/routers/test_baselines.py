"""Embedding baselines (centroid, logreg, kNN) over the embedded all-MiniLM-L6-v2, frozen."""

from __future__ import annotations

import numpy as np
import pytest

from routers import make_router
from routers.embeddings import EMBEDDED_BODY, encode, shared_body
from routing_helpers import GENERAL, HELD_OUT, JSON, LABELS, MATH, SQL, TEXTS, make_config



@pytest.fixture(scope="module")
def trained():
    cfg = make_config()
    return {kind: make_router(kind, cfg).fit(TEXTS, LABELS) for kind in ("centroid", "logreg", "knn")}


@pytest.mark.parametrize("kind", ["centroid", "logreg", "knn"])
def test_routes_held_out_messages(trained, kind):
    r = trained[kind]
    assert r.experts == ("sql", "json", "math", "general")
    proba = r.predict_proba(list(HELD_OUT))
    assert proba.shape == (len(HELD_OUT), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-9)
    picked = [r.experts[i] for i in proba.argmax(axis=1)]
    assert picked == list(HELD_OUT.values())


@pytest.mark.parametrize("kind", ["centroid", "logreg", "knn"])
def test_save_load_gives_identical_scores(trained, kind, tmp_path):
    r = trained[kind]
    r.save(str(tmp_path / kind))
    loaded = type(r).load(str(tmp_path / kind))
    assert loaded.info == r.info and loaded.experts == r.experts
    np.testing.assert_array_equal(loaded.predict_proba(list(HELD_OUT)), r.predict_proba(list(HELD_OUT)))


def test_logreg_matches_sklearn_predict_proba(trained):
    from sklearn.linear_model import LogisticRegression

    r = trained["logreg"]
    emb = r.embed(TEXTS)
    clf = LogisticRegression(C=r.training.logreg_c, max_iter=2000, random_state=r.seed).fit(emb, LABELS)
    held = r.embed(list(HELD_OUT))
    expected = clf.predict_proba(held)  # columns in sorted order: general, json, math, sql
    ours = r.predict_proba(list(HELD_OUT))
    for j, e in enumerate(clf.classes_):
        np.testing.assert_allclose(ours[:, r.experts.index(e)], expected[:, j], atol=1e-6)


def test_logreg_binary_case_is_a_proper_two_way_softmax():
    r = make_router("logreg", make_config()).fit(SQL + GENERAL, ["sql"] * len(SQL) + ["general"] * len(GENERAL))
    p = r.predict_proba(["Count the users table rows.", "Hello, how are you?"])
    assert p.shape == (2, 2) and r.experts == ("sql", "general")
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert p[0, 0] > 0.5 and p[1, 1] > 0.5


@pytest.mark.parametrize("kind", ["centroid", "logreg", "knn"])
def test_topics_train_as_classes_and_sum_per_expert(kind):
    texts = SQL + JSON + MATH[:3] + MATH[3:] + GENERAL
    labels = ["sql"] * len(SQL) + ["json"] * len(JSON) + ["math"] * len(MATH) + ["general"] * len(GENERAL)
    topics = [None] * (len(SQL) + len(JSON)) + ["word"] * 3 + ["geometry"] * 3 + [None] * len(GENERAL)
    r = make_router(kind, make_config()).fit(texts, labels, topics)
    assert r.classes == ("sql", "json", "math::word", "math::geometry", "general")
    assert r.experts == ("sql", "json", "math", "general")
    p = r.predict_proba(list(HELD_OUT))
    assert p.shape == (4, 4)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert [r.experts[i] for i in p.argmax(axis=1)] == list(HELD_OUT.values())


def test_the_body_is_loaded_once_per_process(trained):
    body = shared_body(EMBEDDED_BODY, trained["centroid"].training.max_length)
    assert body is shared_body(EMBEDDED_BODY, 128)
    assert all(r.training.max_length == 128 for r in trained.values())
    assert body.max_seq_length == 128


def test_fast_encode_matches_sentence_transformers_encode():
    body = shared_body(EMBEDDED_BODY, 128)
    texts = ["short", "a much longer message about tables, joins and many other things " * 3, "mid length text"]
    ours = encode(body, texts)
    ref = body.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert encode(body, []).shape == (0, ours.shape[1])


def test_encode_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    body = shared_body(EMBEDDED_BODY, 128)
    texts = [f"message number {i} about {'tables' if i % 2 else 'poems'}" for i in range(24)]
    expected = encode(body, texts)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: encode(body, [t])[0], texts))
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-5)


def test_bodies_stay_deep_copyable_after_encode():
    import copy

    body = shared_body(EMBEDDED_BODY, 128)
    encode(body, ["warm the lock up"])
    clone = copy.deepcopy(body)
    np.testing.assert_allclose(encode(clone, ["same output"]), encode(body, ["same output"]), atol=1e-6)


def test_untrained_router_says_so():
    from coe.errors import RouterError

    with pytest.raises(RouterError, match="not trained"):
        make_router("centroid", make_config()).predict_proba(["x"])


def test_int8_body_routes_the_same_and_is_cached_apart():
    import dataclasses

    cfg = make_config()
    cfg = cfg.replace(router=dataclasses.replace(cfg.router, training=dataclasses.replace(cfg.router.training, quantize="int8")))
    r = make_router("centroid", cfg).fit(TEXTS, LABELS)
    assert [r.experts[i] for i in r.predict_proba(list(HELD_OUT)).argmax(axis=1)] == list(HELD_OUT.values())
    q = shared_body(EMBEDDED_BODY, 128, "int8")
    assert q is not shared_body(EMBEDDED_BODY, 128) and q is shared_body(EMBEDDED_BODY, 128, "int8")
    cos = (r.embed(TEXTS[:4]) * make_router("centroid", make_config()).embed(TEXTS[:4])).sum(axis=1)
    assert (cos > 0.8).all() and (cos < 1 - 1e-6).any()  # close to float32, but really int8
