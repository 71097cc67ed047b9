"""LoRA layers: a frozen base layer plus a trainable low-rank update ΔW = s·B A.

LoRA, Hu et al. 2021 (arXiv 2106.09685), §4.1: for a frozen weight W ∈ R^{d_out×d_in}

    h = W x + ΔW x = W x + s · B A x,     B ∈ R^{d_out×r},  A ∈ R^{r×d_in},  r ≪ min(d_in, d_out)

with A random and B = 0 at initialisation (so ΔW = 0 and the adapted model *is* the
base model at step 0), and the scale s = α/r (§4.1) or α/√r (rsLoRA).  In PyTorch's
row-vector convention (``nn.Linear`` computes ``x @ W.T + b``) the same thing reads

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ

which is exactly :meth:`LoRALinear.forward`.

One layer can hold several *named adapters* (one per task).  At most one is active:
the others are kept but neither used nor trained.  ``layer.A`` / ``layer.B`` /
``layer.r`` / ``layer.scale`` refer to the active adapter, so a single-adapter layer
reads like the paper.

Merging (§4.1, "No Additional Inference Latency") folds ΔW into W.  The merge is
correct by construction: ``merge()`` remembers the exact factors it added, freezes
them (and drops their pending gradients), and ``unmerge()`` subtracts exactly that.
The active and the merged adapter, and every adapter's r, α and scale rule, travel with
``state_dict()`` (as the layer's extra state), so a merged checkpoint loaded into a fresh
LoRA model with the same adapters is not merged a second time and computes what the saved
model computed; a model whose adapter has another r, α or scale rule refuses the load
(its s would differ: unmerged it would compute another function, and unmerge would
subtract another ΔW than the one inside W).

Precision (one policy, :mod:`lora_edu.core.config`): adapters are float32 on a
bfloat16/float16 base; ΔW is computed in at least float32 and rounded into W once.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.core.config import AdapterConfig, adapter_dtype, check_adapter_name, merge_dtype, warn_if_rank_exceeds_shape

__all__ = ["LoRALayer", "LoRALinear", "LoRAEmbedding", "read_extra_state"]


def read_extra_state(state) -> dict | str:
    """The layer's ``_extra_state`` from a state dict: a dict (JSON format) or the first format's plain string.

    A damaged entry (not a uint8 tensor of UTF-8 text, or JSON that is not an object) raises ``RuntimeError``.
    """
    if not isinstance(state, torch.Tensor):
        raise RuntimeError(f"the LoRA layer's _extra_state in the state dict is a {type(state).__name__}, not the uint8 tensor "
                           "that state_dict() writes; the state dict is damaged")
    try:
        text = bytes(state.detach().cpu().reshape(-1).tolist()).decode() if state.dtype == torch.uint8 else None
        fields = json.loads(text) if text is not None and text.startswith("{") else text
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RuntimeError(f"the LoRA layer's _extra_state in the state dict is not valid UTF-8 JSON ({e}); the state dict is "
                           "damaged. Save it again with model.state_dict()") from None
    if fields is None or not isinstance(fields, (dict, str)):
        raise RuntimeError(f"the LoRA layer's _extra_state in the state dict has dtype {state.dtype}, not uint8 JSON; "
                           "the state dict is damaged")
    return fields


@dataclass
class _MergedFactors:
    """What ``merge()`` added to W: the factors as they were, so ``unmerge()`` subtracts exactly that."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    versions: tuple[int, int]  # in-place version counters of the live A and B at merge time


