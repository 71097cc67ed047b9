"""Hugging Face PEFT's adapter format, both ways: ``save_peft_adapter`` / ``load_peft_adapter``.

A PEFT LoRA adapter is a folder with two files:

``adapter_config.json``
    ``{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
    "use_rslora": false, "lora_dropout": 0.0, "fan_in_fan_out": false, "bias": "none",
    "modules_to_save": null, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": false, …}``

``adapter_model.safetensors``
    one entry per factor, named after the module path in the *base* model, prefixed
    with ``base_model.model.`` (the path PEFT sees through ``PeftModel.base_model.model``):

    ==============================================  ========================  =========
    key                                             lora_edu tensor           shape
    ==============================================  ========================  =========
    ``base_model.model.<path>.lora_A.weight``        ``lora_A[name]`` (Linear)  (r, in)
    ``base_model.model.<path>.lora_B.weight``        ``lora_B[name]`` (Linear)  (out, r)
    ``base_model.model.<path>.lora_embedding_A``     ``lora_A[name]`` (Embed.)  (r, num_embeddings)
    ``base_model.model.<path>.lora_embedding_B``     ``lora_B[name]`` (Embed.)  (dim, r)
    ``base_model.model.<module>.<param>``            ``modules_to_save``        as in the model
    ==============================================  ========================  =========

    In memory PEFT inserts the adapter name (``…lora_A.default.weight``); the files
    never contain it.  GPT-2's ``Conv1D`` uses the Linear keys and shapes (PEFT's
    ``fan_in_fan_out=True`` only transposes ΔW at merge time, see :mod:`lora_edu.adapters.hf`).

The orientation and init conventions are the same as lora_edu's (LoRA §4.1; PEFT's
``peft/tuners/lora/layer.py``), so conversion is a renaming — no transposes, no
rescaling: s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``.

Loading validates the whole folder (config, every key, every shape, finiteness) before
it changes the model, and refuses what lora_edu cannot compute identically — LoRA biases,
``bias != "none"``, aLoRA, trainable tokens, DoRA on embeddings, ``layers_to_transform`` /
``layers_pattern``, ``modules_to_save`` without their tensors, layer types it cannot wrap —
with an :class:`~lora_edu.adapters.AdapterFileError` saying why.  Per-module ranks and
alphas (``rank_pattern`` / ``alpha_pattern``) are supported with PEFT's matching rule.
DoRA (``use_dora=true``) on linear layers is read and written: the magnitude vector m (out,)
is ``base_model.model.<path>.lora_magnitude_vector`` (:mod:`lora_edu.variants.dora`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from lora_edu.adapters.state import AdapterFileError, AdapterState, LayerState, adapter_state, apply_adapter_state
from lora_edu.atomic import atomic_write_bytes
from lora_edu.core.config import AdapterConfig
from lora_edu.core.inject import base_module_names
from lora_edu.core.kinds import is_transposed_linear, layer_kind, lora_wrapper
from lora_edu.core.layers import LoRALayer

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PEFT_PREFIX",
    "save_peft_adapter",
    "load_peft_adapter",
    "read_peft_config",
    "to_peft_state_dict",
    "peft_key",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (your model)
_CONFIG_HASH = "lora_edu.config_sha256"  # weights-file metadata written by save_peft_adapter (PEFT ignores it)
_FINGERPRINTED = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules")

# lora_edu layer kind -> (key suffix of A, key suffix of B) in PEFT's files
_KEYS = {"linear": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}

# Config fields that carry no computation lora_edu would get wrong (provenance, init recipes,
# fields that only matter for features checked separately below).
_INFORMATIONAL = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "use_dora", "lora_bias", "qalora_group_size", "runtime_config",
    "ensure_weight_tying", "use_qalora",
}
# Fields that change what the adapted layer computes; a truthy value is refused.
_UNSUPPORTED = {
    "lora_bias": "LoRA biases (lora_bias=true) add a trainable bias to lora_B",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A",
    "alora_invocation_tokens": "activated LoRA (aLoRA) switches the adapter on only after invocation tokens",
    "trainable_token_indices": "trainable tokens replace selected rows of the embedding table",
    "target_parameters": "target_parameters puts LoRA on raw nn.Parameters (e.g. MoE experts), not on layers",
    "layer_replication": "layer_replication duplicates base-model layers",
    "megatron_config": "Megatron tensor-parallel layers are not plain Linear layers",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between several LoRA experts",
    "kasa_config": "KaSA adds a singular-value adapter",
    "velora_config": "VeLoRA changes the backward pass and the layer variant",
    "monteclora_config": "MonteCLoRA samples the adapter weights",
}
# init_lora_weights values whose adapters only make sense on a *modified* base model
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")


# ------------------------------------------------------------------------------------ helpers


def peft_key(module_path: str, kind: str, factor: str) -> str:
    """The key PEFT's file uses for ``factor`` ("A" or "B") of the layer at ``module_path``."""
    return PEFT_PREFIX + module_path + "." + _KEYS[kind][0 if factor == "A" else 1]


