"""PiSSA: initialise A and B from the principal singular triplets of W (Meng et al. 2024, arXiv 2404.02948).

Plain LoRA starts from ΔW = 0 (B = 0) and trains a random subspace.  PiSSA (§3) writes the
SVD W = U S Vᵀ and puts the top-r part into the adapter, the rest into the frozen base:

    A = diag(√(S_r / s)) V_rᵀ        (r, in)
    B = U_r diag(√(S_r / s))         (out, r)
    W_res = W − s·B A                (out, in)   = Σ_{i>r} σ_i u_i v_iᵀ  (up to rounding)

so W_res + s·B A = W: the model is unchanged at step 0, but A and B now span the directions
where W is largest, and both get gradients from the first step.  This matches PEFT's
``init_lora_weights="pissa"`` (``LoraLayer.pissa_init``): the SVD in float32 (float64 for a
float64 base), √(S_r/s) split evenly between the factors.

The base changes, so a PiSSA adapter only works on W_res.  To share it as a plain LoRA adapter
on the *original* W (PEFT's ``path_initial_model_for_weight_conversion``, §3 "…convert…"):

    ΔW_total = s(B A − B₀ A₀) = s·[B, −B₀] [A; A₀]        rank 2r, same s

(:func:`pissa_to_lora`): with s = α/r the rank doubles, so α doubles too (α√2 under rsLoRA).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from lora_edu.core.config import merge_dtype, scale_of
from lora_edu.core.inject import add_lora, check_new_adapter, lora_layers
from lora_edu.core.kinds import lora_wrapper
from lora_edu.core.layers import LoRALayer, LoRALinear

__all__ = ["pissa_factors", "pissa_init", "add_pissa", "PiSSAConversion", "pissa_to_lora", "apply_converted", "is_pissa_adapter"]


def pissa_factors(W: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) from the top-r SVD of an (out, in) W, as PEFT's ``pissa_init`` computes them.

    SVD in float32 (float64 if W is float64); A (r, in), B (out, r) float32/64; W_res in W's dtype.
    """
    if W.ndim != 2:
        raise ValueError(f"pissa_factors needs a 2-D (out, in) weight, got shape {tuple(W.shape)}")
    if not 0 < r <= min(W.shape):
        raise ValueError(f"PiSSA needs 0 < r ≤ min(out, in) = {min(W.shape)}, got r={r}")
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(W.detach().to(work), full_matrices=False)  # (out, k), (k,), (k, in)
    root = torch.sqrt(S[:r] / scale)  # (r,)  √(σ_i / s)
    A = root[:, None] * Vh[:r]  # diag(√(S_r/s)) V_rᵀ: (r, in)
    B = U[:, :r] * root[None, :]  # U_r diag(√(S_r/s)): (out, r)
    W_res = (W.detach().to(work) - scale * (B @ A)).to(W.dtype)  # (out, in)
    return A, B, W_res


def pissa_init(layer: LoRALinear, name: str | None = None) -> None:
    """Re-initialise adapter ``name`` (default: active) of ``layer`` with PiSSA, replacing W by W_res in place.

    The initial factors are kept on the layer (``layer.pissa_initial[name] = (A₀, B₀)``) for
    :func:`pissa_to_lora`.  Refused on a merged layer or a base without a float weight (NF4).
    """
    if type(layer) is not LoRALinear:
        raise TypeError(f"PiSSA initialises plain LoRALinear layers, got {type(layer).__name__} "
                        "(on an NF4 base there is no float W to take the SVD of and replace)")
    if layer.merged:
        raise RuntimeError("the layer has a merged adapter; unmerge() before PiSSA init")
    name = name or layer._active()
    A_, B_ = layer.lora_factors(name)
    W = layer.weight.T if layer.fan_in_fan_out else layer.weight  # (out, in)
    A, B, W_res = pissa_factors(W, layer.adapters[name].r, layer.adapters[name].scale)
    with torch.no_grad():
        A_.copy_(A)
        B_.copy_(B)
        layer.weight.copy_(W_res.T if layer.fan_in_fan_out else W_res)
    initial = layer.__dict__.setdefault("pissa_initial", {})
    initial[name] = (A_.detach().clone(), B_.detach().clone())


def is_pissa_adapter(layer: nn.Module, name: str) -> bool:
    """True when adapter ``name`` of ``layer`` was initialised by :func:`pissa_init` (so W is now W_res)."""
    return name in getattr(layer, "pissa_initial", {})


