"""Analysis of a weight update delta_W (LoRA paper §7; Biderman et al. 2024).

All computations are in float64 on the CPU, whatever the input's dtype/device.

* Spectrum: ``singular_values``, ``energy_rank`` (smallest k whose top-k singular
  values hold ``threshold`` of Σσ², Biderman et al. 2024 §4.4), ``stable_rank``
  (‖M‖_F² / ‖M‖₂²), ``spectrum_summary``.
* Subspace similarity (LoRA §7.2, eq. 4): with U = right singular vectors of A
  (A: (r, in), U = svd(A).Vh.T: (in, r), columns by decreasing σ),
  φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) ∈ [0, 1].
  Two independent uniformly random subspaces of dims i, j in R^D have
  E‖U_iᵀ U_j‖_F² = i·j/D, so the chance level is E φ = max(i, j)/D.
* Table 7 (LoRA §7.3): ‖Uᵀ W V‖_F for W: (d, k) projected on U: (d, r), V: (k, r)
  taken as the top-r singular vectors of delta_W, of W itself, or random frames
  (E‖Uᵀ W V‖_F² = r²‖W‖_F²/(d·k) for independent Haar frames, so the analytic
  random value is r‖W‖_F/√(d·k)), and the amplification ‖ΔW‖_F / ‖Uᵀ W V‖_F.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "singular_values",
    "energy_fraction",
    "energy_rank",
    "stable_rank",
    "numerical_rank",
    "SpectrumSummary",
    "spectrum_summary",
    "right_singular_basis",
    "subspace_similarity",
    "subspace_similarity_grid",
    "chance_similarity",
    "chance_similarity_grid",
    "random_orthonormal",
    "projection_norm",
    "random_projection_norm",
    "Table7",
    "table7",
]


def _f64(M: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(M).detach().to(device="cpu", dtype=torch.float64)


def _sigma(M_or_sigma: torch.Tensor) -> torch.Tensor:
    """Singular values, descending: computed from a matrix, or taken as given (1-D)."""
    t = _f64(M_or_sigma)
    if t.dim() == 1:
        if (t < 0).any():
            raise ValueError("singular values must be non-negative")
        return torch.sort(t, descending=True).values
    return singular_values(t)


# ----------------------------------------------------------------------------- spectrum


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """σ₁ ≥ σ₂ ≥ … ≥ 0 of a 2-D M, float64 (``torch.linalg.svdvals``)."""
    M = _f64(M)
    if M.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(M.shape)}")
    return torch.linalg.svdvals(M)


def energy_fraction(M_or_sigma: torch.Tensor) -> torch.Tensor:
    """Cumulative energy Σ_{i≤k} σᵢ² / Σ σᵢ² for k = 1..n (last entry exactly 1; all zeros for M = 0)."""
    energy = torch.cumsum(_sigma(M_or_sigma) ** 2, dim=0)
    if energy.numel() == 0 or energy[-1] == 0:
        return torch.zeros_like(energy)
    return energy / energy[-1]


def energy_rank(M_or_sigma: torch.Tensor, threshold: float = 0.9) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ threshold · Σ σᵢ² (Biderman et al. 2024); 0 for a zero matrix."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    frac = energy_fraction(M_or_sigma)
    if frac.numel() == 0 or frac[-1] == 0:
        return 0
    # a relative slack of 1e-12 so that e.g. diag(1, 1) at threshold 0.5 gives 1, not 2
    return int((frac < threshold * (1.0 - 1e-12)).sum().item()) + 1


def stable_rank(M_or_sigma: torch.Tensor) -> float:
    """‖M‖_F² / ‖M‖₂² = Σσᵢ² / σ₁² ∈ [1, rank(M)]; 0.0 for a zero matrix."""
    sigma = _sigma(M_or_sigma)
    if sigma.numel() == 0 or sigma[0] == 0:
        return 0.0
    return float((sigma**2).sum() / sigma[0] ** 2)


def numerical_rank(M: torch.Tensor, rtol: float | None = None) -> int:
    """Number of σᵢ > rtol · σ₁ (default rtol = max(shape) · float64 eps, as numpy.linalg.matrix_rank)."""
    M = _f64(M)
    sigma = singular_values(M)
    if sigma.numel() == 0 or sigma[0] == 0:
        return 0
    if rtol is None:
        rtol = max(M.shape) * torch.finfo(torch.float64).eps
    return int((sigma > rtol * sigma[0]).sum().item())


@dataclass(frozen=True)
class SpectrumSummary:
    """One line about a matrix's spectrum (float64)."""

    shape: tuple[int, int]
    frobenius: float  # ‖M‖_F
    spectral: float  # ‖M‖₂ = σ₁
    numerical_rank: int
    stable_rank: float  # ‖M‖_F² / ‖M‖₂²
    energy_rank: int  # at `threshold`
    threshold: float
    top_sigma: tuple[float, ...]  # the first few σᵢ

    def as_dict(self) -> dict:
        return asdict(self)


