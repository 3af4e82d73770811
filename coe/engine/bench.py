"""``coe bench engine``: the engine against transformers+PEFT ``generate``, in one process.

Same model (default: the embedded SmolLM2-135M-Instruct, fp32), same random r=16 all-linear
adapters (8 of them), greedy decoding past EOS, ~40-token prompts, 64 new tokens. Every number
is a median over repeats, and every comparison is a ratio against a baseline measured in the
same run, in alternating turns (engine, PEFT, engine, ...), because the machine may be shared:
each ratio is taken per round, then the median over rounds (``round_seconds`` and
``ratio_round_seconds`` have the raw times).
transformers+PEFT runs on the engine's loop thread, so both sides use the one OpenMP worker pool
(``coe.engine.threads`` explains why a second pool would slow either). Keys written to ``--json``
(goals from issue 6):

- ``single_stream_tok_s`` / ``peft_single_stream_tok_s`` / ``single_stream_speedup`` (>= 2.5):
  one request on one adapter (``*_base_*``: the same on the base model);
- ``mixed16_tok_s`` / ``peft_mixed16_tok_s`` / ``mixed16_speedup`` (>= 3): 16 concurrent requests
  over 8 adapters; PEFT runs them as one batch with ``adapter_names``;
- ``heterogeneity_ratio`` (>= 0.95): 16 requests over 8 adapters / 16 on one adapter;
- ``lora_vs_base_ratio`` (>= 0.95): 16 on one adapter / 16 on the base model (these two over
  ``ratio_rounds`` engine-only rounds of their three cases, 4 x repeats unless
  ``--ratio-rounds`` says, in alternating order; ``ratio_spread`` has the quartiles of their
  per-round values, the ratio of best rounds and a 95% confidence interval of the median,
  ``ci95``: the printed verdict is ``met`` only when that interval clears the goal);
- ``lora_mac_share`` / ``lora_vs_base_at_mac_share``: the LoRA's multiply-adds over the base
  model's in the uniform16 case, and the LoRA-vs-base ratio a LoRA costing exactly that share
  would give (:func:`lora_mac_share`): how far below 1 the goal's ratio is held by arithmetic;
- ``adapter_switch_ms`` (< 1): added latency of a short request (``SWITCH_PROMPT``, 4 tokens)
  when the previous one used another resident adapter: the median of 16 x repeats pairs;
- ``cold_load_ms`` (< 100): reading an r=16 all-linear adapter from local disk into a slot;
- ``itl_p99_during_load_ratio`` (< 2): running streams' p99 inter-token latency while a cold
  adapter loads into a free slot, over their median, pooled over ``itl_loads`` (3 x repeats)
  loads, since one load's window holds only ~15 steps (``itl_p99_during_load_ratio_per_load``:
  each load's own ratio; ``itl_p99_after_load_ratio``: the same streams' p99 after the loads,
  the run's control; ``itl_load_wrote_slot``: every load did write the slot);
- the start-up heap is frozen after the warm-ups, as ``coe serve`` freezes it
  (``coe.engine.threads.freeze_heap``);
- ``peak_rss_mb``: the process's peak resident memory after the engine's warm-up and engine-only
  runs (before the transformers baseline is loaded); ``peak_rss_total_mb`` after everything.
  ``peft_single_stream_base_tok_s`` is plain transformers (no PEFT wrapper) on the base model.

This module is a program that prints numbers; nothing here asserts on timings.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from coe.engine.outputs import GenerationOutput, StreamDelta
from coe.engine.threads import compute_on_one_thread, freeze_heap, run_in_fresh_thread, unfreeze_heap

PROMPT_TOKENS = 40
NUM_ADAPTERS = 8
RANK = 16
RATIO_ROUNDS = 4  # rounds of the engine-only ratio cases per repeat (see run)
SWITCH_PROMPT = "Hello."  # adapter_switch_ms's requests (see run)
_TOPICS = [
    "the history of the printing press", "how volcanoes form", "a recipe for lemon bread", "the rules of chess",
    "why the sky is blue", "training for a marathon", "the life cycle of a star", "how vaccines work",
    "writing a good cover letter", "the causes of the French revolution", "how to grow tomatoes", "black holes",
    "the water cycle", "learning to play the guitar", "the migration of birds", "how a compiler works",
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prompts(tokenizer: Any, n: int) -> list[str]:
    """n distinct prompts of about PROMPT_TOKENS tokens."""
    out = []
    for i in range(n):
        text = (f"Write a detailed explanation of {_TOPICS[i % len(_TOPICS)]} for a curious student. "
                "Cover the main ideas, give two concrete examples, mention a common misconception, "
                "and finish with a short summary of what to remember.")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
        out.append(tokenizer.decode(ids))
    return out


def _make_adapters(args: Any, root: Path, n: int, base_name: str, seed: int = 0) -> list[Path]:
    """n random r=16 all-linear PEFT adapters, written directly in PEFT's format (small random A
    and B, so outputs stay text-like). No transformers model is needed to make them."""
    from safetensors.torch import save_file

    from coe.engine.adapters import base_module_names
    from coe.engine.model import LORA_TARGETS

    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        tensors = {}
        for mod in base_module_names(args):
            d_in, d_out = args.module_shape(mod.rsplit(".", 1)[1])
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g) * 0.02
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g) * 0.02
        path = root / f"bench-{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
                  "target_modules": list(LORA_TARGETS),
                  "bias": "none", "use_rslora": False, "base_model_name_or_path": base_name, "inference_mode": True}
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        paths.append(path)
    return paths


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _ratio(num: list[float], den: list[float]) -> float:
    """The median of the per-round ratios num[i] / den[i] (rounds with a zero den left out):
    a drifting machine load cancels within a round (see :func:`_interleaved`)."""
    return _median([a / b for a, b in zip(num, den) if b])


def _spread(num: list[float], den: list[float]) -> dict[str, Any]:
    """How far a ratio's rounds scatter: the quartiles of the per-round ratios num[i] / den[i],
    the ratio of the two sides' fastest rounds (``of_best``: what the machine's extra load, which
    only ever slows a round, leaves least room to move), and ``ci95``, a 95% confidence interval
    of the median (:func:`_median_ci`; from 5 rounds)."""
    r = sorted(a / b for a, b in zip(num, den) if b)
    if not r:
        return {}
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    out: dict[str, Any] = {"q1": round(q[0], 4), "median": round(q[1], 4), "q3": round(q[2], 4),
                           "of_best": round(min(num) / min(den), 4)}
    ci = _median_ci(r)
    if ci is not None:
        out["ci95"] = [round(ci[0], 4), round(ci[1], 4)]
    return out


def _median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A percentile-bootstrap confidence interval of the median of ``xs`` (scipy's ``bootstrap``,
    10,000 resamples, a fixed seed so that a result file can be recomputed), or None below 5
    values. Why: the engine-only ratios sit within a few % of their goals on a machine whose
    rounds scatter by more than that, so a median alone cannot say whether a goal is met;
    :func:`main` reads a goal as met only when the whole interval clears it."""
    if len(xs) < 5:
        return None
    import numpy as np
    from scipy.stats import bootstrap

    res = bootstrap((np.asarray(xs, dtype=float),), np.median, confidence_level=level, n_resamples=10_000,
                    method="percentile", rng=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def pool_runs(paths: list[str | Path]) -> dict[str, Any]:
    """The engine-only ratios over the rounds of several ``coe bench engine --json`` files pooled
    (their ``ratio_round_seconds``), with :func:`_spread`'s quartiles and 95% confidence interval:
    one run's interval is often wider than the distance between its median and the goal."""
    rounds: dict[str, list[float]] = {"mixed16": [], "uniform16": [], "base16": []}
    for p in paths:
        got = json.loads(Path(p).read_text()).get("ratio_round_seconds")
        if not got or any(k not in got for k in rounds):
            raise ValueError(f"{p}: no ratio_round_seconds with {', '.join(rounds)}; expected a coe bench engine --json file")
        for k in rounds:
            rounds[k] += got[k]
    return {"runs": [str(p) for p in paths], "ratio_rounds": len(rounds["base16"]), **_ratio_spreads(rounds)}


# The engine-only ratios: (numerator case, denominator case) of each rate ratio (den's time / num's).
RATIO_CASES = {"heterogeneity_ratio": ("mixed16", "uniform16"), "lora_vs_base_ratio": ("uniform16", "base16")}


def _ratio_spreads(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """:func:`_spread` of each engine-only ratio over the rounds' times per case."""
    return {k: _spread(times[den], times[num]) for k, (num, den) in RATIO_CASES.items()}


def lora_mac_share(args: Any, rank: int, prompt_tokens: list[int], new_tokens: int) -> dict[str, float]:
    """The multiply-adds of a 16-request case's LoRA against those of its base model, from the
    model's shapes: ``lora_mac_share`` = (every token's r x (d_in + d_out) per all-linear
    projection) / (every token's projections, the output head for every generated token, and
    attention over each token's context); ``lora_vs_base_at_mac_share`` = 1 / (1 +
    lora_mac_share), the LoRA-vs-base ratio that a LoRA costing exactly its share of the
    multiply-adds, at the base's speed per multiply-add, would give if the round's time were all
    in its multiply-adds. Why: it says how far below 1 an exact float32 LoRA puts the ratio at
    all, whatever the kernels (norms, sampling and the scheduler only raise it, as the LoRA adds
    nothing to them). Each request prefills its prompt, then decodes ``new_tokens - 1`` tokens
    (the first comes from the prefill's last position)."""
    from coe.engine.model import LORA_TARGETS

    shapes = [args.module_shape(m) for m in LORA_TARGETS]
    per_tok_base = args.n_layers * sum(i * o for i, o in shapes)
    per_tok_lora = args.n_layers * rank * sum(i + o for i, o in shapes)
    head = args.vocab_size * args.dim
    tokens = base = 0
    for p in prompt_tokens:
        n = p + new_tokens - 1  # positions computed: the prompt, then every decoded token
        tokens += n
        ctx = n * (n + 1) // 2  # each position attends over the positions up to itself
        base += n * per_tok_base + new_tokens * head + 2 * args.n_layers * args.n_heads * args.head_dim * ctx
    share = tokens * per_tok_lora / base
    return {"lora_mac_share": share, "lora_vs_base_at_mac_share": 1.0 / (1.0 + share)}


def _cases(names: list[str], batch: int) -> dict[str, list[str | None]]:
    """Each 16-request case's adapter per request: over all the bench adapters, one, none."""
    return {"mixed16": [names[i % NUM_ADAPTERS] for i in range(batch)], "uniform16": [names[0]] * batch,
            "base16": [None] * batch}


def _engine_with_adapters(model: str | None, threads: int, *, max_batch: int, max_seq_len: int, device: str = "cpu",
                          cold: int = 0, fused_lora_dtype: str = "float16") -> tuple[Any, list[str], list[Path], Path]:
    """A float32 engine with NUM_ADAPTERS random bench adapters loaded (``a0``..``a7``), and the
    paths of those plus ``cold`` more written but not loaded, in a temporary folder (returned,
    for the caller to remove). The adapters are written on a fresh thread that leaves no
    OpenMP pool behind (see ``coe.engine.threads``)."""
    from coe.engine import Engine

    torch.set_num_threads(threads)
    engine = Engine.from_pretrained(model, dtype="float32", device=device, max_batch=max_batch, max_loras=NUM_ADAPTERS,
                                    max_seq_len=max_seq_len, max_queue=4 * max_batch, fused_lora_dtype=fused_lora_dtype)
    tmp = Path(tempfile.mkdtemp(prefix="coe-bench-"))

    def make() -> list[Path]:
        compute_on_one_thread()
        return _make_adapters(engine.model.args, tmp, NUM_ADAPTERS + cold, engine.model_id)

    paths = run_in_fresh_thread(make)
    names = [f"a{i}" for i in range(NUM_ADAPTERS)]
    for n, p in zip(names, paths):
        engine.load_adapter(n, p)
    return engine, names, paths, tmp


# --------------------------------------------------------------------------- engine side


def _engine_concurrent(engine: Any, prompts: list[str], adapters: list[str | None], new_tokens: int) -> None:
    """Submit every request at once, then drain them all (they share the engine's steps).

    The requests are submitted from the engine's loop thread, between two steps, so the first
    step sees all of them, as PEFT's batch sees all its prompts. Submitted one by one from this
    thread (each is tokenized on submission, ~1-2 ms), the loop started its first step on the
    first few, and the rest were prefilled 64 tokens a step next to running decodes (the
    scheduler's budget while streams decode): 66-74 steps a run instead of ~66, a quarter of
    the time in those mixed steps, and a run-to-run spread of ~15%."""
    streams = engine.scheduler.call(
        lambda: [engine.stream(p, adapter=a, max_tokens=new_tokens, ignore_eos=True) for p, a in zip(prompts, adapters)])
    for s in streams:
        for item in s:
            if isinstance(item, GenerationOutput):
                assert item.completion_tokens == new_tokens, item


def _switch_ms(engine: Any, prompt: str, names: list[str], repeats: int) -> float:
    """Added latency of a short request that follows another adapter's request: the median over
    ``repeats`` back-to-back pairs of (latency after a different adapter's request) minus
    (latency after the same adapter's). Pairs, not a difference of two medians, so that the
    machine's drift cancels within each pair."""
    def lat(adapter: str) -> float:
        t0 = time.perf_counter()
        engine.generate(prompt, adapter=adapter, max_tokens=4, ignore_eos=True)
        return time.perf_counter() - t0

    diffs = []
    lat(names[0])
    for i in range(repeats):
        other = names[1 + i % (len(names) - 1)]
        lat(other)
        same = lat(other)  # other after other
        lat(names[0])
        diffs.append(lat(other) - same)  # other after names[0]
    return _median(diffs) * 1e3


def _cold_load_ms(engine: Any, path: Path, repeats: int) -> float:
    times = []
    for i in range(repeats):
        name = f"cold-{i}"
        t0 = time.perf_counter()
        engine.load_adapter(name, path)
        times.append(time.perf_counter() - t0)
        engine.unload_adapter(name)
    return _median(times) * 1e3


def _itl_run(engine: Any, prompts: list[str], names: list[str], cold: Path,
             new_tokens: int) -> tuple[list[float], list[float], float, list[float], bool]:
    """One run of :func:`_itl_during_load`: the streams' inter-token gaps, those that overlap the
    load of ``cold`` (started once every stream has a quarter of its tokens), the load's
    seconds, the gaps of the streams' decoding after the load (the same run's control), and
    whether the load wrote the adapter into a slot."""
    arrivals: list[list[float]] = [[] for _ in prompts]
    streams = [engine.stream(p, adapter=a, max_tokens=new_tokens, ignore_eos=True) for p, a in zip(prompts, names)]

    def drain(i: int) -> None:
        for item in streams[i]:
            if isinstance(item, StreamDelta):
                arrivals[i].append(time.perf_counter())

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    while min(len(a) for a in arrivals) < new_tokens // 4:
        time.sleep(0.002)
    t_load = time.perf_counter()
    engine.load_adapter("cold-itl", cold)  # read off the loop thread, copied into a free slot between two steps
    t_done = time.perf_counter()
    wrote_slot = engine.registry.slot_of("cold-itl") is not None
    for t in threads:
        t.join()
    engine.unload_adapter("cold-itl")
    gaps, during, after = [], [], []
    for a in arrivals:
        for t0, t1 in zip(a, a[1:]):
            gaps.append(t1 - t0)
            if t1 >= t_load and t0 <= t_done:
                during.append(t1 - t0)
            elif t0 > t_done:
                after.append(t1 - t0)
    return gaps, during, t_done - t_load, after, wrote_slot


def _itl_during_load(engine: Any, prompts: list[str], names: list[str], cold: Path, new_tokens: int,
                     loads: int = 1) -> dict[str, Any]:
    """Streams decode while an adapter is read from disk (off the loop thread) and made resident,
    ``loads`` times (a fresh set of streams and one load each).

    Returns the streams' median ITL, the p99 ITL of the gaps overlapping a load, pooled over the
    loads, and their ratio; each load's own ratio (``itl_p99_during_load_ratio_per_load``); and,
    as the run's control, the p99 of the gaps after the loads over the same median
    (``itl_p99_after_load_ratio``: what the machine's noise alone does to the tail; NaN where no
    gap follows a load). A step's gap is every stream's at once, so one load window (~15 steps)
    holds ~15 distinct gaps and its "p99" is its slowest step: one stall of the machine in that
    window decided the figure (the tenth session's s18a gave 8.45 from one 263 ms gap, while 12
    repeats of the same case gave 1.22-1.95). Pooled over several loads, the p99 is a tail
    percentile of ~15 x ``loads`` steps, and a stall that every load causes still sets it (one
    in each window is ~7% of the gaps, far above 1%).
    The streams run at least 64 tokens; where they still ended before the load began (no gap
    overlaps it: a tiny model on a fast machine), the run is repeated with 4x the tokens, up to
    twice, rather than reporting no ratio.
    """
    all_gaps: list[float] = []
    all_during: list[float] = []
    all_after: list[float] = []
    windows, per_load, wrote = [], [], []
    for _ in range(max(1, loads)):
        gaps, during, window, after, wrote_slot = _itl_run_overlapping(engine, prompts, names, cold, new_tokens)
        all_gaps += gaps
        all_during += during
        all_after += after
        windows.append(window)
        wrote.append(wrote_slot)
        if during:
            per_load.append(round(_p99(during) / _median(gaps), 4))
    med = _median(all_gaps)
    p99 = _p99(all_during) if all_during else float("nan")
    p99_after = _p99(all_after) if all_after else float("nan")
    return {"itl_median_ms": med * 1e3, "itl_p99_during_load_ms": p99 * 1e3, "itl_p99_during_load_ratio": p99 / med,
            "itl_p99_after_load_ratio": p99_after / med, "itl_loads": len(windows),
            "itl_p99_during_load_ratio_per_load": per_load, "load_window_ms": _median(windows) * 1e3,
            "itl_load_wrote_slot": all(wrote)}


def _itl_run_overlapping(engine: Any, prompts: list[str], names: list[str], cold: Path,
                         new_tokens: int) -> tuple[list[float], list[float], float, list[float], bool]:
    """:func:`_itl_run` with at least 64 tokens, repeated with 4x the tokens (up to twice) where
    the streams ended before the load began (no gap overlaps it: a tiny model on a fast machine)."""
    n = max(new_tokens, 64)
    for _ in range(3):
        run = _itl_run(engine, prompts, names, cold, n)
        if run[1]:
            break
        n *= 4
    return run


def _p99(xs: list[float]) -> float:
    return float(torch.tensor(xs, dtype=torch.float64).quantile(0.99))


# --------------------------------------------------------------------------- transformers side


def _peft_generate(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, adapter_names: list[str] | None) -> None:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    kw = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **kw)
    assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens


# --------------------------------------------------------------------------- main


def _interleaved(cases: dict[str, Any], repeats: int, log: Any, alternate: bool = False) -> dict[str, list[float]]:
    """Wall seconds of every case, ``repeats`` rounds, the cases taking turns within each round.

    Why interleaved: on a shared machine the load changes from minute to minute; timing the engine
    and transformers+PEFT in alternation puts each ratio's two sides under the same load (ratios
    are taken per round, then the median over rounds). ``alternate`` runs every other round in
    reverse order, so that no case always runs first or always follows the same one (a load
    that drifts within a round then favours neither side of a ratio).
    """
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats):
        order = list(cases.items())
        for k, fn in (reversed(order) if alternate and r % 2 else order):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return times


