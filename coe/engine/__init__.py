"""coe's inference engine: a Llama-family base model serving many LoRA adapters at once.

Public API::

    from coe.engine import Engine, GenerationOutput, StreamDelta, AdapterInfo

Layout: ``model.py`` (the Llama with multi-LoRA layers), ``weights.py`` (folders, hub ids, GGUF
cache), ``adapters.py`` (PEFT adapters: read, check, pack), ``registry.py`` (names, CPU tier,
device slots), ``kv_cache.py``, ``batch.py`` (one step's tensors), ``sampling.py``,
``detokenize.py``, ``request.py`` (validation), ``sequence.py`` (one generation),
``engine.py`` (the public class), ``bench.py`` (``coe bench engine``).
"""

from coe.engine.engine import Engine
from coe.engine.outputs import AdapterInfo, GenerationOutput, StreamDelta

__all__ = ["Engine", "GenerationOutput", "StreamDelta", "AdapterInfo"]
