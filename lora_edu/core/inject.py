"""Putting LoRA into a model: freeze, inject by name, switch/disable/delete adapters, merge, unload.

LoRA, Hu et al. 2021, §4.2 ("Applying LoRA to Transformer"): the pretrained weights
are frozen and low-rank updates are added to chosen weight matrices — in the paper
W_q and W_v of every attention block.  Here the choice is made by *name*: every layer
whose qualified name matches one of ``targets`` is replaced, in place, by a LoRA layer
that wraps the very same module object (its weights are not copied).

Matching rule for a target string ``t`` against a qualified module name ``n``
(e.g. ``"blocks.0.attn.q_proj"``):

* ``n == t``, or ``n`` ends with ``"." + t`` (``"q_proj"``, ``"attn.q_proj"``,
  ``"blocks.0.attn.q_proj"`` all match), or
* ``re.fullmatch(t, n)`` (``r"blocks\\.[01]\\..*_proj"``).

Every target must match at least one module, and every matched module must be a layer
LoRA can wrap (:mod:`lora_edu.core.kinds`).  Every operation here checks everything
first and changes nothing when it raises.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from lora_edu.core.config import AdapterConfig, check_adapter_name
from lora_edu.core.kinds import lora_wrapper, wrap
from lora_edu.core.layers import LoRALayer

__all__ = [
    "active_adapter",
    "adapter_names",
    "add_lora",
    "check_mergeable",
    "check_new_adapter",
    "delete_adapter",
    "disable_lora",
    "find_targets",
    "find_trainable_modules",
    "freeze",
    "lora_overlap",
    "lora_B_parameters",
    "lora_layers",
    "lora_parameters",
    "merge_lora",
    "set_adapter",
    "set_submodule",
    "tied_weights",
    "trainable_modules_of",
    "unload_lora",
    "unmerge_lora",
]


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
        targets = [targets]
    elif targets is None or not isinstance(targets, Iterable):
        raise TypeError(f"targets must be a layer name, a regex, or a list of them (e.g. ['q_proj', 'v_proj']), got {targets!r}")
    out = list(targets)
    if not out or not all(isinstance(t, str) and t for t in out):
        raise ValueError(f"targets must be a non-empty string or list of non-empty strings, got {targets!r}")
    return out


def _matches(target: str, name: str, pattern: re.Pattern | None) -> bool:
    if name == target or name.endswith("." + target):
        return True
    return pattern is not None and pattern.fullmatch(name) is not None


def base_module_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules as the base model has them: a LoRA layer counts as one module, its insides don't."""
    inside: list[str] = []
    out = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoRALayer):
            inside.append(name)
        out.append((name, module))
    return out


def _wrappable(module: nn.Module) -> bool:
    return isinstance(module, LoRALayer) or lora_wrapper(module) is not None


def _describe_available(model: nn.Module) -> str:
    names = [n for n, m in base_module_names(model) if _wrappable(m)]
    if not names:
        return "the model has no layer LoRA can wrap (nn.Linear, nn.Embedding, transformers' Conv1D)"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    listing = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
    return f"short names: {short}; layers: {listing}"