def spectrum_summary(M: torch.Tensor, threshold: float = 0.9, top: int = 5) -> SpectrumSummary:
    """Frobenius/spectral norms, numerical, stable and energy ranks, and the top σ of a matrix."""
    M = _f64(M)
    sigma = singular_values(M)
    return SpectrumSummary(
        shape=(M.shape[0], M.shape[1]),
        frobenius=float(torch.sqrt((sigma**2).sum())),
        spectral=float(sigma[0]) if sigma.numel() else 0.0,
        numerical_rank=numerical_rank(M),
        stable_rank=stable_rank(sigma),
        energy_rank=energy_rank(sigma, threshold),
        threshold=threshold,
        top_sigma=tuple(float(s) for s in sigma[:top]),
    )


# ----------------------------------------------------------------------------- subspace similarity (§7.2)


def right_singular_basis(A: torch.Tensor) -> torch.Tensor:
    """U = svd(A).Vh.T: (in, min(r, in)), orthonormal columns = right singular vectors of A (r, in), σ descending."""
    A = _f64(A)
    if A.dim() != 2:
        raise ValueError(f"expected A of shape (r, in), got {tuple(A.shape)}")
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)  # Vh: (min(r, in), in)
    return Vh.T


def _overlap_sq(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """(U1ᵀ U2)² elementwise: (r1, r2), entry [a, b] = cos² between singular directions a of A1 and b of A2."""
    U1, U2 = right_singular_basis(A1), right_singular_basis(A2)  # (in, r1), (in, r2)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"A1 and A2 must have the same input dimension, got {U1.shape[0]} and {U2.shape[0]}")
    return (U1.T @ U2) ** 2  # (r1, r2)


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) ∈ [0, 1] (LoRA §7.2, eq. 4)."""
    O = _overlap_sq(A1, A2)
    r1, r2 = O.shape
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"need 1 <= i <= {r1} and 1 <= j <= {r2}, got i={i}, j={j}")
    return float(O[:i, :j].sum() / min(i, j))


def subspace_similarity_grid(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(A1, A2, i, j) for all i ≤ r1, j ≤ r2 as an (r1, r2) float64 tensor; entry [i-1, j-1] is φ(i, j)."""
    O = _overlap_sq(A1, A2)
    r1, r2 = O.shape
    S = O.cumsum(0).cumsum(1)  # S[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖_F²
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return S / torch.minimum(i, j)


def chance_similarity(i: int, j: int, D: int) -> float:
    """E φ for independent uniformly random subspaces of dims i, j in R^D: (i·j/D) / min(i, j) = max(i, j)/D."""
    if not (1 <= i <= D and 1 <= j <= D):
        raise ValueError(f"need 1 <= i, j <= D, got i={i}, j={j}, D={D}")
    return max(i, j) / D


def chance_similarity_grid(r1: int, r2: int, D: int) -> torch.Tensor:
    """The chance level max(i, j)/D for i ≤ r1, j ≤ r2, shaped like ``subspace_similarity_grid``."""
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / D


