"""Variants of plain LoRA, each from scratch in a module of its own.

* :mod:`lora_edu.variants.nf4` — QLoRA's 4-bit NormalFloat base (Dettmers et al. 2023):
  the NF4 levels, block-wise absmax and double quantisation, the frozen :class:`NF4Linear`,
  and the error of merging into a quantised base.
* :mod:`lora_edu.variants.qlora` — LoRA on that NF4 base (QLoRA eq. 5): ``QLoRALinear``,
  ``quantize_linears``, ``add_qlora``; merging refused, measured, or done on a dequantised copy.
* :mod:`lora_edu.variants.dora` — DoRA (Liu et al. 2024): W' = m · (W + s·B A) / ‖W + s·B A‖_c,
  ``DoRALinear``, ``add_dora``.
* :mod:`lora_edu.variants.pissa` — PiSSA init (Meng et al. 2024): A, B from the top-r SVD of W,
  W replaced by its residual; conversion back to plain LoRA on the original W.
"""
from lora_edu.variants.dora import DoRALinear, add_dora, column_norm, dora_parameters, dora_weight
from lora_edu.variants.nf4 import (
    NF4_OFFSET,
    NF4_PUBLISHED,
    MergeError,
    NF4Linear,
    NF4Quantized,
    QuantizationError,
    blockwise_absmax_dequantize,
    blockwise_absmax_quantize,
    dequantize_nf4,
    dynamic_8bit_code,
    nf4_bits_per_parameter,
    nf4_levels,
    pack_4bit,
    quantization_error,
    quantize_nf4,
    requantize_merge_error,
    unpack_4bit,
)
from lora_edu.variants.pissa import PiSSAConversion, add_pissa, apply_converted, pissa_factors, pissa_init, pissa_to_lora
from lora_edu.variants.qlora import (
    MERGE_REFUSAL,
    QLoRALinear,
    add_qlora,
    merge_error,
    merge_into_dequantized,
    quantize_linears,
    stored_bytes,
)

__all__ = [
    "DoRALinear",
    "MERGE_REFUSAL",
    "PiSSAConversion",
    "QLoRALinear",
    "add_dora",
    "add_pissa",
    "add_qlora",
    "apply_converted",
    "column_norm",
    "dora_parameters",
    "dora_weight",
    "merge_error",
    "merge_into_dequantized",
    "pissa_factors",
    "pissa_init",
    "pissa_to_lora",
    "quantize_linears",
    "stored_bytes",
    "NF4_OFFSET",
    "NF4_PUBLISHED",
    "MergeError",
    "NF4Linear",
    "NF4Quantized",
    "QuantizationError",
    "blockwise_absmax_dequantize",
    "blockwise_absmax_quantize",
    "dequantize_nf4",
    "dynamic_8bit_code",
    "nf4_bits_per_parameter",
    "nf4_levels",
    "pack_4bit",
    "quantization_error",
    "quantize_nf4",
    "requantize_merge_error",
    "unpack_4bit",
]
