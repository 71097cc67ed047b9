"""Hugging Face transformers support: GPT-2's transposed ``Conv1D`` and default targets per model family.

Importing this module needs ``transformers`` (the ``interop`` extra) and registers
:class:`LoRAConv1D` with :func:`lora_edu.register_lora_layer`, so afterwards
``add_lora(gpt2, targets=["c_attn"], r=8, alpha=16)`` just works::

    import lora_edu.hf                       # registers Conv1D -> LoRAConv1D
    targets = lora_edu.hf.default_targets(model)   # ["c_attn"] for GPT-2

GPT-2 (Radford et al. 2019) inherits OpenAI GPT's ``Conv1D``: a linear layer whose
weight is stored **transposed**, W_conv of shape (in, out), computing
``y = x @ W_conv + b``.  LoRA is still defined on the linear map x ↦ W x with
W = W_convᵀ (out, in), so A stays (r, in) and B stays (out, r) — exactly as for
``nn.Linear`` and as Hugging Face PEFT stores them — and only the *merge* sees the
transpose: ΔW_conv = (s · B A)ᵀ of shape (in, out).  PEFT calls this
``fan_in_fan_out=True``; the adapter files are the same as for a Linear layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .inject import register_lora_layer
from .layers import LoRALayer

__all__ = ["LoRAConv1D", "Conv1D", "DEFAULT_TARGETS", "default_targets"]


class LoRAConv1D(LoRALayer):
    """transformers' ``Conv1D`` plus LoRA: y = x W_conv + b + s · dropout(x) Aᵀ Bᵀ.

    Shapes: W_conv (in, out) frozen (the transpose of a Linear weight); A (r, in)
    Kaiming-uniform(a=√5), i.e. U(−1/√in, 1/√in); B (out, r) zeros; s = α/r
    (α/√r with ``rslora=True``).  ΔW_conv = (s · B A)ᵀ, shape (in, out).
    """

    base: Conv1D
    base_type = Conv1D

    @property
    def in_features(self) -> int:
        return self.base.nx  # W_conv is (nx, nf) = (in, out)

    @property
    def out_features(self) -> int:
        return self.base.nf

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _make_factors(self, r, device, dtype):
        A = torch.empty(r, self.in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # fan_in = in → bound 1/√in, as for LoRALinear
        B = torch.zeros(self.out_features, r, device=device, dtype=dtype)
        return A, B

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s · dropout(x) Aᵀ Bᵀ: (…, in) → (…, r) → (…, out) — the same branch as a Linear layer."""
        name = self._active()
        A, B = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(A.dtype))
        return (x @ A.T @ B.T) * self.adapters[name].scale

    def delta_weight(self, name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW_conv = (s · B @ A)ᵀ, shape (in, out) — the layout of ``base.weight`` (PEFT: fan_in_fan_out)."""
        name = name or self._active()
        A, B = self.lora_A[name], self.lora_B[name]
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return (B @ A).T * self.adapters[name].scale  # (out, in).T -> (in, out)

    def extra_repr(self) -> str:
        cfg = ", ".join(f"{n}: r={c.r}, alpha={c.alpha:g}, s={c.scale:g}" for n, c in self.adapters.items())
        return (
            f"in={self.in_features}, out={self.out_features} (weight stored (in, out)), adapters={{{cfg}}}, "
            f"active={self.active_adapter!r}, merged={self.merged}"
        )


register_lora_layer(Conv1D, LoRAConv1D)

#: ``config.model_type`` -> the LoRA paper's choice (Hu et al. 2021, §4.2/§7.1: W_q and W_v)
#: under each family's module names in transformers 5.x.  Fused-QKV families list the
#: fused projection (one layer holding W_q, W_k and W_v).  Checked in tests/test_hf_models.py.
DEFAULT_TARGETS: dict[str, list[str]] = {
    # decoder-only language models
    "gpt2": ["c_attn"],  # fused QKV Conv1D (in, 3·d)
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],  # fused QKV Linear
    "bloom": ["query_key_value"],
    # encoders
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    # encoder-decoder
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    # vision
    "vit": ["q_proj", "v_proj"],  # transformers 5.x renamed ViT's query/value to q_proj/v_proj
    "deit": ["q_proj", "v_proj"],
}


def default_targets(model_or_type: nn.Module | str) -> list[str]:
    """Default LoRA targets for a transformers model (or a ``config.model_type`` string)."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
        if model_type is None:
            raise ValueError(
                f"{type(model_or_type).__name__} has no config.model_type; pass targets=... explicitly "
                "(e.g. the names from lora_edu.find_targets or model.named_modules())"
            )
    try:
        return list(DEFAULT_TARGETS[model_type])
    except KeyError:
        raise KeyError(
            f"no default LoRA targets for model_type {model_type!r}; known: {sorted(DEFAULT_TARGETS)}. "
            "Pass targets=[...] explicitly — the attention query/value projections are the paper's choice (§4.2)"
        ) from None