def random_orthonormal(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random (n, k) frame with orthonormal columns (QR of a Gaussian, signs fixed), float64."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    G = torch.randn(n, k, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)  # (n, k), (k, k)
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1.0
    return Q * signs  # sign fix makes the distribution exactly Haar


# ----------------------------------------------------------------------------- Table 7 (§7.3)


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """‖Uᵀ W V‖_F with W (d, k), U (d, r), V (k, r): how much of W lives in the r-dim subspaces U, V."""
    W, U, V = _f64(W), _f64(U), _f64(V)
    return float(torch.linalg.matrix_norm(U.T @ W @ V))  # (r, d) @ (d, k) @ (k, r) -> (r, r)


def random_projection_norm(W_fro: float, r: int, d: int, k: int) -> float:
    """r‖W‖_F/√(d·k) = √E‖Uᵀ W V‖_F² for independent Haar frames U (d, r), V (k, r)."""
    return r * W_fro / math.sqrt(d * k)


@dataclass(frozen=True)
class Table7:
    """One column of the LoRA paper's Table 7 for a weight W and its update delta_W at rank r."""

    r: int
    shape: tuple[int, int]  # (d, k) of W
    W_fro: float  # ‖W‖_F
    delta_W_fro: float  # ‖ΔW‖_F
    proj_delta_W: float  # ‖Uᵀ W V‖_F, U, V = top-r left/right singular vectors of ΔW
    proj_W: float  # ‖Uᵀ W V‖_F, U, V = top-r singular vectors of W itself (= √Σ_{i≤r} σᵢ(W)²)
    proj_random: float  # ‖Uᵀ W V‖_F, random orthonormal frames, mean over n_random draws
    proj_random_analytic: float  # r‖W‖_F/√(d·k)
    n_random: int
    amplification: float  # ‖ΔW‖_F / proj_delta_W

    def as_dict(self) -> dict:
        return asdict(self)


def _top_frames(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)  # (d, m), (m,), (m, k)
    return U[:, :r], Vh[:r].T  # (d, r), (k, r)


def table7(
    W: torch.Tensor,
    delta_W: torch.Tensor,
    r: int,
    generator: torch.Generator | None = None,
    n_random: int = 8,
) -> Table7:
    """‖Uᵀ W V‖_F on ΔW's, W's and random top-r directions, the norms, and the amplification (LoRA §7.3, Table 7).

    The paper (GPT-3, layer 48, W_q) finds random < ΔW directions ≪ W's directions, and an
    amplification ‖ΔW‖_F / ‖Uᵀ W V‖_F of ≈ 21.5 at r = 4 and ≈ 1.9 at r = 64.
    """
    W, delta_W = _f64(W), _f64(delta_W)
    if W.dim() != 2 or W.shape != delta_W.shape:
        raise ValueError(f"W and delta_W must be matrices of one shape, got {tuple(W.shape)} and {tuple(delta_W.shape)}")
    d, k = W.shape
    if not 1 <= r <= min(d, k):
        raise ValueError(f"need 1 <= r <= min(d, k) = {min(d, k)}, got {r}")
    if n_random < 1:
        raise ValueError("n_random must be >= 1")

    U, V = _top_frames(delta_W, r)
    proj_delta_W = projection_norm(W, U, V)
    U, V = _top_frames(W, r)
    proj_W = projection_norm(W, U, V)
    proj_random = sum(
        projection_norm(W, random_orthonormal(d, r, generator), random_orthonormal(k, r, generator))
        for _ in range(n_random)
    ) / n_random

    W_fro = float(torch.linalg.matrix_norm(W))
    delta_W_fro = float(torch.linalg.matrix_norm(delta_W))
    return Table7(
        r=r,
        shape=(d, k),
        W_fro=W_fro,
        delta_W_fro=delta_W_fro,
        proj_delta_W=proj_delta_W,
        proj_W=proj_W,
        proj_random=proj_random,
        proj_random_analytic=random_projection_norm(W_fro, r, d, k),
        n_random=n_random,
        amplification=delta_W_fro / proj_delta_W if proj_delta_W > 0 else math.inf,
    )
