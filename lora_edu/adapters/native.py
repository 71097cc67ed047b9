"""The native adapter file: one safetensors file with A, B (and extra trainable modules) plus a JSON config.

An adapter is tiny next to its model — for GPT-3 175B with r = 4 on W_q, W_v, "roughly
35MB if stored in FP16" next to 350 GB (Hu et al. 2021, §7.1) — which is what makes one
base model with many task adapters practical.

Layout: tensors ``<module path>.lora_A`` (r, in) and ``<module path>.lora_B`` (out, r)
(and ``<module path>.lora_magnitude`` (out,) for a DoRA layer, whose ``type`` is ``"DoRALinear"``),
plus ``modules.<parameter path>`` for the declared fully trainable modules (e.g. a new
head).  The safetensors header metadata holds ``{"format": "lora_edu.adapter",
"format_version": "1", "config": <JSON>}``; the JSON config records the adapter name,
per-layer ``type``, ``base_shape``, ``r``, ``alpha``, ``rslora``, ``dropout``, the
trainable modules, ``init`` (``"pissa"`` for a PiSSA-initialised adapter, which fits only
its modified base: saving and loading warn), dtype and library version.  The top-level
``r`` / ``alpha`` / ``scale_rule`` must agree with the layers (null when they differ), and
each ``base_shape`` with the model's layer.

Reading is strict: every field is type-checked (``"rslora": "false"`` is an error, not
True), every tensor must be declared, and :func:`~lora_edu.adapters.state.apply_adapter_state`
validates the adapter against the model before anything changes.  Writing goes through
:func:`lora_edu.atomic.atomic_write_bytes`: a crash never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import safetensors
import safetensors.torch
import torch.nn as nn

from lora_edu._version import __version__
from lora_edu.adapters.state import AdapterFileError, AdapterState, LayerState, adapter_state, apply_adapter_state
from lora_edu.atomic import atomic_write_bytes
from lora_edu.core.config import AdapterConfig, scale_rule, user_stacklevel

__all__ = ["FORMAT", "FORMAT_VERSION", "encode_native", "decode_native", "read_adapter_config", "save_native", "load_native"]

FORMAT = "lora_edu.adapter"
FORMAT_VERSION = "1"
_TYPE_OF_KIND = {"linear": "LoRALinear", "embedding": "LoRAEmbedding"}
_KIND_OF_TYPE = {"LoRALinear": "linear", "LoRAEmbedding": "embedding", "DoRALinear": "linear"}
_OLD_TYPES = {"LoRAConv1D": "linear"}  # written by older versions (GPT-2's Conv1D is a LoRALinear now): read, not advertised


def encode_native(state: AdapterState) -> bytes:
    """The bytes of a native adapter file for ``state``."""
    tensors, layers = {}, {}
    for path, ls in state.layers.items():
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = ls.A, ls.B
        if ls.m is not None:  # DoRA: the magnitude vector m (out,) beside A and B, and the layer type says so
            tensors[f"{path}.lora_magnitude"] = ls.m
        cfg = ls.config
        layers[path] = {"type": "DoRALinear" if ls.m is not None else _TYPE_OF_KIND[ls.kind], "base_shape": [ls.B.shape[0], ls.A.shape[1]],
                        "r": cfg.r, "alpha": cfg.alpha, "rslora": cfg.rslora, "dropout": cfg.dropout}
    for key, t in state.modules.items():
        tensors[f"modules.{key}"] = t
    configs = {(c.r, c.alpha, c.rslora) for c in (ls.config for ls in state.layers.values())}
    r, alpha, rslora = next(iter(configs)) if len(configs) == 1 else (None, None, None)
    config = {
        "adapter": state.name,
        "r": r,
        "alpha": alpha,
        "scale_rule": scale_rule(rslora) if r is not None else None,
        "targets": list(state.layers),
        "layers": layers,
        "trainable_modules": list(state.trainable_modules),
        "init": state.init,  # "pissa": the adapter fits only the base whose W was replaced by W_res (the loader warns)
        "dtype": str(next(iter(state.layers.values())).A.dtype).replace("torch.", ""),
        "library": "lora_edu",
        "library_version": __version__,
    }
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config)}
    return safetensors.torch.save(tensors, metadata=metadata)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The JSON config stored in a native adapter file (raises :class:`AdapterFileError`)."""
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
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: the adapter config in the file header is missing or not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: the adapter config must be a JSON object")
    return config


