"""Tiny, deterministic test assets: a random Llama with a real chat tokenizer, random LoRA adapters,
and an experts.yaml that uses them. Built in about a second on CPU; nothing is downloaded.

- ``build_tiny_model(dir)``: HF-format Llama (config.json + model.safetensors): 2 layers, hidden
  64, 4 query heads over 2 KV heads (GQA), tied embeddings like SmolLM2, and a byte-level BPE
  tokenizer trained with ``tokenizers`` on a small built-in corpus, saved through transformers'
  ``PreTrainedTokenizerFast`` with a ChatML chat template and ``<|im_end|>`` as EOS.
- ``make_tiny_adapter(model_dir, out_dir, ...)``: a PEFT-format LoRA adapter with random,
  NONZERO ``lora_B`` (PEFT initialises B to zero, which would be indistinguishable from the base).
- ``tiny_experts_yaml(dir, ...)``: an experts.yaml over that model with adapter experts
  ``sql`` and ``json`` and the adapter-less fallback ``general``.
- ``tiny_assets(dir)``: all of the above, built once into ``dir`` (reused when already there).

Use them from session-scoped fixtures, e.g.::

    @pytest.fixture(scope="session")
    def tiny(tmp_path_factory):
        return tiny_assets(tmp_path_factory.mktemp("tiny"))

Weights use a larger init than HF's default (``initializer_range=0.3``) so logits are peaked
enough for greedy decoding to be stable under float reassociation (batching-invariance tests).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

TINY_MODEL_ID = "tiny-llama"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CORPUS = """\
How many customers signed up in March? SELECT COUNT(*) FROM customers WHERE month = 3;
List the names of employees whose salary is above 50000. SELECT name FROM employees WHERE salary > 50000;
Extract name, age and city as JSON: Maria Lopez, 34, lives in Madrid. {"name": "Maria Lopez", "age": 34, "city": "Madrid"}
Turn this into JSON with keys product and price: the kettle costs 39.99 euros. {"product": "kettle", "price": 39.99}
Tom has 12 apples and gives 5 to Sara. How many apples does he have left? 12 - 5 = 7. Answer: 7
A train travels 60 km per hour for 3 hours. How far does it go? 60 * 3 = 180. Answer: 180
Hello! How are you today? I am fine, thank you. What a lovely day it is in the park.
Tell me a fun fact about octopuses: they have three hearts and blue blood.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
system user assistant You are a helpful assistant. Answer briefly and clearly.
Grüße aus München! Ça va? 東京は大きい都市です。 Emoji test: 🙂🚀 — done.
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , ; : . ! ? ' " _ @ # % & < >
"""


@dataclass(frozen=True)
class TinyAssets:
    """Paths of the built assets."""

    model_dir: Path
    adapters: dict[str, Path]
    config_path: Path


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """Train a byte-level BPE on the built-in corpus and save it with a ChatML chat template.

    Returns:
        The ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, chat_template=CHATML_TEMPLATE, model_max_length=512,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, num_layers: int = 2, hidden: int = 64,
                     heads: int = 4, kv_heads: int = 2, intermediate: int = 128, max_positions: int = 512) -> Path:
    """Write a random tiny Llama (config.json + model.safetensors) and its tokenizer into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, initializer_range=0.3,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def make_tiny_adapter(model_dir: str | Path, out_dir: str | Path, r: int = 4, alpha: int = 8,
                      targets: Sequence[str] = ALL_LINEAR, seed: int = 1, b_std: float = 0.5) -> Path:
    """Write a random PEFT LoRA adapter for ``model_dir`` with nonzero A and B.

    Args:
        model_dir: the tiny base model.
        out_dir: where ``adapter_config.json`` + ``adapter_model.safetensors`` go.
        r: LoRA rank.
        alpha: LoRA alpha (scale ``alpha / r``).
        targets: module names to adapt.
        seed: RNG seed (different seeds give different adapters).
        b_std: std of ``lora_B`` entries (A is scaled ``1/sqrt(in_features)``).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API that transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    # Point at the local base by path: nothing must resolve it as a hub id.
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(Path(model_dir).resolve())
    cfg_path.write_text(json.dumps(data, indent=2))
    return out