def _peft_targets(target_modules, key: str) -> bool:
    """PEFT's rule: a string is a ``re.fullmatch`` pattern; a list matches a name or a dotted suffix."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith("." + t) for t in target_modules)


def _peft_excluded(exclude_modules, key: str) -> bool:
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, key) is not None
    return key in exclude_modules or any(key.endswith("." + t) for t in exclude_modules)


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's ``get_pattern_key``: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", key)``."""
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default




# --------------------------------------------------------------------------------------- save


def to_peft_state_dict(model: nn.Module, adapter: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, config)`` of adapter ``adapter`` in PEFT's layout (what :func:`save_peft_adapter` writes)."""
    state = adapter_state(model, adapter)
    tensors: dict[str, torch.Tensor] = {}
    for name, ls in state.layers.items():
        tensors[peft_key(name, ls.kind, "A")] = ls.A
        tensors[peft_key(name, ls.kind, "B")] = ls.B
        if ls.m is not None:  # DoRA (lora_edu.variants.dora): PEFT's key for the magnitude vector m (out,)
            tensors[PEFT_PREFIX + name + "." + _MAGNITUDE] = ls.m
    doras = {ls.m is not None for ls in state.layers.values()}
    if len(doras) > 1:
        raise ValueError(f"adapter {state.name!r} mixes DoRA and plain LoRA layers; PEFT has one use_dora flag per adapter")
    configs = {n: ls.config for n, ls in state.layers.items()}
    rsloras = {c.rslora for c in configs.values()}
    dropouts = {c.dropout for n, c in configs.items() if state.layers[n].kind == "linear"}  # PEFT never drops token ids
    if len(rsloras) > 1:
        raise ValueError(f"adapter {state.name!r} mixes α/r and α/√r layers; PEFT has one use_rslora flag per adapter")
    if len(dropouts) > 1:
        raise ValueError(f"adapter {state.name!r} uses different dropouts {sorted(dropouts)}; PEFT has one lora_dropout per adapter")

    # The most common (r, α) become the config's r / lora_alpha; the rest go to rank_pattern /
    # alpha_pattern under their escaped full path (PEFT matches pattern keys as regular expressions).
    r_default = Counter(c.r for c in configs.values()).most_common(1)[0][0]
    alpha_default = Counter(c.alpha for c in configs.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): c.r for n, c in configs.items() if c.r != r_default}
    alpha_pattern = {re.escape(n): _json_number(c.alpha) for n, c in configs.items() if c.alpha != alpha_default}

    # target_modules: the short names if they select exactly the adapted layers, else the full paths
    adapted = set(configs)
    base_names = [n for n, _ in base_module_names(model)]
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    target_modules = short if {n for n in base_names if _peft_targets(short, n)} == adapted else sorted(adapted)
    for key, t in state.modules.items():
        tensors[PEFT_PREFIX + key] = t
    has_conv1d = any(is_transposed_linear(_base_of(model.get_submodule(n))) for n in adapted)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r_default,
        "lora_alpha": _json_number(alpha_default),
        "target_modules": target_modules,
        "exclude_modules": None,
        "lora_dropout": next(iter(dropouts), 0.0),
        "fan_in_fan_out": has_conv1d,  # PEFT decides per layer anyway (True for Conv1D, False for Linear)
        "bias": "none",
        "use_rslora": rsloras.pop(),
        "modules_to_save": state.trainable_modules or None,
        # "pissa": A, B only fit the base whose W became W_res; PEFT's loader (and ours) then warn, as adapter_state did here
        "init_lora_weights": "pissa" if state.init == "pissa" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": doras.pop(),
        "lora_bias": False,
    }
    return tensors, config


