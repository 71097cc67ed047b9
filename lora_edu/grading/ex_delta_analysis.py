"""Exercise 5 checker: analyse a learned ΔW — spectrum, energy rank, subspace similarity.

Oracles, in float64 (LoRA paper §7.2; Biderman et al. 2024):

* singular values of M, descending;
* energy rank: the smallest k with Σ_{i≤k} σ_i² ≥ threshold · Σ σ_i²;
* φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j), U = right singular vectors
  of A (A: (r, in), U = svd(A).Vh.T), chance level max(i, j)/D.
"""
from __future__ import annotations

import torch

from .battery import Exercise, Fail, answer, as_float, as_tensor, call, case_random, fmt, variant_seed

EXERCISE = Exercise(
    name="delta_analysis",
    title="Analyse a learned ΔW",
    notebook="05_delta_analysis.ipynb",
    symbols=("singular_values", "energy_rank", "subspace_similarity", "sigma_dW", "k90", "phi_top", "chance_top"),
    written=("singular_values", "energy_rank", "subspace_similarity"),
    reference_names=("lora_edu.lab.analysis", "subspace_similarity", "energy_rank", "singular_values", "effective_rank"),
)
case = EXERCISE.case


def _sv(M):
    return torch.linalg.svdvals(M.double())


def _energy_rank(s, t):
    e = (s.double() ** 2).cumsum(0)
    return int((e >= t * e[-1]).nonzero()[0].item()) + 1


def _U(A):
    return torch.linalg.svd(A.double(), full_matrices=False).Vh.T


def _phi(A1, A2, i, j):
    U1, U2 = _U(A1), _U(A2)
    return ((U1[:, :i].T @ U2[:, :j]) ** 2).sum().item() / min(i, j)


def _int(v, what):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise Fail(f"{what} returned {type(v).__name__} {v!r:.40}", expected="an integer count k")
    return int(v)


@case("singular_values(M): all of them, descending, float64-accurate", "spectrum")
def spectrum(sub):
    fn = answer(sub, "singular_values", fn=True)
    g = torch.Generator().manual_seed((5 + 7919 * variant_seed()) % 2**63)
    rng = case_random(5)
    for shape in ((rng.randint(8, 16), rng.randint(3, 7)), (rng.randint(3, 7), rng.randint(12, 24)), (16, 16)):
        M = torch.randn(*shape, generator=g, dtype=torch.float64)
        want = _sv(M)
        got = as_tensor(call(f"singular_values(M) for M of shape {shape}", fn, M.clone()), f"singular_values(M), M {shape}")
        if got.dim() != 1 or got.numel() != want.numel():
            raise Fail(f"singular_values(M) for M {shape} has shape {tuple(got.shape)}", expected=f"({want.numel()},) = min(m, n) values",
                       hint="torch.linalg.svdvals(M) returns the min(m, n) singular values")
        if torch.allclose(got, want.flip(0), rtol=1e-6, atol=1e-9) and not torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            raise Fail("your singular values are in ascending order", expected="descending (σ₁ ≥ σ₂ ≥ …)",
                       hint="torch.linalg.svdvals already returns them descending: don't re-sort")
        if torch.allclose(got, want**2, rtol=1e-6, atol=1e-9):
            raise Fail("you returned σ², the eigenvalues of MᵀM", expected="σ", hint="take the square root, or use torch.linalg.svdvals")
        if not torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            raise Fail(f"singular_values differ from torch.linalg.svdvals(M) by up to {fmt((got - want).abs().max().item())}",
                       expected=str([round(v, 4) for v in want.tolist()[:4]]) + " …", hint="compute in float64 with torch.linalg.svdvals")


@case("energy_rank(sigma, threshold): smallest k with Σ_{i≤k} σ_i² ≥ threshold·Σσ²", "energy", points=2)
def energy(sub):
    fn = answer(sub, "energy_rank", fn=True)
    cases = [
        (torch.tensor([2.0, 2.0], dtype=torch.float64), 0.5),  # exactly at the threshold: ≥, not >
        (torch.tensor([3.0, 1.0, 1.0, 0.5], dtype=torch.float64), 0.9),  # σ vs σ² disagree here
        (torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64), 0.9),
        (torch.tensor([5.0, 1e-3, 1e-4], dtype=torch.float64), 0.9),
    ]
    rng = case_random(55)
    drawn = sorted((rng.uniform(0.1, 3.0) for _ in range(rng.randint(5, 12))), reverse=True)
    cases.append((torch.tensor(drawn, dtype=torch.float64), round(rng.uniform(0.6, 0.95), 3)))
    for s, t in cases:
        want = _energy_rank(s, t)
        got = _int(call(f"energy_rank({s.tolist()}, threshold={t})", fn, s.clone(), t), "energy_rank")
        if got == want:
            continue
        txt = f"energy_rank({s.tolist()}, threshold={t}) returned {got}"
        exp = f"{want}"
        if got == want - 1:
            raise Fail(txt + ": one less, a 0-based index", expected=exp, hint="k counts singular values: return index + 1")
        e1 = s.cumsum(0)
        if got == int((e1 >= t * e1[-1]).nonzero()[0].item()) + 1:
            raise Fail(txt + ": you summed σ, not σ²", expected=exp, hint="energy is Σσ² (the squared Frobenius norm), not Σσ")
        e2 = (s**2).cumsum(0)
        strict = (e2 > t * e2[-1]).nonzero()
        if strict.numel() and got == int(strict[0].item()) + 1:
            raise Fail(txt + ": you used > instead of ≥ at the threshold", expected=exp, hint="smallest k with cumulative energy ≥ threshold × total")
        raise Fail(txt, expected=exp, hint="cumsum(σ²) / sum(σ²), first position where it reaches the threshold, plus one")


