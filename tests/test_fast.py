"""The fast path of LoRALinear (lora_edu.fast) computes exactly the readable formula.

CPU, float64: outputs and the gradients of x, A and B equal ``reference_forward`` to 1e-12.
CUDA (``-m cuda``, skipped without a GPU), against a float64 reference:
float32 (TF32 off) relative error < 1e-5; bf16 autocast relative error < 2e-2
(bf16 keeps 8 significant bits: single products land near 4e-3, sums of 10³ terms
a few times that).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_edu
from lora_edu import fast
from lora_edu.fast import LoRALinearFunction, use_fast_path
from lora_edu.layers import LoRALinear

TOL64 = 1e-12
CUDA = torch.cuda.is_available()


def _layer(in_f=7, out_f=6, r=3, alpha=5.0, bias=True, dtype=torch.float64, device="cpu", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(device=device, dtype=dtype)
    layer = LoRALinear(lin, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        layer.B.normal_()  # B = 0 at init would hide every mistake in the B path
    return layer


def _used_fast(y):
    return type(y.grad_fn).__name__.startswith(LoRALinearFunction.__name__)


def _grads(layer, x, fn, g):
    y = fn(x)
    params = [x, layer.A, layer.B]
    return y, torch.autograd.grad(y, params, g)


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7), (2, 3, 2, 7)])
def test_fast_equals_reference_float64(bias, shape):
    layer = _layer(bias=bias)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:-1], 6, dtype=torch.float64)
    y, grads = _grads(layer, x, layer, g)
    assert _used_fast(y)
    yr, ref = _grads(layer, x, layer.reference_forward, g)
    assert y.shape == yr.shape
    assert _maxdiff(y, yr) < TOL64
    for a, b in zip(grads, ref):
        assert a.shape == b.shape and _maxdiff(a, b) < TOL64


def test_fast_equals_general_path_float64():
    layer = _layer()
    x = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 5, 6, dtype=torch.float64)
    y, grads = _grads(layer, x, layer, g)
    with use_fast_path(False):
        yg, ref = _grads(layer, x, layer, g)
    assert not _used_fast(yg)
    assert _maxdiff(y, yg) < TOL64
    for a, b in zip(grads, ref):
        assert _maxdiff(a, b) < TOL64


def test_only_needed_grads():
    """x without grad (first layer): A and B still learn; frozen adapters: only x gets a gradient."""
    layer = _layer()
    x = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(5, 6, dtype=torch.float64)
    y = layer(x)
    assert _used_fast(y)
    gA, gB = torch.autograd.grad(y, [layer.A, layer.B], g)
    rA, rB = torch.autograd.grad(layer.reference_forward(x), [layer.A, layer.B], g)
    assert _maxdiff(gA, rA) < TOL64 and _maxdiff(gB, rB) < TOL64

    layer.A.requires_grad_(False)
    layer.B.requires_grad_(False)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(layer(x), [x], g)
    (rx,) = torch.autograd.grad(layer.reference_forward(x), [x], g)
    assert _maxdiff(gx, rx) < TOL64


def test_no_grad_inference_path():
    layer = _layer()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None and _maxdiff(y, layer.reference_forward(x)) < TOL64
    with torch.inference_mode():
        assert _maxdiff(layer(x), layer.reference_forward(x)) < TOL64


def test_dropout_train_uses_general_path_and_eval_uses_fast():
    layer = _layer(dropout=0.3)
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    assert not _used_fast(y)
    torch.manual_seed(7)
    assert _maxdiff(y, layer.reference_forward(x)) < TOL64  # same mask under the same seed
    layer.eval()
    y = layer(x)
    assert _used_fast(y)
    assert _maxdiff(y, layer.reference_forward(x)) < TOL64


def test_merged_disabled_and_no_adapter_paths():
    layer = _layer()
    x = torch.randn(5, 7, dtype=torch.float64)
    y_unmerged = layer(x)
    layer.merge()
    y_merged = layer(x)
    assert _maxdiff(y_merged, y_unmerged) < TOL64
    assert _maxdiff(y_merged, layer.reference_forward(x)) < TOL64
    layer.unmerge()
    assert _maxdiff(layer(x), y_unmerged) < TOL64

    layer.disabled = True
    assert _maxdiff(layer(x), layer.base(x)) == 0.0
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)  # disabled + merged: the general path's error, not a silent base-with-ΔW
    layer.unmerge()
    layer.disabled = False

    layer.set_adapter(None)
    assert _maxdiff(layer(x), layer.base(x)) == 0.0


def test_multiple_adapters_use_the_active_one():
    layer = _layer()
    layer.add_adapter("second", r=2, alpha=3.0)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert _used_fast(y)
    assert _maxdiff(y, layer.reference_forward(x)) < TOL64
    y.sum().backward()
    assert layer.lora_A["default"].grad is None and layer.lora_A["second"].grad is not None


def test_trainable_base_weight_falls_back():
    layer = _layer()
    layer.base.weight.requires_grad_(True)
    x = torch.randn(5, 7, dtype=torch.float64)
    y = layer(x)
    assert not _used_fast(y)
    y.sum().backward()
    assert layer.base.weight.grad is not None


def test_whole_model_float64_fast_equals_general():
    from lora_edu.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32, bias=True)).double()
    lora_edu.add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for _, l in lora_edu.lora_layers(model):
            l.B.normal_(std=0.1)
    idx = torch.randint(0, 31, (3, 16))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(idx).view(-1, 31), idx.view(-1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora_edu.lora_parameters(model)]

    l1, g1 = loss_and_grads()
    with use_fast_path(False):
        l2, g2 = loss_and_grads()
    assert abs(l1 - l2).item() < TOL64
    for a, b in zip(g1, g2):
        assert _maxdiff(a, b) < TOL64


# ------------------------------------------------------------------ caches (CPU autocast → bf16)
def test_weight_cache_invalidation_cpu_autocast():
    layer = _layer(in_f=16, out_f=8, r=4, dtype=torch.float32)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = layer(x)
        key, Wc, bc = layer.__dict__[fast._CACHE_ATTR]
        assert Wc.dtype == torch.bfloat16 and torch.equal(Wc, layer.base.weight.to(torch.bfloat16))
        layer(x)
        assert layer.__dict__[fast._CACHE_ATTR][1] is Wc  # reused, not re-cast
        ref1 = F.linear(x, layer.base.weight, layer.base.bias).float() + layer.lora_forward(x).float()
        assert ((y1.float() - ref1).norm() / ref1.norm()).item() < 2e-2

        # in-place weight update (an optimizer step, load_state_dict, copy_) invalidates it
        with torch.no_grad():
            layer.base.weight.mul_(-1.0)
        y2 = layer(x)
        assert layer.__dict__[fast._CACHE_ATTR][1] is not Wc
        assert torch.equal(layer.__dict__[fast._CACHE_ATTR][1], layer.base.weight.to(torch.bfloat16))
        ref2 = F.linear(x, layer.base.weight, layer.base.bias).float() + layer.lora_forward(x).float()
        assert ((y2.float() - ref2).norm() / ref2.norm()).item() < 2e-2

        # merge folds ΔW into W: the merged W is re-cast (merged inference is one GEMM with the cached merged W);
        # after unmerge the cache is rebuilt from the restored W
        layer.merge()
        ym = layer(x)
        assert torch.equal(layer.__dict__[fast._CACHE_ATTR][1], layer.base.weight.to(torch.bfloat16))
        layer.unmerge()
        yu = layer(x)
        Wc_after = layer.__dict__[fast._CACHE_ATTR][1]
        assert torch.equal(Wc_after, layer.base.weight.to(torch.bfloat16))
        assert ((yu.float() - y2.float()).norm() / y2.float().norm()).item() < 2e-2
        assert ((ym.float() - y2.float()).norm() / y2.float().norm()).item() < 2e-2

        # a bias update invalidates it too
        with torch.no_grad():
            layer.base.bias.add_(1.0)
        layer(x)
        assert torch.equal(layer.__dict__[fast._CACHE_ATTR][2], layer.base.bias.to(torch.bfloat16))
    assert fast.clear_weight_cache(layer) == 1


def test_weight_cache_invalidated_by_to_and_state_dict():
    layer = _layer(in_f=16, out_f=8, r=4, dtype=torch.float32)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        sd = copy.deepcopy(layer.state_dict())
        with torch.no_grad():
            sd["base.weight"].normal_()
        layer.load_state_dict(sd)
        layer(x)
        assert torch.equal(layer.__dict__[fast._CACHE_ATTR][1], sd["base.weight"].to(torch.bfloat16))
    layer.double()  # .to(): new storage, new key
    y = layer(x.double())
    assert _maxdiff(y, layer.reference_forward(x.double())) < TOL64


def test_shared_input_cast_under_autocast_matches_general_path():
    """q, k, v read the same x: one bf16 cast is shared, and x's gradient sums all three."""
    torch.manual_seed(0)
    layers = [_layer(in_f=16, out_f=16, r=4, dtype=torch.float32, seed=s) for s in range(3)]
    x = torch.randn(2, 5, 16, requires_grad=True)

    def run():
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sum(l(x).float().square().sum() for l in layers)
        out.backward()
        return out.detach(), x.grad.clone(), [l.A.grad.clone() for l in layers]

    for l in layers:
        l.A.grad = l.B.grad = None
    o1, gx1, gA1 = run()
    for l in layers:
        l.A.grad = l.B.grad = None
    with use_fast_path(False):
        o2, gx2, gA2 = run()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(o1, o2) < 2e-2 and rel(gx1, gx2) < 3e-2
    for a, b in zip(gA1, gA2):
        assert rel(a, b) < 3e-2


