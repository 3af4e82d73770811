"""``coe train-router`` and ``coe route``: thin CLI glue over ``routers.factory`` and ``DecisionChain``.

Each function takes the argparse Namespace built in ``coe/cli.py`` and returns an exit code.
Config and usage errors raise ``ConfigError`` (exit 2); a missing or mismatched router raises
``RouterError`` (exit 1); ``coe.cli.main`` prints either on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from coe.config import load_config
from coe.errors import ConfigError
from coe.types import RouteContext


def train_router(args: argparse.Namespace) -> int:
    """``coe train-router [--config CFG] [--data X.jsonl ...] [--out DIR] [--seed N] [--threads N]``."""
    from routers.factory import read_rows, train_router as train, training_rows

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads: {threads} is not a thread count; expected an integer >= 1", param="threads")
        import torch

        torch.set_num_threads(threads)
    cfg = load_config(args.config)
    if cfg.router.type == "none":
        raise ConfigError(
            f"router.type: {args.config} sets `none` (rules and fallback only), so there is no router to train; "
            "set router.type to contrastive, setfit, centroid, logreg or knn",
            param="router.type",
        )
    extra = [row for path in (args.data or []) for row in read_rows(path, cfg)]
    n_rows = len(training_rows(cfg, extra))
    print(
        f"coe train-router: training a {cfg.router.type} router on {n_rows} rows "
        f"({len(extra)} from --data) for experts {', '.join(cfg.expert_names)}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    router = train(cfg, extra, seed=args.seed, out=args.out)
    out = args.out or str(cfg.router_path)
    print(
        f"saved {router.info.kind} router for experts {', '.join(router.experts)} "
        f"({router.info.n_train} rows, seed {router.info.seed}, {time.perf_counter() - started:.1f} s) to {out}"
    )
    return 0


def parse_metadata(items: Sequence[str]) -> dict[str, str]:
    """``["tenant=acme", "user=bo"]`` -> ``{"tenant": "acme", "user": "bo"}``.

    Raises:
        ConfigError: an item is not ``KEY=VALUE`` with a non-empty key.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--metadata: {item!r} is not KEY=VALUE; e.g. --metadata tenant=acme", param="metadata")
        out[key.strip()] = value
    return out


def route(args: argparse.Namespace) -> int:
    """``coe route [--config CFG] [--metadata K=V ...] [--router-path DIR] TEXT [TEXT ...]``.

    Prints one JSON object per text, in order:
    ``{"expert", "source", "score", "reason", "scores": {expert: probability}}``.
    """
    from routers.chain import DecisionChain
    from routers.factory import load_router

    cfg = load_config(args.config)
    metadata = parse_metadata(args.metadata or [])
    router = None
    if cfg.router.type != "none":
        router = load_router(args.router_path, cfg)
    chain = DecisionChain(cfg, router=router)
    decisions = chain.decide_batch([RouteContext(text=t, metadata=metadata) for t in args.texts])
    for d in decisions:
        print(json.dumps(d.to_dict(), ensure_ascii=False))
    return 0
