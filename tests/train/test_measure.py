"""The scoring script on a tiny model: batched greedy equals one-by-one greedy; the card shows the scores."""

from __future__ import annotations

import json

import torch

from train import model_card
from train.measure import generate_batched, measure


def test_left_padded_batches_match_single_prompts(tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("SELECT name FROM", "Answer: 12", "Extract name and age as JSON: Tom, 4")]
    batched = generate_batched(model, tiny_tokenizer, prompts, 6, batch_size=3, desc="b")
    single = [generate_batched(model, tiny_tokenizer, [p], 6, batch_size=1, desc="s")[0] for p in prompts]
    assert batched == single


def test_measure_and_card(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    cfg = tmp_path / "experts.yaml"
    cfg.write_text(f"version: 1\nbase_model: {{model: {json.dumps(str(tiny_model_dir))}}}\nrouter: {{type: none}}\n"
                   "experts:\n  - name: math\n    system_prompt: Solve it.\n    generation: {max_tokens: 5}\n")
    result = measure(str(cfg), "math", adapter=str(adapter), n=4, batch_size=2)
    assert result["n"] == 4 and result["max_new_tokens"] == 5 and result["task"] == "math"
    for name in ("base", "adapter"):
        assert 0.0 <= result[name]["success"] <= 1.0
        assert result[name]["correct"] == round(result[name]["success"] * 4)
    assert len(result["examples"]) == 3 and {"base", "adapter", "reference"} <= set(result["examples"][0])

    # A card renders the measured numbers next to the training facts.
    (adapter / "training.json").write_text(json.dumps({
        "expert": "math", "description": "", "base": "tiny", "base_source": "a test dir", "dtype": "float16",
        "adapter_bytes": 1000, "adapter_params": 500, "seed": 0, "generator_module": "task_math", "steps": 2,
        "examples_seen": 16, "final_loss": 1.5, "train_seconds": 3.0, "train_cpu_seconds": 2.5, "total_seconds": 5.0, "threads": 1,
        "machine": "test", "command": "coe train-expert ...",
        "recipe": {"task": "math", "train_rows": 16, "batch_size": 8, "lr": 0.001, "warmup_steps": 1, "rank": 2,
                   "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    }))
    (adapter / "scores.json").write_text(json.dumps({**result, "command": "python -m train.measure ..."}))
    card = model_card.write(adapter).read_text()
    assert f"({result['adapter']['correct']}/4)" in card and "python -m train.measure" in card
    assert "r=2, lora_alpha=4" in card and "of process CPU time" in card and "\n\n\n" not in card
