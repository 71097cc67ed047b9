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
autocast, or a transposed (Conv1D) base.

Under ``torch.compile`` the compiler traces the plain formula by default (two H200 runs did
not find either formulation reliably faster, see benchmarks/README.md; the traced formula
keeps nothing opaque from the compiler); ``fuse(model, compile_op=True)`` calls the same
computation as one custom operator instead, ``torch.ops.lora_edu.lora_linear`` (with a fake
implementation for tracing and its own backward operator), which keeps the epilogue-fused
GEMMs intact.  ``fuse(model, recompute_input=True)`` saves memory: where a layer's input is
the output of GELU or SiLU (the down-projection of an MLP), backward recomputes it from
the activation's own saved input instead of keeping it.
"""
from __future__ import annotations

import weakref
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.core.layers import LoRALinear

__all__ = ["FusedLoRALinear", "InputCastCache", "LoRALinearFunction", "compute_dtype", "fuse", "lora_linear_op", "unfuse"]

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


def _backward_2d(g, x2, u, W, Ac, Bc, s: float, st, need_x: bool, need_A: bool, need_B: bool):
    """(∂L/∂x, ∂L/∂A, ∂L/∂B) from g = ∂L/∂y (N, out); v = g B (N, r).  st: s as a 1-element tensor in A's master dtype."""
    gx = gA = gB = None
    if need_B:
        gB = torch.mm(g.t(), u) * st  # (out, N) @ (N, r) -> (out, r), scaled and upcast in one kernel
    if need_x or need_A:
        v = torch.mm(g, Bc)  # (N, out) @ (out, r) -> (N, r)
        if need_A:
            gA = torch.mm(v.t(), x2) * st  # (r, N) @ (N, in) -> (r, in)
        if need_x:
            gx = torch.mm(v, Ac).addmm_(g, W, beta=s)  # s·v A + g W: (N, in)
    return gx, gA, gB


# Activations whose autograd node already keeps their input: y = f(h) is recomputed from h in backward.
_RECOMPUTABLE = MappingProxyType({
    "GeluBackward0": lambda node: (lambda h: F.gelu(h, approximate=node._saved_approximate)),
    "SiluBackward0": lambda node: F.silu,
})


def _recompute_plan(x: torch.Tensor):
    """(f, h) with x == f(h) bit for bit and h already saved by x's autograd node, or None."""
    node = x.grad_fn
    make = _RECOMPUTABLE.get(type(node).__name__) if node is not None else None
    if make is None:
        return None
    h = node._saved_self
    if h.shape != x.shape or h.dtype != x.dtype:
        return None
    return make(node), h


class LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, saving only x, u = x Aᵀ and the small factors for backward.

    x (…, in), W (out, in), b (out,) come in the compute dtype; A (r, in), B (out, r) in
    their own (master) dtype and get their gradients in it.  W and b are frozen.
    Backward, with g = ∂L/∂y (N, out) and v = g B (N, r):
    ∂L/∂B = s·gᵀ u,  ∂L/∂A = s·vᵀ x,  ∂L/∂x = s·v A + g W.
    ``recompute``: (f, h) with x = f(h) and h kept alive by x's own autograd node: save h
    (no new memory) instead of x, and recompute x = f(h) in backward.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s: float, s_tensor: torch.Tensor, recompute=None):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, W.shape[1])  # (…, in) -> (N, in)
        Ac, Bc = A.to(x.dtype), B.to(x.dtype)
        y, u = _forward_2d(x2, W, b, Ac, Bc, s)
        need_x, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        ctx.s, ctx.s_tensor, ctx.lead = s, s_tensor, lead
        ctx.recompute = recompute[0] if (recompute is not None and need_A) else None
        keep = (recompute[1].detach() if ctx.recompute else x2) if need_A else None  # h shares x's producer's saved storage
        ctx.save_for_backward(keep, u if need_B else None, W if need_x else None,
                              Ac if need_x else None, Bc if (need_x or need_A) else None)
        return y.view(*lead, W.shape[0])  # (N, out) -> (…, out)

    @staticmethod
    def backward(ctx, gy):
        x2, u, W, Ac, Bc = ctx.saved_tensors
        if ctx.recompute is not None:
            x2 = ctx.recompute(x2).reshape(-1, x2.shape[-1])  # x = f(h), the same kernel on the same h: the same bits
        need_x, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        g = gy.reshape(-1, gy.shape[-1])  # (…, out) -> (N, out)
        gx, gA, gB = _backward_2d(g, x2, u, W, Ac, Bc, ctx.s, ctx.s_tensor, need_x, need_A, need_B)
        if gx is not None:
            gx = gx.view(*ctx.lead, gx.shape[-1])
        return (gx, None, None, gA, gB) + (None,) * (len(ctx.needs_input_grad) - 5)  # s, s_tensor[, recompute]