def test_input_cast_not_shared_across_in_place_change():
    layer = _layer(in_f=8, out_f=8, r=2, dtype=torch.float32)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y1 = layer(x)
        x.mul_(2.0)  # same tensor object, new version: the cached cast must not be reused
        y2 = layer(x)
    ref = F.linear(x, layer.base.weight, layer.base.bias) + layer.lora_forward(x)
    assert ((y2.float() - ref).norm() / ref.norm()).item() < 2e-2
    assert not torch.allclose(y1.float(), y2.float())


def test_torch_compile_fullgraph():
    """No graph breaks: the fast path traces under torch.compile (aot_eager: no C++ compiler needed)."""
    layer = _layer(in_f=8, out_f=6, r=2)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    g = torch.randn(4, 6, dtype=torch.float64)
    y, grads = _grads(layer, x, compiled, g)
    yr, ref = _grads(layer, x, layer.reference_forward, g)
    assert _maxdiff(y, yr) < TOL64
    for a, b in zip(grads, ref):
        assert _maxdiff(a, b) < TOL64


def test_torch_compile_gpt_autocast_no_graph_breaks():
    """A whole LoRA GPT under bf16 autocast compiles into one graph (the caches step aside under compile)."""
    import torch._dynamo as dynamo

    from lora_edu.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, bias=True))
    lora_edu.add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4, alpha=8)
    idx = torch.randint(0, 64, (2, 16))

    def loss_fn(idx):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(idx).float().square().mean()

    dynamo.reset()
    explanation = dynamo.explain(loss_fn)(idx)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons][:3]


