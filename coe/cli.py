"""The ``coe`` command line: argparse, lazy imports, no logic.

Each subcommand's parser is built by one ``_add_<command>`` function, and its work lives in
the module named there (imported only when that command runs, so ``coe --help`` is instant).

Exit codes: 0 ok; 2 for config or usage errors (message on stderr); 1 for runtime errors.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable, Sequence

DEFAULT_CONFIG = "experts.yaml"


def _target(spec: str) -> Callable[[argparse.Namespace], int | None]:
    """Lazily resolve ``"package.module:function"``."""

    def run(args: argparse.Namespace) -> int | None:
        module, _, func = spec.partition(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def _config_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--config", default=None if required else DEFAULT_CONFIG, required=required, metavar="CFG",
        help=f"experts.yaml to use (default: {DEFAULT_CONFIG})" if not required else "experts.yaml to use",
    )


# --------------------------------------------------------------------------- routing front


def _add_train_router(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-router", help="train the router from the experts' examples and save it")
    _config_arg(p)
    p.add_argument("--data", action="append", default=[], metavar="JSONL",
                   help='extra training rows {"text", "label", optional "topic"} (repeatable)')
    p.add_argument("--out", default=None, metavar="DIR", help="where to save (default: router.path of the config)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: router.seed of the config)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (default: torch's own; 1 is faster on a busy machine)")
    p.set_defaults(func=_target("routers.commands:train_router"))


def _add_route(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route", help="route messages and print one JSON decision per text")
    _config_arg(p)
    p.add_argument("texts", nargs="+", metavar="TEXT", help="messages to route")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="request metadata for rules, e.g. --metadata tenant=acme (repeatable)")
    p.add_argument("--router-path", default=None, metavar="DIR", help="trained router dir (default: router.path)")
    p.set_defaults(func=_target("routers.commands:route"))


def _add_eval_router(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-router", help="measure routing accuracy (and build/run the CLINC150 benchmark)")
    p.add_argument("--config", default=None, metavar="CFG", help="experts.yaml with the experts and rules to evaluate")
    p.add_argument("--train", default=None, metavar="JSONL", help='training rows {"text", "label", optional "topic"}')
    p.add_argument("--val", default=None, metavar="JSONL", help="validation rows, used to calibrate the threshold")
    p.add_argument("--test", default=None, metavar="JSONL", help="test rows")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory")
    p.add_argument("--router", default="contrastive",
                   help="contrastive | setfit | centroid | logreg | knn, a comma-separated list of them, or all (default: contrastive)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: router.seed of the config)")
    p.add_argument("--benchmark", default=None, choices=["clinc150"], help="build a benchmark's files and config, then run")
    p.add_argument("--shots", type=int, default=4, help="benchmark examples per intent (default: 4)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="benchmark source data (default: ../shared/data/<name>)")
    p.add_argument("--oos-train", type=int, default=100, metavar="N",
                   help="benchmark: oos_train rows added as examples of the fallback expert (default: 100)")
    p.add_argument("--min-acceptance", type=float, default=0.95, metavar="A",
                   help="threshold calibration on --val: the highest threshold keeping this share of in-scope "
                        "rows routed to an expert (default: 0.95)")
    p.add_argument("--latency-samples", type=int, default=200, metavar="N",
                   help="single-message decisions timed for the latency percentiles (default: 200)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads for training and routing (default: torch's own)")
    p.add_argument("--training", action="append", default=[], metavar="KEY=VALUE",
                   help="override a router.training field for this evaluation, e.g. --training logreg_c=30 (repeatable)")
    p.set_defaults(func=_target("eval.harness:main"))


# --------------------------------------------------------------------------- serving


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible server")
    _config_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing router")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--print-vllm-command", action="store_true",
                   help="print the `vllm serve` command matching the config (for base_model.backend: remote) and exit")
    p.set_defaults(func=_target("coe.server.app:serve_command"))


# --------------------------------------------------------------------------- experts


def _add_train_expert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-expert", help="LoRA-train one expert's adapter on the base model")
    _config_arg(p)
    p.add_argument("--expert", required=True, help="expert name (sql, json or math for the embedded generators)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the expert recipe's)")
    p.add_argument("--out", default=None, metavar="DIR", help="adapter output dir (default: adapters/<expert>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default=None, choices=["sql", "json", "math"],
                   help="data generator (default: the expert's name)")
    p.add_argument("--rows", type=int, default=None, help="distinct training rows (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the recipe's; alpha follows as 2*rank)")
    p.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: the recipe's, or 2*rank)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_target("train.train_expert:main"))


def _add_eval_e2e(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-e2e", help="end-to-end task success: base vs auto routing vs oracle expert")
    _config_arg(p)
    p.add_argument("--test", default=None, metavar="JSONL",
                   help="test rows, e.g. from `python -m train.tasks --out FILE` (default: the seeded held-out sets "
                        "plus chit-chat for the fallback expert)")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory (report.json, report.md, rows.jsonl)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="rows per task at most (default test set: N rows per task, default 40)")
    p.add_argument("--seed", type=int, default=None, help="seed of the default test set (default: 1234)")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="requests in flight at once (default: serving.max_batch)")
    p.add_argument("--no-share", action="store_true",
                   help="generate identical requests (auto routed like the oracle) separately")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_target("eval.e2e:main"))


# --------------------------------------------------------------------------- benchmarks


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the option in its error)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of rounds, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 round, got {n}")
    return n


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (programs that print numbers)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="{router,engine,ttft}")

    r = bsub.add_parser("router", help="routing latency p50/p95 and batch throughput")
    _config_arg(r)
    r.add_argument("--json", default=None, metavar="OUT.json")
    r.add_argument("--repeats", type=int, default=200)
    r.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, i.e. the core count)")
    r.add_argument("--router-path", default=None, metavar="DIR", help="trained router dir (default: router.path)")
    r.add_argument("--batch-sizes", default="1,8,32,128", metavar="N,N,...",
                   help="batch sizes for the throughput part (default: 1,8,32,128)")
    r.set_defaults(func=_target("routers.bench:main"))

    e = bsub.add_parser("engine", help="engine throughput vs transformers+PEFT")
    e.add_argument("--model", default=None, help="model dir, hub id or .gguf (default: embedded SmolLM2-135M)")
    e.add_argument("--json", default=None, metavar="OUT.json")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--new-tokens", type=int, default=64)
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    e.add_argument("--ratio-rounds", type=_at_least_one, default=None, metavar="N",
                   help="rounds of the engine-only ratio cases (default: 12; each ~15 s): more rounds narrow the "
                        "ratios' confidence intervals")
    from coe.config import FUSED_LORA_DTYPES

    e.add_argument("--fused-lora-dtype", choices=FUSED_LORA_DTYPES, default="float16",
                   help="serving.fused_lora_dtype of the engine under test (default: float16, the engine's default)")
    e.set_defaults(func=_target("coe.engine.bench:main"))

    t = bsub.add_parser("ttft", help="routing overhead on time-to-first-token: auto vs explicit expert")
    _config_arg(t)
    t.add_argument("--json", default=None, metavar="OUT.json")
    t.add_argument("--requests", type=int, default=50, help="auto/explicit pairs to time (default: 50)")
    t.add_argument("--max-tokens", type=int, default=1, help="tokens per request (default: 1)")
    t.add_argument("--url", default=None, help="a running server's /v1 URL (default: start one in-process)")
    t.set_defaults(func=_target("eval.bench_ttft:main"))


def _add_soak(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="N concurrent streaming clients against a server for D seconds")
    _config_arg(p)
    p.add_argument("--url", default=None, help="existing server base URL (default: start `coe serve` on loopback)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: 16)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default: 30)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default: 32)")
    p.add_argument("--distinct", type=int, default=32,
                   help="distinct requests in the pool, each also run alone for the equality check (default: 32)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="with --url: the server's pid, to record its RSS (default: RSS not recorded)")
    p.add_argument("--rss-interval", type=float, default=1.0, help="seconds between RSS samples (default: 1)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take (default: 600)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.set_defaults(func=_target("eval.soak:main"))


COMMANDS = (_add_train_router, _add_route, _add_eval_router, _add_serve, _add_train_expert, _add_eval_e2e, _add_bench, _add_soak)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coe",
        description="coe: Composition-of-Experts LLM server (rules + SetFit routing over multi-LoRA experts).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 here
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from coe.errors import CoeError, ConfigError

    try:
        rc = args.func(args)
    except ConfigError as exc:
        print(f"coe {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except CoeError as exc:
        print(f"coe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"coe {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
