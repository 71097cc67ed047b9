"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

DoRA splits a weight into a *magnitude* and a *direction* (§3, eq. 2) and lets LoRA move only
the direction while a vector m learns the magnitude (§4.1, eq. 5):

    W' = m · (W + s·B A) / ‖W + s·B A‖_c

In ``nn.Linear``'s layout W is (out, in) and ``‖·‖_c`` is the Euclidean norm of each *output
unit's* weight vector, i.e. of each row of W over the input dimension: m and the norm are
(out,) vectors.  (The paper writes W ∈ R^{d×k} acting on column vectors and calls the same
per-output norm "column-wise"; PEFT's ``DoraLinearLayer.get_weight_norm`` computes
``torch.linalg.norm(W + s·B A, dim=1)`` on the (out, in) weight — the convention here.)

* m is trainable and starts at ‖W + s·B A‖_c = ‖W‖_c (B = 0), so W' = W at step 0.
* §4.3: the norm is treated as a constant in backward ("detached from the gradient graph"),
  which saves memory and, the paper reports, changes accuracy by nothing measurable.
  ``detach_norm=False`` gives the exact gradient (used by the gradient check).
* Merging writes W' into W and remembers the W it replaced, so ``unmerge()`` restores it
  bit for bit (W' is not W + ΔW: no subtraction can undo it exactly).

:func:`add_dora` injects DoRA layers by name, as :func:`lora_edu.add_lora` does for LoRA.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.core.config import merge_dtype
from lora_edu.core.inject import check_new_adapter, freeze, lora_layers, set_adapter, set_submodule, tied_weights
from lora_edu.core.kinds import is_transposed_linear, lora_wrapper
from lora_edu.core.layers import LoRALayer, LoRALinear, read_extra_state

__all__ = ["DoRALinear", "add_dora", "dora_parameters", "dora_weight", "column_norm"]


def column_norm(V: torch.Tensor) -> torch.Tensor:
    """‖V‖_c of an (out, in) weight: the norm of each output unit's row, (out, in) → (out,)."""
    return torch.linalg.vector_norm(V, dim=1)


def dora_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, m: torch.Tensor,
                detach_norm: bool = True) -> torch.Tensor:
    """W' = m · V / ‖V‖_c with V = W + s·B A (DoRA eq. 5), all (out, in); the norm detached as in §4.3."""
    V = W + scale * (B @ A)  # (out, r) @ (r, in) -> (out, in)
    norm = column_norm(V)  # (out,)
    if detach_norm:
        norm = norm.detach()
    return (m / norm)[:, None] * V  # (out,) -> (out, 1), broadcast over the input dimension


