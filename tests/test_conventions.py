"""The map between LoRA conventions: orientation, scale rules, embeddings, the fan-in trap."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_edu.lab import conventions as cv

D = torch.float64


def _adapter(n_in=7, n_out=5, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g, dtype=D)
    b = torch.randn(n_out, generator=g, dtype=D)
    A = torch.randn(r, n_in, generator=g, dtype=D)
    B = torch.randn(n_out, r, generator=g, dtype=D)
    x = torch.randn(4, 2, n_in, generator=g, dtype=D)
    return W, b, A, B, x


def test_round_trip_is_exact():
    _, _, A, B, _ = _adapter()
    A_row, B_row = cv.to_row_form(A, B)
    assert A_row.shape == (7, 3) and B_row.shape == (3, 5)
    A2, B2 = cv.from_row_form(A_row, B_row)
    assert torch.equal(A2, A) and torch.equal(B2, B)
    assert torch.equal(cv.to_row_form(A2, B2)[0], A_row)


def test_outputs_equal_across_orientations():
    W, b, A, B, x = _adapter()
    s = cv.scale_for(16, 3, "alpha/r")
    y = cv.lora_forward(x, W, A, B, s, bias=b)
    A_row, B_row = cv.to_row_form(A, B)
    y_row = cv.lora_forward_row_form(x, W, A_row, B_row, s, bias=b)
    assert y.shape == (4, 2, 5)
    torch.testing.assert_close(y, y_row, rtol=0, atol=1e-12)
    # and both equal the merged weight: x (W + s B A)^T + b
    torch.testing.assert_close(y, x @ (W + cv.lora_delta_W(A, B, s)).T + b, rtol=0, atol=1e-12)
    # the row form's delta is the transpose
    torch.testing.assert_close(s * A_row @ B_row, cv.lora_delta_W(A, B, s).T, rtol=0, atol=1e-12)


def test_shape_errors():
    with pytest.raises(ValueError):
        cv.from_row_form(torch.zeros(7, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError):
        cv.to_row_form(torch.zeros(3, 7), torch.zeros(5, 4))


def test_scale_rules():
    assert cv.scale_for(32, 4, "alpha") == 32  # the source article (E2): 4x = r too large
    assert cv.scale_for(32, 4, "alpha/r") == 8
    assert cv.scale_for(32, 4, "alpha/sqrt(r)") == 16
    assert cv.scale_for(32, 4, "rslora") == cv.scale_for(32, 4, "alpha/√r") == 16
    assert cv.scale_for(32, 4, "bare") / cv.scale_for(32, 4, "lora") == 4
    with pytest.raises(ValueError):
        cv.scale_for(32, 4, "alpha*r")
    with pytest.raises(ValueError):
        cv.scale_for(32, 0)


def test_convert_alpha_examples():
    assert cv.convert_alpha(32, 4, "alpha", "alpha/r") == 128
    assert cv.convert_alpha(32, 4, "alpha", "alpha/sqrt(r)") == 64
    assert cv.convert_alpha(16, 16, "alpha/r", "alpha/sqrt(r)") == 4


@settings(max_examples=60, deadline=None)
@given(
    alpha=st.floats(0.01, 1e3),
    r=st.integers(1, 512),
    a=st.sampled_from(cv.SCALE_RULES),
    b=st.sampled_from(cv.SCALE_RULES),
)
def test_convert_alpha_keeps_scale(alpha, r, a, b):
    new_alpha = cv.convert_alpha(alpha, r, a, b)
    assert math.isclose(cv.scale_for(new_alpha, r, b), cv.scale_for(alpha, r, a), rel_tol=1e-12)
    assert math.isclose(cv.convert_alpha(new_alpha, r, b, a), alpha, rel_tol=1e-12)


def test_converted_adapter_computes_same_function():
    """An adapter from a bare-α tutorial (row form) re-expressed in PEFT form with α/r gives the same outputs."""
    W, b, A, B, x = _adapter(r=4)
    A_row, B_row = cv.to_row_form(A, B)
    y_tutorial = cv.lora_forward_row_form(x, W, A_row, B_row, cv.scale_for(32, 4, "alpha"), bias=b)
    alpha_peft = cv.convert_alpha(32, 4, "alpha", "alpha/r")
    A2, B2 = cv.from_row_form(A_row, B_row)
    y_peft = cv.lora_forward(x, W, A2, B2, cv.scale_for(alpha_peft, 4, "alpha/r"), bias=b)
    torch.testing.assert_close(y_tutorial, y_peft, rtol=0, atol=1e-12)


def test_embedding_lora():
    num_embeddings, dim, r, s = 11, 6, 3, 0.5
    A0, B0 = cv.init_embedding_lora(num_embeddings, dim, r, torch.Generator().manual_seed(0), dtype=D)
    assert A0.shape == (r, num_embeddings) and B0.shape == (dim, r)
    assert torch.count_nonzero(A0) == 0 and torch.count_nonzero(B0) > 0  # swapped vs Linear
    assert torch.count_nonzero(cv.embedding_delta_W(A0, B0, s)) == 0  # still a no-op at init

    g = torch.Generator().manual_seed(1)
    W = torch.randn(num_embeddings, dim, generator=g, dtype=D)
    A = torch.randn(r, num_embeddings, generator=g, dtype=D)
    B = torch.randn(dim, r, generator=g, dtype=D)
    ids = torch.tensor([[0, 3, 10], [3, 3, 7]])
    delta = cv.embedding_delta_W(A, B, s)
    assert delta.shape == (num_embeddings, dim)
    y = cv.embedding_lora_forward(ids, W, A, B, s)
    torch.testing.assert_close(y, (W + delta)[ids], rtol=0, atol=1e-12)
    torch.testing.assert_close(y, torch.nn.functional.embedding(ids, W + delta), rtol=0, atol=1e-12)
    # the embedding as a Linear on one-hot inputs (in = num_embeddings, out = dim): A, B in Linear orientation
    one_hot = torch.nn.functional.one_hot(ids, num_embeddings).to(D)
    torch.testing.assert_close(y, cv.lora_forward(one_hot, W.T, A, B, s), rtol=0, atol=1e-12)


def test_kaiming_bounds_match_torch():
    n_in, r = 1024, 8
    trap = cv.fan_in_trap(n_in, r)
    assert trap["bound_r_in"] == pytest.approx(1 / math.sqrt(n_in))
    assert trap["bound_in_r"] == pytest.approx(1 / math.sqrt(r))
    assert trap["ratio"] == pytest.approx(math.sqrt(n_in / r))
    torch.manual_seed(0)
    for shape, bound in (((r, n_in), trap["bound_r_in"]), ((n_in, r), trap["bound_in_r"])):
        t = torch.empty(shape, dtype=D)
        torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.99 * bound  # 8192 uniform draws reach the edge
    assert cv.kaiming_uniform_bound((4, 3, 2, 2), a=0) == pytest.approx(math.sqrt(2) * math.sqrt(3 / 12))