def _after_load(layer: LoRALayer, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: a layer loaded as merged remembers (and freezes) the factors it was merged
    with; a layer whose active or merged adapter the load changed makes only the new active one trainable."""
    if layer.merged_adapter is not None:
        layer._remember_merged(layer.merged_adapter)
    if layer._state_changed_by_load:
        layer._state_changed_by_load = False
        layer.set_adapter(layer.active_adapter)


class LoRALayer(nn.Module):
    """Shared machinery: a frozen ``base`` layer and a dictionary of named adapters.

    Subclasses say how A and B are shaped and initialised (:meth:`init_factors`), how
    B A is laid out against the base weight (:meth:`to_weight_layout`), and how the
    branch is computed (:meth:`lora_forward`).
    """

    base: nn.Module
    #: what kind of adapters the layer holds; :func:`lora_edu.add_lora` adds only to ``"LoRA"`` layers (DoRA says ``"DoRA"``)
    adapter_kind = "LoRA"

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)  # freeze W (and b): only A and B learn
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.adapters: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.disabled = False  # set by lora_edu.disable_lora(): run the plain base layer
        self._merged: _MergedFactors | None = None
        self._state_changed_by_load = False
        self.register_load_state_dict_post_hook(_after_load)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        """Create adapter ``name`` with fresh factors and make it active (everything checked first)."""
        check_adapter_name(name)
        config = AdapterConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora)  # validates r, α, dropout, rslora
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete_adapter() it first or pick another name")
        if self.merged:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() before adding adapters")
        W = self.weight
        A, B = self.init_factors(config.r, device=W.device, dtype=adapter_dtype(W.dtype))
        self._install_adapter(name, config, A, B)

    def _install_adapter(self, name: str, config: AdapterConfig, A: torch.Tensor, B: torch.Tensor) -> None:
        """Register fresh factors A (r, in), B (out, r) as adapter ``name`` and make it active; warns when r > min(in, out)."""
        warn_if_rank_exceeds_shape(config.r, A.shape[1], B.shape[0])
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapters[name] = config
        self.set_adapter(name)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the one adapter that is used and trained (``None``: none)."""
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter {name!r} on this layer; available: {sorted(self.adapters)}")
        if self.merged and name != self.merged_adapter:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() before switching adapters")
        self.active_adapter = name
        for n in self.adapters:
            trainable = n == name and not self.merged
            self.lora_A[n].requires_grad_(trainable)
            self.lora_B[n].requires_grad_(trainable)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; if it was active, the layer has no active adapter afterwards."""
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} on this layer; available: {sorted(self.adapters)}")
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() it before deleting it")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def reset_parameters(self) -> None:
        """Re-initialise every adapter's A and B (ΔW = 0), e.g. after ``to_empty()`` from the meta device."""
        with torch.no_grad():
            for name, cfg in self.adapters.items():
                A, B = self.init_factors(cfg.r, device=self.lora_A[name].device, dtype=self.lora_A[name].dtype)
                self.lora_A[name].copy_(A)
                self.lora_B[name].copy_(B)

    def _active(self) -> str:
        if self.active_adapter is None:
            raise RuntimeError("this layer has no active adapter; add_adapter() or set_adapter() first")
        return self.active_adapter

    # Properties that make the active adapter read like the paper.
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight W (in the base layer's own layout)."""
        return self.base.weight

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
    def merged_adapter(self) -> str | None:
        """The adapter folded into ``base.weight``, if any."""
        return None if self._merged is None else self._merged.name

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def lora_factors(self, name: str | None = None) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) of adapter ``name`` (default: the active one)."""
        name = name or self._active()
        return self.lora_A[name], self.lora_B[name]

    # --------------------------------------------------------------------- merge
    def merge_refusal(self) -> str | None:
        """Why this layer can never be merged (None: it can).  A quantised base says what to do instead."""
        return None

    def delta_weight(self, name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW = s · B A, in the layout of ``base.weight``: the one place merge arithmetic starts from."""
        name = name or self._active()
        A, B = self.lora_A[name], self.lora_B[name]
        return self._delta(A, B, self.adapters[name].scale, dtype)

    def _delta(self, A: torch.Tensor, B: torch.Tensor, scale: float, dtype: torch.dtype | None) -> torch.Tensor:
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return self.to_weight_layout(B @ A) * scale  # (out, r) @ (r, in) -> (out, in), then the base's layout

    def merged_weight(self, name: str | None = None) -> torch.Tensor:
        """W + ΔW computed in ≥ float32 and rounded into W's dtype once: what ``merge()`` writes into W."""
        W = self.weight
        acc = merge_dtype(W.dtype)
        return (W.to(acc) + self.delta_weight(name, dtype=acc)).to(W.dtype)

    def merge(self) -> None:
        """W ← W + ΔW for the active adapter.  A second merge raises (it would add ΔW twice)."""
        name = self._active()
        if self.merged:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is already merged into the base weight; "
                "merging again would add ΔW twice. Call unmerge() first."
            )
        with torch.no_grad():
            self.weight.copy_(self.merged_weight(name))
        self._remember_merged(name)

    def _remember_merged(self, name: str) -> None:
        """Record the merged factors and freeze them: gradients computed unmerged must not be applied while merged."""
        A, B = self.lora_A[name], self.lora_B[name]
        for p in (A, B):
            p.grad = None
            p.requires_grad_(False)
        self._merged = _MergedFactors(name, A.detach().clone(), B.detach().clone(), self.adapters[name].scale, (A._version, B._version))

    def unmerge(self) -> None:
        """W ← W − ΔW, with exactly the factors that ``merge()`` added (whatever happened to A and B since)."""
        if self._merged is None:
            raise RuntimeError("nothing to unmerge: no adapter is merged into this layer")
        m, W = self._merged, self.weight
        with torch.no_grad():
            acc = merge_dtype(W.dtype)
            W.copy_((W.to(acc) - self._delta(m.A, m.B, m.scale, acc)).to(W.dtype))
        self._merged = None
        self.set_adapter(self.active_adapter)  # the active adapter is trainable again

    def _check_merged_factors(self) -> None:
        m = self._merged
        A, B = self.lora_A[m.name], self.lora_B[m.name]
        if (A._version, B._version) == m.versions:
            return
        # A copy of the model (deepcopy, pickle) has fresh version counters: compare the values, then trust the new counters.
        if torch.equal(A.detach(), m.A) and torch.equal(B.detach(), m.B):
            m.versions = (A._version, B._version)
            return
        raise RuntimeError(
            f"adapter {m.name!r} was changed in place while merged, so W no longer equals W + s·B A. "
            "Call unmerge() (exact: it subtracts what merge() added) and merge() again"
        )

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the merge record follows the layer
        out = super()._apply(fn, recurse)
        if self._merged is not None:
            m = self._merged
            A, B = self.lora_A[m.name], self.lora_B[m.name]
            self._merged = _MergedFactors(m.name, fn(m.A), fn(m.B), m.scale, (A._version, B._version))
        return out

    def get_extra_state(self) -> torch.Tensor:
        """The active and the merged adapter, and each adapter's r, α, rslora, as UTF-8 JSON — a uint8 tensor (safetensors)."""
        if self._merged is not None:
            self._check_merged_factors()  # a merged layer whose A or B changed since cannot be described by (W, A, B)
        adapters = {n: {"r": c.r, "alpha": c.alpha, "rslora": c.rslora} for n, c in self.adapters.items()}
        state = json.dumps({"active": self.active_adapter, "merged": self.merged_adapter, "adapters": adapters})
        return torch.tensor(list(state.encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        fields = read_extra_state(state)
        if isinstance(fields, dict):
            active, merged, saved = fields.get("active"), fields.get("merged"), fields.get("adapters", {})
        else:  # the first format: only the merged adapter's name (empty: unmerged)
            merged = fields or None
            active, saved = merged or self.active_adapter, {}
        if not all(n is None or isinstance(n, str) for n in (active, merged)) or not isinstance(saved, dict):
            raise RuntimeError(f"the LoRA layer's _extra_state in the state dict is damaged: {fields!r}")
        for name in {active, merged} - {None}:
            if name not in self.adapters:
                raise RuntimeError(f"the state dict names adapter {name!r}, but this layer has adapters {sorted(self.adapters)}; "
                                   "build the model with the same adapters (add_lora) before load_state_dict")
        if merged is not None and active != merged:
            raise RuntimeError(f"the state dict says adapter {merged!r} is merged but {active!r} is active; it is damaged")
        for name, hp in saved.items():  # states written before this field existed have none: nothing to compare
            if name not in self.adapters:
                continue  # its tensors are unexpected keys, which load_state_dict reports
            cfg = self.adapters[name]
            if not isinstance(hp, dict) or (hp.get("r"), hp.get("alpha"), hp.get("rslora")) != (cfg.r, cfg.alpha, cfg.rslora):
                got = hp if not isinstance(hp, dict) else f"r={hp.get('r')}, alpha={hp.get('alpha')}, rslora={hp.get('rslora')}"
                raise RuntimeError(
                    f"the state dict's adapter {name!r} has {got} but this layer's has r={cfg.r}, alpha={cfg.alpha}, "
                    f"rslora={cfg.rslora}: its scale s would differ, so the loaded model would compute another function "
                    f"(and unmerging would subtract another ΔW than the one merged into W). Build the model with the same "
                    f"add_lora(..., r=, alpha=, rslora=) as the saved one"
                )
        self._state_changed_by_load = (active, merged) != (self.active_adapter, self.merged_adapter)
        self.active_adapter = active
        # The factors are loaded after this call; _after_load records them and sets requires_grad.
        self._merged = _MergedFactors(merged, torch.empty(0), torch.empty(0), 0.0, (0, 0)) if merged else None

    # ------------------------------------------------------------------- forward
    def uses_adapter(self) -> bool:
        """True when the forward pass must add the LoRA branch (not merged, not disabled, an adapter active)."""
        if self._merged is not None:
            if self.disabled:
                raise RuntimeError("cannot run the base model while an adapter is merged; unmerge first")
            self._check_merged_factors()
            return False  # ΔW already lives inside W
        return not self.disabled and self.active_adapter is not None

    # Subclass interface ------------------------------------------------------
    def init_factors(self, r: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def to_weight_layout(self, BA: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lora_forward(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        cfg = ", ".join(f"{n}: r={c.r}, alpha={c.alpha:g}, s={c.scale:g}" for n, c in self.adapters.items())
        return f"adapters={{{cfg}}}, active={self.active_adapter!r}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """A linear layer plus LoRA: y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ  (Hu et al. §4.1).

    Shapes: W (out, in) frozen; A (r, in) Kaiming-uniform(a=√5), i.e. U(−1/√in, 1/√in)
    because fan_in of an (r, in) tensor is ``in``; B (out, r) zeros; s = α/r
    (α/√r with ``rslora=True``).  Trainable parameters: r·(in + out).

    ``fan_in_fan_out=True`` wraps a layer that stores W transposed, (in, out), such as
    GPT-2's ``Conv1D``: A and B keep their shapes, only ΔW is transposed at merge time
    (PEFT's flag of the same name).  Dropout acts on the LoRA branch's input only.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 adapter: str = "default", fan_in_fan_out: bool = False) -> None:
        W = getattr(base, "weight", None)
        if not isinstance(W, torch.Tensor) or W.ndim != 2:
            raise TypeError(f"LoRALinear wraps a linear layer with a 2-D weight, got {type(base).__name__}")
        super().__init__(base)
        self.fan_in_fan_out = fan_in_fan_out
        self.add_adapter(adapter, r, alpha, dropout, rslora)

    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.fan_in_fan_out else 1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.fan_in_fan_out else 0]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def init_factors(self, r, device, dtype):
        A = torch.empty(r, self.in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # fan_in = in_features → bound 1/√in
        B = torch.zeros(self.out_features, r, device=device, dtype=dtype)
        return A, B

    def to_weight_layout(self, BA):
        return BA.T if self.fan_in_fan_out else BA  # (out, in), or (in, out) for a transposed base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ."""
        y = self.base(x)  # x Wᵀ + b: the frozen path
        if not self.uses_adapter():  # merged (ΔW is inside W), disabled, or no active adapter
            return y
        return y + self.lora_forward(x).to(y.dtype)  # + s · dropout(x) Aᵀ Bᵀ: the low-rank path

    def lora_forward(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """s · dropout(x) Aᵀ Bᵀ for adapter ``name`` (default: the active one): (…, in) → (…, r) → (…, out)."""
        name = name or self._active()
        A, B, s = self.lora_A[name], self.lora_B[name], self.adapters[name].scale
        x = self.lora_dropout[name](x.to(A.dtype))  # fp32 adapters on a bf16 base: the branch runs in fp32
        return (x @ A.T @ B.T) * s

    def extra_repr(self) -> str:
        layout = " (weight stored (in, out))" if self.fan_in_fan_out else ""
        return f"in={self.in_features}, out={self.out_features}{layout}, " + super().extra_repr()


class LoRAEmbedding(LoRALayer):
    """``nn.Embedding`` plus LoRA, in the loralib/PEFT convention.

    The embedding table is E (num_embeddings, dim) and the lookup of token t is row t.
    The adapter is A (r, num_embeddings) and B (dim, r); the lookup adds
    s · (row t of Aᵀ) Bᵀ, so ΔE = s · (B A)ᵀ of shape (num_embeddings, dim).

    Init is reversed with respect to ``LoRALinear``: A = 0 and B ~ N(0, 1) (loralib,
    PEFT).  Either factor being zero gives ΔE = 0 at init.  Dropout is stored in the
    config for interoperability but, as in PEFT, not applied to token lookups.
    """

    base: nn.Embedding

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 adapter: str = "default") -> None:
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        super().__init__(base)
        self.add_adapter(adapter, r, alpha, dropout, rslora)

    def init_factors(self, r, device, dtype):
        A = torch.zeros(r, self.base.num_embeddings, device=device, dtype=dtype)
        B = torch.empty(self.base.embedding_dim, r, device=device, dtype=dtype)
        nn.init.normal_(B)
        return A, B

    def to_weight_layout(self, BA):
        return BA.T  # (dim, num_embeddings) -> (num_embeddings, dim), the table's layout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] + s · Aᵀ[ids] Bᵀ."""
        y = self.base(ids)
        if not self.uses_adapter():
            return y
        return y + self.lora_forward(ids).to(y.dtype)

    def lora_forward(self, ids: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """s · Aᵀ[ids] Bᵀ: ids (…) → (…, r) → (…, dim)."""
        name = name or self._active()
        A, B, s = self.lora_A[name], self.lora_B[name], self.adapters[name].scale
        e = self.base
        after_A = F.embedding(ids, A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return (after_A @ B.T) * s

    def extra_repr(self) -> str:
        return f"num={self.base.num_embeddings}, dim={self.base.embedding_dim}, " + super().extra_repr()