class DoRALinear(LoRALinear):
    """A linear layer with DoRA adapters: y = x W'ᵀ + b, W' = m · (W + s·B A) / ‖W + s·B A‖_c.

    Every adapter on this layer is a DoRA adapter: A (r, in), B (out, r) as in LoRA, plus the
    magnitude m (out,) in ``lora_magnitude[name]`` (PEFT: ``lora_magnitude_vector``).  Trainable
    parameters per adapter: r·(in + out) + out.  Adapters are float32 on a bf16/fp16 base, and
    W' is formed in the adapters' dtype.  With dropout p > 0 in training, PEFT's form is used:
    y = x Wᵀ + b + (m/‖V‖_c − 1) ⊙ x̃ Wᵀ + (m/‖V‖_c) ⊙ s·x̃ Aᵀ Bᵀ with x̃ = dropout(x), which is
    x W'ᵀ + b when x̃ = x.
    """

    adapter_kind = "DoRA"  # lora_edu.add_lora refuses to add a plain LoRA adapter here (it would be a DoRA one)

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 adapter: str = "default", fan_in_fan_out: bool = False, detach_norm: bool = True) -> None:
        self._detach_norm = detach_norm  # plain attribute, set before nn.Module's __setattr__ bookkeeping matters
        super().__init__(base, r, alpha, dropout, rslora, adapter, fan_in_fan_out)

    # ------------------------------------------------------------------ adapters
    @property
    def detach_norm(self) -> bool:
        return self._detach_norm

    def _W_out_in(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen W in (out, in) layout, whatever the base stores."""
        W = self.weight.T if self.fan_in_fan_out else self.weight
        return W if dtype is None else W.to(dtype)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        """As :meth:`LoRALayer.add_adapter`, plus m = ‖W + s·B A‖_c (= ‖W‖_c, since B = 0)."""
        if "lora_magnitude" not in self._modules:
            self.lora_magnitude = nn.ParameterDict()
        super().add_adapter(name, r, alpha, dropout, rslora)
        with torch.no_grad():
            self.lora_magnitude[name] = nn.Parameter(self._init_magnitude(name))
        self.set_adapter(name)

    def _init_magnitude(self, name: str) -> torch.Tensor:
        A, B, s = self.lora_A[name], self.lora_B[name], self.adapters[name].scale
        return column_norm(self._W_out_in(A.dtype) + s * (B @ A)).detach()  # (out,)

    def set_adapter(self, name: str | None) -> None:
        super().set_adapter(name)
        for n, m in getattr(self, "lora_magnitude", {}).items():
            m.requires_grad_(n == name and not self.merged)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        del self.lora_magnitude[name]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            for name in self.adapters:
                self.lora_magnitude[name].copy_(self._init_magnitude(name))

    @property
    def m(self) -> nn.Parameter:
        """The magnitude vector (out,) of the active adapter."""
        return self.lora_magnitude[self._active()]

    def dora_weight(self, name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' = m · (W + s·B A) / ‖W + s·B A‖_c for adapter ``name``, (out, in), in ``dtype`` (default: the adapters')."""
        name = name or self._active()
        A, B, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude[name]
        dtype = dtype or A.dtype
        return dora_weight(self._W_out_in(dtype), A.to(dtype), B.to(dtype), self.adapters[name].scale, m.to(dtype),
                           self._detach_norm)

    # --------------------------------------------------------------------- merge
    def delta_weight(self, name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' − W in the base's layout: what merging changes (not s·B A: DoRA also rescales W)."""
        dtype = dtype or merge_dtype(self.weight.dtype)
        return self.to_weight_layout(self.dora_weight(name, dtype) - self._W_out_in(dtype))

    def merged_weight(self, name: str | None = None) -> torch.Tensor:
        """W' computed in ≥ float32 and rounded into W's dtype once: what ``merge()`` writes into W."""
        W = self.weight
        return self.to_weight_layout(self.dora_weight(name, merge_dtype(W.dtype))).to(W.dtype)

    def merge(self) -> None:
        """W ← W'.  The replaced W is kept, so :meth:`unmerge` restores it exactly."""
        name = self._active()
        if self.merged:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged into the base weight; "
                               "merging again would apply DoRA twice. Call unmerge() first.")
        W_before = self.weight.detach().clone()
        with torch.no_grad():
            W_new = self.merged_weight(name)
            norm = column_norm(self._W_out_in(merge_dtype(self.weight.dtype)) + self.delta_weight_lora(name))
            self.weight.copy_(W_new)
        self._remember_merged(name)
        self._dora_record = {"W": W_before, "norm": norm.double().cpu()}

    def delta_weight_lora(self, name: str | None = None) -> torch.Tensor:
        """s·B A in (out, in) and ≥ float32: the LoRA part inside V = W + s·B A."""
        name = name or self._active()
        A, B = self.lora_A[name], self.lora_B[name]
        acc = merge_dtype(self.weight.dtype)
        return self.adapters[name].scale * (B.to(acc) @ A.to(acc))

    def _remember_merged(self, name: str) -> None:
        """As in the core, plus m: its value is recorded (m is not used while merged; changing it in place raises)."""
        super()._remember_merged(name)
        m = self.lora_magnitude[name]
        self._dora_m = (m.detach().clone(), m._version)

    def unmerge(self) -> None:
        """W ← the W that :meth:`merge` replaced (bit for bit); after a state-dict round trip, W'·‖V‖_c/m − s·B A."""
        if self._merged is None:
            raise RuntimeError("nothing to unmerge: no adapter is merged into this layer")
        record, W = getattr(self, "_dora_record", None), self.weight
        with torch.no_grad():
            if record is not None and "W" in record:
                W.copy_(record["W"])
            else:  # loaded merged from a state dict: invert W' = m · V / n with the saved norms n
                acc = merge_dtype(W.dtype)
                m_, n = self._dora_m[0].to(acc), record["norm"].to(W.device, acc)
                V = (n / m_)[:, None] * self._W_out_in(acc)
                A, B = self._merged.A.to(acc), self._merged.B.to(acc)
                W.copy_(self.to_weight_layout(V - self._merged.scale * (B @ A)).to(W.dtype))
        self._merged = None
        self._dora_record = None
        self.set_adapter(self.active_adapter)

    def _check_merged_factors(self) -> None:
        super()._check_merged_factors()
        m = self.lora_magnitude[self._merged.name]
        saved, version = self._dora_m
        if m._version != version:
            if not torch.equal(m.detach(), saved.to(m.device)):
                raise RuntimeError(f"the magnitude m of adapter {self._merged.name!r} was changed in place while merged, "
                                   "so W no longer equals W'. Call unmerge() (exact) and merge() again")
            self._dora_m = (saved, m._version)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if getattr(self, "_dora_record", None) is not None and "W" in self._dora_record:
            self._dora_record = {**self._dora_record, "W": fn(self._dora_record["W"])}
        if getattr(self, "_dora_m", None) is not None:
            self._dora_m = (fn(self._dora_m[0]), self._dora_m[1])  # a changed version counter falls back to comparing values
        return out

    def get_extra_state(self) -> torch.Tensor:
        """The core's JSON plus, while merged, the norms ‖V‖_c used (so a loaded merged layer can be unmerged)."""
        state = json.loads(bytes(super().get_extra_state().tolist()).decode())
        record = getattr(self, "_dora_record", None)
        if self.merged and record is not None:
            state["dora_norm"] = [float(v) for v in record["norm"]]
        return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)  # checks the state (a damaged one raises there)
        fields = read_extra_state(state)
        norm = fields.get("dora_norm") if isinstance(fields, dict) else None  # the core's first format has no JSON
        if self.merged and not (isinstance(norm, list) and len(norm) == self.out_features):
            raise RuntimeError("the state dict marks this DoRA layer as merged but lacks its norms ‖V‖_c; it cannot be "
                               "unmerged. Save the model unmerged (unmerge_lora before state_dict)")
        self._dora_record = {"norm": torch.tensor(norm, dtype=torch.float64)} if self.merged else None

    # ------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W'ᵀ + b with W' = m · (W + s·B A) / ‖W + s·B A‖_c."""
        if not self.uses_adapter():  # merged (W' is inside W), disabled, or no active adapter
            return self.base(x)
        name = self._active()
        dropout = self.lora_dropout[name]
        dtype = self.lora_A[name].dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if not self.training or isinstance(dropout, nn.Identity):
            return F.linear(x.to(dtype), self.dora_weight(name), bias).to(x.dtype)
        # dropout on the adapter's input (PEFT's form): the base path sees x, the DoRA correction sees dropout(x)
        A, B, m, s = self.lora_A[name], self.lora_B[name], self.lora_magnitude[name], self.adapters[name].scale
        W = self._W_out_in(dtype)
        norm = column_norm(W + s * (B @ A))
        ratio = m / (norm.detach() if self._detach_norm else norm)  # (out,)
        x_tilde = dropout(x.to(dtype))
        y = F.linear(x.to(dtype), W, bias) + (ratio - 1) * F.linear(x_tilde, W) + ratio * (x_tilde @ A.T @ B.T) * s
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", DoRA" + ("" if self._detach_norm else " (norm not detached)")


