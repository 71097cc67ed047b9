"""Many adapters in one batch: row i of the batch uses adapter ``names_per_row[i]`` (``None``: the base model).

A server with one frozen base and many task adapters (S-LoRA, Punica; PEFT's
``adapter_names=``) batches requests for different adapters together.  Row by row
the function is the single-adapter one,

    y[i] = x[i] Wᵀ + b + s_k · x[i] A_kᵀ B_kᵀ,      k = names_per_row[i]   (no branch when k is None)

so a mixed batch must give, row for row, what running each row with its adapter
alone gives (``tests/test_mixed.py`` checks that in float64 to 1e-12)::

    with lora_edu.adapter_batch(model, ["code", None, "upper", "code"]):
        y = model(x)                      # x: (4, T) — row 1 runs the plain base model

How (no change to the core): inside the context every LoRA layer runs as its base layer
(the flag ``disable_lora`` sets), and a forward hook adds each row's branch.  The
branch of a :class:`~lora_edu.LoRALinear` is computed BGMV-style (Punica's batched
gather matrix-vector product): the adapters the batch uses are stacked once per
context, zero-padded to the largest rank with s folded into B and a zero adapter for
base rows, and each row's factors are gathered, so one layer costs two gathers (kept
between forwards when small) and two batched products whatever the number of
adapters — no Python loop over rows or adapters.  A batch where every row asks for the same adapter takes two plain matrix
products.  ``LoRAEmbedding`` rows are grouped by adapter (one ``lora_forward`` per
adapter).

Decisions:

* a layer that lacks a requested adapter computes the base for those rows — exactly
  what ``set_adapter(model, name)`` does on such a layer, so each row still equals its
  adapter alone; a name that no layer of the model has is refused (``KeyError``);
* refused: a merged model (ΔW of one adapter sits inside W for every row), use inside
  ``disable_lora``, an input whose first dimension is not ``len(names_per_row)``, dropout
  in training mode, and layers whose forward is not base + ``lora_forward`` (e.g. DoRA)
  when rows ask for their adapters;
* meant for inference (eager, or captured in a CUDA graph); under autograd, gradients reach the
  factors that require them.  Not tried under ``torch.compile`` (the hooks would be traced).
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.core.inject import adapter_names, lora_layers
from lora_edu.core.layers import LoRAEmbedding, LoRALayer, LoRALinear

__all__ = ["adapter_batch"]

_VERSION = operator.attrgetter("_version")


def _branch_kind(layer: LoRALayer) -> str | None:
    """'linear' (stacked BGMV branch), 'grouped' (one lora_forward per adapter), or None (not base + lora_forward)."""
    forward = type(layer).forward
    if isinstance(layer, LoRALinear) and type(layer).lora_forward is LoRALinear.lora_forward:
        from_core = forward is LoRALinear.forward or getattr(forward, "__module__", "") == "lora_edu.speed.fused"
        return "linear" if from_core else None
    if isinstance(layer, LoRAEmbedding) and forward is LoRAEmbedding.forward:
        return "grouped"
    return None


class _LayerPlan:
    """One layer's share of a mixed batch: which adapters it has, and each row's slot among them."""

    def __init__(self, layer: LoRALayer, names_per_row: Sequence[str | None]) -> None:
        self.layer = layer
        self.kind = _branch_kind(layer)
        used = [n for n in dict.fromkeys(names_per_row) if n is not None and n in layer.adapters]
        self.names = used  # adapters of this layer that some row asks for, in order of first appearance
        self.slot = [used.index(n) if n in used else len(used) for n in names_per_row]  # len(used): the zero adapter
        self.uniform = used[0] if len(used) == 1 and all(s == 0 for s in self.slot) else None
        self.rows = {n: [i for i, m in enumerate(names_per_row) if m == n] for n in used}
        self.factors = [(*layer.lora_factors(n), layer.adapters[n].scale) for n in used]  # (A, B, s), read once per context
        self.params = [p for A, B, _ in self.factors for p in (A, B)]
        self.dropout = any(layer.adapters[n].dropout > 0 for n in used)
        self._stack: dict = {}  # (device, dtype) -> (factor versions, Aᵀ stack, (s·B)ᵀ stack)
        self._index: dict = {}  # (device, adapter name or None) -> row indices on that device (no host copy per forward)
        self._rows: dict = {}  # device -> (the Aᵀ stack they came from, Aᵀ rows, (s·B)ᵀ rows)

    def index(self, device, name: str | None = None) -> torch.Tensor:
        """Each row's slot (name None), or the rows that use ``name``, as a tensor on ``device`` (made once)."""
        key = (device, name)
        if key not in self._index:
            self._index[key] = torch.tensor(self.slot if name is None else self.rows[name], device=device)
        return self._index[key]

    # --------------------------------------------------------------- LoRALinear: BGMV
    def stacked(self, device, dtype):
        """(Aᵀ stack (K+1, in, r_max), (s·B)ᵀ stack (K+1, r_max, out)) in ``dtype``: zero-padded to r_max, entry K zero.

        Kept while no factor changed in place (version counters) and no gradient is
        needed, so a stream of no-grad forwards stacks once; rebuilt, differentiably,
        when a factor requires a gradient.
        """
        factors = self.factors
        versions = sum(map(_VERSION, self.params))  # in-place version counters only grow: any change raises the sum
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.params)
        key = (device, dtype)
        hit = self._stack.get(key)
        if hit is not None and hit[0] == versions and not grad:
            return hit[1], hit[2]
        r_max = max(A.shape[0] for A, _, _ in factors)
        with contextlib.nullcontext() if grad else torch.no_grad():
            At = [F.pad(A.to(dtype), (0, 0, 0, r_max - A.shape[0])).T for A, _, _ in factors]  # (in, r_max)
            sBt = [F.pad((B * s).to(dtype), (0, r_max - B.shape[1])).T for _, B, s in factors]  # (r_max, out)
            At_stack = torch.stack(At + [torch.zeros_like(At[0])])  # (K+1, in, r_max); entry K: the base rows' zero adapter
            sBt_stack = torch.stack(sBt + [torch.zeros_like(sBt[0])])  # (K+1, r_max, out)
        if not grad:
            self._stack[key] = (versions, At_stack, sBt_stack)
        return At_stack, sBt_stack

    def gathered(self, device, At_stack: torch.Tensor, sBt_stack: torch.Tensor):
        """Each row's Aᵀ and (s·B)ᵀ (zeros for base rows), gathered from the stacks.

        Kept with the stacks they came from when those are kept and the gathered pair is small
        (≤ 2²¹ elements per layer, e.g. 64 rows of a 768 → 3,072 layer at r = 8): a decode step
        then runs two batched GEMMs per layer and no gather.
        """
        hit = self._rows.get(device)
        if hit is not None and hit[0] is At_stack:
            return hit[1], hit[2]
        slot = self.index(device)
        rows = (At_stack.index_select(0, slot), sBt_stack.index_select(0, slot))
        kept = self._stack.get((device, At_stack.dtype))
        if kept is not None and kept[1] is At_stack and len(self.slot) * (At_stack[0].numel() + sBt_stack[0].numel()) <= 2**21:
            self._rows[device] = (At_stack, *rows)
        return rows

    def linear_branch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + each row's s·x Aᵀ Bᵀ.  x (R, …, in), y (R, …, out)."""
        layer = self.layer
        dev = x.device.type
        autocast = dev in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(dev) and x.dtype != torch.float64
        # The plain branch casts x to the adapters' dtype, and autocast casts that to its own: the same dtype here.
        dtype = torch.get_autocast_dtype(dev) if autocast else self.factors[0][0].dtype
        cast = getattr(layer, "cast_input", None)  # a fused layer shares the cast its base GEMM just made (q, k, v too)
        xc = cast(x, dtype) if cast is not None else x.to(dtype)
        R, fused_add = x.shape[0], y.dtype == dtype
        At_stack, sBt_stack = self.stacked(x.device, dtype)
        if self.uniform is not None:  # every row, one adapter: two plain products, the second accumulating into y
            x2, y2 = xc.reshape(-1, xc.shape[-1]), y.reshape(-1, y.shape[-1])  # (R·T, in), (R·T, out)
            u = torch.mm(x2, At_stack[0])  # (R·T, in) @ (in, r_max) -> (R·T, r_max)
            if fused_add:
                return torch.addmm(y2, u, sBt_stack[0]).view(y.shape)  # y + u (s·B)ᵀ
            return y + torch.mm(u, sBt_stack[0]).view(y.shape).to(y.dtype)
        At_rows, sBt_rows = self.gathered(x.device, At_stack, sBt_stack)  # (R, in, r_max), (R, r_max, out)
        x3, y3 = xc.reshape(R, -1, xc.shape[-1]), y.reshape(R, -1, y.shape[-1])  # (R, T, in), (R, T, out)
        u = torch.bmm(x3, At_rows)  # (R, T, in) @ (R, in, r_max) -> (R, T, r_max): each row its own A
        if fused_add:
            return torch.baddbmm(y3, u, sBt_rows).view(y.shape)  # y + u (s·B)ᵀ in the batched GEMM's epilogue
        return y + torch.bmm(u, sBt_rows).view(y.shape).to(y.dtype)

    # --------------------------------------------------------------- any layer: one lora_forward per adapter
    def grouped_branch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            idx = self.index(x.device, name)
            delta = self.layer.lora_forward(x.index_select(0, idx), name)  # (rows of this adapter, …, out)
            y = y.index_add(0, idx, delta.to(y.dtype))
        return y

    def hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.shape[0] != len(self.slot):
            raise ValueError(f"adapter_batch: {len(self.slot)} names for a batch of {x.shape[0]} rows (input shape "
                             f"{tuple(x.shape)}); give one adapter name (or None) per row of the batch")
        if not self.names:
            return output  # no row asks for an adapter this layer has: the base, which the layer computed
        if self.dropout and module.training:
            raise RuntimeError("adapter_batch: dropout in training mode is not supported (each row would need its adapter's "
                               "mask); call model.eval() for a mixed-adapter batch")
        if self.kind == "linear":
            return self.linear_branch(x, output)
        return self.grouped_branch(x, output)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names_per_row: Sequence[str | None]):
    """Context manager: inside it, row i of every batch ``model`` sees uses adapter ``names_per_row[i]`` (None: base).

    Each row computes what it would compute alone with ``set_adapter(model, name)`` (or
    ``disable_lora`` for None).  Everything is checked before anything changes; on exit the
    layers are as before.  See the module docstring for what is refused.
    """
    if isinstance(names_per_row, str) or not isinstance(names_per_row, Sequence):
        raise TypeError(f"names_per_row must be a list with one adapter name (or None) per row, got {names_per_row!r}")
    names_per_row = list(names_per_row)
    if not names_per_row:
        raise ValueError("names_per_row is empty: give one adapter name (or None) per row of the batch")
    bad = [n for n in names_per_row if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"names_per_row holds adapter names (str) or None, got {bad[0]!r}")
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("the model has no LoRA layers; call add_lora(model, targets=..., r=..., alpha=...) first")
    known = adapter_names(model)
    unknown = sorted({n for n in names_per_row if n is not None} - set(known))
    if unknown:
        raise KeyError(f"no adapter {unknown[0]!r} in the model; available: {known}")
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"adapter {model.get_submodule(merged[0]).merged_adapter!r} is merged at {merged[0]!r}: every row would "
                           "get its ΔW. unmerge_lora(model) before running a mixed-adapter batch")
    disabled = [n for n, layer in lora_layers(model) if layer.disabled]
    if disabled:
        raise RuntimeError(f"adapter_batch inside disable_lora() (e.g. {disabled[0]!r} is disabled): leave disable_lora first, "
                           "or pass None for rows that should run the base model")
    plans = [_LayerPlan(layer, names_per_row) for layer in layers]
    unsupported = [(n, type(layer).__name__) for (n, layer), p in zip(lora_layers(model), plans) if p.names and p.kind is None]
    if unsupported:
        raise TypeError(f"adapter_batch: {unsupported[0][0]!r} is a {unsupported[0][1]}, whose forward is not base + lora_forward "
                        "(e.g. DoRA); mixed-adapter batches support LoRALinear (plain or fused), QLoRALinear and LoRAEmbedding")
    handles = []
    try:
        for plan in plans:
            plan.layer.disabled = True  # the layer computes its base; the hook adds each row's branch
            handles.append(plan.layer.register_forward_hook(plan.hook))
        yield model
    finally:
        for h in handles:
            h.remove()
        for plan in plans:
            plan.layer.disabled = False
