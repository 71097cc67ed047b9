"""NF4 / QLoRA base (lora_edu.variants.nf4) against oracles.

Oracles: the NF4 table printed in QLoRA Appendix E; float64 nearest-level rounding by brute force
(argmin over all 16 levels, not the midpoint search the module uses); hand-computed codes for a
tiny tensor; the bound derived from the widest gap of each code table; the bit counts of the
paper (§3) against the tensors' ``nbytes``; ``F.linear`` in float64 for the layer.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_edu.variants import (
    NF4_OFFSET,
    NF4_PUBLISHED,
    NF4Linear,
    dequantize_nf4,
    dynamic_8bit_code,
    nf4_bits_per_parameter,
    nf4_levels,
    pack_4bit,
    quantization_error,
    quantize_nf4,
    requantize_merge_error,
    unpack_4bit,
)

EPS32 = torch.finfo(torch.float32).eps
FAST = settings(max_examples=25, deadline=None)
PUBLISHED = torch.tensor(NF4_PUBLISHED, dtype=torch.float64)


def brute_force_codes(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: float64 absmax per block, then argmin |x/absmax − level| over the 16 published levels."""
    blocks = x.double().view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return (normalised[..., None] - PUBLISHED).abs().argmin(dim=-1).reshape(-1), absmax.reshape(-1)


# ---------------------------------------------------------------- the levels


def test_levels_reproduce_the_published_table():
    derived32 = nf4_levels(dtype=torch.float32)
    assert derived32.tolist() == list(NF4_PUBLISHED)  # bit for bit: the table is float32 values printed in full
    derived64 = nf4_levels(dtype=torch.float64)
    # float64 throughout: within one float32 ulp at 1.0 of the printed values (measured 1.08e-7)
    assert (derived64 - PUBLISHED).abs().max() <= EPS32
    assert derived64[0] == -1 and derived64[7] == 0 and derived64[15] == 1
    assert (derived64[1:] > derived64[:-1]).all()
    assert (derived64 < 0).sum() == 7 and (derived64 > 0).sum() == 8  # asymmetric: 7 negative, 8 positive


