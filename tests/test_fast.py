"""``FusedLoRALinear`` (lora_edu.speed.fused) computes exactly the plain ``LoRALinear`` formula.

The plain ``LoRALinear.forward`` is the reference (``_plain`` below calls it on the very
same parameters).  Tolerances, all measured on these shapes before being written down:

* float64, CPU: outputs and the gradients of x, A and B equal the plain layer's to 1e-12
  (absolute, on O(1) values; measured ≈ 1e-15).
* float32, CPU: relative Frobenius error against a float64 evaluation of the same layer
  < 1e-6 for both paths (measured ≈ 1.5e-7), the fused one at most 1.5 × the plain one's.
* bfloat16 CPU autocast: relative error against float64 < 1e-2 for both paths (bf16 keeps
  8 significant bits, unit roundoff 2⁻⁸ ≈ 3.9e-3; measured 3-4e-3), fused vs plain < 1e-2,
  and the fused error at most 1.25 × the plain one's (one rounding per GEMM instead of one
  per intermediate: measured 0.9×).
* CUDA (``-m cuda``, skipped without a GPU), against float64: float32 (TF32 off) < 1e-5;
  bf16 autocast < 2e-2 (sums of 10³ bf16 products).

Regression tests pin bugs found while porting these tests: a cast reused after
``x.requires_grad_()``, inference tensors (no version counter), pickling the cast cache,
and a stale cast weight after ``.half().float()`` (whether the allocator hands the old
address back, the trigger, depends on the allocator, so that one cannot always fail).
"""
import copy
import functools
import io
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import lora_edu
from lora_edu.core.layers import LoRAEmbedding, LoRALinear
from lora_edu.lab.models import GPT, GPTConfig
from lora_edu.speed import fused
from lora_edu.speed.fused import FusedLoRALinear, InputCastCache, LoRALinearFunction, compute_dtype, fuse, unfuse

TOL64 = 1e-12
CUDA = torch.cuda.is_available()
BF16 = torch.bfloat16
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------ helpers
def _layer(in_f=7, out_f=6, r=3, alpha=5.0, bias=True, dtype=torch.float64, device="cpu", dropout=0.0, seed=0):
    """A plain LoRALinear with B ≠ 0 (B = 0 at init would hide every mistake in the B path)."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(device=device, dtype=dtype)
    layer = LoRALinear(lin, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def _fused(layer, **kw):
    """``fuse`` converts the module itself too (``modules()`` starts with it)."""
    out = fuse(layer, **kw)
    assert out is layer and type(layer) is FusedLoRALinear
    return layer


def _plain(layer):
    """The readable formula, ``LoRALinear.forward``, run on ``layer``'s own parameters."""
    return functools.partial(LoRALinear.forward, layer)


def _used_function(y):
    return y.grad_fn is not None and type(y.grad_fn).__name__.startswith(LoRALinearFunction.__name__)


def _grads(layer, x, fn, g):
    y = fn(x)
    return y, torch.autograd.grad(y, [x, layer.A, layer.B], g)


def _maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _gpt(vocab=31, block=16, n_layer=2, d=16, ff=32, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=2, d_model=d, d_ff=ff, bias=True))
    model = model.to(dtype)
    lora_edu.add_lora(model, ALL_LINEAR, r=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora_edu.lora_layers(model):
            layer.B.normal_(std=0.1)
    return model


class _Calls(TorchFunctionMode):
    """Records every torch function called at Python level (to see which kernels a forward asks for)."""

    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


_GEMMS = {torch.mm, torch.addmm, torch.Tensor.addmm_, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, F.linear}
_ELEMENTWISE = {torch.add, torch.mul, torch.Tensor.add, torch.Tensor.mul, torch.Tensor.__add__, torch.Tensor.__mul__,
                torch.Tensor.__radd__, torch.Tensor.__rmul__, torch.Tensor.add_, torch.Tensor.mul_}


def _calls(fn, *args):
    with _Calls() as rec:
        out = fn(*args)
    return out, rec.funcs


# ------------------------------------------------------------------ float64: exactly the formula
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (5, 7), (3, 4, 7), (2, 3, 2, 7)])
def test_fused_equals_plain_float64(bias, shape):
    layer = _fused(_layer(bias=bias))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:-1], 6, dtype=torch.float64)
    y, grads = _grads(layer, x, layer, g)
    assert _used_function(y)
    yr, ref = _grads(layer, x, _plain(layer), g)
    assert not _used_function(yr)
    assert y.shape == yr.shape and y.dtype == yr.dtype
    assert _maxdiff(y, yr) < TOL64
    for a, b in zip(grads, ref):
        assert a.shape == b.shape and a.dtype == b.dtype and _maxdiff(a, b) < TOL64


def test_fused_forward_is_three_gemms_and_no_elementwise_pass():
    """u = x Aᵀ; t = b + s·u Bᵀ; t += x Wᵀ: no ``y + lora`` and no ``* s`` over an activation."""
    for bias in (True, False):
        layer = _fused(_layer(bias=bias))
        x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
        y, funcs = _calls(layer, x)
        assert _used_function(y)
        assert sum(f in _GEMMS for f in funcs) == 3, funcs
        assert F.linear not in funcs and not any(f in _ELEMENTWISE for f in funcs), funcs
        _, plain_funcs = _calls(_plain(layer), x)
        assert any(f in _ELEMENTWISE for f in plain_funcs)  # the probe does see the plain path's add


