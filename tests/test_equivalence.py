"""Merged vs unmerged: measured errors per dtype, their order, and the report's contract."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_edu as L

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def mlp(d_in, d_hidden, d_out, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out)).to(dtype)


def adapted(dtype, seed=0, r=4, alpha=8.0, std=0.02):
    m = L.add_lora(mlp(64, 128, 32, dtype, seed), ["0", "2"], r=r, alpha=alpha)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, l in L.lora_layers(m):
            l.B.copy_(torch.randn(l.B.shape, generator=g) * std)
    return m


def measure(dtype):
    m = adapted(dtype)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    return L.check_merge_equivalence(m, x)


def test_errors_per_dtype_are_in_the_expected_range_and_order():
    reports = {dt: measure(dt) for dt in DTYPES}
    for dt, rep in reports.items():
        assert rep.passed, str(rep)
        assert rep.tolerance == L.TOLERANCE[dt]
    rel = {dt: reports[dt].rel_error for dt in DTYPES}
    assert rel[torch.float64] < 1e-14  # ≈ 1e-16 relative: a few ulps of float64
    assert 1e-9 < rel[torch.float32] < 1e-5  # ≈ 1e-7 .. 1e-6
    assert 1e-4 < rel[torch.float16] < 2e-2
    assert 1e-3 < rel[torch.bfloat16] < 1e-1
    # the order follows the unit roundoff: fp64 ≪ fp32 ≪ fp16 < bf16
    assert rel[torch.float64] < rel[torch.float32] < rel[torch.float16] < rel[torch.bfloat16]
    # rounding erases small ΔW entries in low precision, essentially never in fp64
    assert reports[torch.float64].erased_fraction == 0.0
    assert reports[torch.bfloat16].erased_fraction > reports[torch.float16].erased_fraction > 0


def test_erased_fraction_matches_ulp_oracle():
    """An entry of ΔW is erased iff |ΔW| < ulp(W)/2 (ties aside): count it independently in float64."""
    m = adapted(torch.bfloat16, std=0.004)
    frac = L.erased_fraction(m)
    erased = total = 0
    for _, l in L.lora_layers(m):
        W = l.base.weight.double()
        dW = l.delta_weight(dtype=torch.float64)
        exponent = torch.floor(torch.log2(W.abs().clamp_min(1e-30)))
        half_ulp = 2.0 ** (exponent - 7) / 2  # bf16 has 8 significant bits → ulp = 2^(e-7)
        mask = dW != 0
        definitely = (dW.abs() < half_ulp * 0.999) & mask
        erased += int(definitely.sum())
        total += int(mask.sum())
    assert total > 0
    assert abs(frac - erased / total) < 0.01, (frac, erased / total)


def test_report_leaves_model_bit_for_bit():
    m = adapted(torch.bfloat16)
    m.train()
    W = [l.base.weight.clone() for _, l in L.lora_layers(m)]
    x = torch.randn(4, 64).to(torch.bfloat16)
    L.check_merge_equivalence(m, x)
    assert m.training
    assert all(torch.equal(w, l.base.weight) for w, (_, l) in zip(W, L.lora_layers(m)))
    assert not any(l.merged for _, l in L.lora_layers(m))
    # also when it starts merged
    L.merge_lora(m)
    W = [l.base.weight.clone() for _, l in L.lora_layers(m)]
    rep = L.check_merge_equivalence(m, x)
    assert rep.passed
    assert all(l.merged for _, l in L.lora_layers(m))
    assert all(torch.equal(w, l.base.weight) for w, (_, l) in zip(W, L.lora_layers(m)))


def test_str_explains():
    text = str(measure(torch.bfloat16))
    assert "PASSED" in text and "bfloat16" in text and "ulp" in text and "vanished" in text


def test_unscaled_merge_breaks_equivalence_by_the_predicted_factor():
    """The article's merge W += B@A (mistake E3) misses the factor s: the error is |1/s − 1|·‖ΔW x‖."""
    m = adapted(torch.float64, alpha=12.0, r=4)  # s = 3
    x = torch.randn(8, 64, dtype=torch.float64)
    layer = m[0]
    y_lora = layer(x)
    dW = layer.delta_weight()
    with torch.no_grad():
        layer.base.weight += layer.B @ layer.A  # unscaled
    y_bad = layer.base(x)
    err = y_bad - y_lora
    torch.testing.assert_close(err, (1 / layer.scale - 1) * x @ dW.T, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.floats(0.1, 64.0),
    dtype=st.sampled_from(DTYPES),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_merge_equivalence(d_in, d_out, r, alpha, dtype, rslora, seed):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    model = nn.Sequential(base)
    L.add_lora(model, ["0"], r=r, alpha=alpha, rslora=rslora)
    with torch.no_grad():
        model[0].B.normal_(std=0.05)
    x = torch.randn(3, d_in).to(dtype)
    rep = L.check_merge_equivalence(model, x)
    assert rep.passed, str(rep)
    # single layer: the merged error is bounded by rounding W+ΔW once, plus the forward's own rounding
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert model[0].scale == pytest.approx(s)
    W0 = base.weight.clone()
    model[0].merge()
    model[0].unmerge()
    eps = torch.finfo(dtype).eps
    assert (base.weight.double() - W0.double()).abs().max() <= 4 * eps * (W0.double().abs().max() + 1)