def _field(where: str, d: dict, key: str, types, what: str):
    value = d.get(key)
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise AdapterFileError(f"{where}: {key} must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise AdapterFileError(f"{where}: {key} must be {what}, got {value!r}")
    return value


def decode_native(path: str | os.PathLike, name: str | None = None) -> AdapterState:
    """Read and check a native adapter file into an :class:`AdapterState` (strict types, declared tensors only)."""
    path = Path(path)
    cfg = read_adapter_config(path)
    try:
        tensors = safetensors.torch.load(path.read_bytes())
    except Exception as e:
        raise AdapterFileError(f"{path}: cannot read the tensors (corrupt or truncated file?): {e}. Re-save the adapter") from e
    where = str(path)
    name = _field(where, cfg, "adapter", str, "a string") if name is None else name
    layer_cfgs = _field(where, cfg, "layers", dict, "an object of per-layer settings")
    trainable = cfg.get("trainable_modules", [])
    if not isinstance(trainable, list) or not all(isinstance(m, str) and m for m in trainable):
        raise AdapterFileError(f"{where}: trainable_modules must be a list of module names, got {trainable!r}")
    layers = {}
    for mod, lc in layer_cfgs.items():
        at = f"{where}: layer {mod!r}"
        if not isinstance(lc, dict):
            raise AdapterFileError(f"{at}: settings must be an object")
        kind = _KIND_OF_TYPE.get(lc.get("type")) or _OLD_TYPES.get(lc.get("type"))
        if kind is None:
            raise AdapterFileError(f"{at}: unknown layer type {lc.get('type')!r}; expected one of {sorted(_KIND_OF_TYPE)}")
        rslora = _field(at, lc, "rslora", bool, "true or false")
        try:
            config = AdapterConfig(r=lc.get("r"), alpha=lc.get("alpha"), dropout=lc.get("dropout", 0.0), rslora=rslora)
        except (TypeError, ValueError) as e:
            raise AdapterFileError(f"{at}: {e}") from None
        try:
            A, B = tensors[f"{mod}.lora_A"], tensors[f"{mod}.lora_B"]
        except KeyError as e:
            raise AdapterFileError(f"{at}: tensor {e.args[0]!r} is missing (truncated or edited file?)") from None
        base_shape = lc.get("base_shape")
        if not (isinstance(base_shape, list) and len(base_shape) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in base_shape)):
            raise AdapterFileError(f"{at}: base_shape must be [out, in] (two positive ints), got {base_shape!r}")
        m = None
        if lc.get("type") == "DoRALinear":
            m = tensors.get(f"{mod}.lora_magnitude")
            if m is None:
                raise AdapterFileError(f"{at}: a DoRALinear layer needs its magnitude tensor {mod + '.lora_magnitude'!r}, which is missing")
        layers[mod] = LayerState(kind, config, A, B, m, base_shape=(base_shape[0], base_shape[1]))
    _check_top_level(where, cfg, layers)
    init = cfg.get("init")
    if init is not None and not isinstance(init, str):
        raise AdapterFileError(f"{where}: init must be null or a string, got {init!r}")
    if init == "pissa":
        warnings.warn(
            f"{where}: init 'pissa': this adapter was initialised with PiSSA, which replaced the base weights W by the residual "
            "W_res; it reproduces the saved model only on that modified base, not on the original one. Convert it to plain LoRA "
            "with lora_edu.variants.pissa_to_lora before saving to share it",
            stacklevel=user_stacklevel(),
        )
    modules = {k[len("modules."):]: t for k, t in tensors.items() if k.startswith("modules.")}
    expected = {f"{m}.lora_{f}" for m in layers for f in "AB"} | {f"modules.{k}" for k in modules}
    expected |= {f"{m}.lora_magnitude" for m, ls in layers.items() if ls.m is not None}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise AdapterFileError(f"{where}: tensors {unexpected[:4]} are not declared in the file's config; the file was edited or is damaged")
    return AdapterState(name, layers, trainable, modules, init=init)


def _check_top_level(where: str, cfg: dict, layers: dict[str, LayerState]) -> None:
    """The top-level ``r`` / ``alpha`` / ``scale_rule`` summarise the layers (null when they differ): they must agree.

    Skipped when a layer's factors contradict its own r: the shape check then says precisely what is wrong.
    """
    if any(ls.A.ndim != 2 or ls.B.ndim != 2 or ls.A.shape[0] != ls.config.r or ls.B.shape[1] != ls.config.r for ls in layers.values()):
        return
    configs = {(ls.config.r, ls.config.alpha, ls.config.rslora) for ls in layers.values()}
    r, alpha, rslora = next(iter(configs)) if len(configs) == 1 else (None, None, None)
    expected = {"r": r, "alpha": alpha, "scale_rule": scale_rule(rslora) if r is not None else None}
    for key, want in expected.items():
        if key not in cfg:
            continue  # absent: nothing to contradict
        got = cfg[key]
        same = got == want and isinstance(got, bool) == isinstance(want, bool)
        if not same:
            raise AdapterFileError(
                f"{where}: the config's top-level {key}={got!r} contradicts its layers, which give {key}={want!r} "
                f"({'one setting for all layers' if r is not None else 'the layers differ, so it must be null'}); "
                "the file was edited or is damaged"
            )


def save_native(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> Path:
    """Write adapter ``adapter`` (default: the active one) to the file ``path``, atomically."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder; pass a file path such as {path / 'adapter.safetensors'}, or format='peft' to write a PEFT folder"
        )
    return atomic_write_bytes(path, encode_native(adapter_state(model, adapter)))


def load_native(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, cast: bool = False) -> nn.Module:
    """Load a native adapter file into ``model`` (validated completely before anything changes)."""
    return apply_adapter_state(model, decode_native(path, adapter), cast=cast, where=str(path))
