"""Routing: rules, the SetFit router and embedding baselines, and the decision chain.

Imports coe.config and coe.types only (never the engine). Heavy dependencies (SetFit,
sentence-transformers) are imported inside the router implementations, not here.
"""

from routers.base import Router, RouterInfo

__all__ = ["Router", "RouterInfo"]
