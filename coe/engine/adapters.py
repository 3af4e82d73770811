"""Reads a PEFT LoRA adapter, checks it against the base model, and packs it for the model's slots.

A PEFT adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` in a folder or hub repo.
Honoured: ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules`` (list, ``all-linear`` or
regex), ``rank_pattern`` / ``alpha_pattern`` (PEFT's own matching rule), ``layers_to_transform``
(through which layers have weights). Refused, each with an ``AdapterError`` naming the adapter:
a missing folder, no or corrupt safetensors, a pickle-only adapter, DoRA, LoRA biases,
``modules_to_save``, a target module the base model does not have (or that the engine cannot
serve, such as ``lm_head``), wrong shapes, a rank above ``serving.max_lora_rank``.

The packed form matches the model's fused projections (q/k/v, o, gate/up, down): per layer and
group, ``A [n*r, d_in]``, ``Bt [r, sum(d_out)]`` (B transposed, as the stacks store it) and a
scale per slice, at the adapter's largest rank ``r`` (smaller module ranks are zero-padded).
Copying it into a slot of the stacks is then a handful of ``copy_`` calls.

This module knows nothing about slots, requests or scheduling (``registry.py`` does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

import torch

from coe.engine.model import FUSED_GROUPS, LORA_TARGETS, ModelArgs
from coe.engine.threads import cooperate
from coe.errors import AdapterError, AdapterNotFound

logger = logging.getLogger("coe.engine")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight$"
)
# Linear modules a Llama has that the engine cannot put an adapter on.
_UNSERVABLE = ("lm_head", "embed_tokens")


@dataclass
class PackedAdapter:
    """An adapter in CPU memory, ready to be copied into a device slot.

    Args:
        name: the registry name.
        source: where it was read from.
        rank: the largest module rank (the packed rank).
        layers: per layer, ``{group: (A [n*rank, d_in], Bt [rank, sum(d_out)], scale [n])}`` for
            the groups the adapter touches in that layer (views into two flat buffers).
        nbytes: bytes held by the packed tensors.
        targets: the PEFT module names the adapter targets (``q_proj``...).
        base_model: the adapter's ``base_model_name_or_path``.
    """

    name: str
    source: str
    rank: int
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    nbytes: int
    targets: tuple[str, ...] = ()
    base_model: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_adapter_dir(name: str, source: str, *, revision: str | None = None) -> Path:
    """A local folder for ``source`` (a folder, or a hub id fetched without pickles).

    Raises:
        AdapterNotFound: the folder does not exist and ``source`` is not a fetchable hub id.
    """
    p = Path(os.path.expanduser(str(source)))
    if p.is_dir():
        return p
    if p.exists():
        raise AdapterError(name, f"source {str(source)!r} is a file; expected a PEFT adapter folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
    if HUB_ID_RE.match(str(source)) and not str(source).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(source), revision=revision, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as exc:  # offline, 404, auth, network: all "cannot get it"
            raise AdapterNotFound(name, f"no local folder {str(source)!r}, and fetching it as a hub id failed: {exc}") from exc
    raise AdapterNotFound(name, f"folder {str(p)!r} does not exist; expected a PEFT adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE}) or a hub id")


def read_adapter_config(name: str, path: Path) -> dict[str, Any]:
    """Parse and sanity-check ``adapter_config.json``."""
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(name, f"{path} has no {CONFIG_FILE}; expected a PEFT LoRA adapter folder (PeftModel.save_pretrained)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(name, f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(name, f"{cfg_path} must hold a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"{cfg_path}: peft_type {peft_type!r} is not supported; only LoRA adapters are served")
    if cfg.get("use_dora"):
        raise AdapterError(name, f"{cfg_path}: DoRA adapters (use_dora: true) are not supported; merge or retrain as plain LoRA")
    if cfg.get("bias", "none") not in ("none", None):
        raise AdapterError(name, f"{cfg_path}: bias {cfg.get('bias')!r} is not supported; train with bias='none'")
    if cfg.get("modules_to_save"):
        raise AdapterError(name, f"{cfg_path}: modules_to_save {cfg['modules_to_save']!r} is not supported (the base model is shared); retrain without it")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(name, f"{cfg_path}: fan_in_fan_out is for GPT-2 style Conv1D layers; a Llama adapter must not set it")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key, 8)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise AdapterError(name, f"{cfg_path}: {key} must be a positive number; found {v!r}")
    return cfg


def base_module_names(args: ModelArgs) -> list[str]:
    """Every LoRA-capable module's full name, as PEFT sees it (``model.layers.0.self_attn.q_proj``)."""
    out = []
    for i in range(args.n_layers):
        for t in LORA_TARGETS:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append(f"model.layers.{i}.{part}.{t}")
    return out


