"""Per-task training recipes for the embedded experts: data size, steps, LoRA shape, optimiser.

Why rank 8 on all seven linear projections: the adapters must stay under 8 MB in fp16. On
SmolLM2-135M (30 layers; q/o 576x576, k/v 576x192, gate/up/down 576x1536) all-linear LoRA
costs 10,176 parameters per rank per layer, so r=16 is 4.9 M parameters = 9.8 MB (too big)
and r=8 is 2.44 M = 4.9 MB. For a fixed budget, adapting every projection at a lower rank
generally beats a higher rank on attention alone (the QLoRA paper's finding), and the MLP
projections are where the format-and-skill changes these tasks need mostly live.

The step counts are sized for the 20-minute budget on 2 CPU cores: see the model cards in
adapters/<name>/README.md for the measured times.

This module knows nothing about configs or file formats.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """How to train one task's adapter.

    Args:
        task: data generator (``train.tasks``): ``sql``, ``json`` or ``math``.
        train_rows: distinct training rows drawn from the generator (cycled if steps need more).
        steps: optimizer steps.
        batch_size: rows per step.
        lr: peak learning rate (AdamW, linear warmup then linear decay).
        warmup_steps: warmup length.
        rank: LoRA rank ``r``.
        alpha: LoRA ``lora_alpha`` (scale = alpha / r).
        target_modules: projection names the adapter wraps.
    """

    task: str
    train_rows: int
    steps: int
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ALL_LINEAR

    def with_overrides(self, **changes) -> "Recipe":
        """A copy with the non-None ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


RECIPES: dict[str, Recipe] = {
    "sql": Recipe(task="sql", train_rows=1280, steps=160, batch_size=8, lr=2e-3),
    "json": Recipe(task="json", train_rows=800, steps=100, batch_size=8, lr=2e-3),
    "math": Recipe(task="math", train_rows=1280, steps=160, batch_size=8, lr=2e-3),
}