def test_float32_within_documented_tolerance():
    layer = _layer(in_f=64, out_f=48, r=8, alpha=16.0, dtype=torch.float32)
    with torch.no_grad():
        layer.B.mul_(0.1)
    ref = copy.deepcopy(layer).double()
    _fused(layer)
    x = torch.randn(4, 10, 64, requires_grad=True)
    g = torch.randn(4, 10, 48)
    xd = x.detach().double().requires_grad_()
    yr, gr = _grads(ref, xd, ref, g.double())
    y, gf = _grads(layer, x, layer, g)
    assert _used_function(y) and y.dtype == torch.float32
    yp, gp = _grads(layer, x, _plain(layer), g)
    for fused_out, plain_out, exact in zip((y, *gf), (yp, *gp), (yr, *gr)):
        ef, ep = _rel(fused_out, exact), _rel(plain_out, exact)
        assert ef < 1e-6 and ep < 1e-6
        assert ef <= 1.5 * ep + 1e-9


def test_only_needed_grads():
    """x without grad (first layer): A and B still learn; frozen adapters: only x gets a gradient."""
    layer = _fused(_layer())
    x = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(5, 6, dtype=torch.float64)
    y = layer(x)
    assert _used_function(y)
    gA, gB = torch.autograd.grad(y, [layer.A, layer.B], g)
    rA, rB = torch.autograd.grad(_plain(layer)(x), [layer.A, layer.B], g)
    assert _maxdiff(gA, rA) < TOL64 and _maxdiff(gB, rB) < TOL64

    layer.A.requires_grad_(False)
    layer.B.requires_grad_(False)
    x.requires_grad_(True)
    y = layer(x)
    assert _used_function(y)
    (gx,) = torch.autograd.grad(y, [x], g)
    (rx,) = torch.autograd.grad(_plain(layer)(x), [x], g)
    assert _maxdiff(gx, rx) < TOL64


def test_no_grad_and_inference_mode_paths():
    layer = _fused(_layer())
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    with torch.no_grad():
        assert layer.fused_forward(x) is not None
        y = layer(x)
        assert y.grad_fn is None and _maxdiff(y, _plain(layer)(x)) < TOL64
    with torch.inference_mode():
        assert _maxdiff(layer(x), _plain(layer)(x)) < TOL64
    x.requires_grad_(True)
    with torch.no_grad():  # x requires grad, grad mode off: still no graph
        assert layer(x).grad_fn is None


def test_multiple_adapters_use_the_active_one():
    layer = _layer()
    layer.add_adapter("second", r=2, alpha=3.0)
    with torch.no_grad():
        layer.B.normal_()
    _fused(layer)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert _used_function(y)
    assert _maxdiff(y, _plain(layer)(x)) < TOL64
    y.sum().backward()
    assert layer.lora_A["default"].grad is None and layer.lora_A["second"].grad is not None
    layer.set_adapter("default")
    assert _maxdiff(layer(x), _plain(layer)(x)) < TOL64


def test_whole_model_float64_fused_equals_plain():
    plain = _gpt()
    model = fuse(copy.deepcopy(plain))
    layers = lora_edu.lora_layers(model)
    assert layers and all(type(layer) is FusedLoRALinear for _, layer in layers)
    idx = torch.randint(0, 31, (3, 16))

    def loss_and_grads(m):
        m.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(idx).view(-1, 31), idx.view(-1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora_edu.lora_parameters(m)]

    l1, g1 = loss_and_grads(model)
    l2, g2 = loss_and_grads(plain)
    assert abs(l1 - l2).item() < TOL64
    assert len(g1) == len(g2) == 2 * 6 * 2
    for a, b in zip(g1, g2):
        assert _maxdiff(a, b) < TOL64


# ------------------------------------------------------------------ where the fused path steps aside
def test_dropout_in_training_steps_aside_and_eval_is_fused():
    layer = _fused(_layer(dropout=0.3))
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    layer.train()
    assert layer.fused_forward(x) is None
    torch.manual_seed(7)
    y = layer(x)
    assert not _used_function(y)
    torch.manual_seed(7)
    assert _maxdiff(y, _plain(layer)(x)) < TOL64  # the same mask under the same seed
    layer.eval()
    y = layer(x)
    assert _used_function(y)
    assert _maxdiff(y, _plain(layer)(x)) < TOL64


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_trainable_base_steps_aside(which):
    layer = _fused(_layer())
    getattr(layer.base, which).requires_grad_(True)
    x = torch.randn(5, 7, dtype=torch.float64)
    assert layer.fused_forward(x) is None
    y = layer(x)
    assert not _used_function(y)
    assert _maxdiff(y, _plain(layer)(x)) == 0.0
    y.sum().backward()
    assert getattr(layer.base, which).grad is not None


