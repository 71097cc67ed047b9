"""NF4 and QLoRA's frozen 4-bit base, from scratch.

QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs", arXiv 2305.14314) trains LoRA adapters on top of a base model stored in 4 bits.  Its
storage format has three parts, each built here in the order of the paper:

1. **NormalFloat 4** (§3 "4-bit NormalFloat Quantization", eq. 4; values printed in Appendix E):
   16 levels at quantiles of N(0, 1), normalised to [-1, 1] — :func:`nf4_levels`.
2. **Block-wise absmax quantisation** (§2 "Block-wise k-bit Quantization", eq. 1–2): each block of
   64 weights is divided by its largest magnitude (the *quantisation constant* c₂ = absmax) and
   every value is rounded to the nearest level; two 4-bit indices are packed per byte —
   :func:`quantize_nf4`, :func:`dequantize_nf4`, :func:`pack_4bit`.
3. **Double quantisation** (§3 "Double Quantization", eq. 6): the fp32 constants c₂ are themselves
   quantised to 8 bits in blocks of 256, after subtracting their mean, with fp32 second-level
   constants c₁ — 0.5 bit/parameter of constants become 8/64 + 32/(64·256) ≈ 0.127 bit
   (:func:`nf4_bits_per_parameter`, :attr:`NF4Quantized.bits_per_parameter`).

Then the layer QLoRA fine-tunes through (eq. 5: Y = X·doubleDequant(c₁, c₂, W^NF4) + X L₁ L₂):
:class:`NF4Linear`, a frozen base that dequantises on the fly and stores nothing else, and two
error analyses: :func:`quantization_error` and :func:`requantize_merge_error` (why an adapter is
kept separate from a 4-bit base rather than merged into it).

Conventions follow bitsandbytes (the paper's reference implementation), so the stored formats are
interchangeable: the first index of a pair sits in the high nibble; normalisation multiplies by
the reciprocal of absmax; a value exactly half-way between two levels goes to the *lower* one
(``torch.bucketize`` on the midpoints, ``right=False``); dequantisation multiplies in float32.
Measured against bitsandbytes 0.50.2 on CPU (benchmarks/results/nf4_vs_bitsandbytes_cpu.txt): the
same code tables, NF4 codes, constants and dequantised values bit for bit; with double quantisation
its 8-bit kernel picks a code that is not the nearest for ~0.1–0.2 % of the constants (ours takes
the nearest), and our dequantiser applied to its stored state reproduces its output bit for bit.
This module depends on torch and math only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "NF4_OFFSET",
    "NF4_PUBLISHED",
    "nf4_levels",
    "dynamic_8bit_code",
    "pack_4bit",
    "unpack_4bit",
    "blockwise_absmax_quantize",
    "blockwise_absmax_dequantize",
    "NF4Quantized",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_bits_per_parameter",
    "NF4Linear",
    "QuantizationError",
    "quantization_error",
    "MergeError",
    "requantize_merge_error",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# --------------------------------------------------------------------------------------------
# 1. The 16 NF4 levels
# --------------------------------------------------------------------------------------------

#: Probability of the outermost quantile.  Equal, to its 7 printed digits, to
#: ½[(1 − 1/(2·15)) + (1 − 1/(2·16))] = 0.96770833…: the mean of the outermost bin centres of 15 and
#: of 16 equal-probability bins.  The paper does not print it; bitsandbytes' ``create_normal_map``
#: (the reference implementation that produced Appendix E's table) uses exactly this value.
NF4_OFFSET = 0.9677083

#: The NF4 levels as published in QLoRA, Appendix E ("NormalFloat 4-bit data type"), also
#: hard-coded in bitsandbytes ``functional.get_4bit_type("nf4")``.  Each is a float32 number printed
#: with 16–17 significant digits, so "equal to the printed precision" means equal as float32.
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_levels(offset: float = NF4_OFFSET, dtype: torch.dtype = torch.float64) -> Tensor:
    """The 16 NF4 levels, sorted, derived from quantiles of N(0, 1) (QLoRA §3, eq. 4 and its asymmetric variant).

    A quantile type with an exact zero and the same number of levels on each side has an odd
    number of levels; 2⁴ = 16 is even.  QLoRA therefore estimates "2^(k−1) quantiles for the
    negative part and 2^(k−1)+1 for the positive part" and removes one of the two zeros::

        positive:  Φ⁻¹(p),  p = linspace(offset, ½, 9) without its last point ½   → 8 levels
        negative: −Φ⁻¹(p),  p = linspace(offset, ½, 8) without its last point ½   → 7 levels
        levels   = sort(negative ∪ {0} ∪ positive) / max(positive)               → 16 levels in [-1, 1]

    (Φ⁻¹(offset) ≈ 1.848 σ is the outermost quantile, since Φ⁻¹(1) = ∞.)  ``dtype=float64`` does
    every step in float64: the mathematical levels, within one float32 ulp of the published table.
    ``dtype=float32`` replays the precision of the reference computation (float32 probability grid,
    float64 Φ⁻¹ as scipy's ``norm.ppf``, float32 normalisation) and reproduces :data:`NF4_PUBLISHED`
    bit for bit; it is the code table the quantiser uses.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"nf4_levels derives the levels in float32 or float64, got {dtype}")
    p_pos = torch.linspace(offset, 0.5, 9, dtype=dtype)[:-1]  # (8,) probabilities, ½ dropped
    p_neg = torch.linspace(offset, 0.5, 8, dtype=dtype)[:-1]  # (7,)
    positive = torch.special.ndtri(p_pos.double()).to(dtype)
    negative = -torch.special.ndtri(p_neg.double()).to(dtype)
    levels = torch.cat([negative, torch.zeros(1, dtype=dtype), positive]).sort().values  # (16,)
    return levels / levels.max()


