"""Render an adapter's README.md model card from its ``training.json`` and ``scores.json``.

``coe train-expert`` writes ``training.json`` (data, seed, recipe, time); ``python -m
train.measure --update-card`` writes ``scores.json`` (base vs adapter on the held-out set).
The card is always regenerated from those two files, so it never shows numbers that were
not measured; a retrained adapter drops its stale ``scores.json``.

This module knows nothing about models or training.
"""

from __future__ import annotations

import json
from pathlib import Path


_GENERATORS = {"peft": "transformers+PEFT", "coe": "coe's engine"}


def _fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def render(adapter_dir: str | Path) -> str:
    """The model card text for ``adapter_dir`` (which must hold ``training.json``)."""
    d = Path(adapter_dir)
    t = json.loads((d / "training.json").read_text())
    r = t["recipe"]
    lines = [
        f"# `{t['expert']}` expert: LoRA adapter for `{t['base']}`",
        "",
        *([t["description"], ""] if t.get("description") else []),
        "## Training",
        "",
        f"- Base: `{t['base']}` (weights from {t['base_source']}, fp32); PEFT LoRA, saved in {t['dtype']} "
        f"(`adapter_model.safetensors`, {t['adapter_bytes'] / 1e6:.2f} MB, {t['adapter_params']:,} parameters).",
        f"- LoRA: r={r['rank']}, lora_alpha={r['alpha']}, dropout 0, target_modules={', '.join(r['target_modules'])}.",
        f"- Data: `train.tasks.train_set({r['task']!r}, {r['train_rows']}, seed={t['seed']})` "
        f"(generator `train/{t['generator_module']}.py`); the held-out split is disjoint by construction.",
        f"- Format: the expert's system prompt from experts.yaml, then the user message, through the model's chat "
        "template; loss on the assistant answer and its end-of-turn token only.",
        f"- Optimisation: {t['steps']} steps x batch {r['batch_size']} ({t['examples_seen']} examples), AdamW lr {r['lr']}, "
        f"{r['warmup_steps']} warmup steps then linear decay; final loss (mean of last 20 steps) {t['final_loss']:.4f}.",
        f"- Train time: {_fmt_time(t['train_seconds'])} wall on {t['threads']} CPU thread(s) ({t['machine']})"
        + (f", {_fmt_time(t['train_cpu_seconds'])} of process CPU time" if "train_cpu_seconds" in t else "")
        + f"; whole command including data and model loading {_fmt_time(t['total_seconds'])} wall.",
        f"- Command: `{t['command']}`",
        "",
        "## Held-out task scores",
        "",
    ]
    scores_path = d / "scores.json"
    if scores_path.is_file():
        s = json.loads(scores_path.read_text())
        lines += [
            f"Greedy decoding with {_GENERATORS.get(s.get('backend', 'peft'), s.get('backend'))}, same chat formatting, max {s['max_new_tokens']} new tokens, "
            f"{s['n']} prompts of `train.tasks.test_set({s['task']!r}, {s['n']}, seed={s['seed']})`, "
            f"checked by `train.tasks.check`.",
            "",
            "| model | task success |",
            "|---|---|",
            f"| base `{t['base']}` | {s['base']['success']:.2f} ({s['base']['correct']}/{s['n']}) |",
            f"| base + this adapter | {s['adapter']['success']:.2f} ({s['adapter']['correct']}/{s['n']}) |",
            "",
            f"Measured with `{s['command']}` ({s['seconds']:.0f} s).",
        ]
    else:
        lines.append("Not measured yet: run `python -m train.measure --expert NAME --update-card`.")
    return "\n".join(lines) + "\n"


def write(adapter_dir: str | Path) -> Path:
    """Write ``README.md`` in ``adapter_dir``; returns its path."""
    path = Path(adapter_dir) / "README.md"
    path.write_text(render(adapter_dir), encoding="utf-8")
    return path