def _base_of(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoRALayer) else module


def _json_number(x: float):
    """α as an int when it is one (PEFT writes ``"lora_alpha": 16``), else a float."""
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter: str | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write adapter ``adapter`` (default: the active one) as a PEFT folder at ``path``; returns the folder.

    The folder loads with ``peft.PeftModel.from_pretrained(base_model, path)`` and with
    :func:`lora_edu.load_adapter`.  Like PEFT's ``save_pretrained`` it writes its two
    files into the folder (created if missing) and leaves every other file alone; each
    file is written atomically, the weights first (the config only if it changed), so an
    interrupted save leaves the old adapter, a complete new one, or new weights beside
    the old config — which :func:`load_peft_adapter` recognises (the weights record a
    fingerprint of their config's r, α and targets) and refuses rather than misreads.
    ``base_model_name_or_path`` / ``task_type`` (e.g. ``"CAUSAL_LM"``) are recorded for
    PEFT's ``AutoPeftModel`` classes.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; a PEFT adapter is a folder. Pick another path")
    tensors, config = to_peft_state_dict(model, adapter)
    config["base_model_name_or_path"] = base_model_name_or_path
    config["task_type"] = task_type
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    # "format": "pt" as PEFT writes it; the config's fingerprint lets the loader tell a pair torn by an interrupted save
    metadata = {"format": "pt", _CONFIG_HASH: _fingerprint(config)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS_NAME, safetensors.torch.save(tensors, metadata=metadata))
    cfg_path = folder / CONFIG_NAME
    if not (cfg_path.is_file() and cfg_path.read_bytes() == config_bytes):
        atomic_write_bytes(cfg_path, config_bytes)
    return folder


# --------------------------------------------------------------------------------------- load


def read_peft_config(path: str | os.PathLike) -> dict:
    """Read and check ``adapter_config.json``; raise :class:`AdapterFileError` for anything lora_edu cannot represent."""
    folder = Path(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(f"{folder}: no {CONFIG_NAME}; is this a PEFT adapter folder?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")

    where = f"{cfg_path}"
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(f"{where}: peft_type is {peft_type!r}; lora_edu reads LoRA adapters only (peft_type 'LORA')")
    for field, what in _UNSUPPORTED.items():
        if cfg.get(field):
            raise AdapterFileError(
                f"{where}: {field}={cfg[field]!r} is not supported: {what}, which lora_edu does not implement. "
                "Loading only A and B would compute a different function, so nothing was loaded. "
                "Use PEFT for this adapter, or retrain it as plain LoRA"
            )
    if cfg.get("bias", "none") != "none":
        raise AdapterFileError(
            f"{where}: bias={cfg['bias']!r} means the adapter also trained bias vectors; lora_edu adapters hold only A and B "
            "(bias 'none'). Nothing was loaded"
        )
    unknown = sorted(k for k, v in cfg.items() if k not in _INFORMATIONAL and k not in _UNSUPPORTED and v not in (None, False, {}, [], ""))
    if unknown:
        raise AdapterFileError(
            f"{where}: unrecognised setting(s) {unknown} (a newer PEFT feature?); lora_edu refuses to guess what they change. "
            "Nothing was loaded"
        )
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFileError(f"{where}: r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterFileError(f"{where}: lora_alpha must be a positive number, got {alpha!r} (lora_edu requires α > 0)")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict):
            raise AdapterFileError(f"{where}: {field} must be a JSON object, got {pattern!r}")
        for p in pattern:
            try:
                re.compile(p)
            except re.error as e:
                raise AdapterFileError(f"{where}: {field} key {p!r} is not a valid regular expression ({e})") from None
    tm = cfg.get("target_modules")
    if not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise AdapterFileError(f"{where}: target_modules must be a string (regex) or a list of names, got {tm!r}")
    for field in ("exclude_modules", "modules_to_save"):
        v = cfg.get(field)
        if not (v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) and t for t in v))):
            raise AdapterFileError(f"{where}: {field} must be null, a string or a list of module names, got {v!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterFileError(f"{where}: use_rslora must be true or false, got {cfg['use_rslora']!r}")
    for field in ("layers_to_transform", "layers_pattern"):
        if cfg.get(field) not in (None, [], ""):
            raise AdapterFileError(
                f"{where}: {field}={cfg[field]!r} is not supported: PEFT then adapts only the target modules inside the listed "
                "layer indices, a selection lora_edu does not implement. Nothing was loaded. Re-save the adapter with "
                "explicit module paths in target_modules (e.g. 'model.layers.0.self_attn.q_proj')"
            )
    dropout = cfg.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterFileError(f"{where}: lora_dropout must be in [0, 1), got {dropout!r}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        warnings.warn(
            f"{where}: init_lora_weights={init!r} modifies the base weights when the adapter is created; this adapter "
            "reproduces PEFT's outputs only on that modified base model (or after PEFT's conversion to plain LoRA)",
            stacklevel=3,
        )
    return cfg


def _fingerprint(cfg: dict) -> str:
    """sha256 of the config fields that decide which layers get which scale (what an interrupted save could mismatch)."""
    return hashlib.sha256(json.dumps({k: cfg.get(k) for k in _FINGERPRINTED}, sort_keys=True).encode()).hexdigest()


def _read_peft_tensors(folder: Path, cfg: dict) -> dict[str, torch.Tensor]:
    st = folder / WEIGHTS_NAME
    if not st.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{folder}: only the legacy pickle file adapter_model.bin is present; lora_edu reads safetensors only "
                "(re-save with PEFT's save_pretrained(safe_serialization=True))"
            )
        raise AdapterFileError(f"{folder}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    try:
        data = st.read_bytes()
        tensors = safetensors.torch.load(data)
        with safetensors.safe_open(str(st), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise AdapterFileError(f"{st}: cannot read the tensors (corrupt or truncated file?): {e}. Re-save the adapter") from e
    expected = metadata.get(_CONFIG_HASH)
    if expected is not None and expected != _fingerprint(cfg):
        raise AdapterFileError(
            f"{folder}: {WEIGHTS_NAME} was written with another {CONFIG_NAME} than the one beside it (its {list(_FINGERPRINTED)} "
            "differ) — an interrupted save_adapter(), or a config edited by hand. Save the adapter again; nothing was loaded"
        )
    return tensors


_MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, (out,)
_MAGNITUDE_RE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<infix>\w+)\.weight)?$")
_FACTOR_RE = re.compile(
    r"^(?P<mod>.+)\.(?:(?P<lin>lora_[AB])(?:\.(?P<infix1>\w+))?\.weight|(?P<emb>lora_embedding_[AB])(?:\.(?P<infix2>\w+))?)$"
)