@case("subspace_similarity(A1, A2, i, j): ‖U1ᵢᵀ U2ⱼ‖²_F / min(i, j) with U = right singular vectors", "similarity", points=2)
def similarity(sub):
    fn = answer(sub, "subspace_similarity", fn=True)
    g = torch.Generator().manual_seed((6 + 7919 * variant_seed()) % 2**63)
    D = case_random(6).randint(20, 32)
    base = torch.randn(2, D, generator=g, dtype=torch.float64)
    A1 = torch.cat([base * 3, torch.randn(2, D, generator=g, dtype=torch.float64)])  # (4, D)
    A2 = torch.cat([base * 2 + 0.1 * torch.randn(2, D, generator=g, dtype=torch.float64), torch.randn(6, D, generator=g, dtype=torch.float64)])  # (8, D)
    for i, j in ((1, 1), (2, 3), (4, 8), (3, 2)):
        want = _phi(A1, A2, i, j)
        got = as_float(call(f"subspace_similarity(A1, A2, {i}, {j})", fn, A1.clone(), A2.clone(), i, j), f"subspace_similarity(A1, A2, {i}, {j})")
        if abs(got - want) <= 1e-6:
            continue
        txt = f"subspace_similarity(A1 (4×{D}), A2 (8×{D}), i={i}, j={j}) returned {fmt(got)}"
        exp = f"{fmt(want)}"
        U1, U2 = _U(A1), _U(A2)
        O = U1[:, :i].T @ U2[:, :j]
        if abs(got - (O**2).sum().item() / max(i, j)) <= 1e-6 and i != j:
            raise Fail(txt + ": divided by max(i, j)", expected=exp, hint="normalise by min(i, j), so that φ = 1 when one subspace contains the other")
        if abs(got - O.norm().item() / min(i, j)) <= 1e-6 or abs(got - O.abs().sum().item() / min(i, j)) <= 1e-6:
            raise Fail(txt + ": the norm is not squared", expected=exp, hint="φ uses the squared Frobenius norm ‖U1ᵢᵀ U2ⱼ‖²_F")
        if abs(got - (O**2).sum().item()) <= 1e-6 and min(i, j) > 1:
            raise Fail(txt + ": not divided by min(i, j)", expected=exp, hint="φ = ‖U1ᵢᵀ U2ⱼ‖²_F / min(i, j) ∈ [0, 1]")
        if got > 1 + 1e-9 or got < -1e-9:
            raise Fail(txt + ": outside [0, 1]", expected=exp,
                       hint="use orthonormal bases: U = torch.linalg.svd(A).Vh.T (right singular vectors), not the rows of A themselves")
        raise Fail(txt, expected=exp, hint="U = torch.linalg.svd(A, full_matrices=False).Vh.T, columns ordered by σ; take the first i (resp. j) columns")


@case("your learned ΔW: spectrum, energy rank and top-direction similarity above chance", "findings", points=2)
def findings(sub):
    s = as_tensor(answer(sub, "sigma_dW"), "sigma_dW")
    if s.dim() != 1 or s.numel() < 4:
        raise Fail(f"sigma_dW has shape {tuple(s.shape)}", expected="the 1-D spectrum of the learned ΔW (one value per singular value)")
    if (s[1:] > s[:-1] + 1e-9).any():
        raise Fail("sigma_dW is not descending", expected="σ₁ ≥ σ₂ ≥ …")
    k = _int(answer(sub, "k90"), "k90")
    want = _energy_rank(s, 0.9)
    if k != want:
        raise Fail(f"k90 = {k}, but your own sigma_dW gives {want}", expected=f"{want}", hint="k90 = energy_rank(sigma_dW, 0.9)")
    phi = as_float(answer(sub, "phi_top"), "phi_top")
    chance = as_float(answer(sub, "chance_top"), "chance_top")
    if not (0 <= phi <= 1):
        raise Fail(f"phi_top = {fmt(phi)} is outside [0, 1]")
    if not (0 < chance < 0.2):
        raise Fail(f"chance_top = {fmt(chance)}", expected="max(i, j)/D for i = j = 1: 1/D", hint="the chance level of φ(·,·,1,1) in R^D is 1/D")
    if phi <= 0.5:
        raise Fail(f"phi_top = {fmt(phi)}: the top directions of your two adapters are not shared",
                   expected="> 0.5, as in the paper's Figure 3", hint="compare A of the r = 4 and r = 16 adapters with i = j = 1, after training both")
    return f"k90 = {k}, φ(1,1) = {fmt(phi)} vs chance {fmt(chance)}"
