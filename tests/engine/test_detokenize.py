"""Incremental detokenization: deltas concatenate to the full decode, multi-byte characters are
never split, and text that may start a stop string is held back until resolved."""

from __future__ import annotations

import pytest
from tinyllm import byte_tokenizer

from coe.engine.detokenize import Detokenizer
from coe.engine.sampling import Sampler, sample_batch

TEXT = "Grüße, 世界! naïve café — ok 🙂 end"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _run(tok, text, stop=()):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok, tok("prompt")["input_ids"], stop)
    deltas = []
    for i in ids:
        deltas.append(d.add(i))
        if d.stopped:
            break
    deltas.append(d.flush())
    return deltas, d


def test_multibyte_deltas_are_whole_characters(tok):
    deltas, _ = _run(tok, TEXT)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in s for s in deltas)
    # Byte-level tokens: a 4-byte emoji arrives as 4 tokens, released once, whole.
    assert "🙂" in deltas


@pytest.mark.parametrize("stop, expect", [
    (["café"], "Grüße, 世界! naïve "),
    (["世界", "ok"], "Grüße, "),
    (["zzz"], TEXT),
    (["end"], "Grüße, 世界! naïve café — ok 🙂 "),
])
def test_stop_strings_cut_and_never_leak(tok, stop, expect):
    deltas, d = _run(tok, TEXT, stop)
    assert "".join(deltas) == expect
    assert d.stopped == (expect != TEXT)
    # No delta ever shows a prefix of the stop string that the final text does not contain.
    shown = ""
    for s in deltas:
        shown += s
        assert expect.startswith(shown)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tok):
    deltas, d = _run(tok, "abcabd", ["abd!"])
    assert not d.stopped and "".join(deltas) == "abcabd"


def test_sampler_seed_and_greedy():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    a = [Sampler(1.0, 0.9, 20, seed=7) for _ in range(3)]
    b = [Sampler(1.0, 0.9, 20, seed=7) for _ in range(3)]
    assert sample_batch(logits, a) == sample_batch(logits, b)
    assert sample_batch(logits, [Sampler() for _ in range(3)]) == logits.argmax(-1).tolist()
    # top_k=3: only the three most likely tokens are ever drawn.
    s = Sampler(2.0, 1.0, 3, seed=1)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    assert {s.sample(logits[0]) for _ in range(50)} <= top3