_EXAMPLES = {
    "sql": ["How many customers signed up in March?", "List employees with a salary above 50000.",
            "Write a SQL query for the top 5 products by sales.", "Count the rows in the orders table.",
            "Select every flight that departs after 6pm.", "Join the authors and books tables."],
    "json": ["Extract name and age as JSON: Maria, 34.", "Turn this into JSON with keys product and price.",
             "Give me a JSON object with the sender and date.", "Parse this address into JSON fields.",
             "Return JSON {title, author} for Dune by Frank Herbert.", "Output a JSON record for this contact."],
    "general": ["Hi there! How are you today?", "Tell me a fun fact about octopuses.",
                "Write a short poem about autumn.", "Why is the sky blue?",
                "What should I cook for dinner tonight?", "Recommend a book for a long flight."],
}


def tiny_experts_yaml(out_dir: str | Path, model_dir: str | Path, adapters: dict[str, Path], *,
                      router: str = "centroid", base_backend: dict | None = None, serving: dict | None = None,
                      rules: list | None = None, filename: str = "experts.yaml") -> Path:
    """Write an experts.yaml over the tiny model.

    Args:
        out_dir: where the YAML goes (relative paths in it resolve against this dir).
        model_dir: the tiny base model.
        adapters: expert name -> adapter dir, for ``sql`` and ``json``.
        router: ``centroid`` (fast, embedded MiniLM body) or any router type.
        base_backend: replaces the ``base_model`` section (e.g. a remote backend).
        serving: overrides merged into the ``serving`` section.
        rules: the ``rules`` section.
        filename: the YAML file name.
    """
    out = Path(out_dir)
    experts = []
    for name in ("sql", "json", "general"):
        e: dict = {"name": name, "description": f"tiny {name} expert", "examples": _EXAMPLES[name]}
        if name in adapters:
            e["adapter"] = str(Path(adapters[name]).resolve())
        if name == "sql":
            e["system_prompt"] = "You write SQL."
            e["generation"] = {"temperature": 0.0, "max_tokens": 8}
        experts.append(e)
    data = {
        "version": 1,
        "base_model": base_backend or {"backend": "local", "model": str(Path(model_dir).resolve()),
                                       "id": TINY_MODEL_ID, "dtype": "float32", "device": "cpu", "threads": 1},
        "router": {"type": router, "path": ".coe/router", "threshold": 0.4, "fallback": "general", "seed": 0},
        "experts": experts,
        "rules": rules if rules is not None else [
            {"name": "sql-statement", "expert": "sql", "when": {"regex": "(?i)\\bselect\\b.+\\bfrom\\b"}},
        ],
        "serving": {"max_batch": 8, "max_seq_len": 256, "max_loras": 4, "max_queue": 64,
                    "max_tokens_default": 16, "max_tokens_limit": 128, "adapter_roots": [str(out.resolve())],
                    "request_timeout_s": 60, "shutdown_grace_s": 5, **(serving or {})},
    }
    path = out / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_assets(root: str | Path, *, router: str = "centroid") -> TinyAssets:
    """Build (once) the model, two adapters (``sql`` seed 1, ``json`` seed 2) and experts.yaml in ``root``."""
    root = Path(root)
    model_dir = root / "model"
    if not (model_dir / "model.safetensors").is_file():
        build_tiny_model(model_dir)
    adapters = {}
    for name, seed in (("sql", 1), ("json", 2)):
        d = root / "adapters" / name
        if not (d / "adapter_model.safetensors").is_file():
            make_tiny_adapter(model_dir, d, seed=seed)
        adapters[name] = d
    config_path = tiny_experts_yaml(root, model_dir, adapters, router=router)
    return TinyAssets(model_dir=model_dir, adapters=adapters, config_path=config_path)


if __name__ == "__main__":  # python tests/tiny.py OUT_DIR: build the assets to look at them
    import sys

    print(tiny_assets(sys.argv[1] if len(sys.argv) > 1 else "tiny-assets"))
