"""Engine behaviour at sampling limits the HTTP schema accepts (``temperature`` in [0, 2], ``top_p``
in (0, 1]): values below float32's range mean the most likely token, in the engine itself (the
pipeline also maps them to greedy: ``test_bad_input.py::test_near_zero_temperature_and_top_p_are_greedy``).
"""

from __future__ import annotations

import torch

from coe.engine.sampling import Sampler


def test_a_near_zero_temperature_samples_the_top_token():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert Sampler(temperature=1e-300, seed=1).sample(logits) == int(logits.argmax())


def test_a_near_zero_top_p_keeps_the_top_token():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert Sampler(temperature=1.0, top_p=1e-300, seed=1).sample(logits) == int(logits.argmax())


def test_a_tiny_top_p_with_sampling_still_keeps_the_top_token():
    """Just above the greedy cut-off, the nucleus is the top token alone (never empty)."""
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    s = Sampler(temperature=1.0, top_p=2e-5, seed=1)
    assert not s.greedy
    assert all(s.sample(logits) == int(logits.argmax()) for _ in range(5))