def test_bf16_base_with_fp32_adapters_without_autocast_steps_aside():
    """The adapter policy keeps A, B in fp32 on a bf16 base: the plain branch runs in fp32, so the fused path must not."""
    layer = _fused(_layer(in_f=16, out_f=8, r=4, dtype=BF16))
    assert layer.weight.dtype == BF16 and layer.A.dtype == torch.float32
    x = torch.randn(5, 16, dtype=BF16, requires_grad=True)
    assert layer.fused_forward(x) is None
    y = layer(x)
    assert torch.equal(y, _plain(layer)(x))
    y.float().sum().backward()
    assert layer.A.grad.dtype == torch.float32


def test_mixed_dtypes_without_autocast_behave_like_plain():
    layer = _fused(_layer())  # float64 weights
    x = torch.randn(5, 7)  # float32 input, no autocast
    assert layer.fused_forward(x) is None
    with pytest.raises(RuntimeError) as plain_err:
        _plain(layer)(x)
    with pytest.raises(RuntimeError) as fused_err:
        layer(x)
    assert str(fused_err.value) == str(plain_err.value)


def test_float64_under_cpu_autocast_steps_aside():
    """Autocast leaves float64 alone; so must the fused path (no silent bf16)."""
    layer = _fused(_layer())
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        assert compute_dtype(x) is None
        assert layer.fused_forward(x) is None
        y = layer(x)
        yr = _plain(layer)(x)
    assert y.dtype == torch.float64 and not _used_function(y)
    assert _maxdiff(y, yr) == 0.0
    # a float64 layer fed float32 under autocast: the fused path also steps aside, whatever the plain one does
    x32 = torch.randn(5, 7)
    with torch.autocast("cpu", dtype=BF16):
        assert layer.fused_forward(x32) is None


class _Conv1D(nn.Module):
    """transformers' Conv1D in miniature: y = x W + b with W stored (in, out)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def test_fan_in_fan_out_layer_steps_aside():
    """A (in, out)-stored base (GPT-2's Conv1D): fuse() leaves it alone, and the fused forward declines it anyway."""
    layer = LoRALinear(_Conv1D(7, 6), r=3, alpha=5.0, fan_in_fan_out=True)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    y_plain = layer(x)
    fuse(layer)
    assert type(layer) is LoRALinear
    layer.__class__ = FusedLoRALinear  # forced: still the plain formula
    assert layer.fused_forward(x) is None
    assert _maxdiff(layer(x), y_plain) == 0.0


def test_merged_disabled_and_no_adapter_are_one_linear():
    layer = _fused(_layer())
    x = torch.randn(5, 7, dtype=torch.float64)
    y_unmerged = layer(x)

    layer.merge()
    assert layer.fused_forward(x) is not None
    y_merged, funcs = _calls(layer, x)
    assert funcs.count(F.linear) == 1 and sum(f in _GEMMS for f in funcs) == 1, funcs
    assert _maxdiff(y_merged, y_unmerged) < TOL64
    assert _maxdiff(y_merged, _plain(layer)(x)) < TOL64
    layer.unmerge()
    assert _maxdiff(layer(x), y_unmerged) < TOL64

    layer.disabled = True
    y, funcs = _calls(layer, x)
    assert funcs.count(F.linear) == 1 and sum(f in _GEMMS for f in funcs) == 1, funcs
    assert torch.equal(y, layer.base(x))
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)  # disabled + merged: the plain path's error, not a silent base-with-ΔW
    layer.unmerge()
    layer.disabled = False

    layer.set_adapter(None)
    y, funcs = _calls(layer, x)
    assert funcs.count(F.linear) == 1 and torch.equal(y, layer.base(x))


def test_merged_under_autocast_is_one_linear_in_bf16():
    layer = _fused(_layer(in_f=16, out_f=8, r=4, dtype=torch.float32))
    x = torch.randn(5, 16)
    layer.merge()
    with torch.autocast("cpu", dtype=BF16):
        y, funcs = _calls(layer, x)
        yp = _plain(layer)(x)
    assert y.dtype == yp.dtype == BF16
    assert funcs.count(F.linear) == 1 and sum(f in _GEMMS for f in funcs) == 1
    assert torch.equal(y, yp)  # the same bf16 GEMM on the same bf16 operands


# ------------------------------------------------------------------ CPU bf16 autocast
def test_bf16_autocast_fused_vs_plain_within_tolerance():
    layer = _layer(in_f=64, out_f=48, r=8, alpha=16.0, dtype=torch.float32)
    with torch.no_grad():
        layer.B.mul_(0.1)
    ref = copy.deepcopy(layer).double()
    _fused(layer)
    x = torch.randn(4, 10, 64, requires_grad=True)
    g = torch.randn(4, 10, 48)
    xd = x.detach().double().requires_grad_()
    yr, gr = _grads(ref, xd, ref, g.double())
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
        yp = _plain(layer)(x)
    assert _used_function(y) and y.dtype == yp.dtype == BF16
    gf = torch.autograd.grad(y, [x, layer.A, layer.B], g.to(BF16))
    gp = torch.autograd.grad(yp, [x, layer.A, layer.B], g.to(BF16))
    for a, b in zip(gf, gp):
        assert a.dtype == b.dtype  # x's gradient in x's dtype, A's and B's in fp32
    assert gf[1].dtype == gf[2].dtype == torch.float32
    for fused_out, plain_out, exact in zip((y, *gf), (yp, *gp), (yr, *gr)):
        ef, ep = _rel(fused_out, exact), _rel(plain_out, exact)
        assert ef < 1e-2 and ep < 1e-2
        assert _rel(fused_out, plain_out) < 1e-2
        assert ef <= 1.25 * ep


