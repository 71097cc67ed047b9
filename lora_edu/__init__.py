"""lora_edu — LoRA (Low-Rank Adaptation, Hu et al. 2021) from scratch in PyTorch.

The pieces, one concept per module:

* :mod:`lora_edu.layers` — ``LoRALinear`` / ``LoRAEmbedding``: W frozen, ΔW = s·B A.
* :mod:`lora_edu.inject` — ``freeze``, ``add_lora`` by name, named adapters, merge/unload.
* :mod:`lora_edu.counting` — ``count_parameters``: r·(in + out) per adapted layer.
* :mod:`lora_edu.equivalence` — ``check_merge_equivalence``: merged vs unmerged, measured.
* :mod:`lora_edu.adapters` — ``save_adapter`` / ``load_adapter`` (safetensors, atomic).
* :mod:`lora_edu.peft_format` — the same in Hugging Face PEFT's folder format.
"""
from ._version import __version__
from .adapters import AdapterFileError, load_adapter, read_adapter_config, save_adapter
from .counting import LayerCount, ParameterCount, count_parameters
from .equivalence import TOLERANCE, MergeReport, check_merge_equivalence, erased_fraction
from .inject import (
    active_adapter,
    adapter_names,
    add_lora,
    delete_adapter,
    disable_lora,
    find_targets,
    freeze,
    lora_layers,
    lora_parameters,
    merge_lora,
    register_lora_layer,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from .layers import AdapterConfig, LoRAEmbedding, LoRALayer, LoRALinear
from .peft_format import load_peft_adapter, save_peft_adapter

__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterFileError",
    "LayerCount",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "MergeReport",
    "ParameterCount",
    "TOLERANCE",
    "active_adapter",
    "adapter_names",
    "add_lora",
    "check_merge_equivalence",
    "count_parameters",
    "delete_adapter",
    "disable_lora",
    "erased_fraction",
    "find_targets",
    "freeze",
    "load_adapter",
    "load_peft_adapter",
    "lora_layers",
    "lora_parameters",
    "merge_lora",
    "read_adapter_config",
    "register_lora_layer",
    "save_adapter",
    "save_peft_adapter",
    "set_adapter",
    "unload_lora",
    "unmerge_lora",
]
