"""The fast path of ``LoRALinear``: the same formula, fewer bytes moved.

``LoRALinear.reference_forward`` is the readable formula

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ

and the general path (``LoRALayer.forward``) computes it the obvious way:
``base(x)``, then ``(dropout(x) @ A.T @ B.T) * s``, then an add.  At rank 8 the
LoRA branch is about 2 % of the layer's arithmetic, yet on a GPU it used to cost
more than half of the base layer's time (PEFT, all six linears of a GPT-2-small
block: 1.59× the frozen-model step, issue 6).  LoRA's extra *arithmetic* is tiny;
its extra *memory traffic* and kernel launches are not.  Every pass over an
activation of a GPT-2-small layer (8 × 1024 tokens × 768 channels in bf16 =
12.6 MB) costs ≈ 4–5 µs on an H100, and the naive branch makes about ten of
them per layer per step.  This module removes the avoidable ones:

1. **One autograd node that saves only what backward needs** (:class:`LoRALinearFunction`).
   Backward needs x (for ∂L/∂A = s·(g B)ᵀ x) and the small u = x Aᵀ (N × r, for
   ∂L/∂B = s·gᵀ u) — and W for ∂L/∂x.  The general path also keeps the scaled
   product, the dropout mask/identity output and an fp32 copy of x when the adapters
   are fp32 (every intermediate of the chain ``x.to(A.dtype) @ A.T @ B.T * s``).
2. **Fused matrix-add calls, no elementwise passes.**  s is folded into the small
   B (out × r) instead of multiplying an N × out activation; the branch goes
   first, ``t = u (sB)ᵀ`` (plus the bias through cuBLASLt's bias epilogue), and the
   base product is *accumulated into it* by the GEMM's epilogue:
   ``t.addmm_(x, Wᵀ)`` — no separate ``y + lora`` pass and no ``* s`` pass.
   Backward does the same for ∂L/∂x = g W + (g sB) A.
3. **The frozen weight kept in the compute dtype.**  Under autocast a frozen
   (``requires_grad=False``) weight is re-cast fp32 → bf16 at *every* call:
   autocast's cast cache only holds trainable leaves.  The fast path casts W (and
   b) once and caches the copy on the layer, keyed by the weight's identity,
   ``data_ptr()``, ``_version``, device and dtype, so any merge/unmerge, ``.to()``,
   ``load_state_dict`` or in-place ``W.copy_()`` / optimizer update invalidates it.
   (``W.data.copy_(...)`` does *not* bump the version counter — don't do that.)
4. **One cast of a shared input.**  q, k and v read the same normed activation:
   under autocast each would cast it to bf16 on its own (three passes, three
   saved copies).  The fast path remembers the last cast (a weak reference to the
   source tensor plus its version) and hands the same bf16 tensor to all three.
5. **No dropout at p = 0** (``nn.Identity`` in the layer), and the fast path runs
   only when the branch has no dropout in effect: with p > 0 in training mode the
   general path runs (its mask is what the readable formula says).
6. **No autograd node at inference.**  Under ``no_grad`` the same three GEMM calls
   run without building a graph.
7. **torch.compile.**  Under ``torch.compile`` the fast path steps aside and the
   compiler traces the readable general path (``OPTIONS["general_path_under_compile"]``);
   with the option off, the Python-side caches are skipped and the autograd function
   traces as plain aten ``mm``/``addmm`` calls.  Measured on the H100 (whole model
   compiled, default mode, ``results/gpu_h100_compile*.md``): floor 16.5 ms, LoRA r=8 all
   linear 37.2 ms via the general path vs 46.3 ms via the autograd function — compiled
   LoRA is *not* at the floor yet; the eager/CUDA-graph path below is the fast one.

Measured effect (``benchmarks/results/gpu_h100.md``: one H100 80GB, torch 2.11, GPT-2-small
shape, batch 8×1024, bf16 autocast, r = 8 on all six linears, whole training step
replayed as a CUDA graph so that only GPU time counts; frozen floor 24.43 ms):

=====================================================  ==========  ==========
configuration                                          step (ms)   × floor
=====================================================  ==========  ==========
general path (``use_fast_path(False)``, ≈ PEFT's)          39.50       1.62
PEFT 0.21.2, same adapters                                  39.51       1.62
fast path, all of the above                                 28.90       1.18
… without the weight cache (3)                              29.41       1.20
… without the shared input cast (4)                         29.98       1.23
… base GEMM first, branch added by a rank-r ``addmm_``      29.00       1.19
=====================================================  ==========  ==========

Steps 1, 2, 5 together take the step from 39.5 to ≈ 30 ms (fewer passes over
activations, fewer kernels); 3 saves 0.5 ms (72 weight casts per step) and 4
another 1.1 ms and ≈ 0.3 GiB of saved activations.  Inference, unmerged: 8.77 ms
vs 13.98 for the general path and 7.71 for the base model (1.14×); merged: 6.92 ms,
*faster* than the base model's 7.71 because the merged W is cast once, not per call.
In eager mode on that machine every configuration is bound by Python and kernel
launches, not by the GPU (see benchmarks/README.md).

The fast path is the *default* path of :class:`~lora_edu.layers.LoRALinear`:
``LoRALinear.forward`` calls :func:`lora_linear_forward`, which returns ``None``
whenever the fast path does not apply (merged, disabled, no active adapter, dropout
active, a trainable base weight, mixed dtypes outside autocast, float64 under
autocast) and the layer then takes the general path.  ``use_fast_path(False)``
switches it off globally, e.g. to compare the two.

Tests (``tests/test_fast.py``): outputs and gradients equal the reference formula in
float64 to 1e-12; float32/bf16 on CUDA within documented tolerances.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

__all__ = [
    "LoRALinearFunction",
    "lora_linear_forward",
    "fast_path_enabled",
    "use_fast_path",
    "set_fast_path",
    "OPTIONS",
    "clear_weight_cache",
    "compute_dtype",
]

_ENABLED = True

#: Switches for ablations (benchmarks/bench_lora.py measures each one's effect).
OPTIONS = {
    "weight_cache": True,  # keep the frozen W (and b) in the compute dtype
    "share_input_cast": True,  # q/k/v share one cast of their common input
    "lora_first": True,  # t = u (sB)ᵀ [+ b], then t += x Wᵀ in the big GEMM's epilogue
    "general_path_under_compile": True,  # under torch.compile, let the compiler fuse the readable formula
}

_AUTOCAST_DEVICES = frozenset({"cuda", "cpu", "xpu", "mps", "hpu"})
_CACHE_ATTR = "_lora_fast_weight_cache"


def fast_path_enabled() -> bool:
    return _ENABLED


def set_fast_path(enabled: bool) -> None:
    """Globally enable/disable the fast path (the general path is always correct)."""
    global _ENABLED
    _ENABLED = bool(enabled)


@contextlib.contextmanager
def use_fast_path(enabled: bool = True, **options):
    """``with use_fast_path(False): ...`` runs the general path; options override :data:`OPTIONS`."""
    global _ENABLED
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise KeyError(f"unknown fast-path options {sorted(unknown)}; known: {sorted(OPTIONS)}")
    old_enabled, old_opts = _ENABLED, dict(OPTIONS)
    _ENABLED = bool(enabled)
    OPTIONS.update(options)
    try:
        yield
    finally:
        _ENABLED = old_enabled
        OPTIONS.clear()
        OPTIONS.update(old_opts)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # very old torch
        return False


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a Linear would compute in: the autocast dtype if autocast is on for x's device, else x.dtype.

    ``None`` when autocast is on but would not touch x (float64 stays float64).
    """
    dev = x.device.type
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        if x.dtype == torch.float64:
            return None
        return torch.get_autocast_dtype(dev)
    return x.dtype


