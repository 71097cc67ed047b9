"""A map between the LoRA conventions found in papers, libraries and tutorials.

Pure functions on tensors; nothing here depends on the LoRA layers.

Orientation (LoRA paper §4.1; loralib, Hugging Face PEFT, litgpt, lora_edu)::

    A: (r, in)    B: (out, r)    delta_W = scale * B @ A : (out, in)
    y = x @ W.T + scale * (x @ A.T) @ B.T

Row-vector form (some tutorials, e.g. LLMs-from-scratch appendix E)::

    A_row: (in, r)    B_row: (r, out)    y = x @ W.T + scale * x @ A_row @ B_row

The two hold the same numbers: ``A = A_row.T`` and ``B = B_row.T``.

Scale rules: the source article's bare ``alpha`` (scale = α), Hu et al.'s α/r,
and rsLoRA's α/√r (Kalajdzievski 2023). ``convert_alpha`` keeps the effective
scale s, so an adapter trained under one rule computes the same function under
another.

Embedding LoRA (loralib / PEFT) stores ``lora_embedding_A`` as (r, num_embeddings),
zero-initialised, and ``lora_embedding_B`` as (dim, r), normal-initialised: the
init is swapped relative to Linear (harmless, one factor is still zero). Read the
embedding as a Linear from one-hot vectors (in = num_embeddings, out = dim) and A,
B have the Linear orientation; the table delta is the transpose:
``delta_W_embedding = (B @ A).T * scale`` of shape (num_embeddings, dim).

Kaiming fan-in trap: ``kaiming_uniform_(a=√5)`` draws from U(−1/√fan_in, 1/√fan_in)
where torch takes fan_in = ``tensor.shape[1]``. On an (r, in) A that is 1/√in; on an
(in, r) A it is 1/√r — √(in/r) times larger.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from lora_edu.core.layers import LoRAEmbedding, LoRALinear

__all__ = [
    "SCALE_RULES",
    "to_row_form",
    "from_row_form",
    "lora_delta_W",
    "lora_forward",
    "lora_forward_row_form",
    "scale_for",
    "convert_alpha",
    "init_embedding_lora",
    "embedding_delta_W",
    "embedding_lora_forward",
    "kaiming_uniform_bound",
    "fan_in_trap",
]

# ----------------------------------------------------------------------------- orientation


def from_row_form(A_row: torch.Tensor, B_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_row (in, r), B_row (r, out)) -> (A (r, in), B (out, r)); ``x @ A_row @ B_row == x @ A.T @ B.T``."""
    if A_row.dim() != 2 or B_row.dim() != 2 or A_row.shape[1] != B_row.shape[0]:
        raise ValueError(f"expected A_row (in, r) and B_row (r, out), got {tuple(A_row.shape)} and {tuple(B_row.shape)}")
    return A_row.T.contiguous(), B_row.T.contiguous()


