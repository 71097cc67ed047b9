"""``torch.compile`` of a fused model: with ``fuse(model, compile_op=True)`` the layer calls ``torch.ops.lora_edu.lora_linear``.

Checked here on CPU: the operator's schema, fake (meta) implementation and autograd
registration (``torch.library.opcheck``); the compiled layer and a compiled GPT equal the
eager plain formula (float64 to 1e-12 with the ``aot_eager`` backend, float32 and
float64 with Inductor), gradients too; ``fullgraph=True`` (no graph break) also under bf16
autocast; and the default ``compile_op=False`` traces the plain formula instead.  CUDA tests (bf16,
Inductor) run on the lent GPU.
"""
import pytest
import torch
import torch.nn as nn

import lora_edu
from lora_edu.core.layers import LoRALinear
from lora_edu.lab.models import GPT, GPTConfig
from lora_edu.speed.fused import lora_linear_op

CUDA = torch.cuda.is_available()
BF16 = torch.bfloat16
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _layer(in_f=8, out_f=6, r=2, bias=True, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias).to(device, dtype), r=r, alpha=2 * r + 1)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def _gpt(dtype=torch.float64, device="cpu", vocab=64, d=32, ff=64, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, d_model=d, d_ff=ff, bias=True)).to(device, dtype)
    lora_edu.add_lora(model, ALL_LINEAR, r=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora_edu.lora_layers(model):
            layer.B.normal_(std=0.1)
    return model


def _capture():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd  # AOT autograd: the backward is traced too

        boxed = lambda g, _: make_boxed_func(g.forward)
        return aot_autograd(fw_compiler=boxed, bw_compiler=boxed)(gm, example_inputs)

    return graphs, backend


def _maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _loss_and_grads(model, fn, idx):
    params = lora_edu.lora_parameters(model)
    loss = fn(idx).square().mean()
    return loss, torch.autograd.grad(loss, params)


# ------------------------------------------------------------------ the operator itself
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(bias, dtype):
    """Schema, fake tensor, autograd registration and AOT dispatch, as torch.library checks them."""
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    W, b = torch.randn(6, 8, dtype=dtype), (torch.randn(6, dtype=dtype) if bias else None)
    A = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    B = torch.randn(6, 3, dtype=dtype, requires_grad=True)
    torch.library.opcheck(lora_linear_op, (x, W, b, A, B, 1.5))
    torch.library.opcheck(torch.ops.lora_edu.lora_linear_backward.default,
                          (torch.randn(5, 6, dtype=dtype), x.detach(), torch.randn(5, 3, dtype=dtype), W, A.detach(), B.detach(),
                           1.5, True, True, True))


def test_op_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear_op(x, W, b, A, B, 0.7)[0], (x, A, B))


# ------------------------------------------------------------------ compiled layer and model
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_compiled_layer_uses_the_op_and_equals_the_formula_float64(bias, x_grad):
    layer = lora_edu.fuse(_layer(bias=bias), compile_op=True)
    graphs, backend = _capture()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=x_grad)
    g = torch.randn(3, 4, 6, dtype=torch.float64)
    inputs = [x, layer.A, layer.B] if x_grad else [layer.A, layer.B]
    y = compiled(x)
    grads = torch.autograd.grad(y, inputs, g)
    yr = LoRALinear.forward(layer, x)
    ref = torch.autograd.grad(yr, inputs, g)
    assert _maxdiff(y, yr) < 1e-12
    assert all(_maxdiff(a, b) < 1e-12 for a, b in zip(grads, ref))
    assert graphs and any("lora_edu.lora_linear" in gm.code for gm in graphs)