# --------------------------------------------------------------------------- caches
def clear_weight_cache(module: torch.nn.Module) -> int:
    """Drop the cached compute-dtype weights of every LoRA layer in ``module``; returns how many."""
    n = 0
    for m in module.modules():
        if m.__dict__.pop(_CACHE_ATTR, None) is not None:
            n += 1
    return n


def _frozen_weights(layer, W: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype):
    """W and b in ``dtype``; a cast copy is cached on the layer and reused while W is unchanged."""
    if W.dtype == dtype and (b is None or b.dtype == dtype):
        return W, b
    if not OPTIONS["weight_cache"] or _is_compiling():
        return W.to(dtype), (None if b is None else b.to(dtype))
    # identity, storage, version counter (bumped by every in-place update: optimizer, copy_, merge), device, dtype
    key = (id(W), W.data_ptr(), W._version, W.device, dtype)
    if b is not None:
        key += (id(b), b.data_ptr(), b._version)
    cached = layer.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    with torch.no_grad():
        Wc = W.detach().to(dtype)
        bc = None if b is None else b.detach().to(dtype)
    layer.__dict__[_CACHE_ATTR] = (key, Wc, bc)
    return Wc, bc


# one slot: (weakref to the source tensor, its version, dtype, grad mode, the cast)
_last_cast: tuple | None = None


