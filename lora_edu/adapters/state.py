"""One adapter in memory: what every file format reads into and writes from.

An :class:`AdapterState` is the adapter alone — per adapted layer its hyper-parameters
and factors A (r, in), B (out, r), plus the parameters of fully trainable extra modules
(e.g. a new classification head).  The native file (:mod:`lora_edu.adapters.native`)
and PEFT's folder (:mod:`lora_edu.adapters.peft`) are two codecs to and from it.

:func:`apply_adapter_state` is the only code that puts an adapter into a model.  It
checks *everything* against the model first — names, layer kinds, shapes, hyper-
parameters, dtypes, finiteness, merged layers, which parameters may be written — and
raises :class:`AdapterFileError` without touching the model; only then does it apply.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lora_edu.core.config import AdapterConfig, adapter_dtype, check_adapter_name, user_stacklevel
from lora_edu.core.inject import (
    adapter_names,
    base_module_names,
    freeze,
    lora_layers,
    lora_overlap,
    set_adapter,
    set_submodule,
    set_trainable_modules,
    trainable_modules_of,
)
from lora_edu.core.kinds import is_transposed_linear, layer_kind, lora_wrapper, wrap
from lora_edu.core.layers import LoRALayer, LoRALinear
from lora_edu.variants.dora import DoRALinear
from lora_edu.variants.nf4 import NF4Linear
from lora_edu.variants.pissa import is_pissa_adapter

__all__ = ["AdapterFileError", "AdapterState", "LayerState", "adapter_state", "apply_adapter_state", "resolve_adapter", "layer_shape"]


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, truncated, or does not fit the model."""


@dataclass(frozen=True)
class LayerState:
    """One adapted layer: ``kind`` ("linear" or "embedding"), its hyper-parameters and factors."""

    kind: str
    config: AdapterConfig
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    m: torch.Tensor | None = None  # (out,) DoRA's magnitude vector (lora_edu.variants.dora); None for plain LoRA
    base_shape: tuple[int, int] | None = None  # (out, in) of the base layer the file was saved from (native files)


@dataclass
class AdapterState:
    """A whole adapter: its name, the adapted layers by module path, and extra trainable modules."""

    name: str
    layers: dict[str, LayerState]
    trainable_modules: list[str] = field(default_factory=list)
    modules: dict[str, torch.Tensor] = field(default_factory=dict)  # full parameter path -> tensor
    init: str | None = None  # "pissa": the adapter was initialised from W's SVD and W replaced by W_res (see adapter_state)


def resolve_adapter(model: nn.Module, adapter: str | None) -> str:
    """The adapter to save: ``adapter`` if the model has it, else the single active one."""
    names = adapter_names(model)
    if not names:
        raise ValueError("the model has no LoRA adapters to save; call add_lora(...) first")
    if adapter is None:
        active = {layer.active_adapter for _, layer in lora_layers(model)} - {None}
        if len(active) != 1:
            raise ValueError(f"pass adapter=<name>: the model has adapters {names} and active {sorted(active)}")
        adapter = active.pop()
    if adapter not in names:
        raise KeyError(f"no adapter {adapter!r}; available: {names}")
    return adapter


def adapter_state(model: nn.Module, adapter: str | None = None) -> AdapterState:
    """The adapter ``adapter`` (default: the active one) of ``model``, detached on the CPU.

    Warns when other parameters are trainable (e.g. an unfrozen base layer): their
    changes are not part of the adapter and would be lost.  Warns, and records
    ``init="pissa"``, for a PiSSA adapter: it only fits the base whose W it replaced by W_res.
    """
    name = resolve_adapter(model, adapter)
    pissa = [path for path, layer in lora_layers(model) if is_pissa_adapter(layer, name)]
    if pissa:
        warnings.warn(
            f"adapter {name!r} was initialised with PiSSA (add_pissa/pissa_init), which replaced W by the residual W_res in "
            f"{pissa[:2]}{' …' if len(pissa) > 2 else ''}: the saved A and B compute the trained model only on that modified base, "
            "not on the original one (the file records init 'pissa'). To share it for the original base, convert it with "
            "lora_edu.variants.pissa_to_lora(model) and apply_converted(original_model, conversion), then save that",
            stacklevel=user_stacklevel(),
        )
    layers = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            A, B = layer.lora_factors(name)
            m = _cpu(layer.lora_magnitude[name]) if isinstance(layer, DoRALinear) else None
            layers[path] = LayerState(layer_kind(layer), layer.adapters[name], _cpu(A), _cpu(B), m)
    extra = trainable_modules_of(model, name)
    modules = {f"{m}.{p}": _cpu(t) for m in extra for p, t in model.get_submodule(m).named_parameters()}
    lora_ids = {id(p) for _, layer in lora_layers(model)
                for p in (*layer.lora_A.values(), *layer.lora_B.values(), *getattr(layer, "lora_magnitude", {}).values())}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids
             and not any(n.startswith(m + ".") for m in extra)]
    if stray:
        warnings.warn(
            f"parameters {stray[:4]}{' …' if len(stray) > 4 else ''} are trainable but not part of adapter {name!r}: "
            "whatever they learned is not saved. Freeze them, or declare their module with add_lora(..., trainable_modules=[...])",
            stacklevel=3,
        )
    return AdapterState(name, layers, extra, modules, init="pissa" if pissa else None)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous()


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of the map LoRA adapts: (num_embeddings, dim) for an embedding; W's storage order does not matter."""
    base = module.base if isinstance(module, LoRALayer) else module
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(module, LoRALayer):
        return module.in_features, module.out_features
    if isinstance(module, NF4Linear):  # a 4-bit base has no float weight (lora_edu.variants.qlora)
        return module.in_features, module.out_features
    d0, d1 = module.weight.shape
    return (d0, d1) if is_transposed_linear(module) else (d1, d0)  # Conv1D stores (in, out), nn.Linear (out, in)