def test_bf16_input_under_autocast_is_fused():
    """Regression: an input already in autocast's dtype (o_proj after SDPA, down_proj after GELU) was taken for
    'no autocast' and sent to the plain path (fp32 W ≠ bf16 x).  It is fused, and equals the plain layer."""
    layer = _fused(_layer(in_f=32, out_f=24, r=4, dtype=torch.float32))
    x = torch.randn(3, 5, 32).to(BF16).requires_grad_()
    g = torch.randn(3, 5, 24).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        y, yp = layer(x), _plain(layer)(x)
        with torch.no_grad():
            y_ng = layer(x)
    assert _used_function(y) and y.dtype == yp.dtype == y_ng.dtype == BF16
    assert _rel(y, yp) < 1e-2 and _rel(y_ng, yp) < 1e-2
    gf = torch.autograd.grad(y, [x, layer.A, layer.B], g)
    gp = torch.autograd.grad(yp, [x, layer.A, layer.B], g)
    assert all(a.dtype == b.dtype and _rel(a, b) < 2e-2 for a, b in zip(gf, gp))
    gpt = fuse(_gpt(dtype=torch.float32))
    with torch.autocast("cpu", dtype=BF16):
        h = F.gelu(torch.randn(2, 16, 32).to(BF16).requires_grad_())
        assert _used_function(gpt.blocks[0].mlp.down_proj(h))


def test_bf16_autocast_whole_model_fused_vs_plain():
    plain = _gpt(vocab=64, d=32, ff=64, dtype=torch.float32)
    model = fuse(copy.deepcopy(plain))
    idx = torch.randint(0, 64, (2, 16))

    def run(m):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            loss = F.cross_entropy(m(idx).view(-1, 64).float(), idx.view(-1))
        loss.backward()
        return loss.detach(), torch.cat([p.grad.reshape(-1) for p in lora_edu.lora_parameters(m)])

    l1, g1 = run(model)
    l2, g2 = run(plain)
    assert abs(l1 - l2).item() / l2.item() < 1e-2
    assert _rel(g1, g2) < 3e-2


# ------------------------------------------------------------------ the shared input cast
def test_input_cast_cache_unit():
    cache = InputCastCache()
    x = torch.randn(4, 8)
    assert cache.cast(x, torch.float32) is x and cache.slot is None  # nothing to cast, nothing kept
    c1 = cache.cast(x, BF16)
    assert c1.dtype == BF16 and torch.equal(c1, x.to(BF16))
    assert cache.cast(x, BF16) is c1  # q, k, v: one cast
    assert cache.cast(x, torch.float16) is not c1  # another dtype
    c2 = cache.cast(x, BF16)
    with torch.no_grad():
        assert cache.cast(x, BF16) is not c2  # another grad mode
    c3 = cache.cast(x, BF16)
    x.mul_(2.0)  # same object, new version: never reuse
    c4 = cache.cast(x, BF16)
    assert c4 is not c3 and torch.equal(c4, x.to(BF16))
    y = x.clone()
    assert cache.cast(y, BF16) is not c4  # another tensor with the same values

    # freed with its source: the cache holds the cast only while x lives
    cache.cast(x, BF16)
    cast_ref = weakref.ref(cache.slot[-1])  # the cast tensor
    del c1, c2, c3, c4, y
    assert cache.slot is not None and cast_ref() is not None
    del x
    assert cache.slot is None and cast_ref() is None


def test_qkv_share_one_cast_under_autocast():
    """q, k, v read the same x: one bf16 cast (one autograd node), and x's gradient sums all three."""
    qkv = nn.ModuleDict({n: _layer(in_f=16, out_f=16, r=4, dtype=torch.float32, seed=s) for s, n in enumerate("qkv")})
    plain = copy.deepcopy(qkv)
    fuse(qkv)
    caches = {id(layer.input_cache) for layer in qkv.values()}
    assert len(caches) == 1 and qkv["q"].input_cache is not None
    x = torch.randn(2, 5, 16, requires_grad=True)

    def run(mods):
        x.grad = None
        for layer in mods.values():
            layer.A.grad = layer.B.grad = None
        with torch.autocast("cpu", dtype=BF16):
            ys = [mods[n](x) for n in "qkv"]
            out = sum(y.float().square().sum() for y in ys)
        out.backward()
        return ys, out.detach(), x.grad.clone(), [mods[n].A.grad.clone() for n in "qkv"]

    ys, o1, gx1, gA1 = run(qkv)
    assert all(_used_function(y) for y in ys)
    cast_nodes = {id(y.grad_fn.next_functions[0][0]) for y in ys}
    assert len(cast_nodes) == 1  # the three layers read the very same bf16 tensor
    _, o2, gx2, gA2 = run(plain)
    assert _rel(o1, o2) < 2e-2 and _rel(gx1, gx2) < 3e-2
    for a, b in zip(gA1, gA2):
        assert _rel(a, b) < 3e-2

    unshared = fuse(copy.deepcopy(plain), share_input_cast=False)
    assert all(layer.input_cache is None for layer in unshared.values())
    ys, *_ = run(unshared)
    assert len({id(y.grad_fn.next_functions[0][0]) for y in ys}) == 3


