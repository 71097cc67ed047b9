"""The fused LoRALinear: the formula of :class:`~lora_edu.LoRALinear`, with fewer bytes moved on a GPU.

``FusedLoRALinear`` computes exactly ``LoRALinear.forward`` —

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ

— through one autograd node that saves only x and u = x Aᵀ, and matrix-multiply calls
whose epilogues do the adds and the scaling (no separate ``y + lora`` or ``* s`` pass).
Turn it on with :func:`fuse` (``unfuse`` turns it off); tests check outputs and
gradients against the plain layer in float64.  Why each step helps, and by how much,
is measured in ``benchmarks/README.md``.

All state lives on the layer or on one :class:`InputCastCache` shared by the layers of
one model (passed in by :func:`fuse`); there are no module-level switches.  The fused
path steps aside (the plain formula runs) whenever it would not be the same function:
dropout in effect, a trainable base weight, mixed dtypes outside autocast, float64 under
autocast, a transposed (Conv1D) base, or inside ``torch.compile`` (which fuses the plain
formula itself).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.core.layers import LoRALinear

__all__ = ["FusedLoRALinear", "InputCastCache", "LoRALinearFunction", "compute_dtype", "fuse", "unfuse"]

_AUTOCAST_DEVICES = frozenset({"cuda", "cpu", "xpu", "mps", "hpu"})


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a Linear computes in: autocast's dtype when autocast is on for x's device, else x.dtype.

    ``None`` when autocast is on but leaves x alone (float64 stays float64).
    """
    dev = x.device.type
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        return None if x.dtype == torch.float64 else torch.get_autocast_dtype(dev)
    return x.dtype


class InputCastCache:
    """One cast of an input that several layers read (q, k and v read the same x).

    Holds the last cast together with a weak reference to its source, the source's
    version counter, the dtype and the grad mode; the cast is freed with its source.
    """

    def __init__(self) -> None:
        self.slot: tuple | None = None

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        if x.is_inference():  # inference tensors have no version counter to key on
            return x.to(dtype)
        key = (x._version, dtype, torch.is_grad_enabled(), x.requires_grad)
        slot = self.slot
        if slot is not None and slot[0]() is x and slot[1] == key:
            return slot[2]
        xc = x.to(dtype)
        self.slot = (weakref.ref(x, self._drop), key, xc)
        return xc

    def __getstate__(self) -> dict:  # pickling and deep copies start with an empty cache (a weak reference cannot travel)
        return {"slot": None}

    def __deepcopy__(self, memo) -> InputCastCache:
        return InputCastCache()

    def _drop(self, ref) -> None:
        if self.slot is not None and self.slot[0] is ref:
            self.slot = None


def _forward_2d(x2, W, b, A, B, s: float):
    """u = x Aᵀ (N, r); y = s·u Bᵀ [+ b] + x Wᵀ, the base product accumulated into y in the GEMM epilogue."""
    u = torch.mm(x2, A.t())  # (N, in) @ (in, r) -> (N, r)
    if b is None:
        y = torch.mm(u, B.t()).addmm_(x2, W.t(), beta=s)  # s·(u Bᵀ) + x Wᵀ
    else:
        y = torch.addmm(b, u, B.t(), alpha=s).addmm_(x2, W.t())  # b + s·u Bᵀ, then += x Wᵀ
    return y, u


class LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, saving only x, u = x Aᵀ and the small factors for backward.

    x (…, in), W (out, in), b (out,) come in the compute dtype; A (r, in), B (out, r) in
    their own (master) dtype and get their gradients in it.  W and b are frozen.
    Backward, with g = ∂L/∂y (N, out) and v = g B (N, r):
    ∂L/∂B = s·gᵀ u,  ∂L/∂A = s·vᵀ x,  ∂L/∂x = s·v A + g W.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s: float, s_tensor: torch.Tensor):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, W.shape[1])  # (…, in) -> (N, in)
        Ac, Bc = A.to(x.dtype), B.to(x.dtype)
        y, u = _forward_2d(x2, W, b, Ac, Bc, s)
        need_x, _, _, need_A, need_B, _, _ = ctx.needs_input_grad
        ctx.s, ctx.s_tensor, ctx.lead = s, s_tensor, lead
        ctx.save_for_backward(x2 if need_A else None, u if need_B else None, W if need_x else None,
                              Ac if need_x else None, Bc if (need_x or need_A) else None)
        return y.view(*lead, W.shape[0])  # (N, out) -> (…, out)

    @staticmethod
    def backward(ctx, gy):
        x2, u, W, Ac, Bc = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _, _ = ctx.needs_input_grad
        s, st = ctx.s, ctx.s_tensor  # st: s as a 1-element tensor in A's master precision, so `mm * st` scales and upcasts in one kernel
        g = gy.reshape(-1, gy.shape[-1])  # (…, out) -> (N, out)
        gx = gA = gB = None
        if need_B:
            gB = torch.mm(g.t(), u) * st  # (out, N) @ (N, r) -> (out, r)
        if need_x or need_A:
            v = torch.mm(g, Bc)  # (N, out) @ (out, r) -> (N, r)
            if need_A:
                gA = torch.mm(v.t(), x2) * st  # (r, N) @ (N, in) -> (r, in)
            if need_x:
                gx = torch.mm(v, Ac).addmm_(g, W, beta=s).view(*ctx.lead, W.shape[1])  # s·v A + g W
        return gx, None, None, gA, gB, None, None