def dora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the active DoRA adapters: A, B and m (``lora_parameters`` lists A and B only)."""
    params = []
    for _, layer in lora_layers(model):
        if layer.active_adapter is None:
            continue
        params += [p for p in layer.lora_factors() if p.requires_grad]
        if isinstance(layer, DoRALinear) and layer.m.requires_grad:
            params.append(layer.m)
    return params


def add_dora(model: nn.Module, targets: str | Sequence[str], r: int, alpha: float, dropout: float = 0.0,
             rslora: bool = False, adapter: str = "default", detach_norm: bool = True) -> nn.Module:
    """Put DoRA adapter ``adapter`` on every linear layer that ``targets`` selects, in place; returns ``model``.

    The same targets rule as :func:`lora_edu.add_lora`.  Targets must be linear layers
    (``nn.Linear`` or transformers' ``Conv1D``), or DoRA layers (a second adapter); a layer that
    already carries plain LoRA is refused.  Everything is checked before anything changes; then
    the whole model is frozen except A, B and m of the new adapter.
    """
    names = check_new_adapter(model, targets, r, alpha, dropout, rslora, adapter, kind=DoRALinear.adapter_kind)
    for n in names:
        module = model.get_submodule(n)
        if not isinstance(module, LoRALayer) and lora_wrapper(module) is not LoRALinear and not is_transposed_linear(module):
            raise TypeError(f"{n!r} is a {type(module).__name__}; DoRA is implemented for linear layers "
                            "(nn.Linear, transformers' Conv1D) only")
        if isinstance(module, DoRALinear) and module.detach_norm != detach_norm:
            raise ValueError(f"{n!r} is a DoRA layer with detach_norm={module.detach_norm}, a setting of the layer shared by all "
                             f"its adapters; pass detach_norm={module.detach_norm} or target other layers")
    if tied_weights(model, names):
        raise ValueError(f"{sorted(tied_weights(model, names))} share their weight with other parameters; DoRA rescales W, "
                         "so merging would change those too. Untie the weights or target other layers")
    freeze(model)
    for n in names:
        module = model.get_submodule(n)
        if isinstance(module, DoRALinear):
            module.add_adapter(adapter, r, alpha, dropout, rslora)
        else:
            set_submodule(model, n, DoRALinear(module, r, alpha, dropout, rslora, adapter=adapter,
                                               fan_in_fan_out=is_transposed_linear(module), detach_norm=detach_norm))
    set_adapter(model, adapter)
    return model
