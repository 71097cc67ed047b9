"""LoRA layers: a frozen base layer plus a trainable low-rank update ΔW = s·B A.

LoRA, Hu et al. 2021 (arXiv 2106.09685), §4.1: for a frozen weight W ∈ R^{d_out×d_in}

    h = W x + ΔW x = W x + s · B A x,     B ∈ R^{d_out×r},  A ∈ R^{r×d_in},  r ≪ min(d_in, d_out)

with A random and B = 0 at initialisation (so ΔW = 0 and the adapted model *is* the
base model at step 0), and the scale s = α/r (§4.1) or s = α/√r (rsLoRA,
Kalajdzievski 2023).  In PyTorch's row-vector convention (``nn.Linear`` computes
``x @ W.T + b``) the same thing reads

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ

which is exactly :meth:`LoRALinear.reference_forward`.

One layer can hold several *named adapters* (one per task).  At most one is active:
the others are kept (their tensors stay in ``lora_A`` / ``lora_B``) but neither used
nor trained.  ``layer.A`` / ``layer.B`` / ``layer.r`` / ``layer.scale`` always refer
to the active adapter, so a single-adapter layer reads like the paper.

Precision choices (documented here once, relied on everywhere):

* Adapters on a float64/float32 base share the base dtype.  On a bfloat16/float16
  base the adapters are float32 (the LoRA branch is small, and fp32 master copies of
  the trainable weights are what mixed-precision training wants anyway).
* Merging computes ΔW in at least float32 (float64 for a float64 base), adds it to W
  in that precision and rounds into W's dtype **once**.
* A second ``merge()`` raises instead of adding ΔW twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AdapterConfig", "LoRALayer", "LoRALinear", "LoRAEmbedding", "validate_hyperparameters"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def validate_hyperparameters(r, alpha, dropout) -> None:
    """Raise ``ValueError``/``TypeError`` with an actionable message for bad r, α or dropout."""
    if isinstance(r, bool) or not isinstance(r, int):
        if isinstance(r, float) and r.is_integer():
            raise TypeError(f"r must be an int, got the float {r!r}; pass r={int(r)}")
        raise TypeError(f"r must be a positive int (the rank of ΔW = B A), got {r!r} of type {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be a positive int (the rank of ΔW = B A), got r={r}; try r=8")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite positive number, got {alpha!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (the scale is s = alpha/r), got alpha={alpha}; a common choice is alpha = r or 2r")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of one named adapter."""

    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False

    @property
    def scale(self) -> float:
        """s = α/r (Hu et al. §4.1) or α/√r with ``rslora=True`` (Kalajdzievski 2023)."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @property
    def scale_rule(self) -> str:
        return "alpha/sqrt(r)" if self.rslora else "alpha/r"


class LoRALayer(nn.Module):
    """Shared machinery: a frozen ``base`` layer and a dictionary of named adapters.

    Subclasses define the shapes and init of A and B (:meth:`_make_factors`), the
    LoRA branch of the forward pass (:meth:`lora_forward`), and how ΔW is laid out
    against the base weight (:meth:`delta_weight`).
    """

    base: nn.Module
    base_type: type[nn.Module] = nn.Module  #: the layer type a subclass wraps

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        adapter: str = "default",
    ) -> None:
        if not isinstance(base, self.base_type):
            raise TypeError(f"{type(self).__name__} wraps a {self.base_type.__name__} layer, got {type(base).__name__}")
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)  # freeze W (and b): only A and B learn
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.adapters: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None  # name of the adapter folded into base.weight, if any
        self.disabled = False  # set by lora_edu.disable_lora(): run the plain base layer
        self.add_adapter(adapter, r, alpha, dropout, rslora)

    # ----------------------------------------------------------------- adapters
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        """Create adapter ``name`` (A random, B = 0 or the subclass's convention) and make it active."""
        validate_hyperparameters(r, alpha, dropout)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"adapter names must be Python identifiers (they become state-dict keys), got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete_adapter() it first or pick another name")
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() before adding adapters")
        W = self.base.weight
        dtype = torch.float32 if W.dtype in LOW_PRECISION else W.dtype
        A, B = self._make_factors(r, device=W.device, dtype=dtype)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters[name] = AdapterConfig(r=r, alpha=float(alpha), dropout=float(dropout), rslora=bool(rslora))
        self.set_adapter(name)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the one adapter that is used and trained (``None``: none)."""
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter {name!r} on this layer; available: {sorted(self.adapters)}")
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() before switching adapters"
            )
        self.active_adapter = name
        for n in self.adapters:
            trainable = n == name
            self.lora_A[n].requires_grad_(trainable)
            self.lora_B[n].requires_grad_(trainable)

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} on this layer; available: {sorted(self.adapters)}")
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() it before deleting it")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.adapters[name]
        if self.active_adapter == name:
            self.set_adapter(next(iter(self.adapters), None))

    def _active(self) -> str:
        if self.active_adapter is None:
            raise RuntimeError("this layer has no active adapter; add_adapter() or set_adapter() first")
        return self.active_adapter

    # Properties that make the active adapter read like the paper.
    @property
    def A(self) -> nn.Parameter:
        return self.lora_A[self._active()]

    @property
    def B(self) -> nn.Parameter:
        return self.lora_B[self._active()]

    @property
    def config(self) -> AdapterConfig:
        return self.adapters[self._active()]

    @property
    def r(self) -> int:
        return self.config.r

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    # -------------------------------------------------------------------- merge
    def _merge_dtype(self) -> torch.dtype:
        """At least float32; float64 when the base is float64."""
        W = self.base.weight
        return torch.float64 if W.dtype == torch.float64 else torch.float32

    def merge(self) -> None:
        """W ← W + ΔW, with ΔW computed in ≥ float32 and rounded into W's dtype once.

        Raises ``RuntimeError`` if an adapter is already merged: merging twice would
        add ΔW twice (the merged model would then be W + 2ΔW).
        """
        name = self._active()
        if self.merged_adapter is not None:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is already merged into the base weight; "
                "merging again would add ΔW twice. Call unmerge() first."
            )
        W = self.base.weight
        with torch.no_grad():
            acc = self._merge_dtype()
            W.copy_((W.to(acc) + self.delta_weight(name, dtype=acc)).to(W.dtype))
        self.merged_adapter = name

    def unmerge(self) -> None:
        """W ← W − ΔW (exact in real arithmetic; in low precision see the merge notebook)."""
        if self.merged_adapter is None:
            raise RuntimeError("nothing to unmerge: no adapter is merged into this layer")
        W = self.base.weight
        with torch.no_grad():
            acc = self._merge_dtype()
            W.copy_((W.to(acc) - self.delta_weight(self.merged_adapter, dtype=acc)).to(W.dtype))
        self.merged_adapter = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            if self.merged_adapter is not None:
                raise RuntimeError("cannot run the base model while an adapter is merged; unmerge first")
            return y
        if self.merged_adapter is not None or self.active_adapter is None:
            return y  # ΔW already lives inside W (or there is nothing to add)
        return y + self.lora_forward(x).to(y.dtype)

    # Subclass interface ------------------------------------------------------
    def _make_factors(self, r: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError


class LoRALinear(LoRALayer):
    """``nn.Linear`` plus LoRA: y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ  (Hu et al. §4.1).

    Shapes: W (out, in) frozen; A (r, in) Kaiming-uniform(a=√5), i.e. U(−1/√in, 1/√in)
    because fan_in of an (r, in) tensor is ``in``; B (out, r) zeros; s = α/r
    (α/√r with ``rslora=True``).  Trainable parameters: r·(in + out).

    Dropout acts on the input of the LoRA branch only, and only in training mode.
    """

    base: nn.Linear
    base_type = nn.Linear

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # so code that reads .weight of a Linear keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _make_factors(self, r, device, dtype):
        A = torch.empty(r, self.base.in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # fan_in = in_features → bound 1/√in
        B = torch.zeros(self.base.out_features, r, device=device, dtype=dtype)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ, by the fast path when it applies (see :mod:`lora_edu.fast`).

        The fast path computes exactly :meth:`reference_forward` with one autograd node,
        fused matrix-add calls and the frozen W kept in the compute dtype (merged, disabled
        or no active adapter: one ``F.linear`` with that cached W).  It steps aside (returns
        ``None``) when dropout is in effect, the base weight is trainable, or the dtypes are
        mixed outside autocast; then the general path (``LoRALayer.forward``) runs.
        """
        from . import fast  # local import: fast.py is an optional layer on top of this module

        y = fast.lora_linear_forward(self, x)
        return super().forward(x) if y is None else y

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s · dropout(x) Aᵀ Bᵀ for the active adapter: (…, in) → (…, r) → (…, out)."""
        name = self._active()
        A, B = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(A.dtype))  # fp32 adapters on a bf16 base: compute the branch in fp32
        return (x @ A.T @ B.T) * self.adapters[name].scale

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The readable formula, kept for tests and notebooks: x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ."""
        W, b = self.base.weight, self.base.bias
        y = x @ W.T
        if b is not None:
            y = y + b
        if self.merged or self.disabled or self.active_adapter is None:
            return y
        return y + (self.lora_dropout[self.active_adapter](x) @ self.A.T @ self.B.T) * self.scale

    def delta_weight(self, name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW = s · B @ A, shape (out, in) — the same layout as ``base.weight``."""
        name = name or self._active()
        A, B = self.lora_A[name], self.lora_B[name]
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return (B @ A) * self.adapters[name].scale

    def extra_repr(self) -> str:
        cfg = ", ".join(f"{n}: r={c.r}, alpha={c.alpha:g}, s={c.scale:g}" for n, c in self.adapters.items())
        return f"in={self.in_features}, out={self.out_features}, adapters={{{cfg}}}, active={self.active_adapter!r}, merged={self.merged}"


class LoRAEmbedding(LoRALayer):
    """``nn.Embedding`` plus LoRA, in the loralib/PEFT convention.

    The embedding table is E (num_embeddings, dim) and the lookup of token t is row t.
    The adapter is A (r, num_embeddings) and B (dim, r); the lookup adds
    s · (row t of Aᵀ) Bᵀ, so ΔE = s · (B A)ᵀ of shape (num_embeddings, dim).

    Init is reversed with respect to ``LoRALinear``: A = 0 and B ~ N(0, 1) (loralib,
    PEFT).  Either factor being zero gives ΔE = 0 at init; with A = 0 the update at
    step 0 only touches rows of tokens that were actually seen, and a normal B keeps
    the rows that A learns on a sensible scale.  Dropout is stored in the config for
    interoperability but, as in PEFT, not applied to embedding lookups (dropping
    token ids is meaningless).
    """

    base: nn.Embedding
    base_type = nn.Embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def _make_factors(self, r, device, dtype):
        A = torch.zeros(r, self.base.num_embeddings, device=device, dtype=dtype)
        B = torch.empty(self.base.embedding_dim, r, device=device, dtype=dtype)
        nn.init.normal_(B)
        return A, B

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s · Aᵀ[x] Bᵀ: ids (…) → (…, r) → (…, dim)."""
        name = self._active()
        A, B = self.lora_A[name], self.lora_B[name]
        e = self.base
        after_A = F.embedding(x, A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return (after_A @ B.T) * self.adapters[name].scale

    def delta_weight(self, name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔE = s · (B @ A)ᵀ, shape (num_embeddings, dim) — the layout of ``base.weight``."""
        name = name or self._active()
        A, B = self.lora_A[name], self.lora_B[name]
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return (B @ A).T * self.adapters[name].scale

    def extra_repr(self) -> str:
        cfg = ", ".join(f"{n}: r={c.r}, alpha={c.alpha:g}, s={c.scale:g}" for n, c in self.adapters.items())
        return f"num={self.base.num_embeddings}, dim={self.base.embedding_dim}, adapters={{{cfg}}}, active={self.active_adapter!r}"
