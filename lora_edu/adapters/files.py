"""``save_adapter`` / ``load_adapter``: one entry point for both adapter formats.

``format="lora_edu"`` (default) writes one ``.safetensors`` file (:mod:`lora_edu.adapters.native`);
``format="peft"`` writes Hugging Face PEFT's folder (:mod:`lora_edu.adapters.peft`).  Loading
recognises the format from the path: a folder holding ``adapter_config.json`` is PEFT's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from lora_edu.adapters.native import load_native, save_native
from lora_edu.adapters.peft import CONFIG_NAME, load_peft_adapter, save_peft_adapter
from lora_edu.adapters.state import AdapterFileError

__all__ = ["save_adapter", "load_adapter"]


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, format: str = "lora_edu") -> Path:
    """Save one adapter (default: the active one) to ``path``; returns the path written.

    ``format="lora_edu"``: one ``.safetensors`` file with A, B and a JSON config.
    ``format="peft"``: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``.
    Files are written atomically; nothing else at ``path`` is touched.
    """
    if format == "peft":
        return save_peft_adapter(model, path, adapter=adapter)
    if format != "lora_edu":
        raise ValueError(f"unknown adapter format {format!r}; use 'lora_edu' or 'peft'")
    return save_native(model, path, adapter=adapter)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, cast: bool = False) -> nn.Module:
    """Load an adapter into ``model`` and make it the active one; returns the model.

    The model may already have LoRA layers with an adapter of that name (its tensors
    are overwritten after checking r, scale rule and shapes), or be a plain model (the
    adapter's layers are injected).  Everything is validated first: on any problem an
    :class:`AdapterFileError` says what, and the model is unchanged.  ``cast=True``
    allows native files whose dtype differs from the model's adapter dtype.
    """
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return load_peft_adapter(model, path, adapter=adapter)
        raise AdapterFileError(f"{path} is a folder without {CONFIG_NAME}; pass the .safetensors file of a lora_edu adapter")
    return load_native(model, path, adapter=adapter, cast=cast)
