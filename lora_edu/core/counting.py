"""Counting parameters: what LoRA trains versus what the model holds.

For an adapted ``Linear(in, out)`` LoRA trains r·(in + out) numbers instead of
in·out (Hu et al. 2021, §4.2); for GPT-3 175B with r = 4 on W_q, W_v that is
18.9 M instead of 175 B.  :func:`count_parameters` makes that visible per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lora_edu.core.inject import lora_layers

__all__ = ["LayerCount", "ParameterCount", "count_parameters"]


@dataclass(frozen=True)
class LayerCount:
    """One adapted layer: its base weight shape, the rank, and r·(in + out) trainable numbers."""

    name: str
    shape: tuple[int, int]  # base weight shape: (out, in) for Linear, (num_embeddings, dim) for Embedding
    r: int
    lora_params: int  # r·(in + out) for the active adapter
    trainable: int  # of those, how many have requires_grad=True


@dataclass(frozen=True)
class ParameterCount:
    total: int
    trainable: int
    layers: list[LayerCount] = field(default_factory=list)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        rows = [("layer", "shape", "r", "r·(in+out)")]
        rows += [(l.name, "×".join(map(str, l.shape)), str(l.r), f"{l.lora_params:,}") for l in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.trainable_fraction:.4g}%; {self.frozen:,} frozen)"
        )
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable parameters, plus a per-LoRA-layer breakdown (shared tensors counted once)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():  # .parameters() already skips shared (tied) tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    layers = []
    for name, layer in lora_layers(model):
        if layer.active_adapter is None:
            continue
        A, B = layer.A, layer.B
        W = getattr(layer.base, "weight", None)  # a quantised base has none: use the layer's (out, in)
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else (layer.out_features, layer.in_features)
        # Linear: A (r, in), B (out, r); Embedding: A (r, num), B (dim, r) — r·(in + out) either way
        n_lora = A.numel() + B.numel()
        n_train = A.numel() * A.requires_grad + B.numel() * B.requires_grad
        layers.append(LayerCount(name, shape, layer.r, n_lora, n_train))
    return ParameterCount(total=total, trainable=trainable, layers=layers)