# ------------------------------------------------------------------ the same computation as a custom operator (torch.compile)
def _master(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Defined with torch.library.Library rather than @torch.library.custom_op: the same schema, fake implementations
# and autograd registration, but about a third of the per-call Python overhead (measured on the CPU: 12 vs 37 µs),
# which matters at 2 calls per adapted layer and step.
_LIB = torch.library.Library("lora_edu", "DEF")
_LIB.define("lora_linear(Tensor x2, Tensor W, Tensor? b, Tensor A, Tensor B, float s) -> (Tensor, Tensor)")
_LIB.define("lora_linear_backward(Tensor g, Tensor? x2, Tensor u, Tensor W, Tensor A, Tensor B, float s, "
            "bool need_x, bool need_A, bool need_B) -> (Tensor, Tensor, Tensor)")


def _lora_linear_impl(x2, W, b, A, B, s: float):
    """(y, u): y = x Wᵀ + b + s·(x Aᵀ) Bᵀ (N, out) and u = x Aᵀ (N, r), by the epilogue-fused GEMMs of the eager path.

    x2 (N, in), W (out, in), b (out,) in the compute dtype; A (r, in), B (out, r) in their master dtype.
    """
    return _forward_2d(x2, W, b, A.to(x2.dtype), B.to(x2.dtype), s)


def _lora_linear_backward_impl(g, x2, u, W, A, B, s: float, need_x: bool, need_A: bool, need_B: bool):
    """(∂x, ∂A, ∂B) as in :class:`LoRALinearFunction`; a gradient that is not needed comes back empty (0 elements)."""
    st = torch.full((1,), s, dtype=_master(A.dtype), device=g.device)
    gx, gA, gB = _backward_2d(g, x2, u, W, A.to(g.dtype), B.to(g.dtype), s, st, need_x, need_A, need_B)
    empty = g.new_empty(0)
    return (empty if gx is None else gx), (empty.to(A.dtype) if gA is None else gA), (empty.to(B.dtype) if gB is None else gB)


_LIB.impl("lora_linear", _lora_linear_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_linear_backward", _lora_linear_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("lora_edu::lora_linear", lib=_LIB)
def _(x2, W, b, A, B, s):
    return x2.new_empty(x2.shape[0], W.shape[0]), x2.new_empty(x2.shape[0], A.shape[0])


@torch.library.register_fake("lora_edu::lora_linear_backward", lib=_LIB)
def _(g, x2, u, W, A, B, s, need_x, need_A, need_B):
    gx = g.new_empty(g.shape[0], W.shape[1]) if need_x else g.new_empty(0)
    gA = A.new_empty(A.shape) if need_A else A.new_empty(0)
    gB = B.new_empty(B.shape) if need_B else B.new_empty(0)
    return gx, gA, gB


def _op_setup_context(ctx, inputs, output):
    x2, W, b, A, B, s = inputs
    ctx.s = s
    ctx.save_for_backward(x2, output[1], W, A, B)


def _op_backward(ctx, gy, gu):
    x2, u, W, A, B = ctx.saved_tensors
    need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
    gx, gA, gB = torch.ops.lora_edu.lora_linear_backward(gy, x2 if need_A else None, u, W, A, B, ctx.s, need_x, need_A, need_B)
    return (gx if need_x else None), None, None, (gA if need_A else None), (gB if need_B else None), None


torch.library.register_autograd("lora_edu::lora_linear", _op_backward, setup_context=_op_setup_context, lib=_LIB)
lora_linear_op = torch.ops.lora_edu.lora_linear.default  # (x2, W, b, A, B, s) -> (y, u)
lora_linear_backward_op = torch.ops.lora_edu.lora_linear_backward.default


class FusedLoRALinear(LoRALinear):
    """:class:`LoRALinear` with the fused forward; made by :func:`fuse`, never constructed directly.

    ``cache_weights``: keep the frozen W (and b) cast to the autocast dtype on the layer
    instead of re-casting them at every call.  The copy is keyed by W's identity,
    storage and in-place version counter, so merges, optimizer updates, ``W.copy_()``
    and ``.to()`` refresh it — but writes through ``W.data`` bypass the version counter
    and would leave it stale, which is why it is off by default.

    ``compile_op``: under ``torch.compile`` call :func:`lora_linear_op` (the same GEMMs, one
    opaque operator with its own backward) instead of letting the compiler trace the plain
    formula (the default; neither was reliably faster on an H200).  ``recompute_input``: see :func:`fuse`.
    """

    cache_weights: bool = False
    compile_op: bool = False
    recompute_input: bool = False
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
        compiling = torch.compiler.is_compiling()
        if self.fan_in_fan_out or (compiling and not self.compile_op) or not x.is_floating_point():
            return None
        W, b = self.weight, self.bias
        if W.requires_grad or (b is not None and b.requires_grad):
            return None
        dtype = compute_dtype(x)
        dev = x.device.type  # autocast is on even when x already has its dtype (o_proj after SDPA, down_proj after GELU)
        autocast = dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)
        if dtype is None or W.dtype == torch.float64 and autocast:
            return None  # autocast leaves float64 alone; so does the plain path
        if not autocast and (W.dtype != dtype or (b is not None and b.dtype != dtype)):
            return None  # mixed dtypes outside autocast: let nn.Linear decide (or raise)
        if not self.uses_adapter():
            if compiling:
                return None  # one F.linear: the compiler handles it as it handles the base model
            Wc, bc = self.frozen_weights(dtype)
            return F.linear(self.cast_input(x, dtype), Wc, bc)  # merged, disabled or no adapter: one GEMM
        name = self.active_adapter
        cfg = self.adapters[name]
        if cfg.dropout > 0 and self.training:
            return None  # the plain path applies the dropout mask
        A, B = self.lora_factors(name)
        if A.dtype != B.dtype or (not autocast and A.dtype != dtype):
            return None  # e.g. fp32 adapters on a bf16 base without autocast: the branch runs in fp32
        if compiling:  # no caches (the compiler de-duplicates casts); the operator keeps the fused GEMMs whole
            xc, Wc, bc = x.to(dtype), W.to(dtype), (None if b is None else b.to(dtype))
            y, _ = lora_linear_op(xc.reshape(-1, W.shape[1]), Wc, bc, A, B, cfg.scale)  # (N, in) -> (N, out)
            return y.view(*xc.shape[:-1], W.shape[0])
        Wc, bc = self.frozen_weights(dtype)
        xc = self.cast_input(x, dtype)
        if torch.is_grad_enabled() and (xc.requires_grad or A.requires_grad or B.requires_grad):
            recompute = _recompute_plan(x) if (self.recompute_input and xc is x and A.requires_grad) else None
            return LoRALinearFunction.apply(xc, Wc, bc, A, B, cfg.scale, self.scale_tensor(cfg.scale, A), recompute)
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


def fuse(model: nn.Module, cache_weights: bool = False, share_input_cast: bool = True, compile_op: bool = False,
         recompute_input: bool = False) -> nn.Module:
    """Give every :class:`LoRALinear` in ``model`` the fused forward, in place; returns the model.

    ``share_input_cast``: layers that read the same input (q, k, v) share one cast of
    it under autocast (one :class:`InputCastCache` per call of ``fuse``).
    ``cache_weights``: see :class:`FusedLoRALinear`.
    ``compile_op``: under ``torch.compile``, ``False`` (default): the compiler traces the plain
    formula; ``True``: the fused computation as one custom operator (:func:`lora_linear_op`).
    On an H200 (GPT-2-small shape, bf16) the two swapped places between runs (benchmarks/README.md).
    ``recompute_input``: a layer whose input x is GELU(h) or SiLU(h) (an MLP's down-projection)
    saves nothing for ∂A = s·(gB)ᵀx: h is kept by the activation's own backward anyway, and x
    is recomputed from it in backward (bit for bit).  Saves N × in activations per such layer
    (for GPT-2-small, 50 MB per block at batch 8 × 1,024 in bf16) for one GELU per layer in backward.
    Eager only: under ``torch.compile`` the compiler chooses what to recompute itself.
    """
    for name, flag in (("cache_weights", cache_weights), ("share_input_cast", share_input_cast), ("compile_op", compile_op),
                       ("recompute_input", recompute_input)):
        if not isinstance(flag, bool):
            raise TypeError(f"fuse: {name} must be True or False, got {flag!r}")
    cache = InputCastCache() if share_input_cast else None
    for module in model.modules():
        if type(module) in (LoRALinear, FusedLoRALinear) and not module.fan_in_fan_out:
            module.__class__ = FusedLoRALinear
            module.cache_weights = cache_weights
            module.compile_op = compile_op
            module.recompute_input = recompute_input
            module.input_cache = cache
            module.weight_cache = None
            module.scale_cache = None
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Back to the plain :class:`LoRALinear` forward; returns the model."""
    for module in model.modules():
        if type(module) is FusedLoRALinear:
            for attr in ("cache_weights", "compile_op", "recompute_input", "input_cache", "weight_cache", "scale_cache"):
                if attr in vars(module):
                    delattr(module, attr)
            module.__class__ = LoRALinear
    return model