def _refusal(target: str, name: str, module: nn.Module, model: nn.Module) -> str:
    what = type(module).__name__
    if isinstance(module, nn.Linear) and module.weight.device.type == "meta":
        why = ("it subclasses nn.Linear and overrides forward(), and on the meta device there are no weights to check that "
               f"it still computes x Wᵀ + b; add LoRA after materialising the weights, or declare it with "
               f"lora_edu.register_lora_layer({what}, lora_edu.LoRALinear)")
    elif isinstance(module, nn.Linear):
        why = ("it subclasses nn.Linear but its forward() does not compute x Wᵀ + b, so a LoRA branch beside it "
               "would not be ΔW x; wrap it with your own LoRALayer subclass or target another layer")
    elif any(_wrappable(m) for m in module.children()):
        inner = [f"{name}.{n}" for n, m in module.named_children() if _wrappable(m)]
        why = f"it is a container; target the layers inside it, e.g. {inner[:4]}"
    else:
        why = "LoRA wraps single linear or embedding layers (nn.Linear, nn.Embedding, transformers' Conv1D)"
    return f"target {target!r} matched {name!r}, a {what}: {why}. Layers that can be wrapped — {_describe_available(model)}"


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """The qualified names that ``targets`` selects (see the module docstring), validated."""
    targets = _as_list(targets)
    candidates = base_module_names(model)
    selected: dict[str, None] = {}
    for t in targets:
        try:
            pattern = re.compile(t)
        except re.error:
            pattern = None  # not a regular expression: plain name matching only
        hits = [(n, m) for n, m in candidates if _matches(t, n, pattern)]
        if not hits:
            raise ValueError(f"target {t!r} matches no module. Layers that can be wrapped — {_describe_available(model)}")
        for n, m in hits:
            if not _wrappable(m):
                raise TypeError(_refusal(t, n, m, model))
            selected[n] = None
    return list(selected)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def tied_weights(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """For each layer in ``names``: the other parameters that share its weight tensor (tied embedding/lm_head)."""
    by_tensor: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(pname)
    out = {}
    for n in names:
        W = getattr(model.get_submodule(n), "weight", None)
        if not isinstance(W, torch.Tensor):  # a quantised base (variants.NF4Linear) has no float weight to share
            continue
        own = {f"{n}.weight", f"{n}.base.weight"}
        others = [p for p in by_tensor.get(id(W), []) if p not in own]
        if others:
            out[n] = others
    return out


def check_new_adapter(model: nn.Module, targets: str | Sequence[str], r: int, alpha: float, dropout: float, rslora: bool,
                      adapter: str, kind: str = "LoRA") -> list[str]:
    """The checks every injector makes before changing anything; returns the target layer names.

    The adapter name is valid and new, the hyper-parameters are valid, every target matches,
    no target already carries adapters of another ``kind`` (e.g. DoRA), and nothing is merged.
    """
    check_adapter_name(adapter)
    AdapterConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora)  # validates the hyper-parameters
    names = find_targets(model, targets)
    for n in names:
        module = model.get_submodule(n)
        here = getattr(module, "adapter_kind", kind)
        if here != kind:
            here = "plain LoRA" if here == "LoRA" else here
            raise TypeError(f"{n!r} already carries {here} adapters {sorted(module.adapters)}; {here} and {kind} adapters "
                            "cannot share a layer here. unload_lora(model, merge=False) first, or target other layers")
    if adapter in adapter_names(model):
        raise ValueError(
            f"the model already has an adapter named {adapter!r} (double injection). "
            f"Pass adapter='<another name>' to add a second adapter, or delete_adapter(model, {adapter!r}) first"
        )
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"{merged[0]!r} has a merged adapter; unmerge_lora(model) before adding another adapter")
    return names


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
    ``trainable_modules`` (e.g. a freshly initialised classification head, which is
    then also saved with the adapter).  A layer that already carries LoRA gets a
    second, named adapter, which becomes the active one.  Everything is checked
    before anything changes; a target whose weight is tied to another layer's
    (e.g. an embedding shared with the output head) gets a warning, as in PEFT.
    """
    names = check_new_adapter(model, targets, r, alpha, dropout, rslora, adapter, kind="LoRA")
    extra = find_trainable_modules(model, trainable_modules, names)
    for n, others in tied_weights(model, names).items():
        warnings.warn(
            f"{n!r} shares its weight with {others}: merging this adapter will change those too, so the merged model "
            "will differ from the unmerged one. Keep the adapter unmerged, or untie the weights first",
            stacklevel=2,
        )
    freeze(model)
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, LoRALayer):
            m.add_adapter(adapter, r, alpha, dropout, rslora)
        else:
            set_submodule(model, n, wrap(m, r, alpha, dropout, rslora, adapter))
    set_adapter(model, adapter)
    for n in extra:
        model.get_submodule(n).requires_grad_(True)
    _trainable_registry(model)[adapter] = list(extra)
    return model


def lora_overlap(model: nn.Module, module: str, lora_paths: Iterable[str]) -> list[str]:
    """The LoRA layers (or targets) among ``lora_paths`` that ``module`` is, contains, or shares a parameter with (tied)."""
    lora_paths = list(lora_paths)
    shared = {id(p): n for n in lora_paths for p in model.get_submodule(n).parameters()}
    hits = {n for n in lora_paths if n == module or n.startswith(module + ".")}
    hits |= {shared[id(p)] for p in model.get_submodule(module).parameters() if id(p) in shared}
    return sorted(hits)


def find_trainable_modules(model: nn.Module, names: Sequence[str], targets: Iterable[str] = ()) -> list[str]:
    """Validate ``trainable_modules``: exact names or dotted suffixes of existing modules that hold no LoRA.

    A trainable module must not be, contain, or share a parameter with (tied weights) a LoRA
    layer or one of ``targets`` (the layers about to be wrapped): making it trainable would
    unfreeze their base weights.
    """
    names = [names] if isinstance(names, str) else list(names or ())
    out = []
    all_names = [n for n, _ in base_module_names(model)]
    lora = set(targets) | {n for n, _ in lora_layers(model)}
    for t in names:
        if not isinstance(t, str) or not t:
            raise TypeError(f"trainable_modules must be module names, got {t!r}")
        hits = [n for n in all_names if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"trainable module {t!r} not found; top-level modules: {[n for n, _ in model.named_children()]}")
        for n in hits:
            inside = lora_overlap(model, n, lora)
            if inside:
                raise ValueError(
                    f"trainable module {n!r} is, contains or shares weights with the LoRA layer(s) {inside[:4]}: making it "
                    "trainable would unfreeze their base weights. List only plain modules (e.g. a new head) in trainable_modules"
                )
            out.append(n)
    return out


def _trainable_registry(model: nn.Module) -> dict[str, list[str]]:
    """Per-adapter list of fully trainable modules, kept on the model object."""
    registry = getattr(model, "lora_trainable_modules", None)
    if registry is None:
        registry = {}
        model.lora_trainable_modules = registry
    return registry


def trainable_modules_of(model: nn.Module, adapter: str) -> list[str]:
    """The fully trainable modules (e.g. a new head) that belong to ``adapter``."""
    return list(_trainable_registry(model).get(adapter, []))


def set_trainable_modules(model: nn.Module, adapter: str, modules: Sequence[str]) -> None:
    """Record ``modules`` as fully trainable modules of ``adapter`` (used by the adapter loaders)."""
    _trainable_registry(model)[adapter] = list(modules)


def adapter_names(model: nn.Module) -> list[str]:
    """All adapter names present anywhere in the model: in module order, and on each layer in order of creation."""
    seen: dict[str, None] = {}
    for _, layer in lora_layers(model):
        for n in layer.adapters:
            seen[n] = None
    return list(seen)


def active_adapter(model: nn.Module) -> str | None:
    """The model's active adapter (layers that lack it run as their base layer)."""
    names = {layer.active_adapter for _, layer in lora_layers(model)} - {None}
    if len(names) > 1:
        raise RuntimeError(f"layers disagree on the active adapter: {sorted(names)}; call set_adapter(model, name)")
    return next(iter(names), None)


