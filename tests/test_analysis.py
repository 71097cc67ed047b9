"""ΔW analysis (LoRA §7) against hand-made float64 matrices with known answers."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_edu.lab import analysis as an

D = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def orthogonal(n, seed):
    return an.random_orthonormal(n, n, gen(seed))


def matrix_with_singular_values(sigma, d, k, seed=0):
    """U diag(σ) Vᵀ with Haar U (d, m), V (k, m)."""
    sigma = torch.as_tensor(sigma, dtype=D)
    m = sigma.numel()
    U, V = an.random_orthonormal(d, m, gen(seed)), an.random_orthonormal(k, m, gen(seed + 1))
    return U @ torch.diag(sigma) @ V.T


# ----------------------------------------------------------------------------- spectrum


def test_singular_values_of_diag():
    s = an.singular_values(torch.diag(torch.tensor([3.0, -4.0, 0.0])))
    assert s.dtype == D
    torch.testing.assert_close(s, torch.tensor([4.0, 3.0, 0.0], dtype=D), rtol=0, atol=1e-15)
    # computed in float64 from a lower-precision input
    s16 = an.singular_values(torch.eye(3, dtype=torch.bfloat16) * 2)
    assert s16.dtype == D and torch.equal(s16, torch.full((3,), 2.0, dtype=D))


def test_energy_rank_hand_values():
    assert an.energy_rank(torch.tensor([4.0, 3.0])) == 2  # 16/25 = 0.64 < 0.9
    assert an.energy_rank(torch.tensor([4.0, 3.0]), threshold=0.64) == 1  # exactly at the threshold
    assert an.energy_rank(torch.tensor([3.0, 4.0]), threshold=0.6) == 1  # sorted first
    assert an.energy_rank(torch.eye(10, dtype=D)) == 9  # 9/10 >= 0.9
    assert an.energy_rank(torch.eye(10, dtype=D), threshold=0.91) == 10
    assert an.energy_rank(torch.ones(2), threshold=0.5) == 1  # 1/2 >= 1/2, despite rounding
    assert an.energy_rank(torch.zeros(4, 3)) == 0
    with pytest.raises(ValueError):
        an.energy_rank(torch.eye(3), threshold=0.0)
    frac = an.energy_fraction(torch.diag(torch.tensor([3.0, 4.0])))
    torch.testing.assert_close(frac, torch.tensor([16 / 25, 1.0], dtype=D))


def test_energy_rank_of_geometric_spectrum():
    sigma = 0.5 ** torch.arange(20, dtype=D)  # energies 4^-i: top-2 hold 15/16·(1 - 4^-20)^-1 < 0.95
    assert an.energy_rank(sigma, 0.9) == 2
    assert an.energy_rank(sigma, 0.95) == 3


def test_stable_rank():
    assert an.stable_rank(torch.diag(torch.tensor([3.0, 4.0]))) == pytest.approx(25 / 16)
    assert an.stable_rank(torch.eye(7)) == pytest.approx(7.0)
    assert an.stable_rank(torch.zeros(3, 3)) == 0.0
    M = torch.randn(30, 20, generator=gen(0), dtype=D)
    assert an.stable_rank(M) == pytest.approx(
        float(torch.linalg.matrix_norm(M) ** 2 / torch.linalg.matrix_norm(M, ord=2) ** 2), rel=1e-12
    )


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_construction(k):
    X = torch.randn(40, k, generator=gen(k), dtype=D)
    Y = torch.randn(k, 30, generator=gen(k + 100), dtype=D)
    M = X @ Y  # rank k
    assert an.numerical_rank(M) == k
    assert an.energy_rank(M, threshold=1.0) == k
    assert an.energy_rank(M) <= k
    assert 1.0 <= an.stable_rank(M) <= k + 1e-9
    summary = an.spectrum_summary(M)
    assert summary.numerical_rank == k and summary.shape == (40, 30)
    assert summary.frobenius == pytest.approx(float(torch.linalg.matrix_norm(M)), rel=1e-12)
    assert summary.as_dict()["energy_rank"] == an.energy_rank(M)


def test_spectrum_is_orthogonally_invariant():
    M = torch.randn(12, 9, generator=gen(3), dtype=D)
    M2 = orthogonal(12, 4) @ M @ orthogonal(9, 5)
    torch.testing.assert_close(an.singular_values(M2), an.singular_values(M), rtol=0, atol=1e-12)
    assert an.energy_rank(M2, 0.8) == an.energy_rank(M, 0.8)


# ----------------------------------------------------------------------------- subspace similarity


def test_right_singular_basis():
    A = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=D)  # (r=2, in=4)
    U = an.right_singular_basis(A)
    assert U.shape == (4, 2)
    torch.testing.assert_close(U.abs(), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0, 0], [0, 0]], dtype=D))
    A = torch.randn(5, 40, generator=gen(0), dtype=D)
    U = an.right_singular_basis(A)
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(A @ U @ U.T, A, rtol=0, atol=1e-12)  # U spans A's row space


def test_subspace_similarity_hand_values():
    e = torch.eye(6, dtype=D)
    A1 = torch.stack([3 * e[0], 2 * e[1], e[2]])  # top directions e0, e1, e2
    A2 = torch.stack([5 * (e[0] + e[3]) / math.sqrt(2), 4 * e[1]])  # top directions (e0+e3)/√2, e1
    assert an.subspace_similarity(A1, A2, 1, 1) == pytest.approx(0.5)
    assert an.subspace_similarity(A1, A2, 2, 2) == pytest.approx(1.5 / 2)
    assert an.subspace_similarity(A1, A2, 1, 2) == pytest.approx(0.5)  # e0 vs span(.): cos² 1/2
    assert an.subspace_similarity(A1, A2, 3, 1) == pytest.approx(0.5)
    assert an.subspace_similarity(A1, A2, 3, 2) == pytest.approx(1.5 / 2)
    assert an.subspace_similarity(A1, torch.stack([e[4], e[5]]), 3, 2) == 0.0  # orthogonal
    with pytest.raises(ValueError):
        an.subspace_similarity(A1, A2, 4, 1)
    with pytest.raises(ValueError):
        an.subspace_similarity(A1, torch.randn(2, 5, dtype=D), 1, 1)


def test_subspace_similarity_invariances():
    A1 = torch.randn(8, 64, generator=gen(1), dtype=D)
    A2 = torch.randn(4, 64, generator=gen(2), dtype=D)
    assert an.subspace_similarity(A1, A1, 3, 7) == pytest.approx(1.0)  # same subspace: φ = 1 for all i, j
    assert an.subspace_similarity(A1, -A1, 5, 5) == pytest.approx(1.0)  # signs don't matter
    # full row spaces only depend on span: mixing A's rows (invertible G) keeps φ(r, r) = 1
    G = torch.randn(8, 8, generator=gen(3), dtype=D)
    assert an.subspace_similarity(A1, G @ A1, 8, 8) == pytest.approx(1.0)
    # symmetric under swapping the arguments and the indices
    assert an.subspace_similarity(A1, A2, 5, 3) == pytest.approx(an.subspace_similarity(A2, A1, 3, 5))
    # a common rotation of the input space changes nothing
    Q = orthogonal(64, 4)
    assert an.subspace_similarity(A1 @ Q, A2 @ Q, 6, 2) == pytest.approx(an.subspace_similarity(A1, A2, 6, 2))


def test_grid_matches_pointwise():
    A1 = torch.randn(8, 32, generator=gen(5), dtype=D)
    A2 = torch.randn(5, 32, generator=gen(6), dtype=D)
    grid = an.subspace_similarity_grid(A1, A2)
    assert grid.shape == (8, 5) and grid.dtype == D
    for i in range(1, 9):
        for j in range(1, 6):
            assert grid[i - 1, j - 1].item() == pytest.approx(an.subspace_similarity(A1, A2, i, j), abs=1e-12)
    assert (grid >= 0).all() and (grid <= 1 + 1e-12).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), r1=st.integers(1, 6), r2=st.integers(1, 6), n_in=st.integers(6, 20))
def test_phi_in_unit_interval(seed, r1, r2, n_in):
    g = gen(seed)
    grid = an.subspace_similarity_grid(torch.randn(r1, n_in, generator=g, dtype=D),
                                       torch.randn(r2, n_in, generator=g, dtype=D))
    assert (grid >= -1e-12).all() and (grid <= 1 + 1e-12).all()


def haar_frames(n, dim, k, g):
    """n independent Haar (dim, k) frames at once: QR of Gaussians (column signs do not matter here)."""
    return torch.linalg.qr(torch.randn(n, dim, k, generator=g, dtype=D)).Q  # (n, dim, k)


def test_chance_similarity_monte_carlo():
    """E φ(i, j) = max(i, j)/D for independent Haar subspaces (E‖U_iᵀ U_j‖² = i j / D)."""
    Dim, r1, r2, n = 48, 6, 10, 2000
    g = gen(11)
    U1, U2 = haar_frames(n, Dim, r1, g), haar_frames(n, Dim, r2, g)
    S = (U1.transpose(1, 2) @ U2).pow(2).cumsum(1).cumsum(2)  # (n, r1, r2): ‖U1[:, :i]ᵀ U2[:, :j]‖²
    i, j = torch.arange(1, r1 + 1, dtype=D)[:, None], torch.arange(1, r2 + 1, dtype=D)[None, :]
    grids = S / torch.minimum(i, j)
    mean, sem = grids.mean(0), grids.std(0) / math.sqrt(n)
    chance = an.chance_similarity_grid(r1, r2, Dim)
    assert chance[2, 7] == an.chance_similarity(3, 8, Dim) == 8 / Dim
    assert ((mean - chance).abs() <= 5 * sem).all()
    assert mean[-1, -1].item() == pytest.approx(10 / Dim, rel=0.03)  # the largest cell has the least noise
    # the library's grid on one Gaussian pair (Haar row spaces) is one such sample
    A1, A2 = U1[0].T * torch.arange(r1, 0, -1, dtype=D)[:, None], U2[0].T * torch.arange(r2, 0, -1, dtype=D)[:, None]
    torch.testing.assert_close(an.subspace_similarity_grid(A1, A2), grids[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        an.chance_similarity(0, 3, 10)


def test_random_orthonormal():
    Q = an.random_orthonormal(30, 7, gen(0))
    assert Q.shape == (30, 7) and Q.dtype == D
    torch.testing.assert_close(Q.T @ Q, torch.eye(7, dtype=D), rtol=0, atol=1e-12)
    assert torch.equal(Q, an.random_orthonormal(30, 7, gen(0)))  # seeded


# ----------------------------------------------------------------------------- Table 7


def test_projection_norm_on_diag():
    W = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=D))
    e = torch.eye(5, dtype=D)
    assert an.projection_norm(W, e[:, :2], e[:, :2]) == pytest.approx(math.sqrt(25 + 16))
    assert an.projection_norm(W, e[:, [4]], e[:, [4]]) == pytest.approx(1.0)
    assert an.projection_norm(W, e[:, [0]], e[:, [1]]) == 0.0  # cross terms of a diagonal W vanish


def test_table7_on_diag():
    W = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=D))
    delta_W = torch.zeros(6, 6, dtype=D)
    delta_W[4, 4], delta_W[3, 3] = 0.7, 0.3  # ΔW amplifies W's weak directions e4, e3
    t = an.table7(W, delta_W, r=2, generator=gen(0))
    assert t.proj_delta_W == pytest.approx(math.sqrt(1.0 + 4.0))  # W restricted to e3, e4
    assert t.proj_W == pytest.approx(math.sqrt(25 + 16))
    assert t.W_fro == pytest.approx(math.sqrt(25 + 16 + 9 + 4 + 1 + 0.25))
    assert t.delta_W_fro == pytest.approx(math.sqrt(0.49 + 0.09))
    assert t.amplification == pytest.approx(math.sqrt(0.58) / math.sqrt(5.0))
    assert t.proj_random_analytic == pytest.approx(2 * t.W_fro / 6)
    assert t.shape == (6, 6) and t.as_dict()["r"] == 2
    t1 = an.table7(W, delta_W, r=1, generator=gen(0))
    assert t1.proj_delta_W == pytest.approx(1.0)  # top direction of ΔW is e4, where W = 1
    assert t1.amplification == pytest.approx(math.sqrt(0.58))  # ‖ΔW‖_F (all of it) / 1


def test_table7_proj_W_is_top_r_energy():
    sigma = torch.tensor([9.0, 7.0, 4.0, 2.0, 1.0], dtype=D)
    W = matrix_with_singular_values(sigma, 20, 12, seed=3)
    delta_W = torch.randn(20, 12, generator=gen(9), dtype=D)
    for r in (1, 3, 5):
        t = an.table7(W, delta_W, r, generator=gen(1))
        assert t.proj_W == pytest.approx(float(torch.sqrt((sigma[:r] ** 2).sum())), rel=1e-12)
        assert t.proj_delta_W <= t.proj_W + 1e-12  # W's own directions capture the most


def test_table7_orthogonal_invariance():
    W = matrix_with_singular_values([6.0, 5.0, 3.0, 2.5, 1.0], 14, 10, seed=0)
    delta_W = matrix_with_singular_values([2.0, 1.0, 0.5], 14, 10, seed=7)
    Q1, Q2 = orthogonal(14, 21), orthogonal(10, 22)
    a = an.table7(W, delta_W, 3, generator=gen(0))
    b = an.table7(Q1 @ W @ Q2, Q1 @ delta_W @ Q2, 3, generator=gen(0))
    for f in ("proj_delta_W", "proj_W", "W_fro", "delta_W_fro", "amplification", "proj_random_analytic"):
        assert getattr(b, f) == pytest.approx(getattr(a, f), rel=1e-10), f


def test_table7_delta_in_W_top_directions_and_errors():
    W = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=D))
    t = an.table7(W, 0.1 * W, r=2, generator=gen(0))
    assert t.proj_delta_W == pytest.approx(t.proj_W)  # ΔW ∝ W: same directions, no amplification of new ones
    with pytest.raises(ValueError):
        an.table7(W, torch.zeros(4, 3, dtype=D), 1)
    with pytest.raises(ValueError):
        an.table7(W, W, 5)


def test_random_frame_expectation_analytic():
    """E‖Uᵀ W V‖_F² = r²‖W‖_F²/(d k) for independent Haar U (d, r), V (k, r)."""
    d, k, r, n = 24, 16, 3, 4000
    W = torch.randn(d, k, generator=gen(0), dtype=D) * torch.linspace(0.1, 3, k, dtype=D)  # anisotropic W
    g = gen(1)
    U, V = haar_frames(n, d, r, g), haar_frames(n, k, r, g)
    sq = (U.transpose(1, 2) @ W @ V).pow(2).sum((1, 2))  # (n,) ‖Uᵀ W V‖_F²
    expected = r**2 * float(torch.linalg.matrix_norm(W)) ** 2 / (d * k)
    assert abs(sq.mean().item() - expected) <= 4 * sq.std().item() / math.sqrt(n)
    assert an.projection_norm(W, U[0], V[0]) ** 2 == pytest.approx(sq[0].item(), rel=1e-12)
    assert an.random_projection_norm(float(torch.linalg.matrix_norm(W)), r, d, k) == pytest.approx(math.sqrt(expected))


def test_paper_random_frame_numbers():
    """LoRA Table 7: ‖W_q‖_F = 61.95, d = k = 12288: random 0.02 (r=4), 0.33 (r=64)."""
    assert an.random_projection_norm(61.95, 4, 12288, 12288) == pytest.approx(0.02, abs=0.005)
    assert an.random_projection_norm(61.95, 64, 12288, 12288) == pytest.approx(0.33, abs=0.01)
    assert 6.91 / 0.32 == pytest.approx(21.6, abs=0.1) and 3.57 / 1.90 == pytest.approx(1.88, abs=0.01)


def test_table7_random_mean_close_to_analytic():
    W = torch.randn(64, 48, generator=gen(2), dtype=D)
    t = an.table7(W, torch.randn(64, 48, generator=gen(3), dtype=D), 8, generator=gen(4), n_random=16)
    # the measured mean of ‖·‖_F sits just below its RMS (Jensen), within sampling noise
    assert t.proj_random == pytest.approx(t.proj_random_analytic, rel=0.15)
    assert t.proj_random < t.proj_W
