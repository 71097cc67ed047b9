"""Hugging Face transformers models: default LoRA targets per model family.

GPT-2 (Radford et al. 2019) inherits OpenAI GPT's ``Conv1D``: a linear layer whose
weight is stored **transposed**, W_conv of shape (in, out), computing ``y = x @ W_conv + b``.
LoRA needs nothing special for it: :func:`lora_edu.add_lora` recognises the layer
(:mod:`lora_edu.core.kinds`) and wraps it in a ``LoRALinear(fan_in_fan_out=True)`` —
A stays (r, in), B stays (out, r), exactly as PEFT stores them, and only the merge
transposes ΔW.  This module needs no import to make that work; it holds the default
target names::

    lora_edu.add_lora(gpt2, lora_edu.adapters.hf.default_targets(gpt2), r=8, alpha=16)   # ["c_attn"]
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["DEFAULT_TARGETS", "default_targets"]

#: ``config.model_type`` -> the LoRA paper's choice (Hu et al. 2021, §4.2/§7.1: W_q and W_v)
#: under each family's module names in transformers 5.x.  Fused-QKV families list the
#: fused projection (one layer holding W_q, W_k and W_v).  Checked in tests/test_hf_models.py.
DEFAULT_TARGETS: dict[str, list[str]] = {
    # The same choice as PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (PEFT 0.21), checked in
    # tests/test_hf_models.py; mostly the paper's W_q and W_v, fused QKV projections where a family fuses them.
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": [r".*language_model\..*\.(q_proj|v_proj)"],  # PEFT gives a regex (fullmatch), as does lora_edu
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    # Not in PEFT's table; lora_edu adds the paper's W_q, W_v under transformers 5.x's names.
    "vit": ["q_proj", "v_proj"],
    "deit": ["q_proj", "v_proj"],
    "distilbert": ["q_lin", "v_lin"],
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
