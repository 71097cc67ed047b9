"""Variants of plain LoRA, each from scratch in a module of its own.

* :mod:`lora_edu.variants.nf4` — QLoRA's 4-bit NormalFloat base (Dettmers et al. 2023):
  the NF4 levels, block-wise absmax and double quantisation, the frozen :class:`NF4Linear`,
  and the error of merging into a quantised base.
"""
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

__all__ = [
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