def _nf4_code(device: torch.device | None = None) -> Tensor:
    """The float32 NF4 code table (16,) used to quantise and dequantise."""
    return nf4_levels(dtype=torch.float32).to(device)


def dynamic_8bit_code() -> Tensor:
    """The signed 8-bit "dynamic" float of Dettmers (2016, arXiv 1511.04561), sorted (256,) float32 in [-0.993, 1].

    QLoRA §3 quantises the absmax constants "with 8-bit Floats"; the reference implementation uses
    this type (bitsandbytes ``create_dynamic_map(signed=True)``, rebuilt here operation for
    operation).  A value is sign · 10^(−e) · f: for each exponent e = 6, 5, …, 0 there are 2^(6−e)
    fractions f, the centres of equal sub-intervals of [0.1, 1] — fine steps near 0, coarse near 1.
    Plus 0 and 1: 2·(1 + 2 + … + 64) + 2 = 256 values.
    """
    values: list[float] = []
    for i in range(7):  # exponent 10^(i−6): i = 0 is the smallest magnitude
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # (2^i,) centres of the sub-intervals
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# 2. Block-wise absmax quantisation, and packing two 4-bit codes per byte
# --------------------------------------------------------------------------------------------


def pack_4bit(codes: Tensor) -> Tensor:
    """Pack 4-bit codes (2m,) uint8 in [0, 15] into (m,) bytes: first code in the high nibble (bitsandbytes' order)."""
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() % 2:
        raise ValueError(f"pack_4bit needs a 1-D uint8 tensor of even length, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_4bit: codes must be in [0, 15], got a maximum of {int(codes.max())}")
    pairs = codes.view(-1, 2)  # (m, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_4bit`: (m,) uint8 → (2m,) uint8 codes in [0, 15]."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"unpack_4bit needs a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)  # (m, 2) → (2m,)