def test_input_cast_not_shared_across_in_place_change():
    layer = _fused(_layer(in_f=8, out_f=8, r=2, dtype=torch.float32))
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=BF16), torch.no_grad():
        y1 = layer(x)
        x.mul_(2.0)  # same tensor object, new version: the cached cast must not be reused
        y2 = layer(x)
        ref = _plain(layer)(x)
    assert _rel(y2, ref) < 1e-2
    assert not torch.allclose(y1.float(), y2.float())


def test_input_cast_follows_requires_grad():
    layer = _fused(_layer(in_f=16, out_f=16, r=2, dtype=torch.float32))
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=BF16):
        layer(x)  # a prediction first ...
        x.requires_grad_(True)  # ... then a saliency map: ∂L/∂x
        y = layer(x)
    y.float().sum().backward()
    assert x.grad is not None


def test_inference_mode_under_autocast():
    layer = _fused(_layer(in_f=16, out_f=8, r=2, dtype=torch.float32))
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        x = torch.randn(3, 16)
        y = layer(x)
        yp = _plain(layer)(x)
    assert _rel(y, yp) < 1e-2


def test_fused_model_pickles_while_its_input_lives():
    model = fuse(nn.Sequential(_layer(in_f=16, out_f=8, r=2, dtype=torch.float32)))
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=BF16):
        model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded[0]) is FusedLoRALinear


# ------------------------------------------------------------------ the weight cache
def test_default_keeps_no_weight_cache():
    layer = _fused(_layer(in_f=16, out_f=8, r=4, dtype=torch.float32))
    assert layer.cache_weights is False
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
        assert _used_function(y)  # A and B need gradients
        with torch.no_grad():
            layer(x)
        layer.merge()
        layer(x)
    assert layer.weight_cache is None


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_default_sees_writes_through_data(which):
    """Regression (the stale-cache bug): with the default cache_weights=False a write through ``.data``,
    which bypasses the version counter, is seen by the very next forward."""
    layer = _fused(_layer(in_f=16, out_f=8, r=4, dtype=torch.float32))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=BF16):
        y_before = layer(x)
        version = getattr(layer.base, which)._version
        new = torch.randn_like(getattr(layer.base, which)) * 3
        getattr(layer.base, which).data.copy_(new)
        assert getattr(layer.base, which)._version == version  # the write the version counter does not see
        y_after = layer(x)
        fresh = _fused(copy.deepcopy(layer))
        fresh.weight_cache = None
        y_fresh = fresh(x)
        y_plain = _plain(layer)(x)
    assert torch.equal(y_after, y_fresh)
    assert not torch.allclose(y_after.float(), y_before.float())
    assert _rel(y_after, y_plain) < 1e-2


def _cached(layer):
    key, Wc, bc = layer.weight_cache
    return Wc, bc


def _check_cache_matches(layer):
    Wc, bc = _cached(layer)
    assert torch.equal(Wc, layer.weight.to(BF16))
    assert (bc is None) == (layer.bias is None)
    if bc is not None:
        assert torch.equal(bc, layer.bias.to(BF16))


def _check_output(layer, x):
    """Under autocast the cached path gives bit-for-bit what the same layer gives with no caches."""
    y = layer(x)
    saved = layer.cache_weights, layer.weight_cache, layer.input_cache
    layer.cache_weights, layer.input_cache = False, None
    try:
        y_uncached = layer(x)
        assert layer.weight_cache is saved[1]  # cache_weights=False neither reads nor writes the cache
    finally:
        layer.cache_weights, layer.weight_cache, layer.input_cache = saved
    assert torch.equal(y, y_uncached)
    return y


