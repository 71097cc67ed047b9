"""LoRALinear / LoRAEmbedding against closed-form oracles in float64."""
import math

import pytest
import torch
import torch.nn as nn

import lora_edu as L

torch.set_default_dtype(torch.float32)


def make_linear(i=12, o=7, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).to(dtype)


def randomize_B(layer, std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.B.copy_(torch.randn(layer.B.shape, generator=g, dtype=torch.float64) * std)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_closed_form_float64(bias, rslora):
    base = make_linear(bias=bias)
    layer = L.LoRALinear(base, r=3, alpha=5.0, rslora=rslora)
    randomize_B(layer)
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    W, b = base.weight, base.bias
    s = 5.0 / math.sqrt(3) if rslora else 5.0 / 3
    oracle = x @ W.T + (b if bias else 0) + s * (x @ layer.A.T @ layer.B.T)
    torch.testing.assert_close(layer(x), oracle, rtol=0, atol=1e-12)
    assert layer.scale == pytest.approx(s)


def test_shapes_init_and_freezing():
    base = make_linear(20, 9)
    layer = L.LoRALinear(base, r=4, alpha=8)
    assert layer.A.shape == (4, 20) and layer.B.shape == (9, 4)
    assert torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(20)  # kaiming_uniform_(a=√5) with fan_in = in_features
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.5 * bound
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.A.requires_grad and layer.B.requires_grad
    torch.testing.assert_close(layer.delta_weight(), torch.zeros(9, 20, dtype=torch.float64))


def test_identity_at_init_exact():
    base = make_linear()
    x = torch.randn(3, 12, dtype=torch.float64)
    y0 = base(x)
    layer = L.LoRALinear(base, r=2, alpha=16)
    assert torch.equal(layer(x), y0)


def test_step0_gradients_A_zero_B_nonzero():
    layer = L.LoRALinear(make_linear(), r=4, alpha=4)
    x = torch.randn(6, 12, dtype=torch.float64)
    target = torch.randn(6, 7, dtype=torch.float64)
    loss = ((layer(x) - target) ** 2).mean()
    loss.backward()
    assert torch.count_nonzero(layer.A.grad) == 0  # ∂L/∂A = s Bᵀ (…) = 0 because B = 0
    assert layer.B.grad.abs().max() > 1e-6
    # closed form: ∂L/∂B = s · gᵀ (x Aᵀ) with g = ∂L/∂y
    g = 2 * (layer(x) - target) / target.numel()
    torch.testing.assert_close(layer.B.grad, layer.scale * g.T @ (x @ layer.A.T), rtol=0, atol=1e-12)


def test_delta_weight_is_scaled_BA():
    layer = L.LoRALinear(make_linear(), r=3, alpha=2.5)
    randomize_B(layer)
    torch.testing.assert_close(layer.delta_weight(), (2.5 / 3) * layer.B @ layer.A, rtol=0, atol=1e-15)
    # and it is what the forward adds: W x + ΔW x
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T, rtol=0, atol=1e-12)


def test_merge_unmerge_float64():
    layer = L.LoRALinear(make_linear(), r=3, alpha=3)
    randomize_B(layer)
    W0 = layer.base.weight.clone()
    x = torch.randn(8, 12, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-13)
    torch.testing.assert_close(layer.base.weight, W0 + layer.delta_weight(), rtol=0, atol=1e-15)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-15)
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        layer.unmerge()


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = L.LoRALinear(make_linear(), r=4, alpha=4, dropout=0.5)
    randomize_B(layer)
    x = torch.randn(64, 12, dtype=torch.float64)
    layer.eval()
    oracle = layer.base(x) + layer.scale * x @ layer.A.T @ layer.B.T
    torch.testing.assert_close(layer(x), oracle, rtol=0, atol=1e-12)
    layer.train()
    assert not torch.allclose(layer(x), oracle)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(r=0, alpha=1), ValueError, "r must be a positive int"),
        (dict(r=-3, alpha=1), ValueError, "r must be a positive int"),
        (dict(r=2.5, alpha=1), TypeError, "r must be a positive int"),
        (dict(r=4.0, alpha=1), TypeError, "pass r=4"),
        (dict(r=True, alpha=1), TypeError, "r must be a positive int"),
        (dict(r=4, alpha=0), ValueError, "alpha must be > 0"),
        (dict(r=4, alpha=-1.0), ValueError, "alpha must be > 0"),
        (dict(r=4, alpha=float("nan")), TypeError, "alpha must be a finite"),
        (dict(r=4, alpha=1, dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\)"),
        (dict(r=4, alpha=1, dropout=-0.1), ValueError, "dropout must be a probability"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        L.LoRALinear(make_linear(), **kwargs)


def test_wrong_base_type():
    with pytest.raises(TypeError, match="LoRALinear wraps a linear layer with a 2-D weight, got Conv2d"):
        L.LoRALinear(nn.Conv2d(3, 3, 1), r=2, alpha=2)


def test_low_precision_base_gets_float32_adapters():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = L.LoRALinear(base, r=2, alpha=2)
    assert layer.A.dtype == torch.float32 and layer.B.dtype == torch.float32
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_embedding_convention_and_oracle():
    torch.manual_seed(0)
    base = nn.Embedding(30, 6).double()
    layer = L.LoRAEmbedding(base, r=3, alpha=6)
    assert layer.A.shape == (3, 30) and layer.B.shape == (6, 3)
    assert torch.count_nonzero(layer.A) == 0 and torch.count_nonzero(layer.B) > 0
    ids = torch.randint(0, 30, (4, 5))
    assert torch.equal(layer(ids), base(ids))  # no-op at init
    with torch.no_grad():
        layer.A.normal_()
    dE = layer.delta_weight()
    assert dE.shape == (30, 6)
    torch.testing.assert_close(dE, 2.0 * (layer.B @ layer.A).T, rtol=0, atol=1e-13)
    torch.testing.assert_close(layer(ids), (base.weight + dE)[ids], rtol=0, atol=1e-12)
    y = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), y, rtol=0, atol=1e-12)
    layer.unmerge()


def test_to_device_and_dtype_after_injection():
    layer = L.LoRALinear(make_linear(dtype=torch.float32), r=2, alpha=2)
    layer = layer.to(torch.float64)
    assert layer.A.dtype == torch.float64 and layer.base.weight.dtype == torch.float64
    assert layer(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu_float64():
    layer = L.LoRALinear(make_linear(), r=3, alpha=3)
    randomize_B(layer)
    x = torch.randn(4, 12, dtype=torch.float64)
    y_cpu = layer(x)
    layer = layer.cuda()
    assert layer.A.is_cuda
    torch.testing.assert_close(layer(x.cuda()).cpu(), y_cpu, rtol=0, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x.cuda()).cpu(), y_cpu, rtol=0, atol=1e-12)
