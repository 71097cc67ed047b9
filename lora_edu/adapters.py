"""Saving and loading adapters: only A, B (and any extra trainable modules) plus a JSON config.

An adapter is tiny next to its model — for GPT-3 175B, 35 MB next to 350 GB (Hu et al.
2021, §4.2) — which is what makes one base model with many task adapters practical.

File format (``lora_edu`` native): one safetensors file.  Tensors are named
``<module path>.lora_A`` (r, in) and ``<module path>.lora_B`` (out, r), plus
``modules.<module path>.<param>`` for fully trainable extra modules (e.g. a new
classification head).  The safetensors header metadata holds
``{"format": "lora_edu.adapter", "format_version": "1", "config": <JSON>}`` where the
JSON config records the adapter name, r, alpha, scale rule, dropout, targets, per-layer
shapes, dtype and library version.

Loading validates *everything* (names, shapes, r, scale rule, dtype, finiteness)
before it changes the model, so a bad file never half-loads.  Writing goes through
:func:`lora_edu.atomic.atomic_write_bytes`, so a crash never leaves a broken file
where a good one was.  ``format="peft"`` (a folder, Hugging Face PEFT's layout) is
handled by :mod:`lora_edu.peft_format`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from ._version import __version__
from .atomic import atomic_write_bytes
from .inject import (
    _set_submodule,
    _trainable_registry,
    _wrapper_for,
    adapter_names,
    freeze,
    lora_layers,
    set_adapter,
    trainable_modules_of,
)
from .layers import LOW_PRECISION, LoRALayer

__all__ = ["AdapterFileError", "save_adapter", "load_adapter", "read_adapter_config"]

FORMAT = "lora_edu.adapter"
FORMAT_VERSION = "1"


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, truncated, or does not fit the model."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_adapter(model: nn.Module, adapter: str | None) -> str:
    """The adapter to save: ``adapter`` if the model has it, else the single active one."""
    names = adapter_names(model)
    if not names:
        raise ValueError("the model has no LoRA adapters to save; call add_lora(...) first")
    if adapter is None:
        active = {l.active_adapter for _, l in lora_layers(model)} - {None}
        if len(active) != 1:
            raise ValueError(f"pass adapter=<name>: the model has adapters {names} and active {sorted(active)}")
        adapter = active.pop()
    if adapter not in names:
        raise KeyError(f"no adapter {adapter!r}; available: {names}")
    return adapter


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, format: str = "lora_edu") -> Path:
    """Save one adapter (default: the active one) to ``path``; returns the path written.

    ``format="lora_edu"``: one ``.safetensors`` file (see module docstring).
    ``format="peft"``: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``.
    """
    if format == "peft":
        from .peft_format import save_peft_adapter

        return save_peft_adapter(model, path, adapter=adapter)
    if format != "lora_edu":
        raise ValueError(f"unknown adapter format {format!r}; use 'lora_edu' or 'peft'")
    adapter = resolve_adapter(model, adapter)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, layer in lora_layers(model):
        if adapter not in layer.adapters:
            continue
        cfg = layer.adapters[adapter]
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        tensors[f"{name}.lora_A"] = A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = B.detach().cpu().contiguous()
        layers[name] = {
            "type": type(layer).__name__,
            "base_shape": list(layer.base.weight.shape),
            "r": cfg.r,
            "alpha": cfg.alpha,
            "rslora": cfg.rslora,
            "dropout": cfg.dropout,
        }
    extra = trainable_modules_of(model, adapter)
    for mod_name in extra:
        for p_name, p in model.get_submodule(mod_name).named_parameters():
            tensors[f"modules.{mod_name}.{p_name}"] = p.detach().cpu().contiguous()
    first = next(iter(layers.values()))
    uniform = all((l["r"], l["alpha"], l["rslora"]) == (first["r"], first["alpha"], first["rslora"]) for l in layers.values())
    config = {
        "adapter": adapter,
        "r": first["r"] if uniform else None,
        "alpha": first["alpha"] if uniform else None,
        "scale_rule": ("alpha/sqrt(r)" if first["rslora"] else "alpha/r") if uniform else None,
        "dropout": first["dropout"],
        "targets": list(layers),
        "layers": layers,
        "trainable_modules": extra,
        "dtype": _dtype_name(next(iter(tensors.values())).dtype),
        "library": "lora_edu",
        "library_version": __version__,
    }
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config)}
    data = safetensors.torch.save(tensors, metadata=metadata)
    return atomic_write_bytes(path, data)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The JSON config stored in a ``lora_edu`` adapter file (raises :class:`AdapterFileError`)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise AdapterFileError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {e}. Re-save the adapter with save_adapter()"
        ) from e
    if meta.get("format") != FORMAT:
        raise AdapterFileError(
            f"{path} is a safetensors file but not a lora_edu adapter (metadata format={meta.get('format')!r}); "
            "for a PEFT adapter pass its folder"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path} has adapter format version {meta.get('format_version')!r}; this lora_edu reads {FORMAT_VERSION}")
    try:
        return json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: the adapter config in the file header is missing or not valid JSON ({e})") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(path.read_bytes())
    except Exception as e:
        raise AdapterFileError(f"{path}: cannot read the tensors (corrupt or truncated file?): {e}. Re-save the adapter") from e


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter: str | None = None, cast: bool = False
) -> nn.Module:
    """Load an adapter into ``model`` and make it the active one; returns the model.

    The model may already have LoRA layers with an adapter of that name (its tensors
    are overwritten after checking r, scale rule and shapes), or be a plain model
    (the adapter's layers are injected from the file's config).  A PEFT adapter
    folder (``adapter_config.json`` inside) is recognised and loaded too.
    ``cast=True`` allows tensors whose dtype differs from the model's adapter dtype.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            from .peft_format import load_peft_adapter

            return load_peft_adapter(model, path, adapter=adapter)
        raise AdapterFileError(f"{path} is a folder without adapter_config.json; pass the .safetensors file of a lora_edu adapter")
    cfg = read_adapter_config(path)
    tensors = _read_tensors(path)
    name = adapter or cfg["adapter"]
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterFileError(f"{path}: invalid adapter name {name!r}")

    # ---- validate everything before touching the model ----------------------------------
    expected = {f"{m}.{k}" for m in cfg["layers"] for k in ("lora_A", "lora_B")}
    expected |= {k for k in tensors if k.startswith("modules.")}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise AdapterFileError(f"{path}: tensors do not match its config (missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    model_layers = {n: l for n, l in lora_layers(model)}
    have = {n for n, l in model_layers.items() if name in l.adapters}
    if have and have != set(cfg["layers"]):
        only_model, only_file = sorted(have - set(cfg["layers"])), sorted(set(cfg["layers"]) - have)
        raise AdapterFileError(
            f"adapter {name!r} in the model covers other layers than the file: only in model {only_model[:4]}, only in file {only_file[:4]}. "
            f"Load under another name (adapter='...') or delete_adapter(model, {name!r}) first"
        )
    plan = []  # (module path, module, per-layer config, A, B)
    for mod_name, lcfg in cfg["layers"].items():
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            raise AdapterFileError(f"{path}: the model has no module {mod_name!r}; was the adapter saved from another architecture?") from None
        base = module.base if isinstance(module, LoRALayer) else module
        wrapper = type(module) if isinstance(module, LoRALayer) else _wrapper_for(module)
        if wrapper is None or wrapper.__name__ != lcfg["type"]:
            raise AdapterFileError(f"{path}: {mod_name!r} is a {type(module).__name__}, the file expects a layer for {lcfg['type']}")
        if list(base.weight.shape) != lcfg["base_shape"]:
            raise AdapterFileError(
                f"{path}: {mod_name!r} has weight shape {tuple(base.weight.shape)}, the adapter was trained on {tuple(lcfg['base_shape'])}"
            )
        A, B = tensors[f"{mod_name}.lora_A"], tensors[f"{mod_name}.lora_B"]
        r = lcfg["r"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r or B.shape[0] * A.shape[1] != base.weight.numel():
            raise AdapterFileError(f"{path}: {mod_name!r} has A {tuple(A.shape)} and B {tuple(B.shape)}, inconsistent with r={r} and weight {tuple(base.weight.shape)}")
        if isinstance(module, LoRALayer) and name in module.adapters:
            have_cfg = module.adapters[name]
            if have_cfg.r != r:
                raise AdapterFileError(f"{path}: {mod_name!r} has r={have_cfg.r} in the model but r={r} in the file; re-create the adapter with r={r}")
            if have_cfg.alpha != lcfg["alpha"]:
                raise AdapterFileError(
                    f"{path}: {mod_name!r} has alpha={have_cfg.alpha:g} in the model but alpha={lcfg['alpha']:g} in the file "
                    "(the scale s would silently change); re-create the adapter with the file's alpha"
                )
            if have_cfg.rslora != lcfg["rslora"]:
                rule = lambda x: "alpha/sqrt(r)" if x else "alpha/r"  # noqa: E731
                raise AdapterFileError(f"{path}: scale rule mismatch at {mod_name!r}: model uses {rule(have_cfg.rslora)}, file {rule(lcfg['rslora'])}")
            if module.merged_adapter == name:
                raise AdapterFileError(f"adapter {name!r} is merged at {mod_name!r}; unmerge_lora(model) before loading over it")
            target_dtype = module.lora_A[name].dtype
        else:
            target_dtype = torch.float32 if base.weight.dtype in LOW_PRECISION else base.weight.dtype
        for t, what in ((A, "A"), (B, "B")):
            if t.dtype != target_dtype and not cast:
                raise AdapterFileError(
                    f"{path}: {mod_name}.{what} is {_dtype_name(t.dtype)} but the model's adapter dtype is {_dtype_name(target_dtype)}; pass cast=True to convert"
                )
            if not torch.isfinite(t).all():
                raise AdapterFileError(f"{path}: {mod_name}.{what} contains NaN or inf values; the adapter is damaged")
        plan.append((mod_name, module, lcfg, A, B))
    extra_plan = []
    for key, t in tensors.items():
        if not key.startswith("modules."):
            continue
        try:
            p = model.get_parameter(key[len("modules.") :])
        except AttributeError:
            raise AdapterFileError(f"{path}: the model has no parameter {key[len('modules.'):]!r} (saved trainable module)") from None
        if p.shape != t.shape:
            raise AdapterFileError(f"{path}: {key[len('modules.'):]} has shape {tuple(p.shape)} in the model, {tuple(t.shape)} in the file")
        extra_plan.append((p, t))

    # ---- apply (nothing below can fail on bad input) ---------------------------------------
    freeze(model)
    for mod_name, module, lcfg, A, B in plan:
        if not isinstance(module, LoRALayer):
            module = _wrapper_for(module)(module, lcfg["r"], lcfg["alpha"], lcfg["dropout"], lcfg["rslora"], adapter=name)
            _set_submodule(model, mod_name, module)
        elif name not in module.adapters:
            module.add_adapter(name, lcfg["r"], lcfg["alpha"], lcfg["dropout"], lcfg["rslora"])
        with torch.no_grad():
            module.lora_A[name].copy_(A)
            module.lora_B[name].copy_(B)
    set_adapter(model, name)
    for p, t in extra_plan:
        with torch.no_grad():
            p.copy_(t)
        p.requires_grad_(True)
    _trainable_registry(model)[name] = list(cfg.get("trainable_modules", []))
    return model