def apply_adapter_state(model: nn.Module, state: AdapterState, cast: bool = False, where: str = "") -> nn.Module:
    """Put ``state`` into ``model`` as the active adapter: validate everything, then apply.

    The model may be plain (layers are wrapped as needed) or already carry LoRA; an
    adapter of the same name must cover the same layers with the same r, α, scale
    rule and dropout (linear layers; its A and B are overwritten).  ``cast=True`` converts factors whose dtype
    differs from the model's adapter dtype; otherwise that is an error.
    """
    prefix = f"{where}: " if where else ""

    def fail(msg: str):
        raise AdapterFileError(prefix + msg)

    try:
        name = check_adapter_name(state.name)
    except ValueError as e:
        fail(str(e))
    if not state.layers:
        fail("the adapter has no layers")
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        fail(f"{merged[0]!r} has a merged adapter; unmerge_lora(model) before loading an adapter")
    have = {n for n, layer in lora_layers(model) if name in layer.adapters}
    if have and have != set(state.layers):
        only_model, only_file = sorted(have - set(state.layers)), sorted(set(state.layers) - have)
        fail(f"adapter {name!r} in the model covers other layers than the file: only in model {only_model[:4]}, "
             f"only in file {only_file[:4]}. Load under another name (adapter='...') or delete_adapter(model, {name!r}) first")

    plan = []
    for path, ls in state.layers.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            fail(f"the model has no module {path!r}; was the adapter saved from another architecture?")
        if not isinstance(module, LoRALayer) and lora_wrapper(module) is None:
            fail(f"{path!r} is a {type(module).__name__}, a layer lora_edu cannot put LoRA on. Nothing was loaded")
        if layer_kind(module) != ls.kind:
            fail(f"{path!r} is a {type(module).__name__} but the file stores {ls.kind}-style LoRA factors for it")
        n_in, n_out = layer_shape(module)
        r = ls.config.r
        A, B = ls.A, ls.B
        if A.ndim != 2 or B.ndim != 2 or tuple(A.shape) != (r, n_in) or tuple(B.shape) != (n_out, r):
            fail(f"{path!r} has A {tuple(A.shape)} and B {tuple(B.shape)}; with r={r} this {type(module).__name__} "
                 f"(in={n_in}, out={n_out}) needs A {(r, n_in)} and B {(n_out, r)}. Different model size, or wrong rank?")
        if ls.base_shape is not None and tuple(ls.base_shape) != (n_out, n_in):
            fail(f"{path!r}: the file was saved from a base layer of shape (out, in) = {tuple(ls.base_shape)} but this model's "
                 f"{type(_base(module)).__name__} is ({n_out}, {n_in}); was the adapter saved from another model?")
        if isinstance(module, LoRALayer) and name in module.adapters:
            cfg = module.adapters[name]
            if (cfg.r, cfg.alpha, cfg.rslora) != (r, ls.config.alpha, ls.config.rslora):
                fail(f"{path!r} has adapter {name!r} with r={cfg.r}, alpha={cfg.alpha:g}, scale {cfg.scale_rule} in the model "
                     f"but r={r}, alpha={ls.config.alpha:g}, scale {ls.config.scale_rule} in the file (the scale s would "
                     f"silently change); delete_adapter(model, {name!r}) first or load under another name")
            # Dropout is the adapter's training setting: loading over an adapter must not silently keep another one.
            # (Embeddings store dropout but never apply it, as in PEFT, so theirs is not compared.)
            if ls.kind == "linear" and cfg.dropout != ls.config.dropout:
                fail(f"{path!r} has adapter {name!r} with dropout={cfg.dropout:g} in the model but dropout={ls.config.dropout:g} "
                     f"in the file; training on would silently use the model's. delete_adapter(model, {name!r}) first "
                     "(the file's dropout is then used) or load under another name")
            target = module.lora_A[name].dtype
        else:
            target = adapter_dtype(module.weight_dtype if isinstance(module, NF4Linear) else module.weight.dtype)
        for t, what in ((A, "A"), (B, "B")):
            if not t.is_floating_point():
                fail(f"{path}.{what} has dtype {t.dtype}; LoRA factors must be floating point")
            if t.dtype != target and not cast:
                fail(f"{path}.{what} is {_dtype_name(t.dtype)} but the model's adapter dtype is {_dtype_name(target)}; "
                     "pass cast=True to convert")
            if not torch.isfinite(t).all():
                fail(f"{path}.{what} contains NaN or inf values; the adapter is damaged")
        if (ls.m is not None) != isinstance(module, DoRALinear) and isinstance(module, LoRALayer):
            fail(f"{path!r} carries {'DoRA' if isinstance(module, DoRALinear) else 'plain LoRA'} adapters but the file stores a "
                 f"{'DoRA' if ls.m is not None else 'plain LoRA'} adapter for it; load it into a fresh copy of the base model")
        if ls.m is not None:
            if ls.kind != "linear" or (not isinstance(module, LoRALayer) and lora_wrapper(module) is not LoRALinear
                                       and not is_transposed_linear(module)):
                fail(f"{path!r} is a {type(module).__name__}; DoRA adapters are supported on linear layers only")
            if ls.m.ndim != 1 or ls.m.shape[0] != n_out or not ls.m.is_floating_point() or not torch.isfinite(ls.m).all():
                fail(f"{path!r}: DoRA magnitude m must be a finite float vector of shape ({n_out},), got {ls.m.dtype} "
                     f"{tuple(ls.m.shape)}; the adapter is damaged or from another model")
            if ls.m.dtype != target and not cast:
                fail(f"{path}.m is {_dtype_name(ls.m.dtype)} but the model's adapter dtype is {_dtype_name(target)}; pass cast=True")
        plan.append((path, module, ls))

    declared = list(state.trainable_modules)
    names = {n for n, _ in base_module_names(model)}
    lora_paths = set(state.layers) | {n for n, _ in lora_layers(model)}
    for m in declared:
        if m not in names:
            fail(f"the model has no module {m!r} (a trainable module of the adapter)")
        inside = lora_overlap(model, m, lora_paths)
        if inside:
            fail(f"trainable module {m!r} is, contains or shares weights with the LoRA layer(s) {inside[:4]}; making it "
                 "trainable would unfreeze (and loading it would overwrite) their base weights, so the file is refused")
    extra_plan = []
    for key, t in state.modules.items():
        owner = next((m for m in declared if key.startswith(m + ".")), None)
        if owner is None:
            fail(f"tensor {key!r} belongs to no declared trainable module ({declared}); refusing to overwrite it")
        try:
            p = model.get_parameter(key)
        except AttributeError:
            fail(f"the model has no parameter {key!r} (saved trainable module {owner!r})")
        if p.shape != t.shape:
            fail(f"{key} has shape {tuple(p.shape)} in the model, {tuple(t.shape)} in the file")
        if t.dtype != p.dtype and not cast:
            fail(f"{key} is {_dtype_name(t.dtype)} in the file but {_dtype_name(p.dtype)} in the model; pass cast=True to convert")
        if t.is_floating_point() and not torch.isfinite(t).all():
            fail(f"{key} contains NaN or inf values; the adapter is damaged")
        extra_plan.append((p, t))

    # ---- apply: nothing below depends on the file's contents being valid ------------------------
    freeze(model)
    for path, module, ls in plan:
        cfg = ls.config
        if not isinstance(module, LoRALayer) and ls.m is not None:
            module = DoRALinear(module, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, name, fan_in_fan_out=is_transposed_linear(module))
            set_submodule(model, path, module)
        elif not isinstance(module, LoRALayer):
            module = wrap(module, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, name)
            set_submodule(model, path, module)
        elif name not in module.adapters:
            module.add_adapter(name, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora)
        A, B = module.lora_factors(name)
        with torch.no_grad():
            A.copy_(ls.A)
            B.copy_(ls.B)
            if ls.m is not None:
                module.lora_magnitude[name].copy_(ls.m)
    set_adapter(model, name)
    for p, t in extra_plan:
        with torch.no_grad():
            p.copy_(t)
    for m in declared:
        model.get_submodule(m).requires_grad_(True)
    set_trainable_modules(model, name, declared)
    return model


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoRALayer) else module


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
