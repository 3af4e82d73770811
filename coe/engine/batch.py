"""Builds one forward step's :class:`~coe.engine.model.StepBatch` from the scheduler's picks.

Everything done once per step lives here, never in a layer: the flat token/position/KV-slot
tensors, the LoRA metadata (one ``LoRAMeta.build`` per step, shared by every LoRA layer), the
decode attention mask, and which rows need logits. All inputs are host ints, turned into tensors
with one ``torch.tensor`` call each.

This module knows nothing about requests, sampling or adapters' names: a sequence is reduced to
its KV slot, its positions, its tokens and its LoRA slot (-1 = base model).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from coe.engine.kv_cache import KVCache
from coe.engine.model import StepBatch
from kernels import LoRAMeta


class Decode(NamedTuple):
    """One decode token: the sequence's last sampled token at ``position``."""

    kv_slot: int
    position: int
    token: int
    lora_slot: int


class Prefill(NamedTuple):
    """A chunk of a prompt: ``tokens`` at positions ``start..``; ``last`` when it ends the prompt
    (its final row's logits give the first new token)."""

    kv_slot: int
    start: int
    tokens: Sequence[int]
    lora_slot: int
    last: bool


def build_step(decodes: Sequence[Decode], prefills: Sequence[Prefill], *, num_lora_slots: int,
               kv: KVCache, device: torch.device, all_logits: bool = False) -> StepBatch:
    """The step's tensors; logits rows come decode sequences first, then finished prefills, in order.

    Args:
        decodes: decode tokens (one per sequence).
        prefills: prompt chunks.
        num_lora_slots: S, the LoRA stacks' slot count (for the metadata).
        kv: the cache (decode slots read past their own length are made safe to read).
        device: where the step's tensors go.
        all_logits: logits for every row (tests compare whole prompts with transformers).
    """
    tokens: list[int] = []
    positions: list[int] = []
    kv_slots: list[int] = []
    lora_slots: list[int] = []
    for d in decodes:
        tokens.append(d.token)
        positions.append(d.position)
        kv_slots.append(d.kv_slot)
        lora_slots.append(d.lora_slot)
    Bd = len(decodes)
    logit_rows = list(range(Bd))
    chunks = []
    row = Bd
    for p in prefills:
        n = len(p.tokens)
        tokens.extend(p.tokens)
        positions.extend(range(p.start, p.start + n))
        kv_slots.extend([p.kv_slot] * n)
        lora_slots.extend([p.lora_slot] * n)
        chunks.append((p.kv_slot, p.start, n, row))
        row += n
        if p.last:
            logit_rows.append(row - 1)

    if all_logits:
        logit_rows = list(range(row))
    decode_len = 0
    decode_mask = None
    slot_range = None
    if Bd:
        lens = [d.position + 1 for d in decodes]
        decode_len = max(lens)
        if min(lens) != decode_len:
            for d in decodes:
                kv.ensure_clean(d.kv_slot, decode_len, d.position)
            decode_mask = (torch.arange(decode_len) < torch.tensor(lens)[:, None]).view(Bd, 1, 1, decode_len).to(device)
        lo = decodes[0].kv_slot
        if all(d.kv_slot == lo + i for i, d in enumerate(decodes)):
            slot_range = (lo, lo + Bd)
    kv_slots_t = torch.tensor(kv_slots, dtype=torch.int64, device=device)
    return StepBatch(
        token_ids=torch.tensor(tokens, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        kv_slots=kv_slots_t,
        meta=LoRAMeta.build(torch.tensor(lora_slots, dtype=torch.int64), max(1, num_lora_slots), device=device),
        num_decode=Bd,
        decode_slot_range=slot_range,
        decode_kv_slots=kv_slots_t[:Bd],
        decode_len=decode_len,
        decode_mask=decode_mask,
        prefills=tuple(chunks),
        logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=device),
    )
