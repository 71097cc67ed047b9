"""PiSSA init (lora_edu.variants.pissa) against float64 oracles.

Oracles: the SVD definition (W_res + s·B A = W; W_res's singular values are σ_{r+1}, …; B A spans
the top-r singular subspace), and the conversion ΔW_total = s(B A − B₀ A₀) in float64.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

import lora_edu
from lora_edu.variants import add_dora, add_pissa, add_qlora, apply_converted, pissa_factors, pissa_init, pissa_to_lora


def test_factors_are_the_top_r_singular_triplets_in_float64():
    torch.manual_seed(0)
    W = torch.randn(12, 9, dtype=torch.float64)
    r, s = 3, 2.5
    A, B, W_res = pissa_factors(W, r, s)
    assert A.shape == (3, 9) and B.shape == (12, 3)
    assert (W_res + s * B @ A - W).abs().max() < 1e-13  # the model is unchanged at init
    S = torch.linalg.svdvals(W)
    assert torch.allclose(torch.linalg.svdvals(W_res)[: 9 - r], S[r:], atol=1e-12)  # the residual keeps the rest
    assert torch.allclose(torch.linalg.svdvals(s * B @ A)[:r], S[:r], atol=1e-12)  # the adapter takes the top r
    # √(σ/s) split evenly: A Aᵀ = Bᵀ B = diag(σ_r / s)
    assert torch.allclose(A @ A.T, torch.diag(S[:r] / s), atol=1e-12)
    assert torch.allclose(B.T @ B, torch.diag(S[:r] / s), atol=1e-12)


def test_float32_weights_take_the_svd_in_float32_like_peft():
    W = torch.randn(6, 5)
    A, B, W_res = pissa_factors(W, 2, 1.0)
    assert A.dtype == B.dtype == W_res.dtype == torch.float32
    with pytest.raises(ValueError, match="0 < r"):
        pissa_factors(W, 6, 1.0)


def test_add_pissa_leaves_the_function_unchanged_and_replaces_W():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    model = add_pissa(copy.deepcopy(base), ["0", "2"], r=3, alpha=6)
    x = torch.randn(5, 10, dtype=torch.float64)
    assert (model(x) - base(x)).abs().max() < 1e-13
    assert not torch.equal(model[0].base.weight, base[0].weight)  # the base changed: W_res
    assert model[0].B.abs().sum() > 0 and model[0].A.requires_grad and model[0].B.requires_grad


@pytest.mark.parametrize("rslora", [False, True])
def test_conversion_to_plain_lora_on_the_original_base_matches_the_float64_oracle(rslora):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    model = add_pissa(copy.deepcopy(base), ["0", "2"], r=3, alpha=6, rslora=rslora)
    initial = {n: (layer.A.detach().clone(), layer.B.detach().clone()) for n, layer in lora_edu.lora_layers(model)}
    with torch.no_grad():  # "training": move both factors
        for _, layer in lora_edu.lora_layers(model):
            layer.A.add_(0.1 * torch.randn_like(layer.A))
            layer.B.add_(0.1 * torch.randn_like(layer.B))
    conv = pissa_to_lora(model)
    assert conv.r == 6 and math.isclose(conv.alpha, 6 * math.sqrt(2) if rslora else 12)
    for n, layer in lora_edu.lora_layers(model):
        A0, B0 = initial[n]
        A2, B2 = conv.factors[n]
        oracle = layer.scale * (layer.B @ layer.A - B0 @ A0)  # s(B A − B₀ A₀), float64
        s2 = conv.alpha / (math.sqrt(conv.r) if rslora else conv.r)
        assert (s2 * B2 @ A2 - oracle).abs().max() < 1e-13
    plain = apply_converted(copy.deepcopy(base), conv)  # the original W plus the converted adapter
    x = torch.randn(5, 10, dtype=torch.float64)
    assert (plain(x) - model(x)).abs().max() < 1e-12
    assert all(type(layer) is lora_edu.LoRALinear for _, layer in lora_edu.lora_layers(plain))


def test_conversion_needs_the_initial_factors_and_refuses_other_layers():
    torch.manual_seed(0)
    model = lora_edu.add_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2, alpha=2)
    with pytest.raises(ValueError, match="not initialised with pissa_init"):
        pissa_to_lora(model)
    dora = add_dora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2, alpha=2)
    with pytest.raises(TypeError, match="plain LoRALinear"):
        pissa_init(dora[0])
    q = add_qlora(nn.Sequential(nn.Linear(64, 64)), ["0"], r=2, alpha=2)
    with pytest.raises(TypeError, match="no float W"):
        pissa_init(q[0])


@pytest.mark.parametrize("fmt", ["lora_edu", "peft"])
def test_saving_a_pissa_adapter_warns_records_pissa_and_loading_it_warns(tmp_path, fmt):
    import json

    import safetensors

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    model = add_pissa(copy.deepcopy(base), ["0", "2"], r=3, alpha=6)
    with pytest.warns(UserWarning, match=r"initialised with PiSSA .* only on that modified base.*pissa_to_lora") as rec:
        path = lora_edu.save_adapter(model, tmp_path / "a", format=fmt)
    assert rec[0].filename == __file__  # the warning points at the caller's line
    if fmt == "peft":
        assert json.loads((path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    else:
        with safetensors.safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["config"])["init"] == "pissa"
    with pytest.warns(UserWarning, match="pissa"):
        lora_edu.load_adapter(copy.deepcopy(base), path)
    # the documented way out: convert to plain LoRA on the original base; that saves without a warning
    plain = apply_converted(copy.deepcopy(base), pissa_to_lora(model))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_edu.save_adapter(plain, tmp_path / "b", format=fmt)
