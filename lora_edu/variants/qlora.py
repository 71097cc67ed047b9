"""QLoRA: LoRA adapters on a frozen NF4 base (Dettmers et al. 2023, arXiv 2305.14314, §3 eq. 5).

    Y = X · doubleDequant(c₁, c₂, W^NF4) + s · X Aᵀ Bᵀ

The base weight lives in 4 bits (:class:`lora_edu.variants.nf4.NF4Linear`) and is dequantised on
the fly in forward and backward; only A and B are trained, in float32 (the library's dtype
policy: adapters are float32 on a low-precision base).  Two steps, both validate-then-apply:

    quantize_linears(model, ["q_proj", "v_proj"])     # nn.Linear -> NF4Linear, in place
    lora_edu.add_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)   # NF4Linear -> QLoRALinear

(:func:`add_qlora` does both.)  ``NF4Linear.lora_layer_class = QLoRALinear`` is what lets the
core wrap a quantised layer without knowing about it.

Merging into a 4-bit base is refused: re-quantising W + ΔW snaps every weight back onto the 16
levels of its block, an error of the order of ΔW itself (:func:`merge_error` measures it with
:func:`lora_edu.variants.nf4.requantize_merge_error`).  Keep the adapter separate, or merge
into a dequantised bf16/fp32 copy with :func:`merge_into_dequantized`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from lora_edu.core.config import AdapterConfig, adapter_dtype, check_adapter_name
from lora_edu.core.inject import check_new_adapter, find_targets, lora_layers, set_submodule, tied_weights
from lora_edu.core.layers import LoRALayer, LoRALinear
from lora_edu.variants.nf4 import MergeError, NF4Linear, requantize_merge_error

__all__ = ["QLoRALinear", "quantize_linears", "add_qlora", "merge_error", "merge_into_dequantized", "MERGE_REFUSAL", "stored_bytes"]

MERGE_REFUSAL = (
    "cannot merge into a 4-bit NF4 base: re-quantising W + ΔW snaps every weight back onto its block's 16 levels, an error "
    "of the order of ΔW itself "
    "(lora_edu.variants.qlora.merge_error(layer) measures how much). Keep the adapter separate (QLoRA eq. 5), "
    "or merge into a dequantised copy: lora_edu.variants.qlora.merge_into_dequantized(model, dtype=torch.bfloat16)"
)


class QLoRALinear(LoRALinear):
    """LoRA on a frozen :class:`NF4Linear`: y = x Ŵᵀ + b + s · dropout(x) Aᵀ Bᵀ, Ŵ dequantised on the fly.

    Shapes and init as :class:`~lora_edu.core.layers.LoRALinear`: A (r, in) Kaiming-uniform, B (out, r)
    zeros.  There is no float ``weight`` (the base keeps only NF4 codes and constants); ``merge()``
    raises with what to do instead.  The adapters' dtype follows the original weight's dtype
    (float32 for a bf16/fp16/fp32 weight).
    """

    def __init__(self, base: NF4Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 adapter: str = "default") -> None:
        if not isinstance(base, NF4Linear):
            raise TypeError(f"QLoRALinear wraps an NF4Linear, got {type(base).__name__}; quantize_linears(model, targets) first")
        LoRALayer.__init__(self, base)
        self.fan_in_fan_out = False
        self.add_adapter(adapter, r, alpha, dropout, rslora)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        """As :meth:`LoRALayer.add_adapter`; device and dtype come from the NF4 base (which has no float W)."""
        check_adapter_name(name)
        config = AdapterConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete_adapter() it first or pick another name")
        A, B = self.init_factors(config.r, device=self.base.codes.device, dtype=adapter_dtype(self.base.weight_dtype))
        self._install_adapter(name, config, A, B)

    def merge_refusal(self) -> str:
        return MERGE_REFUSAL

    def merged_weight(self, name: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ + ΔW formed in float32 (float64 if asked) and rounded once to ``dtype``: a *dequantised* merged copy."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.base.dequantize(acc) + self.delta_weight(name, dtype=acc)).to(dtype)

    def merge(self) -> None:
        raise RuntimeError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        raise RuntimeError("nothing to unmerge: an adapter is never merged into an NF4 base")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", base NF4"


NF4Linear.lora_layer_class = QLoRALinear  # how lora_edu.add_lora knows what to wrap an NF4Linear with


def quantize_linears(model: nn.Module, targets: str | Sequence[str], block_size: int = 64, double_quant: bool = True,
                     compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` that ``targets`` selects by an :class:`NF4Linear`, in place; returns ``model``.

    Same targets rule as :func:`lora_edu.add_lora`.  Checked first, then applied: each match must be
    a plain ``nn.Linear`` whose weight is not shared with another parameter (quantising would
    untie it), with a numel that the block size can cover.  ``compute_dtype`` (default: the
    weight's dtype) is the dtype the dequantised W is multiplied in.
    """
    return _quantize_names(model, find_targets(model, targets), block_size, double_quant, compute_dtype)