def _drop_slot(ref) -> None:
    global _last_cast
    slot = _last_cast
    if slot is not None and slot[0] is ref:
        _last_cast = None


def _cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, shared between consecutive layers that read the same x (q, k, v)."""
    global _last_cast
    if x.dtype == dtype:
        return x
    if not OPTIONS["share_input_cast"] or _is_compiling():
        return x.to(dtype)
    grad_mode = torch.is_grad_enabled()
    slot = _last_cast
    if slot is not None and slot[0]() is x and slot[1] == x._version and slot[2] == dtype and slot[3] == grad_mode:
        return slot[4]
    xc = x.to(dtype)
    # The slot lives exactly as long as x: the weak reference's callback frees the cast.
    _last_cast = (weakref.ref(x, _drop_slot), x._version, dtype, grad_mode, xc)
    return xc


_scales: dict = {}


def _scale_tensor(s: float, like: torch.Tensor) -> torch.Tensor:
    """s as a 1-element tensor of at least float32 on like's device (cached): ``mm(...) * it`` scales and upcasts in one kernel."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if _is_compiling():  # no Python-side cache under torch.compile (a mutation there is a graph break)
        return torch.full((1,), s, dtype=dtype, device=like.device)
    key = (s, like.device, dtype)
    t = _scales.get(key)
    if t is None:
        t = _scales[key] = torch.full((1,), s, dtype=dtype, device=like.device)
    return t


# --------------------------------------------------------------------------- the math
def _forward_2d(x2, W, b, A, B, s: float):
    """u = x Aᵀ (N×r); y = s·u Bᵀ [+ b] + x Wᵀ, the base product accumulated in the GEMM epilogue.

    s rides on the GEMMs' alpha/beta scalars, so no kernel ever multiplies an activation by s.
    """
    u = torch.mm(x2, A.t())  # (N, in) @ (in, r) -> (N, r)
    if OPTIONS["lora_first"]:
        if b is None:
            t = torch.mm(u, B.t())  # (N, out), unscaled
            y = t.addmm_(x2, W.t(), beta=s)  # y = s·t + x Wᵀ: the base GEMM reads t in its epilogue
        else:
            t = torch.addmm(b, u, B.t(), alpha=s)  # b + s·u Bᵀ, the bias in the epilogue
            y = t.addmm_(x2, W.t())  # += x Wᵀ
    else:
        y = torch.mm(x2, W.t()) if b is None else torch.addmm(b, x2, W.t())
        y.addmm_(u, B.t(), alpha=s)  # y += s·u Bᵀ: a rank-r GEMM that reads and writes y
    return y, u


class LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with a hand-written backward that saves only x, u = x Aᵀ and the small factors.

    Inputs: x (…, in) and W (out, in), b (out,) already in the compute dtype; A (r, in)
    and B (out, r) in their own (master) dtype — they are cast here, and their
    gradients are returned in their own dtype.  W and b must not require grad.

    Backward, with g = ∂L/∂y (N, out) and v = g B (N, r):
        ∂L/∂B = s · gᵀ u          (out, r)
        ∂L/∂A = s · vᵀ x          (r, in)
        ∂L/∂x = s · v A + g W     (N, in)   (the small product first, the big GEMM accumulating into it)
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s: float):
        dtype = x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, W.shape[1])
        Ac = A.to(dtype)  # (r, in): a no-op when the adapters already have the compute dtype
        Bc = B.to(dtype)
        y, u = _forward_2d(x2, W, b, Ac, Bc, s)
        need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
        ctx.s = s
        ctx.lead = lead
        ctx.save_for_backward(
            x2 if need_A else None,  # for ∂L/∂A only: not kept when A is frozen
            u if need_B else None,
            W if need_x else None,
            Ac if need_x else None,
            Bc if (need_x or need_A) else None,
        )
        return y.view(*lead, W.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, u, W, Ac, Bc = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.s
        g = gy.reshape(-1, gy.shape[-1])
        gx = gA = gB = None
        if need_B:
            gB = torch.mm(g.t(), u).mul_(s) if u.dtype == torch.float64 else torch.mm(g.t(), u) * _scale_tensor(s, u)
        if need_x or need_A:
            v = torch.mm(g, Bc)  # (N, out) @ (out, r)
            if need_A:
                gA = torch.mm(v.t(), x2).mul_(s) if v.dtype == torch.float64 else torch.mm(v.t(), x2) * _scale_tensor(s, v)
            if need_x:
                gx = torch.mm(v, Ac).addmm_(g, W, beta=s).view(*ctx.lead, W.shape[1])  # s·v A + g W
        return gx, None, None, gA, gB, None


def lora_linear_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The fast forward of a :class:`~lora_edu.layers.LoRALinear`, or ``None`` if it does not apply.

    Applies when the fast path is enabled, the base weight and bias are frozen, and
    the dtypes agree (under autocast: float16/bfloat16/float32 inputs and weights;
    without: x, W, b, A and B all of one dtype).  Then:

    * merged, disabled or no active adapter: ``F.linear`` with the cached compute-dtype W;
    * dropout in effect (p > 0 in training mode): ``None`` — the general path applies the mask;
    * otherwise :class:`LoRALinearFunction` (or, when nothing needs a gradient, the same
      GEMM calls without an autograd node).
    """
    if not _ENABLED or (OPTIONS["general_path_under_compile"] and _is_compiling()):
        return None  # under torch.compile the readable general path is traced and fused by the compiler
    d = layer.__dict__  # plain dict lookups: nn.Module.__getattr__ is slow and this runs per layer per step
    base = d["_modules"]["base"]
    bp = base._parameters
    W = bp["weight"]
    b = bp.get("bias")
    if W.requires_grad or (b is not None and b.requires_grad):
        return None
    dev = x.device.type
    autocast = dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)
    if autocast:
        if x.dtype == torch.float64 or W.dtype == torch.float64 or not x.is_floating_point():
            return None  # autocast leaves float64 alone; so does the general path
        dtype = torch.get_autocast_dtype(dev)  # what F.linear would compute in
    else:
        dtype = x.dtype
        if W.dtype != dtype or (b is not None and b.dtype != dtype):
            return None  # mixed dtypes outside autocast: let nn.Linear decide (or raise)
    name = d["active_adapter"]
    if name is None or d["disabled"] or d["merged_adapter"] is not None:
        if d["disabled"] and d["merged_adapter"] is not None:
            return None  # the general path raises the helpful error
        Wc, bc = _frozen_weights(layer, W, b, dtype)  # merged/base-only inference: one GEMM, no weight cast
        return F.linear(_cast_input(x, dtype), Wc, bc)
    cfg = d["adapters"][name]
    if cfg.dropout > 0 and d["training"]:
        return None  # the general path applies the dropout mask
    A = d["_modules"]["lora_A"]._parameters[name]
    B = d["_modules"]["lora_B"]._parameters[name]
    if A.dtype != B.dtype or (not autocast and A.dtype != dtype):
        return None  # e.g. a bf16 base with fp32 adapters, no autocast: the general path computes the branch in fp32
    Wc, bc = _frozen_weights(layer, W, b, dtype)
    xc = _cast_input(x, dtype)
    if torch.is_grad_enabled() and (xc.requires_grad or A.requires_grad or B.requires_grad):
        return LoRALinearFunction.apply(xc, Wc, bc, A, B, cfg.scale)
    with torch.no_grad():
        y, _ = _forward_2d(xc.reshape(-1, W.shape[1]), Wc, bc, A.to(dtype), B.to(dtype), cfg.scale)
    return y.view(*xc.shape[:-1], W.shape[0])
