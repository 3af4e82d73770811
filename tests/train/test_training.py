"""Formatting, the LoRA loop's loss, and a tiny end-to-end `coe train-expert` run (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from train.formatting import chat_messages, encode_example, prompt_ids
from train.lora_loop import batch_loss
from train.tasks import train_set
from train.train_expert import group_key

SYSTEM = "You translate questions into a single SQLite query. Answer with the SQL only."


def test_system_prompt_is_prepended_once():
    row = {"messages": [{"role": "user", "content": "hi"}]}
    assert chat_messages(SYSTEM, row)[0] == {"role": "system", "content": SYSTEM}
    own = {"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}]}
    assert chat_messages(SYSTEM, own) == own["messages"]
    assert chat_messages(None, row) == row["messages"]


@pytest.mark.parametrize("task", ["sql", "json", "math"])
def test_label_span_is_the_answer_and_end_of_turn(tiny_tokenizer, task):
    row = train_set(task, 1, seed=0)[0]
    enc = encode_example(tiny_tokenizer, SYSTEM, row)
    assert list(enc.ids[: enc.label_start]) == prompt_ids(tiny_tokenizer, SYSTEM, row)
    assert enc.label_end == len(enc.ids)
    assert tiny_tokenizer.decode(enc.ids[enc.label_start : enc.label_end]) == row["reference"] + "<|im_end|>"


def _tiny_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def test_shared_prefix_loss_equals_plain_answer_only_loss(tiny_tokenizer, tiny_model_dir):
    """The prefix-once forward gives the same loss as full forwards with answer-only labels."""
    torch.manual_seed(0)
    peft_model = _tiny_peft(tiny_model_dir)
    rows = train_set("sql", 3, seed=1)
    batch = [encode_example(tiny_tokenizer, SYSTEM, r) for r in rows]
    lm = peft_model.get_base_model()
    loss, _, prefix = batch_loss(lm, batch, tiny_tokenizer.pad_token_id)
    assert prefix > 10  # the system prompt at least is shared
    losses = []
    with torch.no_grad():
        for e in batch:
            logits = lm(input_ids=torch.tensor([e.ids])).logits[0]
            for pos in range(e.label_start - 1, e.label_end - 1):
                losses.append(torch.nn.functional.cross_entropy(logits[pos][None], torch.tensor([e.ids[pos + 1]])))
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in peft_model.parameters() if p.requires_grad)


def test_group_key_is_the_context_block():
    sql_rows = train_set("sql", 5, seed=0)
    assert all(group_key(r).startswith("Schema:\nCREATE TABLE") for r in sql_rows)
    assert group_key(train_set("math", 1, seed=0)[0]) == ""


def _tiny_config(tmp_path, tiny_model_dir):
    cfg = tmp_path / "experts.yaml"
    cfg.write_text(
        "version: 1\n"
        f"base_model: {{model: {json.dumps(str(tiny_model_dir))}}}\n"
        "router: {type: none}\n"
        "experts:\n"
        "  - name: sql\n"
        f"    system_prompt: {json.dumps(SYSTEM)}\n"
        "  - name: notes\n"
    )
    return cfg


def test_train_expert_writes_a_loadable_fp16_peft_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from coe.cli import main

    cfg = _tiny_config(tmp_path, tiny_model_dir)
    out = tmp_path / "adapter"
    rc = main(["train-expert", "--config", str(cfg), "--expert", "sql", "--steps", "4", "--rows", "16",
               "--batch-size", "4", "--rank", "4", "--lr", "0.01", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json", "README.md"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "training.json").read_text())
    # Batches never mix schemas, so a small group can make a short batch.
    assert meta["steps"] == 4 and 4 < meta["examples_seen"] <= 16 and meta["recipe"]["rank"] == 4
    assert "Not measured yet" in (out / "README.md").read_text()

    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(t.dtype == torch.float16 for t in weights.values())
    # LoRA B starts at zero; training moved it.
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in weights.items())

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, out)
        after = adapted(input_ids=ids).logits
    assert not torch.allclose(before, after)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"


def test_train_expert_clear_errors(tmp_path, tiny_model_dir, capsys):
    from coe.cli import main

    cfg = _tiny_config(tmp_path, tiny_model_dir)
    assert main(["train-expert", "--config", str(cfg), "--expert", "nope"]) == 2
    assert "'nope' is not an expert" in capsys.readouterr().err
    assert main(["train-expert", "--config", str(cfg), "--expert", "notes"]) == 2
    assert "no data generator for 'notes'" in capsys.readouterr().err
    assert main(["train-expert", "--config", str(cfg), "--expert", "sql", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