def add_pissa(model: nn.Module, targets: str | Sequence[str], r: int, alpha: float, dropout: float = 0.0,
              rslora: bool = False, adapter: str = "default") -> nn.Module:
    """:func:`lora_edu.add_lora`, then PiSSA init of the new adapter on every adapted layer (W ← W_res).

    Checked before anything changes: what :func:`lora_edu.add_lora` checks, and that every target is (or
    becomes) a plain :class:`LoRALinear` (not an embedding, not a fused or quantised layer).
    """
    names = check_new_adapter(model, targets, r, alpha, dropout, rslora, adapter, kind=LoRALinear.adapter_kind)
    modules = [model.get_submodule(n) for n in names]
    bad = sorted({type(m).__name__ for m in modules
                  if (type(m) is not LoRALinear if isinstance(m, LoRALayer) else lora_wrapper(m) is not LoRALinear)})
    if bad:
        raise TypeError(f"PiSSA initialises plain linear layers only; the targets include {bad} "
                        "(unfuse(model) first if they are fused layers, or target other layers)")
    add_lora(model, targets, r, alpha, dropout, rslora, adapter)
    layers = [layer for _, layer in lora_layers(model) if adapter in layer.adapters]
    for layer in layers:
        pissa_init(layer, adapter)
    return model


@dataclass(frozen=True)
class PiSSAConversion:
    """A PiSSA adapter rewritten as plain LoRA on the original W: per layer A' (2r, in), B' (out, 2r)."""

    r: int  # 2r
    alpha: float  # 2α (α√2 with rsLoRA): the same s
    rslora: bool
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A', B')


def pissa_to_lora(model: nn.Module, adapter: str | None = None) -> PiSSAConversion:
    """ΔW_total = s(B A − B₀ A₀) = s·[B, −B₀][A; A₀] for every layer of a PiSSA adapter (PEFT's conversion).

    Needs the initial factors that :func:`pissa_init` recorded.  The result applies to the
    *original* base model with :func:`apply_converted` (or save it as a normal adapter).
    """
    out, configs = {}, set()
    for path, layer in lora_layers(model):
        name = adapter or layer.active_adapter
        if name is None or name not in layer.adapters:
            continue
        initial = getattr(layer, "pissa_initial", {}).get(name)
        if initial is None:
            raise ValueError(f"{path!r}: adapter {name!r} was not initialised with pissa_init (no A₀, B₀ recorded)")
        A, B = layer.lora_factors(name)
        A0, B0 = initial
        out[path] = (torch.cat([A.detach(), A0], dim=0),  # [A; A₀]: (2r, in)
                     torch.cat([B.detach(), -B0], dim=1))  # [B, −B₀]: (out, 2r)
        cfg = layer.adapters[name]
        configs.add((cfg.r, cfg.alpha, cfg.rslora))
    if not out:
        raise ValueError("no PiSSA adapter found in the model")
    if len(configs) != 1:
        raise ValueError(f"the layers use different (r, alpha, rslora) {sorted(configs)}; convert them one config at a time")
    r, alpha, rslora = configs.pop()
    alpha2 = alpha * math.sqrt(2) if rslora else 2 * alpha
    assert math.isclose(scale_of(alpha2, 2 * r, rslora), scale_of(alpha, r, rslora))
    return PiSSAConversion(2 * r, alpha2, rslora, out)


def apply_converted(model: nn.Module, conversion: PiSSAConversion, adapter: str = "default") -> nn.Module:
    """Put a converted PiSSA adapter on the original (unmodified) base ``model`` as plain LoRA adapter ``adapter``."""
    add_lora(model, [f"{path}" for path in conversion.factors], conversion.r, conversion.alpha, rslora=conversion.rslora,
             adapter=adapter)
    with torch.no_grad():
        for path, (A2, B2) in conversion.factors.items():
            A, B = model.get_submodule(path).lora_factors(adapter)
            A.copy_(A2)
            B.copy_(B2)
    return model


def restore_base_error(model: nn.Module, original: nn.Module, adapter: str | None = None) -> float:
    """max |W_res + s·B₀A₀ − W| over the PiSSA layers: how exactly W_res + the initial adapter gives back W."""
    worst = 0.0
    for path, layer in lora_layers(model):
        name = adapter or layer.active_adapter
        if name is None or name not in getattr(layer, "pissa_initial", {}):
            continue
        A0, B0 = layer.pissa_initial[name]
        acc = merge_dtype(layer.weight.dtype)
        W_res = layer.weight.to(acc)
        W = original.get_submodule(path).weight.to(acc)
        worst = max(worst, float((W_res + layer.to_weight_layout(layer.adapters[name].scale * (B0.to(acc) @ A0.to(acc))) - W).abs().max()))
    return worst
