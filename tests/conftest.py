"""Suite-wide settings: no hub access, quiet tokenizers, deterministic torch threads."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

# Without CUDA, Triton kernels run only under its interpreter, chosen before triton is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def native_isas() -> list[str]:
    """The C kernels' builds this CPU can run (``kernels.native.isa``): AVX2, and AVX-512 where
    the CPU has it."""
    from kernels import native

    return ["avx2", "avx512"] if native.avx512_cpu() else ["avx2"]


@pytest.fixture(params=native_isas())
def native_isa(request):
    """Run the test once per build of the C kernels (``COE_NATIVE_ISA``), with the loaders'
    caches cleared before and after, so the next test gets the default build again."""
    from coe.engine import quantized
    from kernels import native_ops

    def clear() -> None:
        quantized.native_library.cache_clear()
        native_ops.library.cache_clear()

    before = os.environ.get("COE_NATIVE_ISA")
    os.environ["COE_NATIVE_ISA"] = request.param
    clear()
    try:
        yield request.param
    finally:
        if before is None:
            os.environ.pop("COE_NATIVE_ISA", None)
        else:
            os.environ["COE_NATIVE_ISA"] = before
        clear()
