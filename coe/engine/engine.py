"""The public engine: one shared base model, many LoRA adapters, requests on any of them at once.

``Engine`` wires the pieces together: ``weights`` resolves and loads the base model, ``registry``
holds the adapters (read by ``adapters``), ``request`` validates and tokenizes on the caller's
thread, and ``scheduler`` batches every running request, whatever its adapter, into the steps of
one background loop. ``generate``, ``stream`` and ``astream`` are thread-safe front ends to it.

This module knows nothing about HTTP, routing or experts beyond their adapter names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence as Seq

import torch

from coe.config import FUSED_LORA_DTYPES, BaseModelConfig, CoeConfig, ServingConfig
from coe.engine.kv_cache import KVCache
from coe.engine.model import Transformer
from coe.engine.outputs import AdapterInfo, GenerationOutput, StreamDelta
from coe.engine.registry import AdapterRegistry
from coe.engine.request import Request, build_request, encode_prompt
from coe.engine.scheduler import Job, Scheduler
from coe.engine.sequence import Sequence
from coe.engine.threads import background_compute, run_in_fresh_thread
from coe.engine.weights import load_model, model_context, resolve_device, resolve_dtype, resolve_model
from coe.errors import ConfigError, EngineUnavailable, InvalidRequest, UnknownModel

logger = logging.getLogger("coe.engine")

# serving.* fields with their lower bounds (mirrors coe.config's validation of experts.yaml).
_SERVING_MINIMUMS = {
    "max_batch": 1, "max_seq_len": 16, "prefill_chunk": 1, "max_loras": 1, "max_cpu_loras": 0, "max_lora_rank": 1,
    "max_queue": 1, "max_tokens_default": 1, "max_tokens_limit": 1,
}


def serving_with(base: ServingConfig | None = None, **overrides: Any) -> ServingConfig:
    """``base`` (default: ``ServingConfig()``) with ``overrides`` applied and checked.

    Raises:
        ConfigError: an unknown field or an out-of-range value, naming ``serving.<field>``.
    """
    base = base or ServingConfig()
    names = {f.name for f in dataclasses.fields(ServingConfig)}
    for k in overrides:
        if k not in names:
            raise ConfigError(f"serving.{k}: unknown engine option (allowed: {', '.join(sorted(names))})", param=f"serving.{k}")
    s = dataclasses.replace(base, **overrides)
    for k, lo in _SERVING_MINIMUMS.items():
        v = getattr(s, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"serving.{k}: {v!r} is out of range; expected an integer >= {lo}", param=f"serving.{k}")
    if s.fused_lora_dtype not in FUSED_LORA_DTYPES:
        raise ConfigError(f"serving.fused_lora_dtype: {s.fused_lora_dtype!r} is not one of {', '.join(map(repr, FUSED_LORA_DTYPES))}",
                          param="serving.fused_lora_dtype")
    if s.max_tokens_default > s.max_tokens_limit:
        raise ConfigError(f"serving.max_tokens_default: {s.max_tokens_default} is above serving.max_tokens_limit ({s.max_tokens_limit})",
                          param="serving.max_tokens_default")
    return s


class Engine:
    """A base model serving many LoRA adapters.

    Build it with :meth:`from_pretrained` or :meth:`from_config`.

    Example:
        >>> engine = Engine.from_pretrained(None)          # the embedded SmolLM2-135M-Instruct
        >>> engine.load_adapter("sql", "adapters/sql")
        >>> out = engine.generate(messages=[{"role": "user", "content": "Count users"}], adapter="sql", max_tokens=32)
        >>> out.text, out.finish_reason
    """

    def __init__(self, *, model: Transformer, tokenizer: Any, hf_config: Any, serving: ServingConfig, model_id: str,
                 base_names: tuple[str, ...] = (), model_path: Path | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.serving = serving
        self.model_id = model_id
        self.device = model.device
        self.max_seq_len = min(serving.max_seq_len, model_context(model.args))
        a = model.args
        self.kv = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, serving.max_batch, self.max_seq_len, model.dtype, model.device)
        model.set_fused_lora_dtype(serving.fused_lora_dtype)
        self.registry = AdapterRegistry(model, max_loras=serving.max_loras, max_cpu_loras=serving.max_cpu_loras,
                                        max_lora_rank=serving.max_lora_rank, base_names=base_names,
                                        strict_base_model=serving.strict_base_model)
        self.eos_ids = _eos_ids(tokenizer, hf_config, model_path)
        self._closed = False
        # Callers tokenize on their own threads; a fast tokenizer must not be borrowed mutably by
        # two of them at once (transformers may toggle its truncation state inside encode).
        self._tokenize_lock = threading.Lock()
        if serving.compile:
            logger.warning("serving.compile: not used by this engine (compiled regions cannot contain the "
                           "multi-LoRA kernels yet); running eagerly")
        self.scheduler = Scheduler(model, self.kv, self.registry, tokenizer, max_seq_len=self.max_seq_len,
                                   prefill_chunk=serving.prefill_chunk, max_queue=serving.max_queue)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, dtype: Any = None, device: Any = None, *,
                        revision: str | None = None, threads: int | None = None, model_id: str | None = None,
                        serving: ServingConfig | None = None, gguf_blocks: str = "auto",
                        **serving_overrides: Any) -> "Engine":
        """Load a base model.

        Args:
            model: a model folder, a hub id, a ``.gguf`` file, or None for the embedded
                SmolLM2-135M-Instruct (GGUF, converted once and cached).
            dtype: ``torch.dtype`` or its name; None/"auto" = fp32 on CPU, bf16 on CUDA.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; None/"auto" = CUDA when available.
            revision: hub revision for hub ids.
            threads: torch intra-op threads (process-wide), None leaves torch's setting.
            model_id: the served name (default: derived like ``base_model.id``).
            gguf_blocks: ``auto`` (a GGUF model decodes few-row steps on its own quantized blocks
                on a CPU in float32: ``coe.engine.quantized``) or ``off``.
            serving: engine limits (default ``ServingConfig()``).
            **serving_overrides: ``ServingConfig`` fields to change, e.g. ``max_batch=8``.

        Returns:
            The engine, with no adapters registered.

        Raises:
            ConfigError: bad model source, dtype, device or serving option.
        """
        serving = serving_with(serving, **serving_overrides)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if threads is not None:
            torch.set_num_threads(int(threads))
        files = resolve_model(model, revision=revision)
        # on a thread that then exits, so that its OpenMP workers go with it (coe.engine.threads)
        if gguf_blocks not in ("auto", "off"):
            raise ConfigError(f"base_model.gguf_blocks: {gguf_blocks!r} is not one of 'auto', 'off'", param="base_model.gguf_blocks")
        net, hf_config = run_in_fresh_thread(lambda: load_model(files.path, dtype=dt, device=dev, max_seq_len=serving.max_seq_len,
                                                                gguf=files.gguf, block_weights=gguf_blocks == "auto"))
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(files.path))
        except Exception as exc:  # transformers raises OSError/ValueError/... for missing tokenizer files
            raise ConfigError(f"base_model.model: {files.source!r} has no usable tokenizer: {exc}", param="base_model.model") from exc
        mid = model_id or BaseModelConfig(model=None if model is None else str(model)).served_id
        logger.info("engine: %s on %s (%s), %.0f MB of weights", mid, dev, dt, net.weight_bytes() / 2**20)
        return cls(model=net, tokenizer=tokenizer, hf_config=hf_config, serving=serving, model_id=mid,
                   base_names=files.names + (mid,), model_path=files.path)

    @classmethod
    def from_config(cls, cfg: CoeConfig) -> "Engine":
        """Build the engine of an experts.yaml: its base model and serving limits, every expert's
        adapter registered under the expert's name (adapter ``null`` registers nothing), and the
        ``serving.preload`` adapters read (and made resident while slots last) at once.

        Raises:
            ConfigError: the base model cannot be loaded or the backend is remote.
            AdapterError: a preloaded adapter is missing or invalid (named in the message).
        """
        b = cfg.base_model
        if b.backend != "local":
            raise ConfigError("base_model.backend: 'remote' has no local engine; use coe.remote.RemoteBackend", param="base_model.backend")
        model: str | None = None
        if b.model is not None:
            local = cfg.resolve_path(b.model)
            model = str(local) if local.exists() else b.model
        engine = cls.from_pretrained(model, dtype=b.dtype, device=b.device, revision=b.revision, threads=b.threads,
                                     model_id=b.served_id, serving=cfg.serving, gguf_blocks=b.gguf_blocks)
        for e in cfg.experts:
            if e.adapter:
                local = cfg.resolve_path(e.adapter)
                engine.registry.register(e.name, str(local) if local.exists() or not _looks_like_hub_id(e.adapter) else e.adapter)
        preload = [e.name for e in cfg.experts if e.adapter and ("all" in cfg.serving.preload or e.name in cfg.serving.preload)]
        for name in preload:
            engine.load_adapter(name)
        return engine

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, source: str | Path | None = None) -> AdapterInfo:
        """Read, validate and register an adapter now (and make it resident if a slot is free).

        Args:
            name: the name requests use (``adapter=name``).
            source: a PEFT adapter folder or hub id; None reloads the registered source.

        Returns:
            The adapter's description.

        Raises:
            AdapterError: missing folder, corrupt or pickle-only weights, wrong shapes, rank over
                the limit, unknown target module; the registry is unchanged.
        """
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"name: expected a non-empty adapter name, found {name!r}", param="name")
        def read() -> None:  # off the caller's thread, without an OpenMP pool, at low priority (coe.engine.threads);
            background_compute()  # while sequences run, the loop reads it between steps (Scheduler.read_in_pieces)
            self.registry.load(name, None if source is None else str(source), read=self.scheduler.read_in_pieces)

        run_in_fresh_thread(read, "coe-adapter-read")
        self._make_resident_if_free(name)
        return self._info(name)

    def _make_resident_if_free(self, name: str) -> None:
        reg = self.registry

        def activate() -> None:  # on the loop thread: the stacks are only written between steps
            if reg.has(name) and reg.slot_of(name) is None and not reg.writing(name) and reg.is_packed(name) \
                    and reg.free_or_evictable_slot(exclude=lambda n: True) is not None:
                reg.activate(name, budget_s=self.scheduler.write_budget_s())

        self.scheduler.call(activate)
        # while sequences run the write is spread over the next gaps between steps (a few steps)
        while reg.writing(name) and self.scheduler.alive:
            reg.wait_written(name, timeout=0.5)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter: new requests for it fail with ``UnknownModel``; running ones finish
        on it, then its slot is freed.

        Raises:
            UnknownModel: no adapter of that name.
        """
        self.registry.unload(name)

    def list_adapters(self) -> list[AdapterInfo]:
        """Every registered adapter, with where it is and how much memory it holds."""
        return self.registry.info()

    def _info(self, name: str) -> AdapterInfo:
        for a in self.registry.info():
            if a.name == name:
                return a
        raise UnknownModel(f"adapter {name!r} is not loaded", param="adapter")

    # ------------------------------------------------------------------ requests

    def count_prompt_tokens(self, prompt: str | None = None, messages: Seq[Any] | None = None) -> int:
        """Tokens the prompt (or the chat, template applied) takes, as ``generate`` would count them."""
        with self._tokenize_lock:
            return len(encode_prompt(self.tokenizer, prompt, messages))

    def _request(self, prompt: Any, messages: Any, adapter: Any, ignore_eos: bool = False, **params: Any) -> Request:
        if self._closed:
            raise EngineUnavailable("the engine is shutting down; retry on another instance")
        if adapter is not None and not self.registry.has(adapter):
            known = ", ".join(sorted(self.registry.names())) or "none"
            raise UnknownModel(f"adapter {adapter!r} is not loaded (loaded adapters: {known}); load it or pass adapter=None for the base model",
                               param="adapter")
        with self._tokenize_lock:
            ids = encode_prompt(self.tokenizer, prompt, messages)
        s = self.serving
        return build_request(ids, adapter=adapter, max_seq_len=self.max_seq_len, max_tokens_default=s.max_tokens_default,
                             max_tokens_limit=s.max_tokens_limit, default_timeout_s=s.request_timeout_s,
                             eos_ids=() if ignore_eos else self.eos_ids, vocab_size=self.model.args.vocab_size, **params)

    def generate(self, prompt: str | None = None, *, messages: Seq[Any] | None = None, adapter: str | None = None,
                 max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None, stop: str | Seq[str] | None = None,
                 stop_token_ids: Seq[int] | None = None, timeout: float | None = None,
                 ignore_eos: bool = False) -> GenerationOutput:
        """Generate a completion (blocking).

        Args:
            prompt: raw text, tokenized like ``tokenizer(prompt)`` (special tokens included).
            messages: a chat; the chat template is applied with the generation prompt.
            adapter: adapter name; None = the base model. An unknown name raises, never falls back.
            max_tokens: new tokens at most (default ``serving.max_tokens_default``, cut to the context).
            temperature: 0 or None = greedy.
            top_p / top_k: nucleus / top-k filtering (None = off).
            seed: per-request seed (same seed, same tokens, whatever else is batched).
            stop: stop string(s); the text ends before the first one.
            stop_token_ids: token ids that end generation besides EOS.
            timeout: seconds before the request is cancelled (default ``serving.request_timeout_s``).
            ignore_eos: keep generating past EOS (benchmarks; stop strings and stop_token_ids still apply).

        Returns:
            The generation: text, new token ids, finish_reason, usage.

        Raises:
            InvalidRequest / ContextTooLong: bad parameters (raised before anything runs).
            UnknownModel: ``adapter`` is not registered.
            AdapterError: the adapter could not be loaded.
            RequestTimeout: the deadline passed.
            GenerationError: the model failed on this request.
        """
        req = self._request(prompt, messages, adapter, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids, timeout=timeout,
                            ignore_eos=ignore_eos)
        results: queue.SimpleQueue = queue.SimpleQueue()
        job = self._submit(req, results.put, stream=False)
        for item in self._iterate(job, results):  # a non-streaming job posts only its final output
            if isinstance(item, GenerationOutput):
                return item
        raise EngineUnavailable("the engine loop stopped before the request finished")

    def stream(self, prompt: str | None = None, *, messages: Seq[Any] | None = None, adapter: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, seed: int | None = None, stop: str | Seq[str] | None = None,
               stop_token_ids: Seq[int] | None = None, timeout: float | None = None,
               ignore_eos: bool = False) -> Iterator[StreamDelta | GenerationOutput]:
        """Generate with streaming: ``StreamDelta`` items (text and token ids, one per new token),
        then one ``GenerationOutput``. Same arguments and errors as :meth:`generate`; validation
        errors and ``QueueFull`` are raised by this call itself, before iteration starts.

        Closing the iterator early (``close()``, or leaving a ``for`` loop over it) cancels the
        request and frees its slot.

        Example:
            >>> for item in engine.stream("Once upon a time", max_tokens=16):
            ...     print(getattr(item, "text", ""), end="")
        """
        req = self._request(prompt, messages, adapter, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids, timeout=timeout,
                            ignore_eos=ignore_eos)
        results: queue.SimpleQueue = queue.SimpleQueue()
        job = self._submit(req, results.put, stream=True)
        return self._iterate(job, results)

    def _iterate(self, job: Job, results: queue.SimpleQueue) -> Iterator[StreamDelta | GenerationOutput]:
        try:
            while True:
                try:
                    item = results.get(timeout=0.5)
                except queue.Empty:
                    if not self.scheduler.alive:
                        raise EngineUnavailable("the engine loop stopped before the request finished") from None
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationOutput):
                    return
        finally:
            job.cancel()  # a no-op once finished; frees the slot if the caller stopped early

    def astream(self, prompt: str | None = None, *, messages: Seq[Any] | None = None, adapter: str | None = None,
                max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                top_k: int | None = None, seed: int | None = None, stop: str | Seq[str] | None = None,
                stop_token_ids: Seq[int] | None = None, timeout: float | None = None,
                ignore_eos: bool = False) -> AsyncIterator[StreamDelta | GenerationOutput]:
        """:meth:`stream` for asyncio: call it inside a running event loop and ``async for`` over it.

        Cancelling the consuming task, or ``aclose()``, cancels the request and frees its slot.
        Validation errors and ``QueueFull`` are raised by this call itself.
        """
        req = self._request(prompt, messages, adapter, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids, timeout=timeout,
                            ignore_eos=ignore_eos)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()

        def sink(item: Any) -> None:
            loop.call_soon_threadsafe(results.put_nowait, item)

        job = self._submit(req, sink, stream=True)
        return self._aiterate(job, results)

    async def _aiterate(self, job: Job, results: asyncio.Queue) -> AsyncIterator[StreamDelta | GenerationOutput]:
        try:
            while True:
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationOutput):
                    return
        finally:
            job.cancel()  # a no-op once finished; frees the slot if the caller stopped early

    def _submit(self, req: Request, sink: Any, *, stream: bool) -> Job:
        seq = Sequence(req, self.tokenizer, self.max_seq_len, incremental=stream)
        return self.scheduler.submit(seq, sink, stream=stream)

    # ------------------------------------------------------------------ introspection / lifecycle

    def stats(self) -> dict[str, Any]:
        """Gauges and counters: ``queue_depth``, ``running``, ``resident_adapters``,
        ``max_queue_wait_s`` (per adapter; ``<base>`` for the base model), KV cache bytes
        (reserved and in use), weight bytes, and request/token/step totals."""
        return {
            "model_id": self.model_id,
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "max_seq_len": self.max_seq_len,
            "max_batch": self.serving.max_batch,
            "resident_adapters": self.registry.resident(),
            "registered_adapters": len(self.registry.names()),
            "lora_rank": self.model.lora_rank,
            "kv_cache_reserved_bytes": self.kv.reserved_bytes(),
            "weight_bytes": self.model.weight_bytes(),
            "accepting": not self._closed,
            **self.scheduler.stats(),
        }

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting requests (later calls raise ``EngineUnavailable``), let in-flight and
        queued ones finish within ``grace_s`` seconds, fail the rest with ``EngineUnavailable``,
        and stop the loop. Safe to call twice."""
        self._closed = True
        self.scheduler.shutdown(grace_s)


def _looks_like_hub_id(s: str) -> bool:
    from coe.engine.adapters import HUB_ID_RE

    return bool(HUB_ID_RE.match(s)) and not s.startswith((".", "/", "~"))


def _eos_ids(tokenizer: Any, hf_config: Any, path: Path | None = None) -> tuple[int, ...]:
    """Token ids that end a generation: the tokenizer's EOS and the eos_token_id(s) of the model's
    config and generation_config.json."""
    ids: set[int] = set()
    gen_eos = None
    if path is not None and (path / "generation_config.json").is_file():
        try:
            import json

            gen_eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
        except (OSError, ValueError):
            gen_eos = None
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None), gen_eos):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(i) for i in v if isinstance(i, int))
    return tuple(sorted(ids))