def test_levels_are_normal_quantiles():
    """Positive levels are Φ⁻¹ at equally spaced probabilities from offset down to ½ (torch.distributions as oracle)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    q_max = normal.icdf(torch.tensor(NF4_OFFSET, dtype=torch.float64))
    probs = normal.cdf(nf4_levels()[8:] * q_max)  # (8,) undo the normalisation
    assert torch.allclose(probs, torch.linspace(0.5, NF4_OFFSET, 9, dtype=torch.float64)[1:], atol=1e-12)
    probs_neg = normal.cdf(-nf4_levels()[:7] * q_max)  # the 7 negative ones, same map from the other side
    assert torch.allclose(probs_neg.flip(0), torch.linspace(0.5, NF4_OFFSET, 8, dtype=torch.float64)[1:], atol=1e-12)
    assert abs(NF4_OFFSET - 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))) < 5e-8


def test_dynamic_code_structure():
    code = dynamic_8bit_code()
    assert code.dtype == torch.float32 and code.numel() == 256 and (code[1:] > code[:-1]).all()
    assert code[-1] == 1 and (code == 0).sum() == 1 and abs(float(code[0]) + 0.99296875) < 1e-6


# ---------------------------------------------------------------- block-wise absmax


def test_hand_computed_tiny_tensor():
    """Two blocks of 4, worked by hand with the published table.

    block 1, absmax 1: 0.5 → 12 (0.5 < midpoint(0.4407, 0.5626) = 0.5017), −1 → 0, 0.1 → 8 (< 0.1203), 0 → 7
    block 2, absmax 2: normalised 1, −0.25, 0.5, 0.125 → 15, 4 (< −0.2346), 12, 9 (> 0.1203)
    """
    x = torch.tensor([0.5, -1.0, 0.1, 0.0, 2.0, -0.5, 1.0, 0.25])
    q = quantize_nf4(x, block_size=4, double_quant=False)
    expected = [12, 0, 8, 7, 15, 4, 12, 9]
    assert unpack_4bit(q.codes).tolist() == expected
    assert q.codes.tolist() == [12 * 16 + 0, 8 * 16 + 7, 15 * 16 + 4, 12 * 16 + 9]
    assert q.absmax.tolist() == [1.0, 2.0]
    w_hat = PUBLISHED[expected] * torch.tensor([1.0] * 4 + [2.0] * 4, dtype=torch.float64)
    assert torch.equal(dequantize_nf4(q, torch.float64), w_hat)
    assert torch.equal(brute_force_codes(x, 4)[0], torch.tensor(expected))


def test_ties_go_to_the_lower_level():
    mid = (torch.tensor(NF4_PUBLISHED[8]) + torch.tensor(NF4_PUBLISHED[9])) / 2  # float32 midpoint
    q = quantize_nf4(torch.stack([torch.tensor(1.0), mid]), block_size=2, double_quant=False)
    assert unpack_4bit(q.codes).tolist() == [15, 8]
    nudged = torch.nextafter(mid, torch.tensor(1.0))
    assert unpack_4bit(quantize_nf4(torch.stack([torch.tensor(1.0), nudged]), block_size=2, double_quant=False).codes)[1] == 9


@FAST
@given(st.integers(1, 6), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_codes_match_brute_force_nearest_level(n_blocks, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks * 64, generator=gen) * scale
    q = quantize_nf4(x, double_quant=False)
    codes, absmax = brute_force_codes(x, 64)
    assert torch.equal(q.absmax.double(), absmax)
    # away from a decision boundary (ties within float32 rounding) the nearest level is unique
    normalised = x.double().view(-1, 64) / absmax[:, None]
    midpoints = (PUBLISHED[1:] + PUBLISHED[:-1]) / 2
    clear = ((normalised.reshape(-1, 1) - midpoints).abs().amin(dim=1) > 1e-6)
    assert torch.equal(unpack_4bit(q.codes).long()[clear], codes[clear])


@FAST
@given(st.lists(st.integers(0, 15), min_size=0, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_round_trip(codes):
    codes = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.numel() == codes.numel() // 2
    assert torch.equal(unpack_4bit(packed), codes)
    assert pack_4bit(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x12]  # first code in the high nibble


@FAST
@given(st.lists(st.integers(0, 15), min_size=63, max_size=63), st.floats(1e-4, 1e4), st.booleans())
def test_levels_times_absmax_round_trip_exactly(indices, absmax, top):
    """A block that already lies on the grid, level·absmax with level ±1 present, comes back bit for bit.

    (Not −level·absmax: NF4 is asymmetric, the negation of a level is generally not a level.)
    """
    level = torch.tensor(NF4_PUBLISHED)[torch.tensor(indices + [15 if top else 0])]  # makes absmax exact
    w = level * torch.tensor(absmax, dtype=torch.float32)
    q = quantize_nf4(w, double_quant=False)
    assert float(q.absmax) == float(torch.tensor(absmax, dtype=torch.float32))
    assert torch.equal(dequantize_nf4(q), w)
    assert torch.equal(dequantize_nf4(q, torch.float32), dequantize_nf4(q, torch.float64).float())


@FAST
@given(st.integers(1, 700), st.floats(-3, 3), st.integers(0, 2**31 - 1), st.booleans())
def test_error_within_derived_bound(n_blocks, log_spread, seed, double_quant):
    """|w − ŵ| ≤ h·c₂ (+ h₈·c₁ with double quantisation) per block, h = half the widest gap of the code."""
    gen = torch.Generator().manual_seed(seed)
    scales = 10 ** (log_spread * torch.rand(n_blocks, 1, generator=gen))  # constants spread over decades
    w = (torch.randn(n_blocks, 64, generator=gen) * scales).reshape(-1)
    err = quantization_error(w, double_quant=double_quant)
    assert (err.max_abs_per_block <= err.bound_per_block).all()
    q = quantize_nf4(w, double_quant=double_quant)
    if double_quant:  # the constants themselves: |ĉ₂ − c₂| ≤ h₈·c₁ + a few ulps
        code8 = dynamic_8bit_code().double()
        h8 = max(float((code8[1:] - code8[:-1]).max()) / 2, float(code8[0] + 1), float(1 - code8[-1]))
        c1 = q.absmax_scale.double().repeat_interleave(256)[: q.n_blocks]
        exact = w.view(-1, 64).abs().amax(dim=1).double()
        assert ((q.dequantize_absmax().double() - exact).abs() <= (h8 + 8 * EPS32) * c1 + 8 * EPS32 * exact).all()


def test_bound_is_tight_for_gaussian_weights():
    err = quantization_error(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)), double_quant=False)
    ratio = err.max_abs_per_block / err.bound_per_block
    assert 0.99 < float(ratio.max()) <= 1.0  # values just under 1 − 0.139 land half a gap from a level
    assert 0.05 < err.relative_frobenius < 0.15


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("numel", [64 * 256 * 3, 1000, 999, 64 * 257])
@pytest.mark.parametrize("double_quant", [False, True])
def test_measured_bits_equal_formula(numel, double_quant):
    q = quantize_nf4(torch.randn(numel), double_quant=double_quant)
    for t in q.tensors().values():  # each tensor owns exactly its bytes (no slice of a larger storage)
        assert t.untyped_storage().nbytes() == t.nbytes
    assert q.bits_per_parameter == nf4_bits_per_parameter(double_quant=double_quant, numel=numel)
    if numel % (64 * 256) == 0:  # the paper's counts, plus the one fp32 mean of double quantisation
        paper = 4 + 32 / 64 if not double_quant else 4 + 8 / 64 + 32 / (64 * 256)
        assert nf4_bits_per_parameter(double_quant=double_quant) == paper
        assert q.bits_per_parameter == paper + (32 / numel if double_quant else 0)
    assert math.isclose(nf4_bits_per_parameter(), 4.126953125)


# ---------------------------------------------------------------- the layer


def make_layer(out_f=48, in_f=80, bias=True, **kw):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin, NF4Linear.from_linear(lin, **kw)


def test_forward_is_f_linear_of_the_dequantised_weight_float64():
    lin, layer = make_layer(compute_dtype=torch.float64)
    x = torch.randn(3, 5, 80, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, layer.dequantize(torch.float64), layer.bias.double())
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, rtol=0, atol=1e-13)
    assert torch.allclose(layer.dequantize(torch.float64), lin.weight.double(), atol=0.2 * lin.weight.abs().max().item())


def test_layer_is_frozen_has_no_weight_and_keeps_nothing_for_backward():
    lin, layer = make_layer(compute_dtype=torch.float32)
    assert NF4Linear.lora_base_kind == "quantized_linear"
    assert not hasattr(layer, "weight") and (layer.in_features, layer.out_features) == (80, 48)
    assert [(n, p.requires_grad) for n, p in layer.named_parameters()] == [("bias", False)]
    assert torch.equal(layer.bias, lin.bias) and layer.bias.dtype == lin.bias.dtype
    assert {n: b.dtype for n, b in layer.named_buffers()} == {
        "codes": torch.uint8, "absmax_codes": torch.uint8, "absmax_scale": torch.float32, "absmax_mean": torch.float32,
        "nf4_code": torch.float32, "absmax_code": torch.float32}  # the last two: constant code tables, not saved
    assert set(layer.state_dict()) == {"codes", "absmax_codes", "absmax_scale", "absmax_mean", "bias"}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(torch.randn(4, 80, requires_grad=True)).sum().backward()
    assert torch.Size([48, 80]) not in saved  # the dequantised matrix is made again in backward, not stored
    assert layer.dequantize().data_ptr() != layer.dequantize().data_ptr()  # a fresh tensor each time


def test_bf16_compute_and_dtype_casts():
    _, layer = make_layer(compute_dtype=torch.bfloat16, bias=False)
    x = torch.randn(6, 80)
    y = layer(x)
    assert y.dtype == torch.float32  # back to the input's dtype, like bitsandbytes' Linear4bit
    ref = F.linear(x.double(), layer.dequantize(torch.float64))
    assert (y.double() - ref).abs().max() < 0.05 * ref.abs().max()
    before = layer.dequantize(torch.float32)
    layer.to(torch.float16)  # must not round the float32 constants
    assert layer.absmax_scale.dtype == layer.nf4_code.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_state_dict_round_trip_and_single_quant():
    _, a = make_layer(double_quant=False)
    _, b = make_layer(double_quant=False)
    with torch.no_grad():
        b.absmax.mul_(2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.dequantize(), b.dequantize())
    assert set(a.state_dict()) == {"codes", "absmax", "bias"}


# ---------------------------------------------------------------- errors, padding


def test_padding_of_a_partial_last_block():
    w = torch.randn(7, 10)  # 70 = 64 + 6: the last block is zero-padded to 64
    q = quantize_nf4(w, double_quant=False)
    assert q.codes.numel() == 35 and q.absmax.numel() == 2 and dequantize_nf4(q).shape == (7, 10)  # padding not stored
    assert quantize_nf4(torch.randn(3, 3), double_quant=False).codes.numel() == 5  # odd numel: one spare nibble
    alone = quantize_nf4(w.reshape(-1)[64:], double_quant=False)  # the 6 stragglers quantised on their own
    assert torch.equal(dequantize_nf4(q).reshape(-1)[64:], dequantize_nf4(alone))


def test_error_messages():
    with pytest.raises(ValueError, match="even integer"):
        quantize_nf4(torch.randn(64), block_size=63)
    with pytest.raises(TypeError, match="floating-point weight"):
        quantize_nf4(torch.ones(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="finite"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-empty"):
        quantize_nf4(torch.empty(0))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="dtype"):
        dequantize_nf4(quantize_nf4(torch.randn(64)), torch.int32)
    with pytest.raises(ValueError, match="shape"):
        requantize_merge_error(quantize_nf4(torch.randn(8, 8)), torch.randn(8, 9))


# ---------------------------------------------------------------- merging into a quantised base


def test_requantize_merge_error():
    gen = torch.Generator().manual_seed(1)
    w = 0.02 * torch.randn(128, 128, generator=gen)
    q = quantize_nf4(w, double_quant=False)
    zero = requantize_merge_error(q, torch.zeros(128, 128))
    assert zero.requantized_weight_relative == 0.0 and zero.codes_changed == 0.0  # the grid maps onto itself
    q2 = quantize_nf4(w)  # with double quantisation the constants are re-quantised too: not a fixed point
    assert requantize_merge_error(q2, torch.zeros(128, 128)).requantized_weight_relative > 0
    delta = 1e-2 * w.norm() * torch.randn(128, 128, generator=gen) / 128  # ‖ΔW‖ ≈ 1 % of ‖W‖
    m = requantize_merge_error(q, delta)
    assert m.requantized > 0.5  # re-quantising loses most of a small update
    assert m.fp32 < 1e-4 < m.fp16 < m.bf16  # merging into a float copy of W_deq loses one rounding of that dtype
    assert m.fp16 < m.requantized


def test_benchmark_script_runs_tiny_on_cpu(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import nf4_vs_bitsandbytes as bench

    out = tmp_path / "nf4.txt"
    text = bench.main(["--device", "cpu", "--tiny", "--out", str(out)])
    assert out.read_text() == text and "bits/param" in text and "LoRA on an NF4 base" in text
