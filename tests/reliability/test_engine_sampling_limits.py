"""Engine behaviour at sampling limits the HTTP schema accepts (``temperature`` in [0, 2], ``top_p``
in (0, 1]). The server stays correct because the pipeline maps near-zero values to greedy
(``test_bad_input.py::test_near_zero_temperature_and_top_p_are_greedy``); these tests record
what the engine itself still does, for its owner.
"""

from __future__ import annotations

import pytest
import torch

from coe.engine.sampling import Sampler

ENGINE_FIX = ("engine (coe/engine/sampling.py): Sampler.sample must {}; the server works around it in "
              "coe/pipeline.py (_SAMPLING_EPS)")


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=ENGINE_FIX.format(
    "treat a temperature below ~1e-5 as greedy (1e-300 becomes 0 in float32, logits / 0 are inf and "
    "softmax gives NaN: 'probability tensor contains either inf, nan or element < 0')"))
def test_a_near_zero_temperature_samples_the_top_token():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert Sampler(temperature=1e-300, seed=1).sample(logits) == int(logits.argmax())


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=ENGINE_FIX.format(
    "always keep the most likely token under top_p (a top_p below float32's range compares as 0, every "
    "token is dropped, and multinomial fails: 'invalid multinomial distribution')"))
def test_a_near_zero_top_p_keeps_the_top_token():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert Sampler(temperature=1.0, top_p=1e-300, seed=1).sample(logits) == int(logits.argmax())