def test_weight_cache_reused_and_refreshed_cpu_autocast():
    layer = _fused(_layer(in_f=16, out_f=8, r=4, dtype=torch.float32), cache_weights=True)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=BF16):
        y1 = _check_output(layer, x)
        Wc, _ = _cached(layer)
        assert Wc.dtype == BF16
        _check_cache_matches(layer)
        layer(x)
        assert _cached(layer)[0] is Wc  # reused, not re-cast
        assert _rel(y1, _plain(layer)(x)) < 1e-2

        with torch.no_grad():  # in-place update (copy_): new version
            layer.base.weight.copy_(torch.randn_like(layer.base.weight))
        _check_output(layer, x)
        assert _cached(layer)[0] is not Wc
        _check_cache_matches(layer)

        Wc = _cached(layer)[0]  # an optimizer step on W
        layer.base.weight.grad = torch.randn_like(layer.base.weight)
        torch.optim.SGD([layer.base.weight], lr=0.5).step()
        _check_output(layer, x)
        assert _cached(layer)[0] is not Wc
        _check_cache_matches(layer)

        y_unmerged = layer(x)  # merge folds ΔW into W: the merged W is re-cast; unmerge restores it
        layer.merge()
        y_merged = _check_output(layer, x)
        _check_cache_matches(layer)
        layer.unmerge()
        y_again = _check_output(layer, x)
        _check_cache_matches(layer)
        assert _rel(y_merged, y_unmerged) < 1e-2 and _rel(y_again, y_unmerged) < 1e-2

        with torch.no_grad():  # the bias is part of the key too
            layer.base.bias.add_(1.0)
        _check_output(layer, x)
        _check_cache_matches(layer)

        sd = copy.deepcopy(layer.state_dict())  # load_state_dict copies in place
        with torch.no_grad():
            sd["base.weight"].normal_()
        layer.load_state_dict(sd)
        _check_output(layer, x)
        assert torch.equal(_cached(layer)[0], sd["base.weight"].to(BF16))


def test_weight_cache_refreshed_by_to():
    layer = _fused(_layer(in_f=16, out_f=8, r=4, dtype=torch.float32), cache_weights=True)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=BF16):
        layer(x)
        layer.to(torch.float16)  # new storage: new key
        _check_output(layer, x)
        _check_cache_matches(layer)
    layer.double()  # float64: no cast at all, the exact formula
    assert layer.fused_forward(x.double()) is not None
    assert _maxdiff(layer(x.double()), _plain(layer)(x.double())) < TOL64


def test_weight_cache_refreshed_by_dtype_round_trip():
    """Each trial: W[0, 0] = 1e6 becomes inf through float16; the cached bf16 W must see it (trials: allocator luck)."""
    x = torch.randn(3, 64)
    for trial in range(50):
        layer = _fused(LoRALinear(nn.Linear(64, 64, bias=False), r=2, alpha=4.0), cache_weights=True)
        with torch.no_grad():
            layer.base.weight[0, 0] = 1e6  # beyond float16's range: .half() turns it into inf
        with torch.autocast("cpu", dtype=BF16):
            layer(x)
            layer.half().float()
            assert torch.isinf(layer.weight[0, 0])
            layer(x)
        _check_cache_matches(layer)


# ------------------------------------------------------------------ fuse / unfuse
def test_fuse_unfuse_round_trip_keeps_parameters():
    model = _gpt()
    params = dict(model.named_parameters())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 31, (2, 16))
    with torch.no_grad():
        y0 = model(idx)

    fuse(model, cache_weights=True)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.state_dict().keys() == sd.keys()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        model(idx.clone())  # fill the caches

    unfuse(model)
    for _, layer in lora_edu.lora_layers(model):
        assert type(layer) is LoRALinear
        assert not {"cache_weights", "input_cache", "weight_cache"} & set(vars(layer))
    assert all(p is params[n] for n, p in model.named_parameters())
    after = model.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(idx), y0)


def test_fuse_and_unfuse_are_idempotent():
    model = _gpt()
    fuse(model)
    first = model.blocks[0].attn.q_proj.input_cache
    fuse(model, cache_weights=True, share_input_cast=False)  # again: the second call's options win
    layers = [layer for _, layer in lora_edu.lora_layers(model)]
    assert all(type(layer) is FusedLoRALinear and layer.cache_weights and layer.input_cache is None for layer in layers)
    fuse(model)
    caches = {id(layer.input_cache) for layer in layers}
    assert len(caches) == 1 and layers[0].input_cache is not first
    idx = torch.randint(0, 31, (2, 16))
    with torch.no_grad():
        y = model(idx)
    unfuse(model)
    unfuse(model)
    assert all(type(layer) is LoRALinear for _, layer in lora_edu.lora_layers(model))
    with torch.no_grad():
        assert _maxdiff(model(idx), y) < TOL64
    assert unfuse(nn.Linear(2, 2)) is not None and fuse(nn.Linear(2, 2)) is not None  # nothing to do: fine


def test_fuse_leaves_other_layers_alone():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "emb": nn.Embedding(10, 7),
        "lin": nn.Linear(7, 6),
        "conv1d": _Conv1D(7, 6),
        "untouched": nn.Linear(6, 6),
    }).double()
    lora_edu.add_lora(model, ["emb", "lin"], r=2, alpha=4)
    model["conv1d"] = LoRALinear(model["conv1d"], r=2, alpha=4, fan_in_fan_out=True)
    fuse(model)
    assert type(model["emb"]) is LoRAEmbedding
    assert type(model["conv1d"]) is LoRALinear
    assert type(model["lin"]) is FusedLoRALinear
    assert type(model["untouched"]) is nn.Linear