class FusedLoRALinear(LoRALinear):
    """:class:`LoRALinear` with the fused forward; made by :func:`fuse`, never constructed directly.

    ``cache_weights``: keep the frozen W (and b) cast to the autocast dtype on the layer
    instead of re-casting them at every call.  The copy is keyed by W's identity,
    storage and in-place version counter, so merges, optimizer updates, ``W.copy_()``
    and ``.to()`` refresh it — but writes through ``W.data`` bypass the version counter
    and would leave it stale, which is why it is off by default.
    """

    cache_weights: bool = False
    input_cache: InputCastCache | None = None
    weight_cache: tuple | None = None
    scale_cache: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused_forward(x)
        return super().forward(x) if y is None else y

    def _apply(self, fn, recurse=True):  # .to()/.half() may reuse W's storage and version: drop the cast copy
        self.weight_cache = self.scale_cache = None
        return super()._apply(fn, recurse)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused computation, or ``None`` where it would not be the same function as the plain one."""
        if self.fan_in_fan_out or torch.compiler.is_compiling() or not x.is_floating_point():
            return None
        W, b = self.weight, self.bias
        if W.requires_grad or (b is not None and b.requires_grad):
            return None
        dtype = compute_dtype(x)
        autocast = dtype is not x.dtype
        if dtype is None or W.dtype == torch.float64 and autocast:
            return None  # autocast leaves float64 alone; so does the plain path
        if not autocast and (W.dtype != dtype or (b is not None and b.dtype != dtype)):
            return None  # mixed dtypes outside autocast: let nn.Linear decide (or raise)
        if not self.uses_adapter():
            Wc, bc = self.frozen_weights(dtype)
            return F.linear(self.cast_input(x, dtype), Wc, bc)  # merged, disabled or no adapter: one GEMM
        name = self.active_adapter
        cfg = self.adapters[name]
        if cfg.dropout > 0 and self.training:
            return None  # the plain path applies the dropout mask
        A, B = self.lora_factors(name)
        if A.dtype != B.dtype or (not autocast and A.dtype != dtype):
            return None  # e.g. fp32 adapters on a bf16 base without autocast: the branch runs in fp32
        Wc, bc = self.frozen_weights(dtype)
        xc = self.cast_input(x, dtype)
        if torch.is_grad_enabled() and (xc.requires_grad or A.requires_grad or B.requires_grad):
            return LoRALinearFunction.apply(xc, Wc, bc, A, B, cfg.scale, self.scale_tensor(cfg.scale, A))
        with torch.no_grad():
            y, _ = _forward_2d(xc.reshape(-1, W.shape[1]), Wc, bc, A.to(dtype), B.to(dtype), cfg.scale)
        return y.view(*xc.shape[:-1], W.shape[0])

    def frozen_weights(self, dtype: torch.dtype):
        """W and b in ``dtype`` (cached on the layer when ``cache_weights`` is on)."""
        W, b = self.weight, self.bias
        if W.dtype == dtype and (b is None or b.dtype == dtype):
            return W, b
        if not self.cache_weights:
            return W.to(dtype), (None if b is None else b.to(dtype))
        key = (id(W), W.data_ptr(), W._version, W.device, dtype)
        if b is not None:
            key += (id(b), b.data_ptr(), b._version)
        if self.weight_cache is None or self.weight_cache[0] != key:
            with torch.no_grad():
                self.weight_cache = (key, W.detach().to(dtype), None if b is None else b.detach().to(dtype))
        return self.weight_cache[1], self.weight_cache[2]

    def scale_tensor(self, s: float, A: torch.Tensor) -> torch.Tensor:
        """s as a 1-element tensor (float64 for float64 adapters, else float32) on A's device, kept on the layer."""
        dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        cached = self.scale_cache
        if cached is None or cached[0] != (s, A.device, dtype):
            cached = self.scale_cache = ((s, A.device, dtype), torch.full((1,), s, dtype=dtype, device=A.device))
        return cached[1]

    def cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.input_cache.cast(x, dtype) if self.input_cache is not None else x.to(dtype)


def fuse(model: nn.Module, cache_weights: bool = False, share_input_cast: bool = True) -> nn.Module:
    """Give every :class:`LoRALinear` in ``model`` the fused forward, in place; returns the model.

    ``share_input_cast``: layers that read the same input (q, k, v) share one cast of
    it under autocast (one :class:`InputCastCache` per call of ``fuse``).
    ``cache_weights``: see :class:`FusedLoRALinear`.
    """
    cache = InputCastCache() if share_input_cast else None
    for module in model.modules():
        if type(module) in (LoRALinear, FusedLoRALinear) and not module.fan_in_fan_out:
            module.__class__ = FusedLoRALinear
            module.cache_weights = cache_weights
            module.input_cache = cache
            module.weight_cache = None
            module.scale_cache = None
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Back to the plain :class:`LoRALinear` forward; returns the model."""
    for module in model.modules():
        if type(module) is FusedLoRALinear:
            for attr in ("cache_weights", "input_cache", "weight_cache", "scale_cache"):
                if attr in vars(module):
                    delattr(module, attr)
            module.__class__ = LoRALinear
    return model
