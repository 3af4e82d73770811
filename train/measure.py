"""Score an expert adapter against the bare base model on its held-out test set.

``python -m train.measure --expert sql [--config experts.yaml] [--adapter DIR] [--n 100]
[--json OUT.json] [--update-card]``

Both models get identical prompts: the expert's system prompt from experts.yaml, the user
turn, the chat template with the generation prompt; greedy decoding up to the expert's ``generation.max_tokens``. Each answer is judged by
``train.tasks.check``. Two generators (``--backend``):

- ``peft`` (default): transformers+PEFT ``generate``, batched with left padding: the reference,
  independent of coe's engine;
- ``coe``: coe's own engine (``coe.engine.Engine``), every prompt submitted at once so that its
  continuous batching runs them together. Its greedy tokens agree with transformers+PEFT (the
  engine's agreement tests), and it is several times faster on CPU: on a busy 2-core machine
  the ``peft`` path took ~4 minutes per batch of 16 at 1 thread, which makes 3 x 200 held-out
  generations an hour-long job.
 ``--update-card`` stores the result as ``scores.json`` next
to the adapter and regenerates its README.md. Prints one JSON object.

This is the reference measurement; ``coe eval-e2e`` measures the served pipeline.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def generate_batched(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str) -> list[str]:
    """Greedy completions (text of the new tokens, special tokens dropped), in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding, so every row's prompt ends at the last column
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad_id, eos_token_id=tok.eos_token_id,
            )
        for row, i in enumerate(idx):
            outputs[i] = tok.decode(out[row, width:], skip_special_tokens=True)
    return outputs


def generate_engine(engine, messages: list[list[dict]], adapter: str | None, max_new_tokens: int, desc: str) -> list[str]:
    """Greedy completions from coe's engine, all submitted concurrently (the engine batches them)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(msgs: list[dict]) -> str:
        return engine.generate(messages=msgs, adapter=adapter, max_tokens=max_new_tokens, temperature=0.0).text

    with ThreadPoolExecutor(max_workers=max(1, engine.serving.max_batch)) as pool:
        return list(tqdm(pool.map(one, messages), total=len(messages), desc=desc, unit="prompt"))


def measure(config: str, expert_name: str, adapter: str | None = None, task: str | None = None, n: int = 100,
            seed: int | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
            with_base: bool = True, backend: str = "peft") -> dict:
    """Score base and base+adapter on ``test_set(task, n, seed)``.

    Args:
        config: experts.yaml path.
        expert_name: the expert whose system prompt and generation settings are used.
        adapter: adapter dir (default: the expert's ``adapter`` in the config).
        task: data generator (default: the expert's name).
        n: test prompts.
        seed: test-set seed (default ``train.tasks.DEFAULT_TEST_SEED``).
        batch_size: generation batch.
        max_new_tokens: default: the expert's ``generation.max_tokens`` or 128.
        with_base: also score the bare base model.
        backend: ``peft`` (transformers+PEFT, the reference) or ``coe`` (coe's engine).

    Returns:
        A JSON-able dict with ``base`` and ``adapter`` success rates and a few examples.
    """
    from coe.config import load_config
    from train.formatting import chat_messages, prompt_ids
    from train.tasks import DEFAULT_TEST_SEED, check, test_set

    cfg = load_config(config)
    expert = cfg.expert(expert_name)
    task = task or expert.name
    seed = DEFAULT_TEST_SEED if seed is None else seed
    adapter_dir = adapter or (str(cfg.resolve_path(expert.adapter)) if expert.adapter else str(cfg.base_dir / "adapters" / expert.name))
    max_new = max_new_tokens or expert.generation.max_tokens or 128
    base = cfg.base_model.model
    if base is not None and cfg.resolve_path(base).exists():
        base = str(cfg.resolve_path(base))

    t0 = time.perf_counter()
    rows = test_set(task, n, seed)
    result: dict = {"task": task, "expert": expert.name, "adapter_dir": adapter_dir, "n": n, "seed": seed,
                    "max_new_tokens": max_new, "system_prompt": expert.system_prompt, "backend": backend}
    outs: dict[str, list[str]] = {}
    if backend == "coe":
        from coe.engine import Engine

        engine = Engine.from_pretrained(base, max_batch=max(1, batch_size))
        try:
            engine.load_adapter(expert.name, adapter_dir)
            messages = [chat_messages(expert.system_prompt, r) for r in rows]
            if with_base:
                outs["base"] = generate_engine(engine, messages, None, max_new, "base")
            outs["adapter"] = generate_engine(engine, messages, expert.name, max_new, "adapter")
        finally:
            engine.shutdown()
    elif backend == "peft":
        from peft import PeftModel

        from train.base_model import load_base

        model, tok = load_base(base)
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
        peft_model.eval()
        prompts = [prompt_ids(tok, expert.system_prompt, r) for r in rows]
        if with_base:
            with peft_model.disable_adapter():
                outs["base"] = generate_batched(peft_model, tok, prompts, max_new, batch_size, "base")
        outs["adapter"] = generate_batched(peft_model, tok, prompts, max_new, batch_size, "adapter")
    else:
        raise ValueError(f"backend: {backend!r} is not one of peft, coe")
    for name, texts in outs.items():
        ok = [check(task, r, t) for r, t in zip(rows, texts)]
        result[name] = {"success": sum(ok) / n, "correct": sum(ok),
                        "failures": [{"id": r["id"], "prompt": r["messages"][-1]["content"], "reference": r["reference"], "output": t}
                                     for r, t, good in zip(rows, texts, ok) if not good][:5]}
    result["examples"] = [{"id": r["id"], "prompt": r["messages"][-1]["content"], "reference": r["reference"],
                           **{k: v[i] for k, v in outs.items()}} for i, r in enumerate(rows[:3])]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.measure", description="base vs adapter task success on the held-out set")
    p.add_argument("--config", default="experts.yaml")
    p.add_argument("--expert", required=True)
    p.add_argument("--adapter", default=None, help="adapter dir (default: the expert's adapter in the config)")
    p.add_argument("--task", default=None, help="generator (default: the expert's name)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--no-base", action="store_true", help="score the adapter only")
    p.add_argument("--backend", choices=("peft", "coe"), default="peft",
                   help="generator: transformers+PEFT (reference, default) or coe's engine (several times faster)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("--update-card", action="store_true", help="write scores.json next to the adapter and regenerate README.md")
    args = p.parse_args(argv)
    result = measure(args.config, args.expert, args.adapter, args.task, args.n, args.seed, args.batch_size,
                     args.max_new_tokens, with_base=not args.no_base, backend=args.backend)
    result["command"] = shlex.join(["python", "-m", "train.measure", *(argv if argv is not None else sys.argv[1:])])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.update_card:
        if args.no_base:
            p.error("--update-card needs the base score too; drop --no-base")
        from train import model_card

        (Path(result["adapter_dir"]) / "scores.json").write_text(text + "\n")
        model_card.write(result["adapter_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
