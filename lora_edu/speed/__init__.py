"""Speed on top of the core: the fused LoRALinear path and multi-GPU training (DDP)."""
