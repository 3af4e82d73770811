"""The embedded SmolLM2-135M-Instruct GGUF end to end: converted once into the cache, then the
engine with a random r=16 all-linear adapter agrees with transformers+PEFT (32 greedy tokens
identical; prompt logits as close to a float64 PEFT run as PEFT's own float32 ones are), and the
second load reads the cache instead of converting."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_gguf_matches_transformers_peft(tmp_path, monkeypatch):
    from peft import PeftModel
    from tinyllm import save_adapter
    from transformers import AutoModelForCausalLM

    from coe.embedded import embedded_gguf_path
    from coe.engine import Engine
    from coe.engine import weights

    engine = Engine.from_pretrained(None, dtype="float32", device="cpu", max_seq_len=256, max_batch=2)
    gguf = Path(embedded_gguf_path())
    cache = weights.gguf_cache_dir(gguf)
    assert (cache / "coe-gguf.json").is_file() and (cache / "model.safetensors").is_file()

    hf = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32).eval()
    adapter = save_adapter(hf, tmp_path / "r16", r=16, alpha=32, targets="all-linear", seed=0)
    engine.load_adapter("r16", adapter)
    ref = PeftModel.from_pretrained(hf, str(adapter)).eval()

    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = engine.tokenizer(engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want_logits = ref(torch.tensor([ids])).logits[0, -1].float()
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    out = engine.generate(messages=msgs, adapter="r16", max_tokens=32, temperature=0.0)
    assert out.token_ids == want
    assert out.completion_tokens == 32 or out.finish_reason == "stop"

    from coe.engine.batch import Prefill, build_step

    slot = engine.registry.slot_of("r16")
    kv = engine.kv.allocate()
    b = build_step([], [Prefill(kv, 0, ids, slot, True)], num_lora_slots=engine.model.num_lora_slots, kv=engine.kv,
                   device=engine.device)
    got = engine.model.forward(b, engine.kv.k, engine.kv.v)[0]
    engine.kv.release(kv)
    # The engine sums in other orders than PEFT (oneDNN / GGUF-block kernels, C LoRA), so it is
    # held to PEFT's own float32 accuracy: measured on SmolLM2, both ~3.2e-4 from float64 (the
    # engine 3.2-3.9e-4 across its prompt paths), and 1.6e-5-3.6e-4 from each other.
    hf64 = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float64).eval()
    with torch.no_grad():
        exact = PeftModel.from_pretrained(hf64, str(adapter)).eval()(torch.tensor([ids])).logits[0, -1]
    peft_err = (want_logits.double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() < 2 * peft_err + 1e-5
    assert (got - want_logits).abs().max() < 1e-3

    # Second load: the cached folder is used; transformers' GGUF reader is never called.
    def no_conversion(*a, **k):
        raise AssertionError("GGUF converted again instead of reading the cache")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_conversion)
    t0 = time.perf_counter()
    again = Engine.from_pretrained(None, dtype="float32", device="cpu", max_seq_len=256, max_batch=1)
    assert time.perf_counter() - t0 < 60  # a plain safetensors read (a conversion takes minutes here)
    assert again.generate(messages=msgs, max_tokens=4).completion_tokens >= 1
    again.shutdown()
    engine.shutdown()  # their loops end: nothing keeps the two models alive for later tests