# ------------------------------------------------------------------ CUDA
def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_cuda_fast_matches_float64_reference(bias, mode, tol):
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        layer = _layer(in_f=256, out_f=384, r=8, alpha=16.0, bias=bias, dtype=torch.float32, device="cuda")
        with torch.no_grad():
            layer.B.mul_(0.05)
        ref_layer = copy.deepcopy(layer).double()
        x = torch.randn(4, 128, 256, device="cuda", requires_grad=True)
        g = torch.randn(4, 128, 384, device="cuda")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16" else torch.autocast("cuda", enabled=False)
        with ctx:
            y = layer(x)
        assert _used_fast(y)
        assert y.dtype == (torch.bfloat16 if mode == "bf16" else torch.float32)
        grads = torch.autograd.grad(y, [x, layer.A, layer.B], g.to(y.dtype))
        assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
        xd = x.detach().double().requires_grad_()
        yr = ref_layer.reference_forward(xd)
        ref = torch.autograd.grad(yr, [xd, ref_layer.A, ref_layer.B], g.double())
        assert _rel(y, yr) < tol
        for a, b in zip(grads, ref):
            assert _rel(a, b) < tol
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_weight_cache_invalidation():
    layer = _layer(in_f=64, out_f=64, r=4, dtype=torch.float32, device="cuda")
    x = torch.randn(8, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x)
        Wc = layer.__dict__[fast._CACHE_ATTR][1]
        with torch.no_grad():
            layer.base.weight.add_(0.5)
        layer(x)
        assert layer.__dict__[fast._CACHE_ATTR][1] is not Wc
        layer.merge()
        layer(x)
        layer.unmerge()
        y = layer(x)
        assert torch.equal(layer.__dict__[fast._CACHE_ATTR][1], layer.base.weight.to(torch.bfloat16))
    ref = layer.reference_forward(x)
    assert _rel(y, ref) < 2e-2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_gpt_bf16_fast_vs_general():
    from lora_edu.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, d_model=256, d_ff=1024, bias=True)).cuda()
    lora_edu.add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=8, alpha=16)
    with torch.no_grad():
        for _, l in lora_edu.lora_layers(model):
            l.B.normal_(std=0.02)
    idx = torch.randint(0, 512, (4, 128), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(idx).view(-1, 512).float(), idx.view(-1))
        loss.backward()
        return loss.detach(), torch.cat([p.grad.reshape(-1) for p in lora_edu.lora_parameters(model)])

    l1, g1 = run()
    with use_fast_path(False):
        l2, g2 = run()
    assert abs(l1 - l2).item() / l2.item() < 1e-2
    assert _rel(g1, g2) < 3e-2
