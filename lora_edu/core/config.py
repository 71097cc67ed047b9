"""One place for each LoRA rule: the scale s, hyper-parameter checks, adapter names, dtypes.

Hu et al. 2021 (arXiv 2106.09685), §4.1: ΔW x is scaled by s = α/r, "α is a constant
in r", so changing r does not require re-tuning the learning rate.  rsLoRA
(Kalajdzievski 2023) shows that α/r shrinks the update's gradients like r^(−1/2) at
large r and uses s = α/√r instead.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "AdapterConfig",
    "LOW_PRECISION",
    "adapter_dtype",
    "check_adapter_name",
    "merge_dtype",
    "scale_of",
    "scale_rule",
    "user_stacklevel",
    "validate_hyperparameters",
    "warn_if_rank_exceeds_shape",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Names an adapter cannot take: they are attributes of the containers that hold A, B and dropout.
_RESERVED = frozenset(dir(nn.ParameterDict())) | frozenset(dir(nn.ModuleDict()))


def scale_of(alpha: float, r: int, rslora: bool = False) -> float:
    """s = α/r (Hu et al. §4.1), or α/√r with ``rslora=True`` (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def scale_rule(rslora: bool) -> str:
    return "alpha/sqrt(r)" if rslora else "alpha/r"


def _is_int(x) -> bool:
    """An integral number (Python or numpy int), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    """A real number (Python or numpy int/float), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


#: the largest scale s accepted: beyond it s · (x Aᵀ Bᵀ) is inf in float32 (the adapters' dtype on most bases)
MAX_SCALE = float(torch.finfo(torch.float32).max)


def validate_hyperparameters(r, alpha, dropout=0.0, rslora=False) -> None:
    """Raise ``TypeError``/``ValueError`` with an actionable message for a bad r, α, dropout or rslora.

    Integral r (``int``, ``numpy.int64``, …) and real α / dropout (``float``, ``numpy.float32``, …) are accepted;
    bools are not.  α must be finite and give a scale s that float32 can hold (else every output overflows to inf).
    """
    if not _is_int(r):
        if isinstance(r, float) and r.is_integer():
            raise TypeError(f"r must be an int, got the float {r!r}; pass r={int(r)}")
        raise TypeError(f"r must be a positive int (the rank of ΔW = B A), got {r!r} of type {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be a positive int (the rank of ΔW = B A), got r={r}; try r=8")
    if not _is_real(alpha) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite positive number, got {alpha!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (the scale is s = alpha/r), got alpha={alpha}; a common choice is alpha = r or 2r")
    if not _is_real(dropout) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be True or False, got {rslora!r} of type {type(rslora).__name__}")
    s = scale_of(float(alpha), int(r), bool(rslora))
    if not math.isfinite(s) or s > MAX_SCALE:
        raise ValueError(f"alpha={alpha} gives the scale s = {scale_rule(bool(rslora))} = {s:.3g}, which overflows float32 "
                         f"(max {MAX_SCALE:.3g}): every LoRA output would be inf. A common choice is alpha = r or 2r")


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../lora_edu


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside lora_edu (the user's line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_rank_exceeds_shape(r: int, n_in: int, n_out: int) -> None:
    """Warn (not an error: it is legal) when r > min(in, out): ΔW = B A cannot have rank above min(in, out)."""
    k = min(n_in, n_out)
    if r > k:
        warnings.warn(
            f"r={r} is larger than min(in, out) = min({n_in}, {n_out}) = {k} for this layer: ΔW = B A has rank at most {k}, "
            f"so the extra {r - k} ranks only add parameters (this is legal, but wasteful). r ≤ {k} gives the same expressiveness",
            stacklevel=user_stacklevel(),
        )


def check_adapter_name(name) -> str:
    """An adapter name becomes a state-dict key and a container key: a Python identifier that is not reserved."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter names must be Python identifiers (they become state-dict keys), got {name!r}")
    if name in _RESERVED:
        raise ValueError(f"adapter name {name!r} is reserved (an attribute of torch's module containers); pick another, e.g. {name + '_adapter'!r}")
    return name


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters share a float32/float64 base's dtype; on a float16/bfloat16 base they are float32."""
    return torch.float32 if base_dtype in LOW_PRECISION or not base_dtype.is_floating_point else base_dtype


def merge_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """ΔW is computed and added in at least float32 (float64 for a float64 base), then rounded once."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of one named adapter (validated on creation)."""

    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self) -> None:
        validate_hyperparameters(self.r, self.alpha, self.dropout, self.rslora)
        object.__setattr__(self, "r", int(self.r))  # numpy integers and reals are stored as Python int / float
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.r, self.rslora)

    @property
    def scale_rule(self) -> str:
        return scale_rule(self.rslora)
