"""DoRA (lora_edu.variants.dora) against float64 oracles.

Oracles: W' = m · (W + s·B A) / ‖W + s·B A‖_c written out with explicit per-row norms
(sqrt of the sum of squares), ``torch.autograd.gradcheck`` (finite differences) for the exact
gradient, and the closed form with the norm held constant for the §4.3 (detached) gradient.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_edu
from lora_edu.variants import DoRALinear, add_dora, dora_parameters


def oracle_weight(W, A, B, scale, m):
    """m · V / ‖V‖_c, V = W + s B A, with the row norms written out: (out, in)."""
    V = W + scale * (B @ A)
    norms = torch.stack([torch.sqrt((V[i] ** 2).sum()) for i in range(V.shape[0])])  # (out,)
    return torch.stack([m[i] * V[i] / norms[i] for i in range(V.shape[0])])


def random_dora(d_in=7, d_out=5, r=3, alpha=6.0, bias=True, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(d_in, d_out, bias=bias).to(dtype), r, alpha, **kw)
    with torch.no_grad():
        layer.B.normal_()
        layer.m.mul_(torch.rand(d_out, dtype=dtype) + 0.5)
    return layer


def test_init_is_the_base_layer_and_m_is_the_row_norm_of_W():
    torch.manual_seed(0)
    base = nn.Linear(9, 4).double()
    layer = DoRALinear(copy.deepcopy(base), r=2, alpha=4)
    expected_m = torch.sqrt((base.weight**2).sum(dim=1))  # one norm per output unit (PEFT: norm over dim=1 of (out, in))
    assert layer.m.shape == (4,)
    assert torch.allclose(layer.m, expected_m, rtol=1e-15, atol=0)
    x = torch.randn(3, 9, dtype=torch.float64)
    assert torch.equal(layer(x), base(x)) or (layer(x) - base(x)).abs().max() < 1e-15
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 2 * (9 + 4) + 4  # r(in + out) + out


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_the_closed_form_in_float64(bias):
    layer = random_dora(bias=bias)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    W_prime = oracle_weight(layer.weight, layer.A, layer.B, layer.scale, layer.m)
    expected = x @ W_prime.T + (layer.bias if bias else 0)
    assert (layer(x) - expected).abs().max() < 1e-13
    assert (layer.dora_weight() - W_prime).abs().max() < 1e-14
    # the rows of W' have exactly the norms m: magnitude and direction are decoupled
    assert torch.allclose(W_prime.norm(dim=1), layer.m, rtol=1e-13)


def test_exact_gradient_passes_gradcheck():
    layer = random_dora(d_in=4, d_out=3, r=2, detach_norm=False)
    names = ["lora_A.default", "lora_B.default", "lora_magnitude.default"]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters() if n in names}
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, A, B, m):
        return torch.func.functional_call(layer, {"lora_A.default": A, "lora_B.default": B, "lora_magnitude.default": m}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-7)


def test_detached_norm_gradient_is_the_closed_form_with_the_norm_held_constant():
    layer = random_dora(d_in=4, d_out=3, r=2)  # detach_norm=True, DoRA §4.3 and PEFT
    x = torch.randn(5, 4, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    W = layer.weight
    A, B, m = (p.detach().clone().requires_grad_(True) for p in (layer.A, layer.B, layer.m))
    n0 = (W + layer.scale * (B @ A)).detach().norm(dim=1)  # the norm as a constant

    def g(A, B, m):
        return (x @ ((m / n0)[:, None] * (W + layer.scale * (B @ A))).T + layer.bias).pow(2).sum()

    gA, gB, gm = torch.autograd.grad(g(A, B, m), (A, B, m))
    assert torch.allclose(layer.A.grad, gA, rtol=1e-12, atol=1e-14)
    assert torch.allclose(layer.B.grad, gB, rtol=1e-12, atol=1e-14)
    assert torch.allclose(layer.m.grad, gm, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(g, (A, B, m), eps=1e-6, atol=1e-7)  # and that closed form is differentiated right


def test_merge_writes_W_prime_and_unmerge_restores_W_bit_for_bit():
    layer = random_dora()
    x = torch.randn(4, 7, dtype=torch.float64)
    W0 = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert (layer.weight - oracle_weight(W0, layer.A, layer.B, layer.scale, layer.m)).abs().max() < 1e-14
    assert (layer(x) - y).abs().max() < 1e-13
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, W0)
    assert layer.m.requires_grad and layer.A.requires_grad


def test_changing_m_in_place_while_merged_raises():
    layer = random_dora()
    layer.merge()
    with torch.no_grad():
        layer.m.mul_(2)
    with pytest.raises(RuntimeError, match="magnitude m .* changed in place while merged"):
        layer(torch.randn(1, 7, dtype=torch.float64))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_check_merge_equivalence_on_a_dora_model(dtype, tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(dtype)
    add_dora(model, ["0", "2"], r=4, alpha=8)
    for _, layer in lora_edu.lora_layers(model):
        with torch.no_grad():
            layer.B.normal_(std=0.3)
            layer.m.mul_(1.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = lora_edu.check_merge_equivalence(model, torch.randn(5, 8, dtype=dtype))
    assert report.passed and report.rel_error <= tol and report.n_layers == 2
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # left bit for bit as found
    assert all(p.requires_grad for p in dora_parameters(model)) and len(dora_parameters(model)) == 6


def test_merged_state_dict_round_trip_is_not_merged_twice_and_unmerges():
    layer = random_dora()
    W0 = layer.weight.detach().clone()
    layer.merge()
    fresh = random_dora(seed=1)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 7, dtype=torch.float64)
    assert fresh.merged and (fresh(x) - layer(x)).abs().max() < 1e-14
    fresh.unmerge()  # from the saved norms: W = W'·‖V‖_c/m − s·B A, one rounding away from W
    assert (fresh.weight - W0).abs().max() < 1e-14


def test_bf16_base_keeps_fp32_adapters_and_bf16_output():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=2, alpha=4)
    assert layer.A.dtype == layer.m.dtype == torch.float32
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_dropout_in_training_is_peft_form_and_in_eval_the_formula():
    layer = random_dora(dropout=0.5)
    x = torch.randn(4, 7, dtype=torch.float64)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    x_tilde = F.dropout(x, 0.5, training=True)
    W, A, B, m, s = layer.weight, layer.A, layer.B, layer.m, layer.scale
    ratio = m / (W + s * B @ A).norm(dim=1)
    expected = x @ W.T + layer.bias + (ratio - 1) * (x_tilde @ W.T) + ratio * s * (x_tilde @ A.T @ B.T)
    assert (y - expected).abs().max() < 1e-13
    layer.eval()
    assert (layer(x) - (x @ oracle_weight(W, A, B, s, m).T + layer.bias)).abs().max() < 1e-13


def test_training_moves_m_A_and_B():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    add_dora(model, ["0"], r=2, alpha=4)
    params = dora_parameters(model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(3):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    assert not model[2].weight.requires_grad


def test_add_dora_refuses_without_changing_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="DoRA is implemented for linear layers"):
        add_dora(model, ["0", "1"], r=2, alpha=4)
    lora_edu.add_lora(model, ["1"], r=2, alpha=4)
    with pytest.raises(TypeError, match="already carries plain LoRA"):
        add_dora(model, ["1"], r=2, alpha=4, adapter="d")
    assert type(model[0]) is nn.Embedding and torch.equal(model[0].weight, before["0.weight"])


def test_second_adapter_and_delete():
    layer = random_dora()
    layer.add_adapter("other", 2, 2.0)
    assert layer.active_adapter == "other" and torch.allclose(layer.m, layer.weight.norm(dim=1))
    assert not layer.lora_magnitude["default"].requires_grad and layer.lora_magnitude["other"].requires_grad
    layer.delete_adapter("other")
    assert "other" not in layer.lora_magnitude


def test_native_file_round_trip_and_strict_reading(tmp_path):
    import safetensors.torch

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model = add_dora(copy.deepcopy(base), ["0", "2"], r=2, alpha=4)
    for _, layer in lora_edu.lora_layers(model):
        with torch.no_grad():
            layer.B.normal_()
            layer.m.mul_(1.5)
    path = lora_edu.save_adapter(model, tmp_path / "dora.safetensors")
    assert lora_edu.read_adapter_config(path)["layers"]["0"]["type"] == "DoRALinear"
    loaded = lora_edu.load_adapter(copy.deepcopy(base), path)
    x = torch.randn(4, 6)
    assert isinstance(loaded[0], DoRALinear) and torch.equal(loaded(x), model(x))
    # a DoRA file without its m is refused, and so is an m of the wrong shape
    tensors = safetensors.torch.load_file(path)
    meta = safetensors.safe_open(str(path), "pt").metadata()
    for edit, match in [("drop", "needs its magnitude tensor"), ("shape", r"must be a finite float vector of shape \(6,\)")]:
        t = dict(tensors)
        if edit == "drop":
            del t["0.lora_magnitude"]
        else:
            t["0.lora_magnitude"] = torch.ones(5)
        bad = tmp_path / f"{edit}.safetensors"
        safetensors.torch.save_file(t, bad, metadata=meta)
        target = copy.deepcopy(base)
        with pytest.raises(lora_edu.AdapterFileError, match=match):
            lora_edu.load_adapter(target, bad)
        assert type(target[0]) is nn.Linear


def test_add_lora_on_a_dora_layer_is_refused_like_add_dora_on_a_lora_layer():
    torch.manual_seed(0)
    model = add_dora(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double(), ["0"], r=2, alpha=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"'0' already carries DoRA adapters \['default'\]; DoRA and LoRA adapters cannot share a layer"):
        lora_edu.add_lora(model, ["0", "2"], r=2, alpha=4, adapter="plain")  # "2" would have been wrapped first
    assert type(model[2]) is nn.Linear and list(model[0].adapters) == ["default"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    plain = lora_edu.add_lora(nn.Sequential(nn.Linear(6, 5)).double(), ["0"], r=2, alpha=4)
    with pytest.raises(TypeError, match="already carries plain LoRA adapters"):  # the message it mirrors
        add_dora(plain, ["0"], r=2, alpha=4, adapter="d")


def test_second_adapter_with_another_detach_norm_is_refused():
    model = nn.Sequential(nn.Linear(6, 5))
    add_dora(model, ["0"], r=2, alpha=4)
    with pytest.raises(ValueError, match="detach_norm=True, a setting of the layer shared by all its adapters"):
        add_dora(model, ["0"], r=2, alpha=4, adapter="b", detach_norm=False)
    assert list(model[0].adapters) == ["default"]