def test_no_module_level_state():
    """Everything lives on a model: two models fused separately share nothing, and a plain model stays plain."""
    a, b = _gpt(seed=0), _gpt(seed=1)
    fuse(a)
    fuse(b)
    ca = {id(layer.input_cache) for _, layer in lora_edu.lora_layers(a)}
    cb = {id(layer.input_cache) for _, layer in lora_edu.lora_layers(b)}
    assert len(ca) == len(cb) == 1 and not ca & cb
    plain = _gpt(seed=2)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert not _used_function(plain.blocks[0].attn.q_proj(x))
    assert _used_function(a.blocks[0].attn.q_proj(x))
    unfuse(a)
    assert _used_function(b.blocks[0].attn.q_proj(x))  # unfusing one model does not touch another
    mutable = [n for n, v in vars(fused).items()
               if not n.startswith("__") and isinstance(v, (dict, list, set, bytearray))]
    assert not mutable, f"module-level mutable state in lora_edu.speed.fused: {mutable}"


def test_deepcopy_of_a_fused_model_has_its_own_cache():
    model = fuse(_gpt())
    twin = copy.deepcopy(model)
    caches = {id(layer.input_cache) for _, layer in lora_edu.lora_layers(twin)}
    assert len(caches) == 1 and id(model.blocks[0].attn.q_proj.input_cache) not in caches


# ------------------------------------------------------------------ torch.compile: the plain formula
def test_torch_compile_fullgraph_traces_the_plain_formula():
    """With compile_op=False the fused layer runs the plain formula under torch.compile (no autograd.Function, no
    custom operator in the graph); the operator (the default) is tested in tests/test_compile.py."""
    layer = _fused(_layer(in_f=8, out_f=6, r=2), compile_op=False)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, dtype=torch.float64)
    y, grads = _grads(layer, x, compiled, g)
    yr, ref = _grads(layer, x, _plain(layer), g)
    assert _maxdiff(y, yr) < TOL64
    for a, b in zip(grads, ref):
        assert _maxdiff(a, b) < TOL64
    assert graphs and not any("autograd_function" in gm.code or "LoRALinearFunction" in gm.code or "lora_edu" in gm.code
                              for gm in graphs)


def test_torch_compile_fused_gpt_autocast_no_graph_breaks():
    import torch._dynamo as dynamo

    model = fuse(_gpt(vocab=64, d=32, ff=64, dtype=torch.float32), cache_weights=True)
    idx = torch.randint(0, 64, (2, 16))

    def loss_fn(idx):
        with torch.autocast("cpu", dtype=BF16):
            return model(idx).float().square().mean()

    loss_fn(idx)  # eager first: the caches are filled, and must not leak into the trace
    dynamo.reset()
    explanation = dynamo.explain(loss_fn)(idx)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons][:3]