@pytest.mark.parametrize("kwargs", [{}, {"compile_op": False}])
def test_default_traces_the_plain_formula(kwargs):
    layer = lora_edu.fuse(_layer(), **kwargs)
    graphs, backend = _capture()
    torch._dynamo.reset()
    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(2, 8, dtype=torch.float64))
    assert graphs and not any("lora_edu" in gm.code for gm in graphs)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_compiled_gpt_aot_eager_matches_eager(dtype, tol):
    model = lora_edu.fuse(_gpt(dtype=dtype), compile_op=True)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, g_c = _loss_and_grads(model, compiled, idx)
    lora_edu.unfuse(model)
    loss_e, g_e = _loss_and_grads(model, model, idx)  # the plain LoRALinear, eager
    assert abs(loss_c.item() - loss_e.item()) <= tol * abs(loss_e.item())
    assert max(_maxdiff(a, b) / b.abs().max().item() for a, b in zip(g_c, g_e)) < tol * 10


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_compiled_gpt_inductor_matches_eager(dtype, tol):
    """Inductor (C++ on CPU): the loss and every LoRA gradient agree with the eager plain formula."""
    model = lora_edu.fuse(_gpt(dtype=dtype), compile_op=True)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss_c, g_c = _loss_and_grads(model, compiled, idx)
    loss_c2, _ = _loss_and_grads(model, compiled, idx)  # second call: no recompilation problem, same value
    lora_edu.unfuse(model)
    loss_e, g_e = _loss_and_grads(model, model, idx)
    assert abs(loss_c.item() - loss_e.item()) <= tol * abs(loss_e.item()) and loss_c2.item() == loss_c.item()
    rel = max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(g_c, g_e))
    assert rel < tol, rel


def test_no_graph_breaks_under_bf16_autocast_and_inference():
    import torch._dynamo as dynamo

    model = lora_edu.fuse(_gpt(dtype=torch.float32), cache_weights=True, compile_op=True)
    idx = torch.randint(0, 64, (2, 16))

    def train_loss(idx):
        with torch.autocast("cpu", dtype=BF16):
            return model(idx).float().square().mean()

    @torch.no_grad()
    def infer(idx):
        with torch.autocast("cpu", dtype=BF16):
            return model(idx)

    train_loss(idx)  # eager first: caches filled, must not leak into the trace
    for fn in (train_loss, infer):
        dynamo.reset()
        explanation = dynamo.explain(fn)(idx)
        assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons][:3]
        assert any("lora_edu.lora_linear" in str(gm.code) for gm in explanation.graphs)


def test_compiled_bf16_autocast_close_to_eager_fused():
    model = lora_edu.fuse(_gpt(dtype=torch.float32), compile_op=True)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))

    def loss_fn(m):
        def f(idx):
            with torch.autocast("cpu", dtype=BF16):
                return m(idx).float()
        return f

    torch._dynamo.reset()
    loss_c, g_c = _loss_and_grads(model, loss_fn(torch.compile(model, backend="aot_eager", fullgraph=True)), idx)
    loss_e, g_e = _loss_and_grads(model, loss_fn(model), idx)
    assert abs(loss_c.item() - loss_e.item()) < 1e-2 * abs(loss_e.item())
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(g_c, g_e))
    assert rel < 3e-2, rel


def test_merged_and_disabled_under_compile_are_the_base():
    model = lora_edu.fuse(_gpt())
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        with lora_edu.disable_lora(model):
            torch._dynamo.reset()
            ref = model(idx)
            assert _maxdiff(torch.compile(model, backend="aot_eager")(idx), ref) < 1e-12
        lora_edu.merge_lora(model)
        torch._dynamo.reset()
        merged = model(idx)
        assert _maxdiff(torch.compile(model, backend="aot_eager")(idx), merged) < 1e-12


# ------------------------------------------------------------------ CUDA (run on the lent GPU)
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_op", [True, False])
def test_cuda_compiled_bf16_matches_eager_fused(compile_op):
    """Inductor on the GPU, bf16 autocast: loss to 1e-2, LoRA gradients to 3e-2 relative (bf16 roundings in another order)."""
    model = lora_edu.fuse(_gpt(dtype=torch.float32, device="cuda", vocab=256, d=128, ff=512), compile_op=compile_op)
    idx = torch.randint(0, 256, (4, 16), device="cuda")

    def f(m):
        def loss(idx):
            with torch.autocast("cuda", dtype=BF16):
                return m(idx).float()
        return loss

    torch._dynamo.reset()
    loss_c, g_c = _loss_and_grads(model, f(torch.compile(model, fullgraph=True)), idx)
    loss_e, g_e = _loss_and_grads(model, f(model), idx)
    assert abs(loss_c.item() - loss_e.item()) < 1e-2 * abs(loss_e.item())
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(g_c, g_e))
    assert rel < 3e-2, rel


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_op_float32_matches_float64_reference():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        layer = lora_edu.fuse(_layer(in_f=256, out_f=384, r=8, dtype=torch.float32, device="cuda"), compile_op=True)
        x = torch.randn(512, 256, device="cuda", requires_grad=True)
        torch._dynamo.reset()
        y = torch.compile(layer, fullgraph=True)(x)
        ref = LoRALinear.forward(layer.double(), x.double())
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
