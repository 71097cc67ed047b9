"""Putting LoRA into a model: freeze, inject by name, switch/disable/delete adapters, merge, unload.

LoRA, Hu et al. 2021, §4.2 ("Applying LoRA to Transformer"): the pretrained weights
are frozen and low-rank updates are added to chosen weight matrices — in the paper
W_q and W_v of every attention block.  Here the choice is made by *name*: every
``nn.Linear`` (or ``nn.Embedding``) whose qualified name matches one of ``targets``
is replaced, in place, by a :class:`~lora_edu.layers.LoRALinear` that wraps the very
same module object (its weights are not copied).

Matching rule for a target string ``t`` against a qualified module name ``n``
(e.g. ``"blocks.0.attn.q_proj"``):

* ``n == t``, or ``n`` ends with ``"." + t`` (``"q_proj"``, ``"attn.q_proj"``,
  ``"blocks.0.attn.q_proj"`` all match), or
* ``re.fullmatch(t, n)`` (``r"blocks\\.[01]\\..*_proj"``).

Every target must match at least one module, and every matched module must be a
supported layer type; otherwise a ``ValueError``/``TypeError`` says what exists.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence

import torch.nn as nn

from .layers import LoRAEmbedding, LoRALayer, LoRALinear, validate_hyperparameters

__all__ = [
    "LORA_LAYER_TYPES",
    "register_lora_layer",
    "freeze",
    "add_lora",
    "lora_layers",
    "find_targets",
    "set_adapter",
    "disable_lora",
    "delete_adapter",
    "lora_parameters",
    "merge_lora",
    "unmerge_lora",
    "unload_lora",
    "adapter_names",
]

#: base layer type -> LoRA wrapper type.  Extend with :func:`register_lora_layer`.
LORA_LAYER_TYPES: dict[type[nn.Module], type[LoRALayer]] = {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding}


def register_lora_layer(base_type: type[nn.Module], lora_type: type[LoRALayer]) -> None:
    """Teach :func:`add_lora` to wrap ``base_type`` (e.g. GPT-2's ``Conv1D``) with ``lora_type``."""
    LORA_LAYER_TYPES[base_type] = lora_type


def _wrapper_for(module: nn.Module) -> type[LoRALayer] | None:
    for base_type, lora_type in LORA_LAYER_TYPES.items():
        if type(module) is base_type:  # exact type: a subclass may change forward()
            return lora_type
    return None


def freeze(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter (LoRA §4: W stays fixed). Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Yield ``(qualified_name, layer)`` for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _as_list(targets: str | Iterable[str]) -> list[str]:
    if isinstance(targets, str):
        return [targets]
    out = list(targets)
    if not out or not all(isinstance(t, str) and t for t in out):
        raise ValueError(f"targets must be a non-empty string or list of non-empty strings, got {targets!r}")
    return out


def _matches(target: str, name: str, pattern: re.Pattern | None) -> bool:
    if name == target or name.endswith("." + target):
        return True
    return pattern is not None and pattern.fullmatch(name) is not None


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All named modules except the model itself and modules *inside* a LoRA layer."""
    inside: list[str] = []
    out = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoRALayer):
            inside.append(name)
        out.append((name, module))
    return out


def _supported_names(model: nn.Module) -> list[str]:
    return [n for n, m in _candidate_modules(model) if isinstance(m, LoRALayer) or _wrapper_for(m) is not None]


def _describe_available(model: nn.Module) -> str:
    names = _supported_names(model)
    if not names:
        return "the model has no nn.Linear or nn.Embedding layers"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    listing = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
    return f"short names: {short}; layers: {listing}"


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """The qualified names that ``targets`` selects (see the module docstring), validated."""
    targets = _as_list(targets)
    candidates = _candidate_modules(model)
    selected: dict[str, None] = {}
    for t in targets:
        try:
            pattern = re.compile(t)
        except re.error:
            pattern = None  # not a regular expression: plain name matching only
        hits = [(n, m) for n, m in candidates if _matches(t, n, pattern)]
        if not hits:
            raise ValueError(f"target {t!r} matches no module. Available Linear/Embedding layers — {_describe_available(model)}")
        for n, m in hits:
            if not isinstance(m, LoRALayer) and _wrapper_for(m) is None:
                supported = ", ".join(k.__name__ for k in LORA_LAYER_TYPES)
                if type(m).__name__ == "Conv1D":
                    supported += " (GPT-2's Conv1D after `import lora_edu.hf`)"
                raise TypeError(
                    f"target {t!r} matched {n!r}, a {type(m).__name__}; LoRA wraps single layers of type {supported}. "
                    f"Target the layers inside it instead — {_describe_available(model)}"
                )
            selected[n] = None
    return list(selected)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    adapter: str = "default",
    trainable_modules: Sequence[str] = (),
) -> nn.Module:
    """Inject adapter ``adapter`` into every layer that ``targets`` selects, in place; returns ``model``.

    Everything is frozen except the new adapter's A and B and the parameters of
    ``trainable_modules`` (e.g. a freshly initialised classification head, which
    is then also saved with the adapter by :func:`lora_edu.save_adapter`).  A layer
    that already carries LoRA gets a second, named adapter, which becomes the active
    one (see :func:`set_adapter`).  Validation happens before anything is changed.
    """
    validate_hyperparameters(r, alpha, dropout)
    names = find_targets(model, targets)
    extra = find_trainable_modules(model, trainable_modules)
    existing = adapter_names(model)
    if adapter in existing:
        raise ValueError(
            f"the model already has an adapter named {adapter!r} (double injection). "
            f"Pass adapter='<another name>' to add a second adapter, or delete_adapter(model, {adapter!r}) first"
        )
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, LoRALayer) and m.merged:
            raise RuntimeError(f"{n!r} has a merged adapter; unmerge_lora(model) before adding another adapter")
    freeze(model)
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, LoRALayer):
            m.add_adapter(adapter, r, alpha, dropout, rslora)
        else:
            _set_submodule(model, n, _wrapper_for(m)(m, r, alpha, dropout, rslora, adapter=adapter))
    set_adapter(model, adapter)
    for n in extra:
        model.get_submodule(n).requires_grad_(True)
    _trainable_registry(model)[adapter] = list(extra)
    return model


def find_trainable_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Validate ``trainable_modules``: exact names or dotted suffixes of existing, non-LoRA modules."""
    names = [names] if isinstance(names, str) else list(names)
    out = []
    all_names = [n for n, _ in model.named_modules() if n]
    for t in names:
        hits = [n for n in all_names if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"trainable module {t!r} not found; top-level modules: {[n for n, _ in model.named_children()]}")
        for n in hits:
            if isinstance(model.get_submodule(n), LoRALayer):
                raise ValueError(f"{n!r} is a LoRA layer; list only plain modules (e.g. a new head) in trainable_modules")
            out.append(n)
    return out


def _trainable_registry(model: nn.Module) -> dict[str, list[str]]:
    """Per-adapter list of fully trainable modules, kept on the model object."""
    if "_lora_trainable_modules" not in model.__dict__:
        model.__dict__["_lora_trainable_modules"] = {}
    return model.__dict__["_lora_trainable_modules"]


def trainable_modules_of(model: nn.Module, adapter: str) -> list[str]:
    return list(_trainable_registry(model).get(adapter, []))


def adapter_names(model: nn.Module) -> list[str]:
    """All adapter names present anywhere in the model, in order of creation."""
    seen: dict[str, None] = {}
    for _, layer in lora_layers(model):
        for n in layer.adapters:
            seen[n] = None
    return list(seen)


def active_adapter(model: nn.Module) -> str | None:
    names = {layer.active_adapter for _, layer in lora_layers(model)} - {None}
    if len(names) > 1:
        raise RuntimeError(f"layers disagree on the active adapter: {sorted(names)}; call set_adapter(model, name)")
    return next(iter(names), None)


def _require_lora(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; call add_lora(model, targets=..., r=..., alpha=...) first")
    return layers


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the single active adapter: only it is used in forward and only it is trainable."""
    layers = _require_lora(model)
    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r} in the model; available: {adapter_names(model)}")
    merged = {l.merged_adapter for _, l in layers} - {None}
    if merged and merged != {name}:
        raise RuntimeError(f"adapter {sorted(merged)} is merged; unmerge_lora(model) before switching to {name!r}")
    for _, layer in layers:
        layer.set_adapter(name if name in layer.adapters else None)


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Context manager: inside it the model computes the plain base model (no ΔW anywhere)."""
    layers = _require_lora(model)
    merged = [n for n, l in layers if l.merged]
    if merged:
        raise RuntimeError(f"cannot disable LoRA while adapters are merged (e.g. {merged[0]!r}); unmerge_lora(model) first")
    previous = [l.disabled for _, l in layers]
    for _, l in layers:
        l.disabled = True
    try:
        yield model
    finally:
        for (_, l), p in zip(layers, previous):
            l.disabled = p


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (layers left with none keep working as the base)."""
    layers = _require_lora(model)
    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r} in the model; available: {adapter_names(model)}")
    for _, layer in layers:
        if name in layer.adapters:
            layer.delete_adapter(name)
    _trainable_registry(model).pop(name, None)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (A and B of the active adapter), for the optimizer."""
    params = []
    for _, layer in _require_lora(model):
        name = layer.active_adapter
        if name is not None:
            params += [p for p in (layer.lora_A[name], layer.lora_B[name]) if p.requires_grad]
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapter into every base weight: W ← W + s·B A.  Refuses a second merge."""
    layers = [(n, l) for n, l in _require_lora(model) if l.active_adapter is not None]
    already = [n for n, l in layers if l.merged]
    if already:
        raise RuntimeError(
            f"the model is already merged (e.g. {already[0]!r}); merging again would add ΔW twice. Call unmerge_lora(model) first"
        )
    for _, layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`: W ← W − s·B A in every merged layer."""
    merged = [l for _, l in _require_lora(model) if l.merged]
    if not merged:
        raise RuntimeError("nothing to unmerge: no adapter is merged into the model")
    for layer in merged:
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Return the model with every LoRA layer replaced by its plain base layer.

    ``merge=True``: the active adapter is merged first (if it is not already), so the
    plain model computes the adapted function.  ``merge=False``: merged adapters are
    unmerged and all adapters are dropped, giving back the base model.
    """
    for name, layer in list(_require_lora(model)):
        if merge and not layer.merged and layer.active_adapter is not None:
            layer.merge()
        if not merge and layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base)
    model.__dict__.pop("_lora_trainable_modules", None)
    return model
