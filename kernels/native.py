"""Build and load the project's C kernels (``kernels/native/*.c``, ``coe/engine/native/*.c``).

Each source is compiled once, with the machine's C compiler (``$CC``, else ``gcc``/``cc``), into
``$COE_CACHE_DIR/native`` (default ``~/.cache/coe/native``) under a name keyed by the source's
hash and the flags, and loaded with ``ctypes``. Nothing is compiled at install time, so the
project installs anywhere; where a library cannot be built or loaded (no compiler, a CPU
without AVX2/FMA, ``COE_NATIVE=0``) :func:`load` returns None, :func:`unavailable_reason`
says why, and callers keep their torch paths.

The libraries are built with ``-fopenmp`` and link ``libgomp.so.1``; loaded after torch, that
soname resolves to the copy torch already loaded, so they share torch's OpenMP workers instead
of starting a second pool (two pools on two cores slow each other down).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch  # noqa: F401  (loaded first: libgomp.so.1 must resolve to torch's copy)

CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared")
# Added where the CPU has them (see :func:`isa`): the sources' ``#ifdef __AVX512F__`` paths.
AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
AVX512_CPU = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
ISAS = ("avx2", "avx512")
_why: dict[str, str] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("COE_CACHE_DIR") or Path.home() / ".cache" / "coe") / "native"


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def avx512_cpu() -> bool:
    """Whether this CPU runs the AVX-512 build (F/BW/VL/DQ)."""
    return AVX512_CPU <= cpu_flags()


# Added to the AVX-512 build where the CPU has AVX512-BF16: the ``#ifdef __AVX512BF16__`` paths
# (the engine's opt-in bfloat16 LoRA, see coe.engine.model.LoRAStack).
BF16_FLAGS = ("-mavx512bf16",)


def bf16_cpu() -> bool:
    """Whether this CPU has AVX512-BF16 (``vdpbf16ps``) besides the AVX-512 build's sets."""
    return avx512_cpu() and "avx512_bf16" in cpu_flags()


def _flags(chosen: str) -> tuple[str, ...]:
    if chosen != "avx512":
        return CFLAGS
    return CFLAGS + AVX512_FLAGS + (BF16_FLAGS if bf16_cpu() else ())


def isa() -> str:
    """The instruction set the kernels are built for: ``avx512`` where the CPU has AVX-512
    (F/BW/VL/DQ), else ``avx2``. ``COE_NATIVE_ISA=avx2`` forces the AVX2 build on any CPU (to
    compare the two, or to rule one out); ``avx512`` on a CPU without it is refused by
    :func:`load`. Read at every :func:`load`, so a test can build both."""
    want = os.environ.get("COE_NATIVE_ISA", "").strip().lower()
    if want and want not in ISAS:
        raise ValueError(f"COE_NATIVE_ISA={want!r}: expected one of {', '.join(ISAS)} (or unset for the best the CPU has)")
    return want or ("avx512" if avx512_cpu() else "avx2")


def build_flags() -> tuple[str, ...]:
    """The compiler flags of :func:`isa`'s build (what :func:`load` compiles with)."""
    return _flags(isa())


def disabled() -> bool:
    """``COE_NATIVE=0`` (or false/off/no) turns every C kernel off."""
    return os.environ.get("COE_NATIVE", "1").strip().lower() in ("0", "false", "off", "no")


def load(src: Path, setup: Callable[[ctypes.CDLL], bool], include: tuple[Path, ...] = ()) -> ctypes.CDLL | None:
    """Compile ``src`` once (cached) and load it; ``setup(lib)`` declares the functions' argument
    types and returns False when the library does not match (an ABI check). ``include``: more
    folders of headers (``src``'s own folder is searched too); every header there is part of the
    cache key. None when the library cannot be used here (see :func:`unavailable_reason`)."""
    key = str(src)
    _why.pop(key, None)

    def no(why: str) -> None:
        _why[key] = why
        return None

    if disabled():
        return no("COE_NATIVE=0")
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        return no("the CPU lacks AVX2/FMA/F16C (or /proc/cpuinfo is unreadable)")
    try:
        chosen = isa()
    except ValueError as exc:
        return no(str(exc))
    if chosen == "avx512" and not avx512_cpu():
        return no("COE_NATIVE_ISA=avx512, but the CPU lacks AVX-512 F/BW/VL/DQ; unset it or set it to avx2")
    base = _flags(chosen)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return no(f"no C compiler (gcc, cc or $CC) to build {src.name}")
    dirs = (src.parent, *include)
    flags = base + tuple(f"-I{d}" for d in include)
    code = src.read_bytes() + b"".join(h.read_bytes() for d in dirs for h in sorted(d.glob("*.h")))
    digest = hashlib.sha256(code + " ".join((cc,) + base).encode()).hexdigest()[:16]
    out = cache_dir() / f"{src.stem}-{digest}.so"
    if not out.is_file():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
        except OSError as exc:
            return no(f"cannot write the kernel cache {out.parent}: {exc}")
        try:
            proc = subprocess.run([cc, *flags, "-o", tmp, str(src)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                return no(f"{cc} failed to build {src.name}: {proc.stderr.strip()[-400:]}")
            os.replace(tmp, out)  # atomic: concurrent builds end with one complete file
        except (OSError, subprocess.SubprocessError) as exc:
            return no(f"could not run {cc}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as exc:
        return no(f"could not load {out}: {exc}")
    if not setup(lib):
        return no(f"{out} does not match {src.name} (ABI check failed); delete it to rebuild")
    return lib


def unavailable_reason(src: Path) -> str | None:
    """Why the last :func:`load` of ``src`` returned None (None if it did not)."""
    return _why.get(str(src))