def run(model: str | None = None, *, threads: int = 2, new_tokens: int = 64, device: str = "cpu", batch: int = 16,
        repeats: int = 3, skip_peft: bool = False, ratio_rounds: int | None = None, fused_lora_dtype: str = "float16",
        log: Any = print) -> dict[str, Any]:
    """Run every measurement and return the result dict (see the module docstring for the keys).
    ``ratio_rounds``: rounds of the engine-only ratio cases (default ``RATIO_ROUNDS`` x repeats);
    ``fused_lora_dtype``: the engine's ``serving.fused_lora_dtype``.

    Order: engine warm-up of every case, the engine-only measurements (adapter switch, cold load,
    ITL during a load), ``peak_rss_mb``; then transformers+PEFT is loaded and the throughput cases
    of both run interleaved (:func:`_interleaved`).

    Raises:
        ValueError: ``ratio_rounds`` is below 1 (checked before anything loads).
    """
    if ratio_rounds is not None and ratio_rounds < 1:
        raise ValueError(f"ratio_rounds must be at least 1 (got {ratio_rounds}); leave it unset for {RATIO_ROUNDS} x repeats")
    res: dict[str, Any] = {"model": model or "embedded SmolLM2-135M-Instruct (GGUF, fp32)", "threads": threads,
                           "device": device, "new_tokens": new_tokens, "batch": batch, "repeats": repeats,
                           "adapters": NUM_ADAPTERS, "rank": RANK, "torch": torch.__version__,
                           "fused_lora_dtype": fused_lora_dtype}
    t0 = time.perf_counter()
    engine, names, paths, tmp = _engine_with_adapters(model, threads, device=device, max_batch=batch,
                                                      max_seq_len=PROMPT_TOKENS + new_tokens + 64, cold=1,
                                                      fused_lora_dtype=fused_lora_dtype)
    res["engine_load_s"] = round(time.perf_counter() - t0, 2)
    from coe.engine.weights import resolve_model

    files = resolve_model(model)
    prompts = _prompts(engine.tokenizer, batch)
    prompt_lens = [engine.count_prompt_tokens(p) for p in prompts]
    res["prompt_tokens"] = _median(prompt_lens)
    res.update(lora_mac_share(engine.model.args, RANK, prompt_lens, new_tokens))
    many = _cases(names, batch)
    mixed = many["mixed16"]
    total = batch * new_tokens

    cases: dict[str, Any] = {
        "single": lambda: engine.generate(prompts[0], adapter=names[0], max_tokens=new_tokens, ignore_eos=True),
        "single_base": lambda: engine.generate(prompts[0], adapter=None, max_tokens=new_tokens, ignore_eos=True),
        **{k: (lambda ad=ad: _engine_concurrent(engine, prompts, ad, new_tokens)) for k, ad in many.items()},
    }
    log(f"engine: {engine.model_id}, {threads} threads; warm-up and engine-only measurements...")
    for fn in cases.values():
        fn()
    freeze_heap()  # as `coe serve` does once started (coe.engine.threads.freeze_heap); again after PEFT's load below
    # A short prompt: the switch's cost, if any, is the same in ms, and a shorter request's
    # latency carries less of the machine's noise (3 runs each, in one process: the bench prompt
    # x 24 pairs gave +3.10 / +1.04 / +0.29 ms, this one x 48 pairs -0.62 / -0.18 / -0.14).
    res["adapter_switch_ms"] = _switch_ms(engine, SWITCH_PROMPT, names, max(5, 16 * repeats))
    res["cold_load_ms"] = _cold_load_ms(engine, paths[-1], max(3, repeats))
    # Streams on half of the adapters (two each), and the last adapter unloaded first, so that the
    # cold adapter finds a free slot: the load is read off the loop thread and then written into
    # that slot on the loop thread between two steps, as a cold request's load is
    # (``itl_load_wrote_slot`` says it was). Before 2026-12-07's ninth session every slot was
    # taken and the load wrote none.
    n_itl = max(2, batch // 2)
    itl_names = [names[i % max(1, NUM_ADAPTERS // 2)] for i in range(n_itl)]
    engine.unload_adapter(names[-1])
    res.update(_itl_during_load(engine, prompts[:n_itl], itl_names, paths[-1], new_tokens, loads=3 * repeats))
    engine.load_adapter(names[-1], paths[NUM_ADAPTERS - 1])  # back into the slot the cold one left
    res["peak_rss_mb"] = _rss_mb()  # the engine alone: transformers is not loaded yet

    if not skip_peft:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log("loading transformers+PEFT...")
        # transformers+PEFT runs on the engine's loop thread (idle meanwhile), so that both sides
        # compute with the same single OpenMP worker pool: a second live pool would slow whichever
        # side runs (coe.engine.threads), and a fresh thread per call would pay a new pool each time.
        on_loop = lambda fn: engine.scheduler.call(fn)  # noqa: E731

        def load_hf() -> tuple[Any, Any, Any]:
            hf = AutoModelForCausalLM.from_pretrained(str(files.path), dtype=torch.float32).eval()
            plain = AutoModelForCausalLM.from_pretrained(str(files.path), dtype=torch.float32).eval()
            pm = PeftModel.from_pretrained(hf, str(paths[0]), adapter_name=names[0])
            for n, p in zip(names[1:], paths[1:]):
                pm.load_adapter(str(p), adapter_name=n)
            pm.eval()
            pm.set_adapter(names[0])
            return pm, plain, AutoTokenizer.from_pretrained(str(files.path))

        pm, plain, tok = on_loop(load_hf)
        peft_cases = {
            "peft_single": lambda: on_loop(lambda: _peft_generate(pm, tok, prompts[:1], new_tokens, None)),
            "peft_single_base": lambda: on_loop(lambda: _peft_generate(plain, tok, prompts[:1], new_tokens, None)),
            "peft_mixed16": lambda: on_loop(lambda: _peft_generate(pm, tok, prompts, new_tokens, mixed)),
        }
        for fn in peft_cases.values():
            fn()
        freeze_heap()
        order = ["single", "peft_single", "single_base", "peft_single_base", "mixed16", "peft_mixed16", "uniform16", "base16"]
        cases.update(peft_cases)
        cases = {k: cases[k] for k in order}
    log(f"timing {len(cases)} cases, {repeats} interleaved rounds...")
    times = _interleaved(cases, repeats, log)
    # The engine-only ratios (heterogeneity, LoRA vs base) compare cases a few % apart on a machine
    # whose speed drifts more than that between rounds (per-round ratios spread 0.87-1.05 here):
    # they come from RATIO_ROUNDS x repeats rounds of their own three cases (~13 s a round),
    # every other round in reverse order (in the rounds above, uniform16 always followed PEFT).
    ratio_cases = ("mixed16", "uniform16", "base16")
    n_ratio = ratio_rounds or RATIO_ROUNDS * repeats
    log(f"timing {len(ratio_cases)} engine cases, {n_ratio} more interleaved rounds for the ratios...")
    ratio_times = _interleaved({k: cases[k] for k in ratio_cases}, n_ratio, log, alternate=True)
    tokens = {"single": new_tokens, "single_base": new_tokens, "peft_single": new_tokens, "peft_single_base": new_tokens}
    rate = {k: (tokens.get(k, total)) / _median(v) for k, v in {**times, **ratio_times}.items()}
    res["single_stream_tok_s"] = rate["single"]
    res["single_stream_base_tok_s"] = rate["single_base"]
    res["mixed16_tok_s"] = rate["mixed16"]
    res["uniform16_tok_s"] = rate["uniform16"]
    res["base16_tok_s"] = rate["base16"]

    def ratio(num: str, den: str, t: dict[str, list[float]] = times) -> float:  # rates' ratio = den's time / num's, per round
        return _ratio(t[den], t[num])

    res["heterogeneity_ratio"] = ratio("mixed16", "uniform16", ratio_times)
    res["lora_vs_base_ratio"] = ratio("uniform16", "base16", ratio_times)
    res["ratio_rounds"] = len(ratio_times["base16"])
    res["ratio_spread"] = _ratio_spreads(ratio_times)
    if not skip_peft:
        res["peft_single_stream_tok_s"] = rate["peft_single"]
        res["peft_single_stream_base_tok_s"] = rate["peft_single_base"]
        res["peft_mixed16_tok_s"] = rate["peft_mixed16"]
        res["single_stream_speedup"] = ratio("single", "peft_single")
        res["single_stream_base_speedup"] = ratio("single_base", "peft_single_base")
        res["mixed16_speedup"] = ratio("mixed16", "peft_mixed16")
    res["round_seconds"] = {k: [round(t, 3) for t in v] for k, v in times.items()}
    res["ratio_round_seconds"] = {k: [round(t, 3) for t in v] for k, v in ratio_times.items()}
    res["engine_stats"] = {k: v for k, v in engine.stats().items() if k in ("steps_total", "tokens_total", "kv_cache_reserved_bytes", "weight_bytes")}
    engine.shutdown()
    unfreeze_heap()
    res["peak_rss_total_mb"] = _rss_mb()
    shutil.rmtree(tmp, ignore_errors=True)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}


def step_times(model: str | None = None, *, threads: int = 2, iterations: int = 15, log: Any = print) -> dict[str, Any]:
    """Milliseconds of single forward steps (no scheduler, sampling or threads in between), for
    the engine's design choices rather than the issue's goals: decode steps of 1 and 16 sequences
    (context 60) on the base model, one adapter, and 8 adapters; each as the engine runs it (GGUF
    blocks with the LoRA fused into them), with the LoRA in separate ops (``_unfused``: the dense
    path for one adapter, kernels' C backend for eight), and on float32 weights only (``_f32``:
    no GGUF blocks, as for a safetensors model; the oneDNN-packed copies where torch has
    oneDNN, see ``PACKED_MIN_ROWS``); and prompt steps of 16 prompts x 32 tokens
    (``prompt512_*``) on the base model, one adapter as the engine runs it (kernels' torch
    backend in PEFT's summation order, or C where the projections are oneDNN-packed) and in C
    (``_c``: ``PEFT_ORDER_PROMPTS`` off), and 8 adapters.
    Cases take turns within each iteration; the median per case is reported.
    The steps run on a helper thread, as in the engine (see ``coe.engine.threads``).
    """
    from coe.engine import model as M
    from coe.engine.batch import Decode, Prefill, build_step

    engine, names, _paths, tmp = _engine_with_adapters(model, threads, max_batch=16, max_seq_len=PROMPT_TOKENS + 128)
    engine.generate("warm up", adapter=names[0], max_tokens=1)  # makes every adapter resident
    slots = [engine.registry.slot_of(n) for n in names]
    engine.shutdown()
    net, kv = engine.model, engine.kv
    f32 = {"BLOCK_MAX_ROWS": 0}  # float32 weights only (as without a GGUF or a C compiler)
    unfused = {"FUSED_LORA": False}  # blocks for the base, LoRA in separate ops (dense / kernels)
    c_order = {"PEFT_ORDER_PROMPTS": False}  # one adapter's prompt steps in kernels' C backend
    one, mixed = [slots[0]], [slots[i % NUM_ADAPTERS] for i in range(16)]
    cases = {
        "single_base": ([-1], {}), "single_base_f32": ([-1], f32),
        "single_lora": (one, {}), "single_lora_unfused": (one, unfused), "single_lora_f32": (one, f32),
        "base16": ([-1] * 16, {}), "base16_f32": ([-1] * 16, f32),
        "uniform16": (one * 16, {}), "uniform16_unfused": (one * 16, unfused), "uniform16_f32": (one * 16, f32),
        "mixed16": (mixed, {}), "mixed16_unfused": (mixed, unfused), "mixed16_f32": (mixed, f32),
    }
    prompts = {"prompt512_base": ([-1] * 16, {}), "prompt512_lora": (one * 16, {}), "prompt512_lora_c": (one * 16, c_order),
               "prompt512_mixed8": (mixed, {})}
    cases.update(prompts)
    defaults = {k: getattr(M, k) for k in ("BLOCK_MAX_ROWS", "FUSED_LORA", "PEFT_ORDER_PROMPTS")}
    times: dict[str, list[float]] = {k: [] for k in cases}

    def run() -> None:
        for t in kv.k + kv.v:
            t.zero_()
        for it in range(iterations + 2):
            for name, (lora_slots, knobs) in cases.items():
                for k, v in {**defaults, **knobs}.items():
                    setattr(M, k, v)
                rows = list(enumerate(lora_slots))
                decodes, chunks = (([], [Prefill(i, 0, list(range(100 + i, 132 + i)), s, True) for i, s in rows])
                                   if name in prompts else ([Decode(i, 60, 100 + i, s) for i, s in rows], []))
                b = build_step(decodes, chunks, num_lora_slots=net.num_lora_slots, kv=kv, device=engine.device)
                t0 = time.perf_counter()
                net.forward(b, kv.k, kv.v)
                if it >= 2:  # two warm-up rounds
                    times[name].append((time.perf_counter() - t0) * 1e3)
        for k, v in defaults.items():
            setattr(M, k, v)

    log(f"timing {len(cases)} step cases, {iterations} rounds...")
    run_in_fresh_thread(run)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"threads": threads, "iterations": iterations, "step_ms": {k: round(_median(v), 1) for k, v in times.items()}}


def phase_times(model: str | None = None, *, threads: int = 2, new_tokens: int = 64, batch: int = 16, repeats: int = 5,
                log: Any = print) -> dict[str, Any]:
    """Where the time of the two engine-only ratios goes: the three 16-request cases of
    :func:`run` (``base16``, ``uniform16``: one adapter, ``mixed16``: over 8 adapters), submitted
    as there, with every forward step of the real engine timed by kind (the model's ``forward``
    wrapped): ``prefill`` (prompt tokens only), ``decode`` (decode rows only), ``mixed`` (both),
    and ``outside`` (the rest of the run's wall time: scheduling, sampling, detokenizing, stream
    hand-off). One warm-up round, then ``repeats`` interleaved rounds; each phase's seconds are the
    median over rounds, and ``ratios`` the medians of its per-round ratios, ``uniform16/base16``
    (the LoRA cost, the inverse of ``lora_vs_base_ratio``'s terms) and ``mixed16/uniform16`` (the
    heterogeneity cost). Unlike :func:`step_times`, contexts grow and prompts arrive as the
    scheduler forms them."""
    engine, names, _paths, tmp = _engine_with_adapters(model, threads, max_batch=batch,
                                                       max_seq_len=PROMPT_TOKENS + new_tokens + 64)
    prompts = _prompts(engine.tokenizer, batch)
    net = engine.model
    steps: list[tuple[int, int, float]] = []  # (rows, decode rows, seconds) of each step
    forward = net.forward

    def timed(b: Any, k: Any, v: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = forward(b, k, v)
        steps.append((b.token_ids.shape[0], b.num_decode, time.perf_counter() - t0))
        return out

    cases = dict(reversed(_cases(names, batch).items()))  # base16, uniform16, mixed16
    phases = ("wall", "prefill", "decode", "mixed", "outside", "steps")
    got: dict[str, dict[str, list[float]]] = {k: {p: [] for p in phases} for k in cases}
    net.forward = timed  # an instance attribute: the scheduler calls self.model.forward
    try:
        log(f"timing {len(cases)} cases by step kind, {repeats} rounds after a warm-up...")
        for r in range(repeats + 1):
            for k, adapters in cases.items():
                steps.clear()
                t0 = time.perf_counter()
                _engine_concurrent(engine, prompts, adapters, new_tokens)
                wall = time.perf_counter() - t0
                if not r:
                    continue
                kinds = {"prefill": 0.0, "decode": 0.0, "mixed": 0.0}
                for rows, dec, sec in steps:
                    kinds["prefill" if dec == 0 else "decode" if dec == rows else "mixed"] += sec
                row = {"wall": wall, **kinds, "outside": wall - sum(kinds.values()), "steps": float(len(steps))}
                for p in phases:
                    got[k][p].append(row[p])
    finally:
        del net.forward
        engine.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(num: str, den: str) -> dict[str, float]:
        return {p: round(_ratio(got[num][p], got[den][p]), 3) for p in phases[:-1]}

    return {"threads": threads, "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
            "seconds": {k: {p: round(_median(v), 3) for p, v in d.items()} for k, d in got.items()},
            "ratios": {"uniform16/base16": ratio("uniform16", "base16"), "mixed16/uniform16": ratio("mixed16", "uniform16")}}


def load_times(model: str | None = None, *, threads: int = 2, loads: int = 10, new_tokens: int = 64, streams: int = 8,
               log: Any = print) -> dict[str, Any]:
    """How a cold adapter load disturbs running streams, the engine's way against the earlier one,
    alternating load by load in one engine: ``pieces`` (the read's in-memory part and the slot
    write in ~4 ms pieces between steps: ``coe.engine.scheduler.READ_IN_PIECES`` and
    ``SLOT_WRITE_SLICE_S``) and ``whole`` (the read on its own thread, the write in one gap).
    Each load is :func:`run`'s ITL case (``streams`` streams on 4 adapters, the load once they
    have a quarter of their tokens); per load, the p99 of the gaps overlapping it and their
    largest, over that run's median gap, and the load's milliseconds; the medians over the
    loads per way."""
    from coe.engine import scheduler

    engine, names, paths, tmp = _engine_with_adapters(model, threads, max_batch=max(streams, 2),
                                                      max_seq_len=PROMPT_TOKENS + new_tokens + 64, cold=1)
    prompts = _prompts(engine.tokenizer, streams)
    stream_names = [names[i % max(1, NUM_ADAPTERS // 2)] for i in range(streams)]
    engine.unload_adapter(names[-1])  # a free slot for the cold adapter, as in run()
    ways = {"pieces": (scheduler.SLOT_WRITE_SLICE_S, True), "whole": (None, False)}
    per: dict[str, dict[str, list[float]]] = {w: {"p99": [], "max": [], "ms": []} for w in ways}
    try:
        for i in range(loads):
            for way in (("pieces", "whole") if i % 2 == 0 else ("whole", "pieces")):
                scheduler.SLOT_WRITE_SLICE_S, scheduler.READ_IN_PIECES = ways[way]
                gaps, during, window, _, wrote = _itl_run_overlapping(engine, prompts, stream_names, paths[-1], new_tokens)
                if not (during and wrote):
                    raise RuntimeError(f"load {i + 1} ({way}) " + ("overlapped no stream's gap" if wrote else "wrote no slot"))
                med = _median(gaps)
                per[way]["p99"].append(_p99(during) / med)
                per[way]["max"].append(max(during) / med)
                per[way]["ms"].append(window * 1e3)
            log(f"load {i + 1}/{loads}: " + ", ".join(f"{w} p99 {v['p99'][-1]:.2f}x" for w, v in per.items() if v["p99"]))
    finally:
        scheduler.SLOT_WRITE_SLICE_S, scheduler.READ_IN_PIECES = ways["pieces"]
        engine.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {"loads": loads, "streams": streams, "threads": threads}
    for way, v in per.items():
        out[way] = {"p99_over_median": round(_median(v["p99"]), 3), "max_over_median": round(_median(v["max"]), 3),
                    "load_ms": round(_median(v["ms"]), 1), "per_load_p99_over_median": [round(x, 3) for x in v["p99"]]}
    return out


def kernel_times(model: str | None = None, *, threads: int = 2, iterations: int = 20, rows: int = 16, rank: int = RANK,
                 log: Any = print) -> dict[str, Any]:
    """Milliseconds of one step's worth of the fused block kernel alone (``coe.engine.quantized``):
    every projection group of every layer (SmolLM2: 30 x qkv, o, gate_up, down = 120 calls) on
    ``rows`` rows, without LoRA, with every row on one adapter of rank ``rank`` (16), and with the
    rows spread over 8 adapters. Random Q4_1 blocks and adapters of the model's shapes, each call's weights
    distinct (out of cache, as in a real step). The cases take turns within each iteration;
    medians per case, and the medians of the per-iteration ratios (``one_over_base``,
    ``eight_over_one``), which a drifting machine affects least. Where the kernel's LoRA cost
    is, without the rest of a step around it. Where the kernel has its bfloat16 LoRA
    (``serving.fused_lora_dtype``), ``one_adapter_bf16`` and ``eight_adapters_bf16`` run the same
    adapters' bfloat16 copies, and ``bf16_minus_f16_ms`` has the paired medians of the
    per-iteration differences."""
    from transformers import AutoConfig

    from coe.engine.model import FUSED_GROUPS, ModelArgs
    from coe.engine.quantized import BlockWeight, lora_bf16_available, lora_rows, native_library, panels_shape, unavailable_reason
    from coe.engine.weights import resolve_model
    from kernels import LoRAMeta, native_ops

    if native_library() is None:
        raise RuntimeError(f"the block kernels are unavailable here: {unavailable_reason()}")
    torch.set_num_threads(threads)
    args = ModelArgs.from_hf(AutoConfig.from_pretrained(str(resolve_model(model).path)))
    # Built on the timing thread, as everything in a real step: an OpenMP region started on this
    # (the caller's) thread would leave a second worker pool alive, and every call would then pay
    # futex wake-ups (coe.engine.threads) that hide the LoRA's cost (measured: +0.37 ms for one
    # adapter and +0 for eight over one with the data built here, +0.88 and +1.6 in real steps).
    def setup() -> tuple[list[Any], dict[int, torch.Tensor], dict[str, Any]]:
        g = torch.Generator().manual_seed(0)
        calls = []
        for _ in range(args.n_layers):
            for targets in FUSED_GROUPS.values():
                d_in = args.module_shape(targets[0])[0]
                slices = tuple(args.module_shape(t)[1] for t in targets)
                n = sum(slices)
                if d_in % 32 or any(d % 8 for d in slices):
                    raise RuntimeError(f"the fused kernel needs inputs in blocks of 32 and outputs in blocks of 8; this model's "
                                       f"{'/'.join(targets)} is {d_in} -> {slices}")
                w = BlockWeight("q4_1", torch.randint(0, 256, (n, d_in // 2), dtype=torch.uint8, generator=g),
                                torch.rand(n, d_in // 32, 2, generator=g) * 0.01)
                A32 = torch.randn(NUM_ADAPTERS, len(slices) * rank, d_in, generator=g) * 0.01
                P32 = torch.randn(panels_shape(NUM_ADAPTERS, n, rank), generator=g) * 0.01
                copies = {}  # the engine's fused copies in each dtype, with their descriptor (kept alive together)
                for dt in dtypes:
                    A, P = A32.to(dt), P32.to(dt)
                    copies[dt] = (A, P, lora_rows(A, P, slices))
                calls.append((w, A32.shape[1], copies))
        xs = {d: torch.randn(rows, d, generator=g) for d in {c[0].shape[1] for c in calls}}
        metas = {k: None if v is None else LoRAMeta.build(torch.tensor(v), NUM_ADAPTERS) for k, v in cases.items()}
        return calls, xs, metas

    bf16 = lora_bf16_available()
    dtypes = (torch.float16, torch.bfloat16) if bf16 else (torch.float16,)
    cases = {"base": None, "one_adapter": [0] * rows, "eight_adapters": [i % NUM_ADAPTERS for i in range(rows)]}
    variants = [(k, k, torch.float16) for k in cases]  # (case, its rows' slots, the fused copies' dtype)
    if bf16:
        variants += [("one_adapter_bf16", "one_adapter", torch.bfloat16), ("eight_adapters_bf16", "eight_adapters", torch.bfloat16)]
    n_calls = args.n_layers * len(FUSED_GROUPS)
    times: dict[str, list[float]] = {k: [] for k, _, _ in variants}

    def loop() -> None:
        calls, xs, metas = setup()
        for it in range(iterations + 1):
            for k, slots_of, dt in variants:
                meta = metas[slots_of]
                t0 = time.perf_counter()
                for w, width, copies in calls:
                    w.matmul(xs[w.shape[1]], None if meta is None else (copies[dt][2], native_ops.step_descriptor(meta, width)))
                if it:  # one warm-up turn
                    times[k].append((time.perf_counter() - t0) * 1e3)

    log(f"timing {n_calls} fused kernel calls x {len(times)} cases, {iterations} turns...")
    run_in_fresh_thread(loop)
    ratio = lambda a, b: round(_ratio(times[a], times[b]), 3)  # noqa: E731
    out = {"threads": threads, "rows": rows, "rank": rank, "calls": n_calls, "iterations": iterations,
           "ms": {k: round(_median(v), 3) for k, v in times.items()},
           "one_over_base": ratio("one_adapter", "base"), "eight_over_one": ratio("eight_adapters", "one_adapter")}
    if bf16:
        diff = lambda a, b: round(_median([x - y for x, y in zip(times[a], times[b])]), 3)  # noqa: E731
        out["bf16_minus_f16_ms"] = {"one_adapter": diff("one_adapter_bf16", "one_adapter"),
                                    "eight_adapters": diff("eight_adapters_bf16", "eight_adapters")}
    return out


GOALS = {"single_stream_speedup": (">=", 2.5), "mixed16_speedup": (">=", 3.0), "heterogeneity_ratio": (">=", 0.95),
         "lora_vs_base_ratio": (">=", 0.95), "adapter_switch_ms": ("<", 1.0), "cold_load_ms": ("<", 100.0),
         "itl_p99_during_load_ratio": ("<", 2.0)}


def _verdict(value: float, goal: tuple[str, float], ci: list[float] | None) -> str:
    """``met`` or ``MISSED``; for a value with a confidence interval (the engine-only ratios),
    ``met`` only when the whole interval clears the goal, ``MISSED`` when none of it does, and
    otherwise ``UNDECIDED`` (the machine's noise spans the goal)."""
    ok = (lambda x: x >= goal[1]) if goal[0] == ">=" else (lambda x: x < goal[1])
    if ci is None:
        return "met" if ok(value) else "MISSED"
    span = f"(95% CI {ci[0]}-{ci[1]})"
    if ok(ci[0]) and ok(ci[1]):
        return f"met {span}"
    if not ok(ci[0]) and not ok(ci[1]):
        return f"MISSED {span}"
    return f"UNDECIDED {span}: the machine's noise spans the goal; more --ratio-rounds narrow it"


def main(args: Any) -> int:
    """Entry point of ``coe bench engine`` (argparse Namespace from ``coe.cli``)."""
    quick = bool(getattr(args, "quick", False))
    res = run(getattr(args, "model", None), threads=getattr(args, "threads", 2) or 2,
              new_tokens=getattr(args, "new_tokens", 64) or 64, device=getattr(args, "device", "cpu") or "cpu",
              batch=getattr(args, "batch", 16) or 16, repeats=1 if quick else 3,
              ratio_rounds=getattr(args, "ratio_rounds", None),
              fused_lora_dtype=getattr(args, "fused_lora_dtype", None) or "float16", log=lambda m: print(m, file=sys.stderr))
    width = max(len(k) for k in res)
    for k, v in res.items():
        goal = GOALS.get(k)
        mark = ""
        if goal and isinstance(v, (int, float)):
            mark = f"   goal {goal[0]} {goal[1]}: {_verdict(v, goal, res.get('ratio_spread', {}).get(k, {}).get('ci95'))}"
        print(f"{k:<{width}}  {v}{mark}")
    out = getattr(args, "json", None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m coe.engine.bench [--quick | --steps | --phases | --kernel | --loads N | --pool JSON...]
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ratio-rounds", type=int, default=None, help="rounds of the engine-only ratio cases (default 4 x repeats)")
    ap.add_argument("--steps", action="store_true", help="time single forward steps of the design's variants instead")
    ap.add_argument("--phases", action="store_true", help="time the 16-request cases' real steps by kind instead")
    ap.add_argument("--kernel", action="store_true", help="time one step's worth of the fused block kernel alone instead")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of --phases (5) or iterations of --steps (15) / --kernel (20)")
    ap.add_argument("--rows", type=int, default=16, help="rows of --kernel's calls (default 16)")
    ap.add_argument("--rank", type=int, default=RANK, help="the adapters' rank in --kernel (default 16)")
    ap.add_argument("--loads", type=int, default=None, help="time N cold loads each way under running streams instead (load_times)")
    ap.add_argument("--pool", nargs="+", default=None, metavar="JSON", help="pool the ratio rounds of these --json files instead (pool_runs)")
    a = ap.parse_args()
    if a.pool:
        print(json.dumps(pool_runs(a.pool), indent=2))
        sys.exit(0)
    if a.steps or a.phases or a.kernel or a.loads:
        fn = step_times if a.steps else phase_times if a.phases else kernel_times if a.kernel else load_times
        more = {} if a.rounds is None or a.loads else {"repeats" if a.phases else "iterations": a.rounds}
        if a.kernel:
            more.update(rows=a.rows, rank=a.rank)
        if a.loads:
            more.update(loads=a.loads)
        out = fn(a.model, threads=a.threads, log=lambda m: print(m, file=sys.stderr), **more)
        print(json.dumps(out, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2))
        sys.exit(0)
    sys.exit(main(a))