def _require_lora(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; call add_lora(model, targets=..., r=..., alpha=...) first")
    return layers


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the single active adapter: only it is used in forward and only it is trainable."""
    layers = _require_lora(model)
    if name is not None and name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r} in the model; available: {adapter_names(model)}")
    merged = {layer.merged_adapter for _, layer in layers} - {None}
    if merged and merged != {name}:
        raise RuntimeError(f"adapter {sorted(merged)} is merged; unmerge_lora(model) before switching to {name!r}")
    for _, layer in layers:
        layer.set_adapter(name if name in layer.adapters else None)


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Context manager: inside it the model computes the plain base model (no ΔW anywhere)."""
    layers = _require_lora(model)
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"cannot disable LoRA while adapters are merged (e.g. {merged[0]!r}); unmerge_lora(model) first")
    previous = [layer.disabled for _, layer in layers]
    for _, layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for (_, layer), p in zip(layers, previous):
            layer.disabled = p


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer.

    If it was the active adapter, the first remaining adapter becomes active on every
    layer that has it (layers without it run as their base layer), so the model and
    :func:`active_adapter` agree; with none left, the model computes the base model.
    """
    layers = _require_lora(model)
    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r} in the model; available: {adapter_names(model)}")
    merged = [n for n, layer in layers if layer.merged_adapter == name]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged at {merged[0]!r}; unmerge_lora(model) before deleting it")
    was_active = active_adapter(model) == name
    for _, layer in layers:
        if name in layer.adapters:
            layer.delete_adapter(name)
    _trainable_registry(model).pop(name, None)
    remaining = adapter_names(model)
    if was_active:
        set_adapter(model, remaining[0] if remaining else None)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (A and B of the active adapter), for the optimizer."""
    params = []
    for _, layer in _require_lora(model):
        if layer.active_adapter is not None:
            params += [p for p in layer.lora_factors() if p.requires_grad]
    return params