def _split_key(key: str) -> tuple[str, str, str, str | None] | None:
    """``'base_model.model.h.0.attn.c_attn.lora_A.weight'`` → ``('h.0.attn.c_attn', 'linear', 'A', None)``.

    Also accepts keys without the ``base_model.model.`` prefix (transformers' own adapter
    integration writes those) and PEFT's *in-memory* keys with the adapter name inserted,
    ``…lora_A.<adapter>.weight`` / ``…lora_embedding_A.<adapter>`` (a ``PeftModel.state_dict()``),
    returning the adapter name as the last element.  ``None`` for any other key.
    """
    m = _FACTOR_RE.match(key.removeprefix(PEFT_PREFIX))
    if m is None:
        return None
    if m["lin"]:
        return m["mod"], "linear", m["lin"][-1], m["infix1"]
    return m["mod"], "embedding", m["emb"][-1], m["infix2"]


def load_peft_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> nn.Module:
    """Load the PEFT LoRA adapter folder ``path`` into ``model`` as adapter ``adapter`` (default ``"default"``).

    Works on a plain model (the layers named in the file are wrapped, as PEFT injects
    them from the config) and on a model that already has LoRA layers with adapter
    ``adapter`` on exactly those layers (same r, α and scale rule; A and B are overwritten).
    ``modules_to_save`` (e.g. a new classification head) are copied in and made trainable.
    The loaded adapter becomes the active one.  Everything is validated before the model
    is touched; on any problem an :class:`~lora_edu.adapters.AdapterFileError` explains it.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFileError(f"{folder} is not a folder; a PEFT adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg = read_peft_config(folder)
    tensors = _read_peft_tensors(folder, cfg)
    name = "default" if adapter is None else adapter
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterFileError(f"invalid adapter name {name!r}: adapter names must be Python identifiers")

    # ---- sort the keys: LoRA factors, modules_to_save parameters, anything else is an error ---------------
    factors: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    saved_modules: list[tuple[str, torch.Tensor]] = []
    base_copies: list[tuple[str, torch.Tensor]] = []
    infixes: set[str | None] = set()
    modules_to_save = cfg.get("modules_to_save") or []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    magnitudes: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        dora = _MAGNITUDE_RE.match(key.removeprefix(PEFT_PREFIX))
        if dora is not None:  # DoRA's m: <mod>.lora_magnitude_vector (file) or <mod>.lora_magnitude_vector.<adapter>.weight
            if not cfg.get("use_dora"):
                raise AdapterFileError(f"{folder}: {key!r} is a DoRA magnitude vector but the config has use_dora=false. Nothing was loaded")
            if dora["mod"] in magnitudes:
                raise AdapterFileError(f"{folder}: duplicate DoRA magnitude for {dora['mod']!r}")
            infixes.add(dora["infix"])
            magnitudes[dora["mod"]] = t
            continue
        parsed = _split_key(key)
        if parsed is not None:
            mod, kind, factor, infix = parsed
            infixes.add(infix)
            if kinds.setdefault(mod, kind) != kind:
                raise AdapterFileError(f"{folder}: {mod!r} has both Linear-style and Embedding-style LoRA keys")
            if factor in factors.setdefault(mod, {}):
                raise AdapterFileError(f"{folder}: duplicate {factor} for {mod!r} (with and without the {PEFT_PREFIX!r} prefix?)")
            factors[mod][factor] = t
            continue
        plain = key.removeprefix(PEFT_PREFIX)
        owners = modules_to_save_paths(model, modules_to_save) if modules_to_save else []
        if any(plain.startswith(m + ".") for m in owners):
            saved_modules.append((plain, t))
            continue
        if _base_parameter(model, plain) is not None:
            base_copies.append((plain, t))
            continue
        raise AdapterFileError(
            f"{folder}: unexpected tensor {key!r}: neither a LoRA factor (lora_A/lora_B/lora_embedding_A/B) "
            f"nor a parameter of modules_to_save={modules_to_save or None}. Nothing was loaded"
        )
    if len(infixes) > 1:
        raise AdapterFileError(
            f"{folder}: the keys mix adapter names {sorted(map(str, infixes))}; PEFT files hold one adapter without its name "
            "(…lora_A.weight). Save with PeftModel.save_pretrained, which strips the in-memory name (…lora_A.default.weight)"
        )
    if not factors:
        raise AdapterFileError(f"{folder}: {WEIGHTS_NAME} holds no LoRA factors (keys like '{PEFT_PREFIX}<module>.lora_A.weight')")
    for mod, fs in factors.items():
        missing = {"A", "B"} - set(fs)
        if missing:
            raise AdapterFileError(f"{folder}: {mod!r} has no {'/'.join(sorted(missing))} factor in {WEIGHTS_NAME} (truncated or edited file?)")

    # ---- the layers the config targets must be the layers in the file ----------------------------------
    tm, excl = cfg.get("target_modules"), cfg.get("exclude_modules")
    base_names = [n for n, _ in base_module_names(model)]
    not_targeted = sorted(m for m in factors if not _peft_targets(tm, m) or _peft_excluded(excl, m))
    if not_targeted:
        raise AdapterFileError(
            f"{folder}: the file has weights for {not_targeted[:4]}, which target_modules={tm!r} does not select; "
            "config and weights disagree"
        )
    targeted = {
        n for n in base_names
        if _peft_targets(tm, n) and not _peft_excluded(excl, n)
        and not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in modules_to_save)
        and (isinstance(model.get_submodule(n), LoRALayer) or lora_wrapper(model.get_submodule(n)) is not None)
    }
    missing_layers = sorted(targeted - set(factors))
    if missing_layers:
        raise AdapterFileError(
            f"{folder}: target_modules={tm!r} selects {missing_layers[:4]} in this model but the file has no weights for "
            f"{'it' if len(missing_layers) == 1 else 'them'} ({len(missing_layers)} layers). Wrong base model, or a truncated file?"
        )

    rslora = cfg.get("use_rslora", False)
    dropout = cfg.get("lora_dropout", 0.0)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    layers = {}
    for mod, fs in factors.items():
        try:
            module = model.get_submodule(mod)
        except AttributeError:
            raise AdapterFileError(f"{folder}: the model has no module {mod!r}; was the adapter trained on another architecture?") from None
        if not isinstance(module, LoRALayer) and lora_wrapper(module) is None:
            raise AdapterFileError(f"{folder}: {mod!r} is a {type(module).__name__}, a layer type lora_edu cannot put LoRA on. Nothing was loaded")
        if layer_kind(module) != kinds[mod]:
            raise AdapterFileError(f"{folder}: {mod!r} is a {type(_base_of(module)).__name__} but the file stores {kinds[mod]}-style LoRA keys for it")
        r = _pattern_value(rank_pattern, mod, cfg["r"])
        alpha = _pattern_value(alpha_pattern, mod, cfg["lora_alpha"])
        try:
            config = AdapterConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        except (TypeError, ValueError) as e:
            raise AdapterFileError(f"{folder}: {mod!r}: {e}") from None
        m = magnitudes.pop(mod, None)
        if cfg.get("use_dora") and (m is None or kinds[mod] != "linear"):
            raise AdapterFileError(f"{folder}: use_dora=true but {mod!r} has "
                                   f"{'no lora_magnitude_vector' if m is None else 'Embedding-style keys (DoRA on embeddings is not implemented)'}"
                                   ". Nothing was loaded")
        layers[mod] = LayerState(kinds[mod], config, fs["A"], fs["B"], m)
    if magnitudes:
        raise AdapterFileError(f"{folder}: DoRA magnitude vectors for {sorted(magnitudes)[:4]} without lora_A/lora_B. Nothing was loaded")

    # PEFT's save_pretrained(save_embedding_layers=...) also stores base parameters of the input and output embeddings
    # (``embed_tokens.base_layer.weight``, ``lm_head.base_layer.bias``, or ``embed_tokens.weight`` when not adapted):
    # accept them when they are this model's, refuse otherwise (loading them would change the base model).
    for key, t in base_copies:
        W = _base_parameter(model, key)
        if tuple(W.shape) != tuple(t.shape) or not torch.equal(W.detach().cpu().to(t.dtype), t):
            raise AdapterFileError(
                f"{folder}: the file carries the base parameter {key!r} (PEFT's save_embedding_layers stores the embedding "
                "layers' base weights) and it differs from this model's: wrong base model, or new tokens were added. "
                "Load the base model the adapter was trained on (or resize/copy those embeddings first). Nothing was loaded"
            )

    # PEFT refuses a modules_to_save entry whose module has no tensors in the file; loading would keep the model's own
    # (e.g. randomly initialised) head while the adapter was trained with another one.
    saved_keys = [key for key, _ in saved_modules]
    empty = [p for p in (modules_to_save_paths(model, modules_to_save) if modules_to_save else [])
             if any(True for _ in _base_of(model.get_submodule(p)).parameters())
             and not any(k.startswith(p + ".") for k in saved_keys)]
    if empty:
        raise AdapterFileError(
            f"{folder}: modules_to_save={modules_to_save!r} selects {empty[:4]} in this model but {WEIGHTS_NAME} has no tensors for "
            f"{'it' if len(empty) == 1 else 'them'} (keys '{PEFT_PREFIX}{empty[0]}.<parameter>'): the adapter was trained with "
            "other values there. Truncated file, or another base model? Nothing was loaded"
        )
    trainable = []
    for key, _ in saved_modules:
        owner = next(m for m in modules_to_save_paths(model, modules_to_save) if key.startswith(m + "."))
        if owner not in trainable:
            trainable.append(owner)
    state = AdapterState(name, layers, trainable, dict(saved_modules))
    return apply_adapter_state(model, state, cast=True, where=str(folder))


def _base_parameter(model: nn.Module, key: str) -> torch.Tensor | None:
    """The model's base parameter or buffer that a PEFT key names (``<module>[.base_layer].<param>``), or None."""
    mod, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(mod.removesuffix(".base_layer"))
    except AttributeError:
        return None
    t = getattr(_base_of(module), attr, None)
    return t if isinstance(t, torch.Tensor) else None


def modules_to_save_paths(model: nn.Module, modules_to_save) -> list[str]:
    """The module paths that PEFT's ``modules_to_save`` names select (exact path or dotted suffix)."""
    return [n for n, _ in base_module_names(model) if any(n == m or n.endswith("." + m) for m in modules_to_save)]