def _check_targets(name: str, cfg: dict[str, Any], args: ModelArgs) -> None:
    """Every ``target_modules`` entry must name modules the base model has and the engine serves."""
    targets = cfg.get("target_modules")
    if targets is None:
        return
    modules = base_module_names(args)
    unservable = ["lm_head", "model.embed_tokens"]
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        try:
            rx = re.compile(targets)
        except re.error as exc:
            raise AdapterError(name, f"target_modules regex {targets!r} is invalid: {exc}") from exc
        if any(rx.fullmatch(m) for m in unservable):
            raise AdapterError(name, f"target_modules {targets!r} matches lm_head/embed_tokens, which the engine cannot adapt")
        if not any(rx.fullmatch(m) for m in modules):
            raise AdapterError(name, f"target_modules regex {targets!r} matches no module of the base model "
                               f"(LoRA-capable: {', '.join(LORA_TARGETS)})")
        return
    for t in targets:
        t = str(t)
        if t.split(".")[-1] in _UNSERVABLE:
            raise AdapterError(name, f"target module {t!r} is not supported: the engine serves adapters on "
                               f"{', '.join(LORA_TARGETS)} only (the base model's embeddings and lm_head are shared)")
        if not any(m == t or m.endswith("." + t) for m in modules):
            raise AdapterError(name, f"target module {t!r} does not exist in the base model; its LoRA-capable modules are "
                               f"{', '.join(LORA_TARGETS)}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern key that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def read_file_ahead(path: Path, chunk: int = 1 << 20) -> None:
    """Read ``path`` through once, so that what follows finds it in the OS's page cache: the
    first piece of :func:`read_adapter_steps` does it, on the reader's thread, so that the pieces
    the engine's step loop may run read from memory and never wait on the disk."""
    with open(path, "rb") as fh:
        while fh.read(chunk):
            pass


def read_adapter(name: str, source: str, args: ModelArgs, *, max_rank: int, dtype: torch.dtype,
                 base_names: tuple[str, ...] = (), strict_base_model: bool = False,
                 revision: str | None = None) -> PackedAdapter:
    """Read, validate and pack one adapter into CPU memory: :func:`read_adapter_steps` run to its
    end, with :func:`coe.engine.threads.cooperate` between its pieces (a background reader then
    leaves a running decode loop the GIL). Same arguments, result and errors."""
    steps = read_adapter_steps(name, source, args, max_rank=max_rank, dtype=dtype, base_names=base_names,
                               strict_base_model=strict_base_model, revision=revision)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        cooperate()


def read_adapter_steps(name: str, source: str, args: ModelArgs, *, max_rank: int, dtype: torch.dtype,
                       base_names: tuple[str, ...] = (), strict_base_model: bool = False,
                       revision: str | None = None, read_ahead: bool = False) -> Generator[None, None, PackedAdapter]:
    """Read, validate and pack one adapter into CPU memory, as a generator that stops between
    pieces of work (every 8 tensors read, every 2 fused groups packed, each finiteness check:
    well under a millisecond each for SmolLM2 at r=16) and returns the packed adapter. The first
    piece resolves the source (a hub id is downloaded there), reads the config and opens the
    weights; with ``read_ahead`` it also reads the weights file through (:func:`read_file_ahead`:
    all of the disk's part), so that the engine's step loop can run the other pieces, memory and
    arithmetic only, between its steps (``Scheduler.read_in_pieces``). Without it (a read run to
    its end on one thread, :func:`read_adapter`) the file is read once, as it is used.

    Args:
        name: the registry name (used in every error message).
        source: a folder or hub id.
        args: the base model's architecture.
        max_rank: ``serving.max_lora_rank``.
        dtype: the base model's dtype (the packed tensors take it).
        base_names: names identifying the base model, for the ``base_model_name_or_path`` check.
        strict_base_model: a mismatch is an error instead of a warning.
        revision: hub revision.

    Returns:
        The packed adapter.

    Raises:
        AdapterError: (or ``AdapterNotFound``) naming the adapter and what is wrong.
    """
    path = resolve_adapter_dir(name, source, revision=revision)
    cfg = read_adapter_config(name, path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [f for f in _PICKLE_FILES if (path / f).is_file()]
        if pickles:
            raise AdapterError(name, f"{path} has only pickled weights ({pickles[0]}); pickles are refused (they can run code). "
                               "Re-save with `model.save_pretrained(dir, safe_serialization=True)`")
        raise AdapterError(name, f"{path} has no {WEIGHTS_FILE}; expected the PEFT adapter weights next to {CONFIG_FILE}")
    _check_targets(name, cfg, args)
    _check_base_model(name, cfg.get("base_model_name_or_path"), base_names, strict_base_model)
    if read_ahead:
        read_file_ahead(weights)  # the disk's part, in the first piece (the caller's thread)

    from safetensors import safe_open

    tensors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            for i, key in enumerate(keys):
                if i % 8 == 0:
                    yield  # a piece of work ends (see read_adapter)
                m = _KEY_RE.match(key)
                if not m:
                    raise AdapterError(name, f"{weights.name}: tensor {key!r} is not a LoRA A/B weight of a supported module "
                                       f"({', '.join(LORA_TARGETS)}); embeddings, lm_head, biases and DoRA magnitudes are not served")
                layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
                if module not in LORA_TARGETS:
                    raise AdapterError(name, f"{weights.name}: tensor {key!r} targets module {module!r}, which the engine cannot "
                                       f"adapt (supported: {', '.join(LORA_TARGETS)})")
                if layer >= args.n_layers:
                    raise AdapterError(name, f"{weights.name}: tensor {key!r} is for layer {layer}, but the base model has "
                                       f"{args.n_layers} layers; was it trained for another base model?")
                tensors.setdefault((layer, module), {})[ab] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterError(name, f"{weights} is not a readable safetensors file ({exc}); re-save or re-download it") from exc
    if not tensors:
        raise AdapterError(name, f"{weights} holds no LoRA weights")

    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    default_r, default_alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for (layer, module), ab in sorted(tensors.items()):
        full = f"model.layers.{layer}.{'self_attn' if module in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{module}"
        if "lora_A" not in ab or "lora_B" not in ab:
            missing = "lora_A" if "lora_A" not in ab else "lora_B"
            raise AdapterError(name, f"{weights.name}: {full} has no {missing} weight (corrupt or truncated adapter)")
        A, B = ab["lora_A"], ab["lora_B"]
        d_in, d_out = args.module_shape(module)
        r = int(_pattern_value(rank_pattern, full, default_r))
        alpha = float(_pattern_value(alpha_pattern, full, default_alpha))
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, d_in) or tuple(B.shape) != (d_out, r):
            raise AdapterError(
                name,
                f"{full}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit the base model; expected "
                f"lora_A [{r}, {d_in}] and lora_B [{d_out}, {r}] (r={r} from adapter_config.json); was it trained for another base model?",
            )
        if r > max_rank:
            raise AdapterError(name, f"{full}: rank {r} is above serving.max_lora_rank={max_rank}; raise the limit or use a smaller adapter")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[(layer, module)] = (A, B, scale)

    rank = max(A.shape[0] for A, _, _ in modules.values())
    layers, flats = yield from _pack(modules, args, rank, dtype)
    # One pass per buffer: a NaN or inf anywhere makes the sum non-finite (an overflowing sum of
    # finite weights is re-checked exactly before anything is refused).
    for f in flats:
        yield
        if not bool(torch.isfinite(f.sum())):
            _first_non_finite(name, modules)
    nbytes = sum(f.numel() * f.element_size() for f in flats) + 4 * sum(len(t[2]) for g in layers for t in g.values())
    targets = tuple(t for t in LORA_TARGETS if any(m == t for _, m in modules))
    return PackedAdapter(name=name, source=str(source), rank=rank, layers=layers, nbytes=nbytes, targets=targets,
                         base_model=cfg.get("base_model_name_or_path"), meta={"path": str(path), "use_rslora": rslora})


def _pack(modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]], args: ModelArgs, rank: int,
          dtype: torch.dtype) -> Generator[None, None, tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
                                                          list[torch.Tensor]]]:
    """Lay the modules out per fused group as ``(A [n*rank, d_in], Bt [rank, sum(d_out)], scale [n])``
    (a generator, pausing every 2 groups: see :func:`read_adapter_steps`).

    All groups are views into two flat buffers (one allocation each instead of one per group),
    which are returned too: a single reduction over each then checks the whole adapter.
    """
    todo = []
    size_a = size_b = size_s = 0
    for layer in range(args.n_layers):
        for group, members in FUSED_GROUPS.items():
            if any((layer, m) in modules for m in members):
                d_in = args.module_shape(members[0])[0]
                outs = [args.module_shape(m)[1] for m in members]
                todo.append((layer, group, members, d_in, outs, size_a, size_b, size_s))
                size_a += len(members) * rank * d_in
                size_b += rank * sum(outs)
                size_s += len(members)
    flat_a = torch.zeros(size_a, dtype=dtype)
    flat_b = torch.zeros(size_b, dtype=dtype)
    scales = [0.0] * size_s
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [{} for _ in range(args.n_layers)]
    views = []
    for i, (layer, group, members, d_in, outs, off_a, off_b, off_s) in enumerate(todo):
        if i % 2 == 0:
            yield
        A = flat_a[off_a : off_a + len(members) * rank * d_in].view(len(members) * rank, d_in)
        Bt = flat_b[off_b : off_b + rank * sum(outs)].view(rank, sum(outs))
        off = 0
        for i, m in enumerate(members):
            if (layer, m) in modules:
                a, b, sc = modules[(layer, m)]
                r = a.shape[0]
                A[i * rank : i * rank + r].copy_(a)
                Bt[:r, off : off + outs[i]].copy_(b.t())
                scales[off_s + i] = sc
            off += outs[i]
        views.append((layer, group, A, Bt, off_s, len(members)))
    flat_s = torch.tensor(scales, dtype=dtype)
    for layer, group, A, Bt, off_s, n in views:
        layers[layer][group] = (A, Bt, flat_s[off_s : off_s + n])
    return layers, [flat_a, flat_b]


def _first_non_finite(name: str, modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Raise naming the first module whose weights hold NaN or inf (the slow, exact check)."""
    for (layer, module), (A, B, _) in sorted(modules.items()):
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(name, f"model.layers.{layer}.{module}: lora weights contain NaN or inf (corrupt adapter)")


def _norm_name(s: str) -> str:
    s = str(s).rstrip("/").split("/")[-1].lower()
    s = re.sub(r"\.gguf$", "", s)
    s = re.sub(r"([.-](q\d\w*|f16|f32|bf16))$", "", s)
    return re.sub(r"[^a-z0-9]", "", s)


def _check_base_model(name: str, declared: str | None, base_names: tuple[str, ...], strict: bool) -> None:
    if not declared or not base_names:
        return
    want = _norm_name(declared)
    have = [_norm_name(b) for b in base_names if b]
    if not want or any(h and (h == want or h in want or want in h) for h in have):
        return
    msg = (f"was trained for base model {declared!r}, but the engine serves {base_names[0]!r}; outputs may be wrong "
           "(set serving.strict_base_model to refuse such adapters)")
    if strict:
        raise AdapterError(name, msg.split(";")[0] + "; serving.strict_base_model is on, so it is refused")
    logger.warning("adapter %r %s", name, msg)
