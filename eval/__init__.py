"""Evaluation: routing accuracy (``coe eval-router``: metrics, harness, report files, the CLINC150
benchmark builder), end-to-end evaluation and benchmarks.

Only ``coe.cli`` imports this package (lazily); nothing in coe/, routers/ or kernels/ may.
"""
