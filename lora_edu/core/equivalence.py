"""Is the merged model the adapted model?  Measure it instead of assuming it.

Merging (Hu et al. 2021, §4.1, "No Additional Inference Latency") replaces W by
W' = W + s·B A.  In real arithmetic W' x = W x + s·B A x exactly; in floating point
W' is *rounded* to W's dtype, so every entry moves by up to half a unit in the last
place (ulp).  In bfloat16 (8 significant bits) at |w| ≈ 0.02 one ulp is 2⁻¹³ ≈ 1.2e-4,
so ΔW entries smaller than ≈ 6e-5 are erased outright.  :func:`check_merge_equivalence`
runs both forms on the same input and reports the difference and that erased fraction.

Tolerances (relative error ``max|y_merged − y_unmerged| / max|y_unmerged|``), chosen
per weight dtype from its unit roundoff u (the ulp bound of one rounding) with room
for accumulation over depth and the inner dimension:

=========  ==========  =========
dtype      u           tolerance
=========  ==========  =========
float64    1.1e-16     1e-12
float32    6.0e-8      1e-5
float16    4.9e-4      2e-2
bfloat16   3.9e-3      1e-1
=========  ==========  =========

Measured values on the package's models sit one to three orders of magnitude below
these (see notebook 03 and ``tests/test_equivalence.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lora_edu.core.inject import check_mergeable, lora_layers, merge_lora, tied_weights, unmerge_lora

__all__ = ["MergeReport", "check_merge_equivalence", "TOLERANCE", "erased_fraction"]

TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 1e-1,
}


@dataclass(frozen=True)
class MergeReport:
    dtype: torch.dtype
    max_abs_error: float  # max |y_merged − y_unmerged|
    rel_error: float  # max_abs_error / max |y_unmerged|
    tolerance: float  # bound on rel_error for this dtype (module docstring)
    erased_fraction: float  # share of nonzero ΔW entries that rounding into W's dtype erases
    n_layers: int
    tied: tuple[str, ...] = ()  # adapted layers whose weight is shared with another parameter

    @property
    def passed(self) -> bool:
        return self.rel_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        dt = str(self.dtype).replace("torch.", "")
        why = (
            f"Merging rounds W + ΔW to {dt} once per entry, so some difference is expected; "
            f"{100 * self.erased_fraction:.3g}% of the nonzero ΔW entries were smaller than half an ulp of the "
            f"weight they were added to and vanished entirely."
        )
        if self.tied:
            why += (
                f" Layers {list(self.tied)} share their weight with another parameter (tied weights): merging changes "
                "that parameter too, which rounding does not explain — keep these adapters unmerged or untie the weights."
            )
        elif not self.passed:
            why += (
                " The error exceeds what rounding explains: look for a merge without the scale s, "
                "a double merge, or a transposed ΔW — or keep the adapter unmerged / merge in float32."
            )
        return (
            f"Merge equivalence {verdict} for {self.n_layers} LoRA layers in {dt}: the merged model differs from "
            f"the unmerged one by at most {self.max_abs_error:.3g} (relative {self.rel_error:.3g}; tolerance "
            f"{self.tolerance:.0e} for {dt}). {why}"
        )


def _as_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot compare model outputs of type {type(out).__name__}; return a tensor, a tuple or .logits")


def erased_fraction(model: nn.Module) -> float:
    """Fraction of nonzero ΔW entries that vanish when W + ΔW is rounded to W's dtype (model unmerged)."""
    check_mergeable((n, layer) for n, layer in lora_layers(model) if layer.active_adapter is not None)
    erased = nonzero = 0
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if layer.active_adapter is None or layer.merged:
                continue
            W = layer.weight
            delta_W = layer.delta_weight()
            mask = delta_W != 0
            erased += int(((layer.merged_weight() == W) & mask).sum())
            nonzero += int(mask.sum())
    return erased / nonzero if nonzero else 0.0


def check_merge_equivalence(model: nn.Module, x, tolerance: float | None = None) -> MergeReport:
    """Run ``model(x)`` unmerged and merged; report the difference.  The model is left bit-for-bit as found.

    ``x`` is a tensor or a tuple of positional arguments.  The model runs in eval
    mode (no dropout) under ``torch.no_grad()``.  Layers whose weight is tied to
    another parameter are named in the report: merging them changes that parameter too.
    """
    named = [(n, layer) for n, layer in lora_layers(model) if layer.active_adapter is not None]
    if not named:
        raise ValueError("the model has no active LoRA adapter to merge; call add_lora(...) first")
    check_mergeable(named)
    if not isinstance(x, (torch.Tensor, tuple)):
        raise TypeError(f"x must be the model's input tensor or a tuple of its positional arguments, got a {type(x).__name__}; "
                        f"for several arguments pass a tuple, e.g. check_merge_equivalence(model, (ids, mask))")
    layers = [layer for _, layer in named]
    args = x if isinstance(x, tuple) else (x,)
    dtype = layers[0].weight.dtype
    tol = TOLERANCE.get(dtype, 1e-5) if tolerance is None else tolerance
    tied = tuple(tied_weights(model, [n for n, _ in named]))

    was_merged = any(layer.merged for layer in layers)
    saved_weights = [layer.weight.detach().clone() for layer in layers]
    saved_records = [layer._merged for layer in layers]  # what each merged layer added to W, as merge() recorded it
    saved_factors = [(p, p.grad, p.requires_grad) for layer in layers for p in layer.lora_factors()]
    saved_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if was_merged:
                unmerge_lora(model)
            fraction = erased_fraction(model)
            y_unmerged = _as_tensor(model(*args)).double()
            merge_lora(model)
            y_merged = _as_tensor(model(*args)).double()
    finally:
        # Restore W bit-for-bit (undoing the rounding of merge/unmerge) together with the merge records, so a later
        # unmerge subtracts exactly what the user's merge added, even if A or B changed in place since.
        with torch.no_grad():
            for layer, W, record in zip(layers, saved_weights, saved_records):
                layer.weight.copy_(W)
                layer._merged = record
        for p, grad, requires_grad in saved_factors:
            p.grad = grad
            p.requires_grad_(requires_grad)
        for m, t in saved_training.items():
            m.training = t
    max_abs = (y_merged - y_unmerged).abs().max().item()
    scale = y_unmerged.abs().max().item()
    rel = max_abs / scale if scale > 0 else max_abs
    return MergeReport(dtype, max_abs, rel, tol, fraction, len(layers), tied)