def _quantize_names(model: nn.Module, names: list[str], block_size: int, double_quant: bool,
                    compute_dtype: torch.dtype | None) -> nn.Module:
    for n in names:
        module = model.get_submodule(n)
        if type(module) is not nn.Linear:
            raise TypeError(f"{n!r} is a {type(module).__name__}; quantize_linears replaces plain nn.Linear layers only "
                            "(quantise before add_lora)")
    tied = tied_weights(model, names)
    if tied:
        raise ValueError(f"{sorted(tied)} share their weight with {sorted(tied.values())}: quantising would untie them. "
                         "Leave those layers in float (e.g. a tied lm_head), or untie first")
    quantized = {n: NF4Linear.from_linear(model.get_submodule(n), block_size=block_size, double_quant=double_quant,
                                          compute_dtype=compute_dtype) for n in names}  # may raise: nothing replaced yet
    for n, q in quantized.items():
        set_submodule(model, n, q)
    return model


def add_qlora(model: nn.Module, targets: str | Sequence[str], r: int, alpha: float, dropout: float = 0.0,
              rslora: bool = False, adapter: str = "default", block_size: int = 64, double_quant: bool = True,
              compute_dtype: torch.dtype | None = None) -> nn.Module:
    """QLoRA in one call: quantise the targets to NF4 (if they are not already), then add LoRA to them.

    Everything is frozen except the new adapter.  Validated before anything changes.
    """
    names = check_new_adapter(model, targets, r, alpha, dropout, rslora, adapter, kind=QLoRALinear.adapter_kind)
    to_quantize = [n for n in names if not isinstance(model.get_submodule(n), (NF4Linear, QLoRALinear))]
    _quantize_names(model, to_quantize, block_size, double_quant, compute_dtype)  # validates, then replaces
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        module = model.get_submodule(n)
        if isinstance(module, QLoRALinear):
            module.add_adapter(adapter, r, alpha, dropout, rslora)
        else:
            set_submodule(model, n, QLoRALinear(module, r, alpha, dropout, rslora, adapter=adapter))
    for _, layer in lora_layers(model):
        layer.set_adapter(adapter if adapter in layer.adapters else None)
    return model


def merge_error(layer: QLoRALinear, name: str | None = None) -> MergeError:
    """What "dequantise, add ΔW, re-quantise" would cost for this layer's adapter, measured in float64
    against keeping the adapter separate (:func:`lora_edu.variants.nf4.requantize_merge_error`)."""
    with torch.no_grad():
        return requantize_merge_error(layer.base.quantized(), layer.delta_weight(name, dtype=torch.float64))


def merge_into_dequantized(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every :class:`QLoRALinear` by an ``nn.Linear`` holding Ŵ + ΔW (active adapter) in ``dtype``, in place.

    ΔW is added to the dequantised Ŵ in float32 and the sum rounded to ``dtype`` once (the
    library's merge rule).  The result is a float model that computes the adapted function up
    to that one rounding; it is no longer 4-bit.  Layers without an active adapter become Ŵ alone.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"merge_into_dequantized: dtype must be a float dtype, got {dtype}")
    layers = [(n, layer) for n, layer in lora_layers(model) if isinstance(layer, QLoRALinear)]
    if not layers:
        raise ValueError("the model has no QLoRA layers to merge")
    if any(layer.disabled for _, layer in layers):
        raise RuntimeError("cannot merge inside disable_lora()")
    plain = {}
    with torch.no_grad():
        for n, layer in layers:
            W = layer.merged_weight(dtype=dtype) if layer.active_adapter else layer.base.dequantize(dtype)
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=W.device, dtype=dtype)
            linear.weight.copy_(W)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.to(dtype))
            linear.requires_grad_(False)
            plain[n] = linear
    for n, linear in plain.items():
        set_submodule(model, n, linear)
    return model


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model stores: parameters plus persistent buffers (NF4 codes and constants; not the shared code tables)."""
    persistent = model.state_dict(keep_vars=True)
    return sum(t.nbytes for k, t in persistent.items() if isinstance(t, torch.Tensor) and not k.endswith("_extra_state"))