def lora_B_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable B factors of the active adapter (LoRA+, Hayou et al. 2024, gives them a larger learning rate)."""
    return [layer.lora_factors()[1] for _, layer in lora_layers(model)
            if layer.active_adapter is not None and layer.lora_factors()[1].requires_grad]


def check_mergeable(layers: Iterable[tuple[str, LoRALayer]]) -> None:
    """Raise ``RuntimeError`` with the layer's own reason if one of ``layers`` can never be merged (e.g. a 4-bit base)."""
    for n, layer in layers:
        why = layer.merge_refusal()
        if why is not None:
            raise RuntimeError(f"{n!r}: {why}")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapter into every base weight: W ← W + s·B A.  Refuses a second merge."""
    layers = [(n, layer) for n, layer in _require_lora(model) if layer.active_adapter is not None]
    if not layers:
        raise RuntimeError("no layer has an active adapter to merge; set_adapter(model, name) first")
    check_mergeable(layers)
    already = [n for n, layer in layers if layer.merged]
    if already:
        raise RuntimeError(
            f"the model is already merged (e.g. {already[0]!r}); merging again would add ΔW twice. Call unmerge_lora(model) first"
        )
    disabled = [n for n, layer in layers if layer.disabled]
    if disabled:
        raise RuntimeError(f"cannot merge inside disable_lora() (e.g. {disabled[0]!r} is disabled)")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`: W ← W − s·B A in every merged layer, with the factors that were merged."""
    merged = [layer for _, layer in _require_lora(model) if layer.merged]
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
    layers = _require_lora(model)
    if merge and any(layer.disabled for _, layer in layers):
        raise RuntimeError("cannot unload with merge=True inside disable_lora()")
    if merge:
        check_mergeable([(n, layer) for n, layer in layers if layer.active_adapter is not None and not layer.merged])
    for _, layer in layers:
        if merge and layer.merged:
            layer._check_merged_factors()  # the merged ΔW is kept: it must still be s·B A (raises before anything changes)
    for name, layer in layers:
        if merge and not layer.merged and layer.active_adapter is not None:
            layer.merge()
        if not merge and layer.merged:
            layer.unmerge()
        set_submodule(model, name, layer.base)
    if "lora_trainable_modules" in vars(model):  # the plain model carries no LoRA bookkeeping
        del model.lora_trainable_modules
    return model
