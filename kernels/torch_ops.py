"""Multi-LoRA ops in plain torch: the production path on CPU and the fallback on GPU. (draft)"""

from __future__ import annotations

import torch

from kernels.meta import LoRAMeta

__all__ = ["add_lora_packed"]


def add_lora_packed(y, x, A, B, meta: LoRAMeta, scale, output_slices, rank):
    """Group-by-slot: per active slot, gather its tokens, two mm, scatter-add back."""
    sorted_ids = meta.sorted_token_ids
    offs = [0]
    for d in output_slices:
        offs.append(offs[-1] + d)
    for s, start, count in zip(meta.active_slots_host, meta.slot_starts_host, meta.tokens_per_slot_host):
        idx = sorted_ids[start : start + count]
        xs = x.index_select(0, idx)
        h = torch.mm(xs, A[s].t()).float()
        out = torch.empty(count, y.shape[1], dtype=torch.float32, device=y.device)
        for i in range(len(output_slices)):
            sc = scale if not isinstance(scale, torch.Tensor) else (scale[s] if scale.dim() == 1 else scale[i, s])
            out[:, offs[i] : offs[i + 1]] = (h[:, i * rank : (i + 1) * rank] @ B[s, offs[i] : offs[i + 1]].t().float()) * sc
        y.index_add_(0, idx, out.to(y.dtype))
    return y
