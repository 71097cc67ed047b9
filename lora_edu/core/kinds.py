"""Which layers LoRA can wrap, and with which LoRA class — decided by looking at the layer.

The library registers nothing: the one registry, :data:`USER_LAYER_TYPES`, is filled only by
explicit :func:`register_lora_layer` calls in user code.  In the order :func:`lora_wrapper` checks:

* a type the user registered with :func:`register_lora_layer` (exact type match);
* a layer whose class names its own LoRA class in a ``lora_layer_class`` attribute (how
  :mod:`lora_edu.variants` adds LoRA to a quantised base without touching the core);
* ``nn.Embedding`` → :class:`LoRAEmbedding`.
* ``nn.Linear`` → :class:`LoRALinear`.  A *subclass* of ``nn.Linear`` is wrapped when it
  keeps ``nn.Linear``'s maths: either it does not override ``forward``, or a probe
  (its output on a small random input compared with ``F.linear(x, W, b)``) shows the
  override computes the same function (transformers' ``FalconLinear`` does; a layer
  that adds an activation does not).  The probe uses its own random generator and
  ``no_grad`` and bypasses forward hooks, so it changes neither the model nor the global RNG.
* transformers' ``Conv1D`` (GPT-2; W stored (in, out)) → :class:`LoRALinear` with
  ``fan_in_fan_out=True``.  It is recognised when transformers is already imported —
  a model that contains one has imported it — so nothing is imported or registered.

Anything else is refused by :func:`lora_edu.add_lora` with the list of layers that can be wrapped.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.core.layers import LoRAEmbedding, LoRALayer, LoRALinear

__all__ = ["lora_wrapper", "wrap", "is_transposed_linear", "layer_kind", "register_lora_layer"]

#: user-registered base type -> LoRA class; filled only by :func:`register_lora_layer`.
USER_LAYER_TYPES: dict[type[nn.Module], Callable[..., LoRALayer]] = {}


def register_lora_layer(base_type: type[nn.Module], lora_type: Callable[..., LoRALayer]) -> None:
    """Teach :func:`lora_edu.add_lora` to wrap ``base_type`` with ``lora_type`` (exact type match)."""
    if not (isinstance(base_type, type) and issubclass(base_type, nn.Module)):
        raise TypeError(f"register_lora_layer: base_type must be an nn.Module subclass (the layer class to wrap), got {base_type!r}")
    if not callable(lora_type):
        raise TypeError(f"register_lora_layer: lora_type must be a LoRALayer subclass or a callable "
                        f"(base, r, alpha, dropout, rslora, adapter=...) -> LoRALayer, got {lora_type!r}")
    USER_LAYER_TYPES[base_type] = lora_type


_PROBE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def is_transposed_linear(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear map whose weight is stored (in, out))."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def _keeps_linear_maths(module: nn.Linear) -> bool:
    """Does this ``nn.Linear`` subclass compute x Wᵀ + b?  Checked on a probe input when it overrides forward."""
    if type(module).forward is nn.Linear.forward:
        return True
    W = module.weight
    if W.device.type == "meta":
        return False  # nothing to probe; refused with a message that says why
    gen = torch.Generator(device=W.device).manual_seed(0)
    x = torch.randn(3, module.in_features, generator=gen, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        try:
            y = module.forward(x)  # not module(x): the user's forward hooks must not see the probe
        except Exception:
            return False
        expected = F.linear(x, W, module.bias)
    if not isinstance(y, torch.Tensor) or y.shape != expected.shape:
        return False
    tol = _PROBE_TOLERANCE.get(W.dtype, 1e-5)
    return bool(((y.double() - expected.double()).abs().max() <= tol * (1 + expected.double().abs().max())).item())


def lora_wrapper(module: nn.Module) -> Callable[..., LoRALayer] | None:
    """A constructor ``(module, r, alpha, dropout, rslora, adapter) -> LoRALayer`` for ``module``, or None."""
    if isinstance(module, LoRALayer):
        return None
    if type(module) in USER_LAYER_TYPES:
        return USER_LAYER_TYPES[type(module)]
    own = getattr(type(module), "lora_layer_class", None)  # a base layer that names its LoRA class (e.g. a quantised linear)
    if own is not None:
        return own
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        return LoRAEmbedding
    if isinstance(module, nn.Linear) and _keeps_linear_maths(module):
        return LoRALinear
    if is_transposed_linear(module):
        return lambda base, *args, **kwargs: LoRALinear(base, *args, fan_in_fan_out=True, **kwargs)
    return None


def wrap(module: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, adapter: str) -> LoRALayer:
    """Wrap ``module`` in its LoRA layer (TypeError for a layer that cannot be wrapped)."""
    wrapper = lora_wrapper(module)
    if wrapper is None:
        raise TypeError(f"cannot put LoRA on a {type(module).__name__}")
    return wrapper(module, r, alpha, dropout, rslora, adapter=adapter)


def layer_kind(layer: LoRALayer | nn.Module) -> str:
    """``"embedding"`` or ``"linear"`` (Linear, Conv1D): how adapter files name the factors."""
    if isinstance(layer, LoRAEmbedding) or (not isinstance(layer, LoRALayer) and lora_wrapper(layer) is LoRAEmbedding):
        return "embedding"
    return "linear"
