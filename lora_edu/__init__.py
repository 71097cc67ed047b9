"""lora_edu — LoRA (Low-Rank Adaptation, Hu et al. 2021) from scratch in PyTorch.

The package tells the story in layers, each importing only the ones below it:

* :mod:`lora_edu.core` — the LoRA core: ``LoRALinear`` / ``LoRAEmbedding`` (W frozen,
  ΔW = s·B A), ``add_lora`` by name, named adapters, merge with a measured equivalence
  check, parameter counting.  Start reading at ``lora_edu/core/layers.py``.
* :mod:`lora_edu.variants` — beyond plain LoRA: QLoRA's NF4 base, DoRA, PiSSA initialisation.
* :mod:`lora_edu.adapters` — adapter files: one in-memory adapter state, the native
  safetensors format and Hugging Face PEFT's folder format.
* :mod:`lora_edu.speed` — the fused ``LoRALinear`` path (:func:`fuse`), many adapters in one batch
  (:func:`adapter_batch`) and multi-GPU training.
* :mod:`lora_edu.lab` — the course lab: offline data, small models, training, experiments,
  analysis, the guided tour.
* :mod:`lora_edu.grading` — classroom exercises and their checker.

``import lora_edu as L`` gives the names below.
"""
from lora_edu._version import __version__
from lora_edu.adapters import AdapterFileError, load_adapter, read_adapter_config, save_adapter
from lora_edu.adapters.peft import load_peft_adapter, save_peft_adapter
from lora_edu.core.config import AdapterConfig
from lora_edu.core.counting import LayerCount, ParameterCount, count_parameters
from lora_edu.core.equivalence import TOLERANCE, MergeReport, check_merge_equivalence, erased_fraction
from lora_edu.core.inject import (
    active_adapter,
    adapter_names,
    add_lora,
    delete_adapter,
    disable_lora,
    find_targets,
    freeze,
    lora_B_parameters,
    lora_layers,
    lora_parameters,
    merge_lora,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from lora_edu.core.kinds import register_lora_layer
from lora_edu.core.layers import LoRAEmbedding, LoRALayer, LoRALinear
from lora_edu.speed.fused import FusedLoRALinear, fuse, unfuse
from lora_edu.speed.mixed import adapter_batch
from lora_edu.variants import DoRALinear, QLoRALinear, add_dora, add_pissa, add_qlora, quantize_linears

__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterFileError",
    "DoRALinear",
    "FusedLoRALinear",
    "LayerCount",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "MergeReport",
    "ParameterCount",
    "QLoRALinear",
    "TOLERANCE",
    "active_adapter",
    "adapter_batch",
    "adapter_names",
    "add_dora",
    "add_lora",
    "add_pissa",
    "add_qlora",
    "check_merge_equivalence",
    "count_parameters",
    "delete_adapter",
    "disable_lora",
    "erased_fraction",
    "find_targets",
    "freeze",
    "fuse",
    "load_adapter",
    "load_peft_adapter",
    "lora_B_parameters",
    "lora_layers",
    "lora_parameters",
    "merge_lora",
    "quantize_linears",
    "read_adapter_config",
    "register_lora_layer",
    "save_adapter",
    "save_peft_adapter",
    "set_adapter",
    "unfuse",
    "unload_lora",
    "unmerge_lora",
]
