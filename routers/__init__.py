"""Routing: rules, the contrastive (default) and SetFit routers, embedding baselines, and the decision chain.

Imports coe.config, coe.types and coe.errors only (never the engine). Heavy dependencies
(SetFit, sentence-transformers, torch) are imported inside the router implementations when
a router is trained or loaded, so importing this package stays cheap.

Public API:
    DecisionChain(config, router=None).decide(ctx) / .decide_batch(ctxs)
    RuleSet.from_config(config).match_pre(ctx) / .match_post(ctx, routed)
    make_router(kind, config, seed=None) -> Router (untrained)
    training_rows(config, extra_rows=()) -> [{"text", "label", "topic"}]
    train_router(config, extra_rows=(), seed=None, out=None, kind=None) -> Router (saved)
    load_router(path, config) -> Router
"""

from routers.base import Router, RouterInfo
from routers.chain import DecisionChain
from routers.factory import ROUTER_CLASSES, load_router, make_router, read_rows, train_router, training_rows
from routers.rules import RuleSet

__all__ = [
    "DecisionChain",
    "ROUTER_CLASSES",
    "Router",
    "RouterInfo",
    "RuleSet",
    "load_router",
    "make_router",
    "read_rows",
    "train_router",
    "training_rows",
]
