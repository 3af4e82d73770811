"""Helpers for the engine tests: tiny random Llama models with a byte-level tokenizer, and random
PEFT adapters, all built in-test (nothing is downloaded).

The tokenizer has one token per byte (so a multi-byte character spans several tokens), BOS added
by default like Llama's, and a ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

VOCAB = 300
BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for tok, i in (("<s>", BOS), ("</s>", EOS), ("<|im_start|>", IM_START), ("<|im_end|>", IM_END)):
        vocab[tok] = i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(model_type: str = "llama", *, tie: bool = False, layers: int = 2, hidden: int = 64, heads: int = 4,
                kv_heads: int = 2, **kw: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    return cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
               tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, **kw)


def save_tiny_model(path: Path, config: Any, seed: int = 0) -> Any:
    """Random weights (scaled up so that greedy decoding does not collapse onto one token)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return model


def save_adapter(base: Any, path: Path, *, r: int = 4, alpha: float = 8, targets: Any = ("q_proj", "v_proj"),
                 rslora: bool = False, seed: int = 1, zero_b: bool = False, **lora_kw: Any) -> Path:
    """A random PEFT LoRA adapter for ``base`` (B nonzero unless ``zero_b``)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets) if not isinstance(targets, str) else targets,
                     use_rslora=rslora, init_lora_weights=zero_b, lora_dropout=0.0, **lora_kw)
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    if not zero_b:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.1)
    peft_model.save_pretrained(str(path))
    return path


def quantize_blocks(w: torch.Tensor, kind: str) -> Any:
    """``w`` [N, K] rounded to GGUF blocks (``q4_1`` like llama.cpp: m = block min, d = range / 15,
    both float16; ``q8_0``: d = absmax / 127) as a ``BlockWeight``; its ``dequantize()`` is the
    matrix a model built from it holds."""
    from coe.engine.quantized import BlockWeight

    n, k = w.shape
    b = w.detach().float().reshape(n, k // 32, 32)
    if kind == "q4_1":
        m = b.amin(-1).half().float()
        d = ((b.amax(-1) - m) / 15).half().float().clamp_min(1e-4)
        q = ((b - m[..., None]) / d[..., None]).round().clamp(0, 15).to(torch.uint8)
        qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
        return BlockWeight(kind, qs.contiguous(), torch.stack([d, m], dim=-1).contiguous())
    d = (b.abs().amax(-1) / 127).half().float().clamp_min(1e-4)
    q = (b / d[..., None]).round().clamp(-127, 127).to(torch.int8)
    return BlockWeight(kind, q.reshape(n, k).contiguous(), d.contiguous())


def save_tiny_block_model(path: Path, config: Any, seed: int = 0) -> dict[str, Any]:
    """A tiny model whose projections are exactly Q4_1 blocks and whose embeddings (tied head) are
    Q8_0, as in a GGUF file; returns the blocks by checkpoint name (``Transformer.attach_blocks``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    blocks: dict[str, Any] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0, 0.08)
            if p.dim() == 2 and (name.endswith("proj.weight") or name == "model.embed_tokens.weight"):
                bw = quantize_blocks(p, "q8_0" if "embed" in name else "q4_1")
                p.copy_(bw.dequantize())
                blocks[name] = bw
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return blocks