def to_row_form(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) -> (A_row (in, r), B_row (r, out)); the inverse of ``from_row_form``."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"expected A (r, in) and B (out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    return A.T.contiguous(), B.T.contiguous()


def _lora_linear(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, bias=None) -> LoRALinear:
    """The library's LoRALinear holding W (out, in), b, A (r, in), B (out, r) and the given scale s."""
    base = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        base.weight.copy_(W)
        if bias is not None:
            base.bias.copy_(bias)
    r = A.shape[0]
    layer = LoRALinear(base, r=r, alpha=scale * r)  # s = α/r = scale
    with torch.no_grad():
        layer.A.copy_(A)
        layer.B.copy_(B)
    return layer


def lora_delta_W(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """delta_W = scale · B @ A, shape (out, in) — the weight update a merge adds to W (LoRA §4.1)."""
    W = torch.zeros(B.shape[0], A.shape[1], dtype=A.dtype, device=A.device)
    return _lora_linear(W, A, B, scale).delta_weight().detach()


def lora_forward(x, W, A, B, scale: float, bias=None) -> torch.Tensor:
    """y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ with W (out, in), A (r, in), B (out, r): ``LoRALinear.forward``."""
    with torch.no_grad():
        return _lora_linear(W, A, B, scale, bias)(x)


def lora_forward_row_form(x, W, A_row, B_row, scale: float, bias=None) -> torch.Tensor:
    """The tutorials' form, y = x Wᵀ + b + scale · x @ A_row @ B_row with A_row (in, r), B_row (r, out).

    The same function as :func:`lora_forward` after :func:`from_row_form` (a transpose of each factor).
    """
    A, B = from_row_form(A_row, B_row)
    return lora_forward(x, W, A, B, scale, bias)


# ----------------------------------------------------------------------------- scale rules

SCALE_RULES = ("alpha", "alpha/r", "alpha/sqrt(r)")
_RULE_ALIASES = {
    "alpha": "alpha",
    "bare": "alpha",  # the source article: W(x) + alpha * B(A(x))
    "alpha/r": "alpha/r",
    "lora": "alpha/r",  # Hu et al. 2021, loralib, PEFT default
    "alpha/sqrt(r)": "alpha/sqrt(r)",
    "rslora": "alpha/sqrt(r)",  # Kalajdzievski 2023, PEFT use_rslora=True
}


def _rule(rule: str) -> str:
    try:
        return _RULE_ALIASES[rule.strip().lower().replace(" ", "").replace("√r", "sqrt(r)")]
    except KeyError:
        raise ValueError(f"unknown scale rule {rule!r}; use one of {SCALE_RULES} (or 'bare', 'lora', 'rslora')") from None


def scale_for(alpha: float, r: int, rule: str = "alpha/r") -> float:
    """The effective scale s multiplying B @ A: α, α/r or α/√r."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    rule = _rule(rule)
    if rule == "alpha":
        return float(alpha)
    if rule == "alpha/r":
        return alpha / r
    return alpha / math.sqrt(r)


def convert_alpha(alpha: float, r: int, from_rule: str, to_rule: str) -> float:
    """The α that gives the same scale s under ``to_rule`` as ``alpha`` gives under ``from_rule``.

    E.g. the article's bare α = 32 at r = 4 (s = 32) is α = 128 under α/r and α = 64 under α/√r.
    """
    s = scale_for(alpha, r, from_rule)
    to_rule = _rule(to_rule)
    if to_rule == "alpha":
        return s
    if to_rule == "alpha/r":
        return s * r
    return s * math.sqrt(r)


# ----------------------------------------------------------------------------- embeddings


def init_embedding_lora(
    num_embeddings: int, dim: int, r: int, generator: torch.Generator | None = None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT/loralib embedding init: A (r, num_embeddings) = 0, B (dim, r) ~ N(0, 1) — swapped vs Linear."""
    A = torch.zeros(r, num_embeddings, dtype=dtype)
    B = torch.randn(dim, r, generator=generator, dtype=dtype)
    return A, B


def _lora_embedding(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> LoRAEmbedding:
    base = nn.Embedding(*W.shape, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        base.weight.copy_(W)
    r = A.shape[0]
    layer = LoRAEmbedding(base, r=r, alpha=scale * r)
    with torch.no_grad():
        layer.A.copy_(A)
        layer.B.copy_(B)
    return layer


def embedding_delta_W(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Embedding-table update (B @ A)ᵀ · scale: A (r, num_embeddings), B (dim, r) -> (num_embeddings, dim)."""
    W = torch.zeros(A.shape[1], B.shape[0], dtype=A.dtype, device=A.device)
    return _lora_embedding(W, A, B, scale).delta_weight().detach()


def embedding_lora_forward(ids: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float):
    """PEFT's embedding forward, W[ids] + scale · Aᵀ[ids] Bᵀ with W (num_embeddings, dim): ``LoRAEmbedding.forward``."""
    with torch.no_grad():
        return _lora_embedding(W, A, B, scale)(ids)


# ----------------------------------------------------------------------------- Kaiming fan-in trap


def kaiming_uniform_bound(shape: tuple[int, ...], a: float = math.sqrt(5)) -> float:
    """Bound of ``torch.nn.init.kaiming_uniform_(t, a)`` on a tensor of ``shape`` (fan_in mode, leaky_relu).

    gain = √(2 / (1 + a²)), bound = gain · √(3 / fan_in), fan_in = shape[1] · prod(shape[2:]);
    for a = √5 this is 1/√fan_in.
    """
    if len(shape) < 2:
        raise ValueError("fan_in needs a tensor with at least 2 dimensions")
    fan_in = shape[1] * math.prod(shape[2:])
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return gain * math.sqrt(3.0 / fan_in)


def fan_in_trap(in_features: int, r: int) -> dict[str, float]:
    """Kaiming(a=√5) bounds for A stored as (r, in) vs as (in, r), and their ratio √(in/r)."""
    bound_r_in = kaiming_uniform_bound((r, in_features))  # 1/√in: fan_in = in (correct)
    bound_in_r = kaiming_uniform_bound((in_features, r))  # 1/√r: fan_in = r (the trap)
    return {"bound_r_in": bound_r_in, "bound_in_r": bound_in_r, "ratio": bound_in_r / bound_r_in}