def blockwise_absmax_quantize(x: Tensor, code: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Absmax-quantise a flat float32 tensor block by block onto a sorted code table (QLoRA §2, eq. 1).

    For each block b of ``block_size`` values: c_b = max |x_i| (the quantisation constant), and
    each x_i → the index of the code value nearest to x_i / c_b (ties to the lower index).
    A length that is not a multiple of ``block_size`` is zero-padded: zeros change no block's
    absmax and map to the code's 0 (NF4 and the dynamic type both contain an exact 0).
    An all-zero block gets c_b = 0 and all-zero codes' values.

    Returns ``(indices, absmax)``: (n_blocks·block_size,) uint8 and (n_blocks,) float32.
    """
    n_blocks = math.ceil(x.numel() / block_size)
    padded = F.pad(x.reshape(-1), (0, n_blocks * block_size - x.numel()))
    blocks = padded.view(n_blocks, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    inverse = torch.where(absmax > 0, absmax.reciprocal(), torch.zeros_like(absmax))
    normalised = (blocks * inverse[:, None]).clamp(-1.0, 1.0)  # in [-1, 1]
    midpoints = (code[:-1] + code[1:]) / 2  # (len(code) − 1,) decision boundaries
    indices = torch.bucketize(normalised, midpoints, right=False)  # boundary value → lower index
    return indices.to(torch.uint8).reshape(-1), absmax


def blockwise_absmax_dequantize(indices: Tensor, absmax: Tensor, code: Tensor) -> Tensor:
    """code[index] · c_b for every block b, in the dtype of ``code``/``absmax``: (n_blocks·block_size,)."""
    values = code.index_select(0, indices.int()).view(absmax.numel(), -1)  # (n_blocks, block_size); int32, not int64, indices
    return (values * absmax[:, None]).reshape(-1)


# --------------------------------------------------------------------------------------------
# 3. The stored format, double quantisation, and bits per parameter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NF4Quantized:
    """A weight stored in NF4: packed codes plus single- or double-quantised absmax constants.

    Names follow QLoRA eq. 6 where they differ from bitsandbytes': ``absmax`` is c₂ in fp32 (single
    quantisation); with double quantisation, ``absmax_codes`` is c₂ in 8 bits (after subtracting
    ``absmax_mean``), ``absmax_scale`` the second-level fp32 constants c₁, one per 256 constants.
    """

    codes: Tensor  # (ceil(numel / 2),) uint8: two NF4 indices per byte, block padding not stored
    shape: torch.Size  # the original weight's shape
    dtype: torch.dtype  # the original weight's dtype (the default of dequantize)
    block_size: int
    absmax: Tensor | None = None  # (n_blocks,) float32, single quantisation
    absmax_codes: Tensor | None = None  # (n_blocks,) uint8 indices into dynamic_8bit_code()
    absmax_scale: Tensor | None = None  # (ceil(n_blocks / absmax_block_size),) float32 = c₁
    absmax_mean: Tensor | None = None  # () float32, subtracted before the second quantisation
    absmax_block_size: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.numel / self.block_size)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (what a checkpoint holds; the code tables are shared constants)."""
        names = ("codes", "absmax") if self.absmax is not None else ("codes", "absmax_codes", "absmax_scale", "absmax_mean")
        return {name: getattr(self, name) for name in names}

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the stored tensors (measured with ``Tensor.nbytes``)."""
        return sum(t.nbytes for t in self.tensors().values())

    @property
    def bits_per_parameter(self) -> float:
        """Measured storage: 8 · nbytes / numel (compare :func:`nf4_bits_per_parameter`)."""
        return 8 * self.nbytes / self.numel

    def dequantize_absmax(self, code8: Tensor | None = None) -> Tensor:
        """The absmax constants c₂ as the format reconstructs them: (n_blocks,) float32 (eq. 6, inner dequant).

        ``code8``: :func:`dynamic_8bit_code` already on the right device (rebuilt when None).
        """
        if self.absmax is not None:
            return self.absmax
        code8 = dynamic_8bit_code().to(self.absmax_codes.device) if code8 is None else code8
        c1 = self.absmax_scale.repeat_interleave(self.absmax_block_size)[: self.n_blocks]  # (n_blocks,) c₁ of each c₂
        return code8.index_select(0, self.absmax_codes.int()) * c1 + self.absmax_mean

    def to(self, device: torch.device | str) -> NF4Quantized:
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return NF4Quantized(shape=self.shape, dtype=self.dtype, block_size=self.block_size,
                            absmax_block_size=self.absmax_block_size, **moved)


def _check_block_size(block_size: int, name: str = "block_size") -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2 or block_size % 2:
        raise ValueError(f"{name} must be an even integer ≥ 2 (two 4-bit codes per byte), got {block_size!r}")


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"NF4 quantisation needs a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"NF4 quantisation needs a floating-point weight (float16, bfloat16, float32 or float64), "
                        f"got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("NF4 quantisation needs a non-empty weight, got 0 elements")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("NF4 quantisation needs finite weights: found NaN or ±inf (a block's absmax would be non-finite)")


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True,
                 absmax_block_size: int = 256) -> NF4Quantized:
    """Quantise ``weight`` (any shape) to NF4 with block-wise absmax, optionally double-quantising the constants.

    The weight is flattened in row-major order and cut into blocks of ``block_size`` (QLoRA and
    bitsandbytes: 64).  **A numel that is not a multiple of block_size is padded**, not refused:
    the last block is filled with zeros while it is quantised (they change no absmax), and only
    the real weights' codes are stored, ceil(numel/2) bytes, as in bitsandbytes.
    Double quantisation (QLoRA §3): mean-centre the (n_blocks,) fp32 constants, absmax-quantise
    them to the 8-bit dynamic float in blocks of ``absmax_block_size`` (256), keep c₁ in fp32.
    float64 weights are rounded to float32 first (the constants are fp32 anyway).
    """
    _check_weight(weight)
    _check_block_size(block_size)
    _check_block_size(absmax_block_size, "absmax_block_size")
    flat = weight.detach().reshape(-1).float()  # (numel,) float32
    indices, absmax = blockwise_absmax_quantize(flat, _nf4_code(flat.device), block_size)
    indices = indices[: flat.numel() + flat.numel() % 2]  # drop the block padding (keep one code to fill a byte)
    common = dict(codes=pack_4bit(indices), shape=weight.shape, dtype=weight.dtype, block_size=block_size,
                  absmax_block_size=absmax_block_size)
    if not double_quant:
        return NF4Quantized(absmax=absmax, **common)
    absmax_mean = absmax.mean()  # () — the constants are all positive: centre them to use the signed code
    absmax_codes, absmax_scale = blockwise_absmax_quantize(absmax - absmax_mean, dynamic_8bit_code().to(flat.device),
                                                           absmax_block_size)
    # clone: keep only the real constants' codes, in storage of their own (nbytes must be what is held)
    return NF4Quantized(absmax_codes=absmax_codes[: absmax.numel()].clone(), absmax_scale=absmax_scale, absmax_mean=absmax_mean,
                        **common)


def dequantize_nf4(q: NF4Quantized, dtype: torch.dtype | None = None, *, code: Tensor | None = None,
                   code8: Tensor | None = None) -> Tensor:
    """W = NF4[code] · c₂ per block, reshaped to the original shape (QLoRA eq. 6).

    The stored values are float32 levels times float32 (reconstructed) constants.  For float64 the
    product is formed in float64, where it is exact; for the other dtypes it is formed in float32
    and rounded once to ``dtype`` (as bitsandbytes does), so ``dequantize(float32) ==
    dequantize(float64).float()`` bit for bit.  ``dtype=None`` gives the original weight's dtype.
    ``code``/``code8``: the float32 NF4 and 8-bit code tables already on the device (:class:`NF4Linear`
    keeps them as buffers); rebuilt when None.  Temporaries of a few bytes per weight are made on the
    way (indices, float32 values): a fused kernel, as in bitsandbytes, would avoid them.
    """
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    code = (_nf4_code(q.codes.device) if code is None else code).to(work)
    absmax = q.dequantize_absmax(code8).to(work)  # (n_blocks,)
    indices = F.pad(unpack_4bit(q.codes), (0, q.n_blocks * q.block_size - 2 * q.codes.numel()))  # refill the last block
    flat = blockwise_absmax_dequantize(indices, absmax, code)  # (n_blocks·block_size,)
    return flat[: q.numel].view(q.shape).to(dtype)


def nf4_bits_per_parameter(block_size: int = 64, double_quant: bool = True, absmax_block_size: int = 256,
                           numel: int | None = None) -> float:
    """Storage in bits per weight, from the format's definition (QLoRA §3, "Double Quantization").

    Without ``numel``, the paper's asymptotic count: 4 + 32/64 = 4.5 bits (single) and
    4 + 8/64 + 32/(64·256) ≈ 4.127 bits (double).  With ``numel``, the exact count of what
    :func:`quantize_nf4` stores for that many weights: ceil(numel/2) bytes of codes, one constant per
    started block (and per started block of constants), and the one fp32 mean.
    """
    if numel is None:
        if not double_quant:
            return 4 + 32 / block_size
        return 4 + 8 / block_size + 32 / (block_size * absmax_block_size)
    n_blocks = math.ceil(numel / block_size)
    bits = 8 * math.ceil(numel / 2)
    if double_quant:
        bits += 8 * n_blocks + 32 * math.ceil(n_blocks / absmax_block_size) + 32
    else:
        bits += 32 * n_blocks
    return bits / numel


# --------------------------------------------------------------------------------------------
# 4. The frozen NF4 base layer
# --------------------------------------------------------------------------------------------


class _DequantizedLinear(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ dequantised in forward and again in backward: no copy of Ŵ is kept for autograd.

    A plain ``F.linear(x, layer.dequantize())`` would save the dequantised matrix for the backward
    pass — one full-precision copy per layer, the memory QLoRA is meant to save.  Ŵ is frozen,
    so backward only needs ∂L/∂x = ∂L/∂y · Ŵ (and ∂L/∂b if a bias was unfrozen).
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: NF4Linear) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        W = layer.dequantize(layer.compute_dtype)  # (out, in)
        return F.linear(x.to(W.dtype), W, None if bias is None else bias.to(W.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = ctx.layer.dequantize(grad_y.dtype)  # (out, in), re-made rather than stored
            grad_x = (grad_y @ W).to(ctx.x_dtype)  # (..., out) @ (out, in) → (..., in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4, dequantised on the fly: the base of QLoRA (eq. 5).

    ``forward(x) = F.linear(x, dequantize(compute_dtype), bias)``; x is cast to ``compute_dtype``
    and the result back to x's dtype (as bitsandbytes' ``Linear4bit``).  Nothing dequantised is
    cached, in forward or for backward (see :class:`_DequantizedLinear`).

    There is deliberately no ``weight`` attribute: code that sees a ``weight`` would treat it as a
    float matrix it may update in place (merging ΔW into it).  The matrix is only available as a
    fresh tensor from :meth:`dequantize`; ``lora_base_kind = "quantized_linear"`` tells LoRA code it
    may add a branch on top of this layer but never merge into it.  The stored tensors are buffers
    (codes uint8, constants float32); the optional ``bias`` is a frozen parameter in its original
    dtype.  ``module.to(dtype)`` leaves the float32 constants as they are (it would round them).
    """

    lora_base_kind = "quantized_linear"
    _STORED = ("codes", "absmax", "absmax_codes", "absmax_scale", "absmax_mean")

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, block_size: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"NF4Linear needs a 2-D (out_features, in_features) weight, got {shape}")
        compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        if compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4Linear: compute_dtype must be one of {FLOAT_DTYPES}, got {compute_dtype}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"NF4Linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        q = quantize_nf4(weight, block_size=block_size, double_quant=double_quant)
        self.out_features, self.in_features = weight.shape
        self.block_size, self.double_quant, self.compute_dtype = block_size, double_quant, compute_dtype
        self.weight_dtype = weight.dtype
        for name in self._STORED:
            self.register_buffer(name, getattr(q, name))
        # the code tables, built once per layer and moved with it (not saved: they are constants of the format)
        self.register_buffer("nf4_code", _nf4_code(weight.device), persistent=False)
        self.register_buffer("absmax_code", dynamic_8bit_code().to(weight.device) if double_quant else None, persistent=False)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantise an ``nn.Linear`` (its weight (out, in) and bias); ``compute_dtype`` defaults to its weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), block_size=block_size,
                   double_quant=double_quant, compute_dtype=compute_dtype)

    def quantized(self) -> NF4Quantized:
        """The stored format as an :class:`NF4Quantized` (views of this layer's buffers)."""
        return NF4Quantized(shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                            block_size=self.block_size, **{name: getattr(self, name) for name in self._STORED})

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """A fresh (out_features, in_features) tensor; ``dtype=None`` gives the original weight's dtype."""
        return dequantize_nf4(self.quantized(), dtype, code=self.nf4_code, code8=self.absmax_code)

    def forward(self, x: Tensor) -> Tensor:
        return _DequantizedLinear.apply(x, self.bias, self).to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype)/.half() would round the float32 constants; keep them float32, move devices only.
        names = ("absmax", "absmax_scale", "absmax_mean", "nf4_code", "absmax_code")
        constants = {n: b for n in names if (b := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for name, original in constants.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        quant = "double-quantised constants" if self.double_quant else "fp32 constants"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"NF4 blocks of {self.block_size}, {quant}, compute_dtype={self.compute_dtype}")


# --------------------------------------------------------------------------------------------
# 5. Error analysis
# --------------------------------------------------------------------------------------------


def _half_widest_gap(code: Tensor) -> float:
    """Largest rounding error of nearest-value rounding onto ``code`` for inputs in [-1, 1]."""
    code = code.double()
    return max(float((code[1:] - code[:-1]).max()) / 2, float(code[0] + 1), float(1 - code[-1]))


@dataclass(frozen=True)
class QuantizationError:
    """Error of NF4 storage for one weight (all float64 quantities, per block as (n_blocks,) tensors)."""

    relative_frobenius: float  # ‖W − Ŵ‖_F / ‖W‖_F
    max_abs: float  # max |W − Ŵ|
    max_abs_per_block: Tensor  # (n_blocks,)
    absmax_per_block: Tensor  # (n_blocks,) the exact constants c₂ (before double quantisation)
    bound_per_block: Tensor  # (n_blocks,) the derived bound on max_abs_per_block, see quantization_error


def quantization_error(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> QuantizationError:
    """Quantise ``weight`` and measure the error against it in float64, with a derived per-block bound.

    Bound: a normalised value in [-1, 1] is rounded to the nearest NF4 level, so it moves by at most
    h = ½·(widest gap) = ½(1 − 0.7229568) ≈ 0.139, i.e. |w − ŵ| ≤ h·c₂ per block.  With double
    quantisation the constant itself is off by at most δ ≤ h₈·c₁ (h₈ the same quantity for the
    8-bit code), which moves a value by |level|·δ ≤ δ.  A few float32 ulps (ε) cover the
    reciprocal, the product and the mean: bound = (h + 8ε)·c₂ + (h₈ + 8ε)·c₁ + 8ε·c₂.
    """
    q = quantize_nf4(weight, block_size=block_size, double_quant=double_quant)
    eps = torch.finfo(torch.float32).eps
    w = F.pad(weight.detach().reshape(-1).double(), (0, q.n_blocks * block_size - q.numel))
    w_hat = F.pad(dequantize_nf4(q, torch.float64).reshape(-1), (0, q.n_blocks * block_size - q.numel))
    err = (w - w_hat).view(q.n_blocks, block_size).abs()  # (n_blocks, block_size)
    absmax = w.view(q.n_blocks, block_size).abs().amax(dim=1)  # (n_blocks,)
    bound = (_half_widest_gap(_nf4_code()) + 8 * eps) * absmax * (1 + 8 * eps)
    if double_quant:
        c1 = q.absmax_scale.double().repeat_interleave(q.absmax_block_size)[: q.n_blocks]  # (n_blocks,)
        bound = bound + (_half_widest_gap(dynamic_8bit_code()) + 8 * eps) * c1
    return QuantizationError(relative_frobenius=float((w - w_hat).norm() / w.norm()) if w.norm() > 0 else 0.0,
                             max_abs=float(err.max()), max_abs_per_block=err.amax(dim=1), absmax_per_block=absmax,
                             bound_per_block=bound)


@dataclass(frozen=True)
class MergeError:
    """What merging ΔW into an NF4 base costs, all relative to ‖ΔW‖_F unless named otherwise.

    The reference is the adapter kept separate: W_deq + ΔW, exact (float64).
    """

    delta_norm: float  # ‖ΔW‖_F
    requantized: float  # ‖Q(W_deq + ΔW) − (W_deq + ΔW)‖_F / ‖ΔW‖_F: merge, then store in NF4 again
    requantized_weight_relative: float  # the same error / ‖W_deq + ΔW‖_F
    codes_changed: float  # fraction of weights whose NF4 index changed on re-quantisation
    bf16: float  # merged into a bf16 copy of the dequantised weight: ‖bf16(W_deq + ΔW) − (W_deq + ΔW)‖_F / ‖ΔW‖_F
    fp16: float  # the same in float16
    fp32: float  # the same in float32


def requantize_merge_error(q: NF4Quantized, delta_w: Tensor) -> MergeError:
    """Measure "dequantise, add ΔW, re-quantise" against keeping the adapter separate (W_deq + ΔW exactly).

    Re-quantisation snaps every merged weight back onto the 16 levels of its block: an update
    smaller than half a level spacing (≈ 0.04–0.15 · c₂) mostly disappears, so the error is of the
    order of ‖ΔW‖ itself.  What a user should do: on a quantised base keep the adapter separate
    (QLoRA eq. 5); to deploy a merged model, merge into a bf16/fp16 copy of the *dequantised*
    weights (errors ≈ one bf16/fp16 rounding of W, reported here as ``bf16``/``fp16``).
    """
    if tuple(delta_w.shape) != tuple(q.shape):
        raise ValueError(f"requantize_merge_error: ΔW has shape {tuple(delta_w.shape)}, the weight {tuple(q.shape)}")
    w_deq = dequantize_nf4(q, torch.float64)
    exact = w_deq + delta_w.detach().to(w_deq.device, torch.float64)  # the adapter kept separate
    q_merged = quantize_nf4(exact, block_size=q.block_size, double_quant=q.double_quant,
                            absmax_block_size=q.absmax_block_size)
    requantized = dequantize_nf4(q_merged, torch.float64)
    delta_norm = float(delta_w.double().norm())

    def rel(approx: Tensor) -> float:
        return float((approx.double() - exact).norm()) / delta_norm if delta_norm > 0 else 0.0

    changed = unpack_4bit(q_merged.codes)[: q.numel] != unpack_4bit(q.codes)[: q.numel]
    return MergeError(delta_norm=delta_norm, requantized=rel(requantized),
                      requantized_weight_relative=float((requantized - exact).norm() / exact.norm()),
                      codes_changed=float(changed.double().mean()), bf16=rel(exact.to(torch.bfloat16)),
                      fp16=rel(exact.to(torch.float16)), fp32=rel(exact.float()))
