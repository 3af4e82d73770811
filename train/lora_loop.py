"""A small LoRA training loop for causal LMs on CPU, with answer-only loss and prefix sharing.

Why not transformers' Trainer: on 2 CPU cores every token of forward and backward counts,
and two savings need control of the forward pass:

1. **Shared-prefix forward without grad.** Examples of one expert share a long prompt head:
   the system prompt, and for SQL the whole ``CREATE TABLE`` schema. Each step runs that
   common prefix once (batch 1, no grad), repeats its KV cache across the batch, and runs
   forward/backward only on the rest. Forward activations are exactly those of serving
   (the adapter is applied on the prefix too); only the gradient that would flow into the
   adapter through the prefix positions is dropped. For SQL this cuts the tokens that need
   a backward pass by about 3x.
2. **LM head on answer positions only.** The 49k-entry head is applied to the hidden states
   that predict answer tokens, not to every position.

Batches are built from examples with the same ``group`` key (e.g. the same schema) so their
prefixes are shared; batch order is shuffled. The loss is the mean over answer tokens of the
batch. AdamW, linear warmup then linear decay, gradient clipping at 1.0.

This module knows nothing about tasks, configs or file formats; it trains whatever trainable
parameters the model has (the PEFT adapter).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from train.formatting import Encoded


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings.

    Args:
        steps: optimizer steps.
        batch_size: examples per step.
        lr: peak learning rate.
        warmup_steps: linear warmup length.
        weight_decay: AdamW weight decay.
        seed: shuffling seed.
        progress: show a tqdm bar.
    """

    steps: int
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"LoopConfig: steps, batch_size and lr must be positive (got {self})")


@dataclass
class LoopStats:
    """What happened during training (for the model card)."""

    steps: int = 0
    examples: int = 0
    grad_tokens: int = 0
    prefix_tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def _batches(examples: Sequence[Encoded], groups: Sequence[str], batch_size: int, rng: random.Random) -> list[list[int]]:
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    batches = []
    for idx in by_group.values():
        rng.shuffle(idx)
        batches.extend(idx[i : i + batch_size] for i in range(0, len(idx), batch_size))
    rng.shuffle(batches)
    return batches


def _common_prefix_len(seqs: list[tuple[int, ...]], limit: int) -> int:
    n = 0
    first = seqs[0]
    while n < limit and all(s[n] == first[n] for s in seqs[1:]):
        n += 1
    return n


def batch_loss(causal_lm, batch: list[Encoded], pad_id: int) -> tuple[torch.Tensor, int, int]:
    """Mean answer-token cross-entropy of one batch, with the shared prefix run once without grad.

    Args:
        causal_lm: a ``*ForCausalLM`` (LoRA layers injected) with ``.model`` and ``.lm_head``-style
            output embeddings.
        batch: encoded examples.
        pad_id: id used to pad suffixes (masked out, never predicted).

    Returns:
        ``(loss, grad_tokens, prefix_tokens)``.
    """
    body = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    B = len(batch)
    # The last prompt position predicts the first answer token, so it must be in the suffix.
    P = _common_prefix_len([e.ids for e in batch], min(e.label_start for e in batch) - 1)
    cache = None
    if P > 0:
        with torch.no_grad():
            cache = body(input_ids=torch.tensor([batch[0].ids[:P]]), use_cache=True).cache
        cache.batch_repeat_interleave(B)
    S = max(len(e.ids) for e in batch) - P
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + S), dtype=torch.long)
    attn[:, :P] = 1
    rows, cols, targets = [], [], []
    for b, e in enumerate(batch):
        suffix = e.ids[P:]
        input_ids[b, : len(suffix)] = torch.tensor(suffix)
        attn[b, P : P + len(suffix)] = 1
        for pos in range(e.label_start - 1, e.label_end - 1):  # position pos predicts token pos + 1
            rows.append(b)
            cols.append(pos - P)
            targets.append(e.ids[pos + 1])
    hidden = body(input_ids=input_ids, attention_mask=attn, cache=cache, use_cache=cache is not None).last_hidden_state
    logits = head(hidden[torch.tensor(rows), torch.tensor(cols)])  # [N, V]
    loss = F.cross_entropy(logits.float(), torch.tensor(targets))
    return loss, B * S, P


def train_lora(model, examples: Sequence[Encoded], groups: Sequence[str], cfg: LoopConfig, pad_id: int) -> LoopStats:
    """Train the model's trainable parameters (the LoRA adapter) on ``examples``.

    Args:
        model: a PEFT model (or any causal LM whose trainable parameters are the adapter).
        examples: encoded examples; cycled (reshuffled each epoch) until ``cfg.steps``.
        groups: one key per example; a batch only mixes examples with the same key.
        cfg: optimisation settings.
        pad_id: padding token id.

    Returns:
        Loop statistics (loss per step, tokens, wall time).
    """
    if len(examples) != len(groups) or not examples:
        raise ValueError("train_lora: need one group key per example and at least one example")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_lora: the model has no trainable parameters (no adapter attached?)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(cfg.seed)
    stats = LoopStats()
    model.train()
    queue: list[list[int]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not cfg.progress)
    for _ in bar:
        if not queue:
            queue = _batches(examples, groups, cfg.batch_size, rng)
        batch = [examples[i] for i in queue.pop()]
        loss, grad_tokens, prefix = batch_loss(causal_lm, batch, pad_id)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {stats.steps}; lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        stats.steps += 1
        stats.examples += len(batch)
        stats.grad_tokens += grad_tokens
        stats.prefix_tokens += prefix
        stats.losses.append(round(loss.item(), 4))
        recent = stats.losses[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    stats.seconds = time.perf_counter() - start
    # CPU time of this process: on a shared machine it says what the loop cost, where wall
    # time mostly says how busy the neighbours were.
    stats.cpu_seconds = time.process_time() - cpu_start
    model.eval()
    return stats
