"""Multi-LoRA kernels (being written)."""