# ------------------------------------------------------------------ recompute_input: the down-projection's input is not saved
def _saved_bytes(fn):
    """Bytes of distinct storages that autograd keeps for backward while fn() builds its graph."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_recompute_input_exact_and_saves_the_activation(act):
    f = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "silu": F.silu}[act]
    torch.manual_seed(0)
    up, down = _layer(in_f=8, out_f=32, r=3, seed=1), _layer(in_f=32, out_f=8, r=2, seed=2)
    x = torch.randn(5, 7, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, 8, dtype=torch.float64)
    params = [x, up.A, up.B, down.A, down.B]
    results = {}
    for recompute in (False, True):
        fuse(up, recompute_input=recompute)
        fuse(down, recompute_input=recompute)
        y, nbytes = _saved_bytes(lambda: down(f(up(x))))
        results[recompute] = (y, torch.autograd.grad(y, params, g), nbytes)
    y_ref = LoRALinear.forward(down, f(LoRALinear.forward(up, x)))
    g_ref = torch.autograd.grad(y_ref, params, g)
    (y0, g0, b0), (y1, g1, b1) = results[False], results[True]
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))  # recomputation is bit for bit
    assert _maxdiff(y1, y_ref) < TOL64 and all(_maxdiff(a, b) < TOL64 for a, b in zip(g1, g_ref))
    assert b0 - b1 == 5 * 7 * 32 * 8  # exactly the activation f(h), (5·7, 32) float64, is no longer kept


def test_recompute_input_gpt_saves_one_activation_per_block():
    model = _gpt(n_layer=2, d=16, ff=32)
    idx = torch.randint(0, 31, (3, 16))
    saved, losses = {}, {}
    for recompute in (False, True):
        fuse(model, recompute_input=recompute)
        loss, saved[recompute] = _saved_bytes(lambda: model(idx).square().mean())
        losses[recompute] = (loss, torch.autograd.grad(loss, lora_edu.lora_parameters(model)))
    assert saved[False] - saved[True] == 2 * 3 * 16 * 32 * 8  # n_layer × (B·T, d_ff) float64: the GELU outputs
    assert torch.equal(losses[False][0], losses[True][0])
    assert all(torch.equal(a, b) for a, b in zip(losses[False][1], losses[True][1]))


def test_recompute_input_leaves_other_inputs_alone_and_detects_in_place_changes():
    layer = fuse(_layer(in_f=6, out_f=4), recompute_input=True)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    for inp in (x * 2, torch.tanh(x)):  # not GELU/SiLU: x itself is saved, as without the option
        g = torch.autograd.grad(layer(inp).sum(), [layer.A])[0]
        ref = torch.autograd.grad(LoRALinear.forward(layer, inp).sum(), [layer.A])[0]
        assert _maxdiff(g, ref) < TOL64
    h = x * 1.0
    y = layer(F.gelu(h))
    with torch.no_grad():
        h.add_(1.0)  # the activation's own backward would be wrong too: autograd says so
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_cuda_fused_matches_float64_reference(bias, mode, tol):
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        layer = _layer(in_f=256, out_f=384, r=8, alpha=16.0, bias=bias, dtype=torch.float32, device="cuda")
        with torch.no_grad():
            layer.B.mul_(0.05)
        ref_layer = copy.deepcopy(layer).double()
        _fused(layer)
        x = torch.randn(4, 128, 256, device="cuda", requires_grad=True)
        g = torch.randn(4, 128, 384, device="cuda")
        ctx = torch.autocast("cuda", dtype=BF16) if mode == "bf16" else torch.autocast("cuda", enabled=False)
        with ctx:
            y = layer(x)
        assert _used_function(y)
        assert y.dtype == (BF16 if mode == "bf16" else torch.float32)
        grads = torch.autograd.grad(y, [x, layer.A, layer.B], g.to(y.dtype))
        assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
        xd = x.detach().double().requires_grad_()
        yr = ref_layer(xd)
        ref = torch.autograd.grad(yr, [xd, ref_layer.A, ref_layer.B], g.double())
        assert _rel(y, yr) < tol
        for a, b in zip(grads, ref):
            assert _rel(a, b) < tol
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_weight_cache_invalidation():
    layer = _fused(_layer(in_f=64, out_f=64, r=4, dtype=torch.float32, device="cuda"), cache_weights=True)
    x = torch.randn(8, 64, device="cuda")
    with torch.autocast("cuda", dtype=BF16):
        layer(x)
        Wc = _cached(layer)[0]
        with torch.no_grad():
            layer.base.weight.add_(0.5)
        layer(x)
        assert _cached(layer)[0] is not Wc
        layer.merge()
        layer(x)
        _check_cache_matches(layer)
        layer.unmerge()
        y = layer(x)
        _check_cache_matches(layer)
    assert _rel(y, _plain(layer)(x)) < 2e-2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_default_sees_writes_through_data():
    layer = _fused(_layer(in_f=64, out_f=64, r=4, dtype=torch.float32, device="cuda"))
    x = torch.randn(8, 64, device="cuda")
    with torch.autocast("cuda", dtype=BF16):
        y0 = layer(x)
        layer.base.weight.data.copy_(torch.randn_like(layer.base.weight))
        y1 = layer(x)
        yp = _plain(layer)(x)
    assert not torch.allclose(y0.float(), y1.float())
    assert _rel(y1, yp) < 2e-2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_weights", [False, True])
def test_cuda_gpt_bf16_fused_vs_plain(cache_weights):
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, d_model=256, d_ff=1024, bias=True)).cuda()
    lora_edu.add_lora(plain, ALL_LINEAR, r=8, alpha=16)
    with torch.no_grad():
        for _, layer in lora_edu.lora_layers(plain):
            layer.B.normal_(std=0.02)
    model = fuse(copy.deepcopy(plain), cache_weights=cache_weights)
    idx = torch.randint(0, 512, (4, 128), device="cuda")

    def run(m):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=BF16):
            loss = F.cross_entropy(m(idx).view(-1, 512).float(), idx.view(-1))
        loss.backward()
        return loss.detach(), torch.cat([p.grad.reshape(-1) for p in lora_edu.lora_parameters(m)])

    l1, g1 = run(model)
    l2, g2 = run(plain)
    assert abs(l1 - l2).item() / l2.item() < 1e-2
    assert _rel(g1, g2) < 3e-2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_recompute_input_bf16_same_gradients_less_memory():
    """bf16 autocast on the GPU: recomputing GELU(h) gives the same bits, and the step's peak memory drops."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=256, n_layer=2, n_head=4, d_model=256, d_ff=1024, bias=True)).cuda()
    lora_edu.add_lora(model, ALL_LINEAR, r=8, alpha=16)
    with torch.no_grad():
        for _, layer in lora_edu.lora_layers(model):
            layer.B.normal_(std=0.02)
    idx = torch.randint(0, 512, (8, 256), device="cuda")
    out = {}
    for recompute in (False, True):
        fuse(model, recompute_input=recompute)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=BF16):
            loss = model(idx).float().square().mean()
        grads = torch.autograd.grad(loss, lora_edu.lora_parameters(model))
        torch.cuda.synchronize()
        out[recompute] = (loss, grads, torch.cuda.max_memory_allocated())
    assert torch.equal(out[False][0], out[True][0])
    assert all(torch.equal(a, b) for a, b in zip(out[False][1], out[True][1]))
    assert out[True][2] < out[False][2]


def test_fuse_options_must_be_booleans():
    layer = LoRALinear(nn.Linear(4, 3), r=2, alpha=4)
    with pytest.raises(TypeError, match="compile_op must be True or False"):
        lora_edu.fuse(nn.Sequential(layer), compile_op="no")
    assert type(layer) is LoRALinear  # nothing was switched
