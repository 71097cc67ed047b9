"""Parameter counts of real architectures from their published shapes — no weights needed.

A LoRA adapter on a Linear(in, out) trains r·(in + out) parameters (A: (r, in), B: (out, r)),
so the trainable count of a whole model is Σ r·(in + out) over the targeted matrices
(LoRA paper §4.2). This module holds the shapes of GPT-2 small, LLaMA-7B, GPT-3 175B
and ViT-B/16 and reproduces the paper's numbers:

* GPT-3 175B, r = 4 on W_q and W_v: 96 · 2 · 4 · (12288 + 12288) = 18,874,368 trainable,
  175e9 / 18,874,368 ≈ 9,272 ≈ 9,300× fewer (the paper's "10,000×").
* The "35 MB" checkpoint: 18,874,368 params × 2 bytes (fp16) = 37,748,736 bytes
  = 37.7 MB = 36.0 MiB. No dtype/unit gives 35 exactly (that needs 1.85 bytes/param);
  35 MB is the paper's 350 GB (175e9 × 2 bytes, decimal GB) divided by the rounded
  10,000×. ``PAPER_CHECKPOINT_MB`` records this.

Attention projections are described as the paper does, W_q, W_k, W_v, W_o, each
d → d, even where the published code fuses them (GPT-2 and GPT-3's ``c_attn``
d → 3d, timm ViT's ``qkv``). A fused matrix has exactly the parameters of the three
slices, so totals do not change; LoRA counts do: one adapter on the fused matrix
trains r·(d + 3d), three separate ones 3·r·(d + d). Targets ``"q"``/``"v"`` mean
separate adapters on the W_q/W_v slices, as loralib's ``MergedLinear`` with
``enable_lora=[True, False, True]`` does for the paper's GPT-2 runs; the target
``"qkv_fused"`` means one adapter on the whole fused matrix, as PEFT's
``target_modules=["c_attn"]`` does on Hugging Face GPT-2.

GPT-2 small at r = 16 on every Linear plus a 768 → 2 head = 2,666,528: this is the
figure of Raschka, *Build a Large Language Model (From Scratch)*, appendix E, whose
GPT-2 has separate W_query/W_key/W_value (768 → 768) and whose ``replace_linear_with_lora``
wraps every ``nn.Linear`` — the 72 block matrices and the new 768 → 2 ``out_head`` too
(its weights frozen, LoRA on top):
12 · (4 · 16 · (768 + 768) + 16 · (768 + 3072) + 16 · (3072 + 768)) = 2,654,208, plus
16 · (768 + 2) = 12,320 on the head. Other conventions give other numbers (see
``GPT2_CONVENTIONS`` and the tests): fused c_attn → 2,371,616; the head trained in full
(768·2 + 2 = 1,538) instead of LoRA on it → 2,655,746.

Memory model (Biderman et al. 2024): full fine-tuning with Adam keeps fp32 weights,
gradients and two moments, 16 bytes per parameter (7B → 112 GB); LoRA keeps the frozen
weights in bf16 (2 bytes each) plus 16 bytes per adapter parameter. Activations excluded.
For GPT-3 the frozen fp16 weights alone are the paper's 350 GB LoRA training VRAM; its
1.2 TB for full fine-tuning is not the 16-byte model (that gives 2.8 TB) and the paper does
not give its breakdown.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

__all__ = [
    "Linear",
    "Architecture",
    "GPT2_SMALL",
    "LLAMA_7B",
    "GPT3_175B",
    "VIT_B16",
    "ARCHITECTURES",
    "get_architecture",
    "with_classifier",
    "resolve_targets",
    "lora_params",
    "lora_params_breakdown",
    "reduction_factor",
    "BYTES_PER_PARAM",
    "checkpoint_bytes",
    "format_bytes",
    "PAPER_CHECKPOINT_MB",
    "ADAM_BYTES_PER_PARAM",
    "MemoryEstimate",
    "full_finetune_memory",
    "lora_memory",
    "many_tasks_storage",
    "lora_table",
    "format_table",
    "GPT2_CONVENTIONS",
]


@dataclass(frozen=True)
class Linear:
    """One weight matrix y = x Wᵀ + b, W: (out_features, in_features)."""

    name: str  # target name: q, k, v, o, gate, up, down, head
    in_features: int
    out_features: int
    bias: bool
    module: str  # where it lives in the published implementation

    @property
    def n_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    def lora_params(self, r: int) -> int:
        """r·(in + out): A (r, in) plus B (out, r)."""
        return r * (self.in_features + self.out_features)


@dataclass(frozen=True)
class Architecture:
    """A transformer described by its matrices: n_layer identical blocks, a head, and the rest."""

    name: str
    n_layer: int
    d_model: int
    block: tuple[Linear, ...]  # the Linear layers of one block
    block_other: int  # non-Linear parameters of one block (norms)
    head: Linear  # output Linear (LM head or classifier)
    head_tied: bool  # head shares the token-embedding matrix: not counted twice
    other: tuple[tuple[str, int], ...]  # embeddings, final norm, ...: (name, n_params)
    published_total: float  # as the authors state it
    source: str  # where the shapes and the published total come from
    notes: str = ""
    fused_qkv: str | None = None  # the published fused module, if q, k, v are slices of one matrix

    @property
    def linears(self) -> tuple[tuple[Linear, int], ...]:
        """(Linear, multiplicity) for every matrix: block ones × n_layer, the head × 1."""
        return tuple((lin, self.n_layer) for lin in self.block) + ((self.head, 1),)

    def total_params(self) -> int:
        """Parameters counted from the shapes (tied matrices once)."""
        per_block = sum(lin.n_params for lin in self.block) + self.block_other
        head = 0 if self.head_tied else self.head.n_params
        return self.n_layer * per_block + head + sum(n for _, n in self.other)

    def breakdown(self) -> dict[str, int]:
        """Where the parameters are."""
        out = {name: n for name, n in self.other}
        out["blocks.linear"] = self.n_layer * sum(lin.n_params for lin in self.block)
        out["blocks.norms"] = self.n_layer * self.block_other
        out["head" + (" (tied)" if self.head_tied else "")] = 0 if self.head_tied else self.head.n_params
        return out


def _attention(d: int, bias: bool, module: str, o: str) -> tuple[Linear, ...]:
    """W_q, W_k, W_v, W_o, each d → d; ``module`` names where each lives, formatted with "q", "k" or "v"."""
    return tuple(Linear(n, d, d, bias, module.format(n)) for n in ("q", "k", "v")) + (Linear("o", d, d, bias, o),)


def _gpt2_like(name: str, n_layer: int, d: int, vocab: int, n_ctx: int, published: float, source: str, notes: str):
    """GPT-2/GPT-3 block: fused c_attn d→3d, c_proj d→d, c_fc d→4d, mlp c_proj 4d→d, all with bias; 2 LayerNorms."""
    return Architecture(
        name=name,
        n_layer=n_layer,
        d_model=d,
        block=_attention(d, True, "attn.c_attn[{}]", "attn.c_proj")
        + (Linear("up", d, 4 * d, True, "mlp.c_fc"), Linear("down", 4 * d, d, True, "mlp.c_proj")),
        block_other=2 * 2 * d,  # ln_1, ln_2: weight + bias
        head=Linear("head", d, vocab, False, "lm_head (tied to wte)"),
        head_tied=True,
        other=(("wte", vocab * d), ("wpe", n_ctx * d), ("ln_f", 2 * d)),
        published_total=published,
        source=source,
        notes=notes,
        fused_qkv="attn.c_attn",
    )


GPT2_SMALL = _gpt2_like(
    "GPT-2 small",
    n_layer=12,
    d=768,
    vocab=50257,
    n_ctx=1024,
    published=124e6,
    source="Radford et al. 2019; shapes of the released checkpoint (HF gpt2)",
    notes="124,439,808 counted = the HF 'gpt2' count; the GPT-2 paper's 117M was a miscount later corrected to 124M.",
)

GPT3_175B = _gpt2_like(
    "GPT-3 175B",
    n_layer=96,
    d=12288,
    vocab=50257,
    n_ctx=2048,
    published=175e9,
    source="Brown et al. 2020, Table 2.1 (n_layers 96, d_model 12288, n_ctx 2048; GPT-2 block)",
    notes="≈174.6B counted (tied embeddings, biases); the paper states 175.0B.",
)

LLAMA_7B = Architecture(
    name="LLaMA-7B",
    n_layer=32,
    d_model=4096,
    block=_attention(4096, False, "self_attn.{}_proj", "self_attn.o_proj")
    + (
        Linear("gate", 4096, 11008, False, "mlp.gate_proj"),
        Linear("up", 4096, 11008, False, "mlp.up_proj"),
        Linear("down", 11008, 4096, False, "mlp.down_proj"),
    ),
    block_other=2 * 4096,  # input_layernorm, post_attention_layernorm: RMSNorm weight only
    head=Linear("head", 4096, 32000, False, "lm_head"),
    head_tied=False,
    other=(("embed_tokens", 32000 * 4096), ("norm", 4096)),  # RoPE: no position parameters
    published_total=6.7e9,
    source="Touvron et al. 2023, Table 2 (dim 4096, 32 layers, 32 heads; SwiGLU hidden 11008)",
    notes="6,738,415,616 counted = the HF count; the paper states 6.7B ('7B').",
)

_VIT_PATCH, _VIT_IMG, _VIT_D = 16, 224, 768
_VIT_TOKENS = (_VIT_IMG // _VIT_PATCH) ** 2 + 1  # 196 patches + [CLS]
VIT_B16 = Architecture(
    name="ViT-B/16",
    n_layer=12,
    d_model=_VIT_D,
    block=_attention(_VIT_D, True, "attn.qkv[{}]", "attn.proj")
    + (Linear("up", _VIT_D, 3072, True, "mlp.fc1"), Linear("down", 3072, _VIT_D, True, "mlp.fc2")),
    block_other=2 * 2 * _VIT_D,  # norm1, norm2
    head=Linear("head", _VIT_D, 1000, True, "head"),
    head_tied=False,
    other=(
        ("patch_embed", 3 * _VIT_PATCH * _VIT_PATCH * _VIT_D + _VIT_D),  # Conv2d(3, 768, 16, stride 16)
        ("cls_token", _VIT_D),
        ("pos_embed", _VIT_TOKENS * _VIT_D),
        ("norm", 2 * _VIT_D),
    ),
    published_total=86e6,
    source="Dosovitskiy et al. 2021, Table 1 (ViT-Base: 12 layers, hidden 768, MLP 3072, 86M); timm vit_base_patch16_224",
    notes="86,567,656 counted = timm's count (1000-class head). The patch embedding is a Conv2d, not a LoRA target here.",
    fused_qkv="attn.qkv",
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2-small": GPT2_SMALL,
    "llama-7b": LLAMA_7B,
    "gpt3-175b": GPT3_175B,
    "vit-b16": VIT_B16,
}


def get_architecture(name: str | Architecture) -> Architecture:
    """An Architecture or its key in ``ARCHITECTURES`` (case-insensitive)."""
    if isinstance(name, Architecture):
        return name
    try:
        return ARCHITECTURES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None


def with_classifier(arch: str | Architecture, num_classes: int, bias: bool = True) -> Architecture:
    """The architecture with its output layer replaced by a new Linear(d_model, num_classes) (untied)."""
    arch = get_architecture(arch)
    head = Linear("head", arch.d_model, num_classes, bias, f"classifier {arch.d_model}→{num_classes}")
    return replace(arch, name=f"{arch.name} + {num_classes}-class head", head=head, head_tied=False)


# ----------------------------------------------------------------------------- targets

_ALIASES = {
    "w_q": "q", "q_proj": "q", "query": "q",
    "w_k": "k", "k_proj": "k", "key": "k",
    "w_v": "v", "v_proj": "v", "value": "v",
    "w_o": "o", "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "lm_head": "head", "out_head": "head", "classifier": "head",
    "c_attn": "qkv_fused", "qkv": "qkv_fused",
}
_GROUPS = {
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "block": ("q", "k", "v", "o", "gate", "up", "down"),
    "all_linear": ("q", "k", "v", "o", "gate", "up", "down"),  # = PEFT's "all-linear": the output layer excluded
    "every_linear": ("q", "k", "v", "o", "gate", "up", "down", "head"),  # every nn.Linear (replace_linear_with_lora)
}


def resolve_targets(arch: str | Architecture, targets: str | Iterable[str]) -> tuple[str, ...]:
    """Canonical target names for ``arch``: q, k, v, o, gate, up, down, head, or qkv_fused.

    Accepts the paper's names (W_q, W_v), HF names (q_proj, c_attn, lm_head) and groups:
    ``attn``, ``mlp``, ``block`` = ``all_linear`` (every block Linear, as PEFT's "all-linear",
    which leaves the output layer out) and ``every_linear`` (block + head: every ``nn.Linear``).
    """
    arch = get_architecture(arch)
    if isinstance(targets, str):
        targets = [targets]
    present = {lin.name for lin in arch.block} | {"head"}
    out: list[str] = []
    for t in targets:
        key = t.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        names = [n for n in _GROUPS[key] if n in present] if key in _GROUPS else [key]
        for n in names:
            if n != "qkv_fused" and n not in present:
                raise ValueError(f"{arch.name} has no {t!r} matrix; it has {sorted(present)}")
            if n not in out:
                out.append(n)
    if "qkv_fused" in out and {"q", "k", "v"} & set(out):
        raise ValueError("'qkv_fused' (one adapter on the fused q|k|v matrix) cannot be combined with q, k or v")
    return tuple(out)


def lora_params_breakdown(arch: str | Architecture, r: int, targets: str | Iterable[str]) -> dict[str, int]:
    """Trainable LoRA parameters per target name (summed over layers): Σ r·(in + out)."""
    arch = get_architecture(arch)
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    out: dict[str, int] = {}
    for name in resolve_targets(arch, targets):
        if name == "qkv_fused":
            q, k, v = (next(lin for lin in arch.block if lin.name == n) for n in ("q", "k", "v"))
            out[name] = arch.n_layer * r * (q.in_features + q.out_features + k.out_features + v.out_features)
        else:
            out[name] = sum(lin.lora_params(r) * mult for lin, mult in arch.linears if lin.name == name)
    return out


def lora_params(arch: str | Architecture, r: int, targets: str | Iterable[str], train_head: bool = False) -> int:
    """Trainable parameters of LoRA at rank r on ``targets``; plus the head's own weights if ``train_head``.

    ``train_head=True`` is PEFT's ``modules_to_save=["classifier"]``: a new head trained in full.
    """
    arch = get_architecture(arch)
    n = sum(lora_params_breakdown(arch, r, targets).values())
    return n + (arch.head.n_params if train_head else 0)


def reduction_factor(arch: str | Architecture, r: int, targets, published: bool = True, **kw) -> float:
    """total / trainable, with the published total (the paper's 175e9) or the one counted from shapes."""
    arch = get_architecture(arch)
    total = arch.published_total if published else arch.total_params()
    return total / lora_params(arch, r, targets, **kw)


# ----------------------------------------------------------------------------- bytes

BYTES_PER_PARAM = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
_DTYPE_ALIASES = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}

# LoRA §4.2: "350GB to 35MB": 350 GB / 10,000 (decimal units), not a dtype size.
PAPER_CHECKPOINT_MB = 35


def _bytes_per_param(dtype) -> float:
    key = str(dtype).removeprefix("torch.").lower()
    key = _DTYPE_ALIASES.get(key, key)
    try:
        return BYTES_PER_PARAM[key]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(BYTES_PER_PARAM)}") from None


def checkpoint_bytes(n_params: int, dtype="fp16") -> int:
    """Bytes of n_params stored in ``dtype`` ("fp16", "bf16", "fp32", torch.float16, ...), tensor data only."""
    return math.ceil(n_params * _bytes_per_param(dtype))


_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def format_bytes(n_bytes: float, unit: str | None = None, digits: int = 1) -> str:
    """'37.7 MB' (decimal, as the LoRA paper writes sizes) or a given unit such as 'MiB'."""
    if unit is None:
        unit = next((u for u in ("TB", "GB", "MB", "KB") if n_bytes >= _UNITS[u]), "B")
    return f"{n_bytes / _UNITS[unit]:,.{digits}f} {unit}"


# ----------------------------------------------------------------------------- memory

ADAM_BYTES_PER_PARAM = 16  # fp32 weight 4 + gradient 4 + Adam m 4 + v 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Weights + gradients + optimizer state in bytes; activations excluded."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def full_finetune_memory(n_params: int) -> MemoryEstimate:
    """Adam full fine-tuning: 16 bytes per parameter (fp32 weights, gradients, m, v); 7e9 → 112 GB."""
    return MemoryEstimate(weights=4 * n_params, gradients=4 * n_params, optimizer=8 * n_params)


def lora_memory(n_base: int, n_lora: int, base_dtype="bf16") -> MemoryEstimate:
    """LoRA: frozen base weights in ``base_dtype`` (no gradients, no Adam state) + 16 bytes per adapter parameter."""
    return MemoryEstimate(
        weights=checkpoint_bytes(n_base, base_dtype) + 4 * n_lora,
        gradients=4 * n_lora,
        optimizer=8 * n_lora,
    )


def many_tasks_storage(n_tasks: int, base_bytes: float, adapter_bytes: float) -> dict[str, float]:
    """Storage for n_tasks: one base + n adapters vs n full fine-tuned copies (LoRA §4.2's 100 tasks)."""
    shared = base_bytes + n_tasks * adapter_bytes
    separate = n_tasks * base_bytes
    return {"shared_base": shared, "full_copies": separate, "ratio": separate / shared}


# ----------------------------------------------------------------------------- tables

# GPT-2 small conventions around the 2,666,528 of LLMs-from-scratch appendix E (r = 16, 768 → 2 head):
# (description, targets, train_head)
GPT2_CONVENTIONS = (
    ("separate q,k,v; LoRA on every Linear incl. the 768→2 head (LLMs-from-scratch)", ("every_linear",), False),
    ("separate q,k,v; LoRA on the 72 block Linears; head trained in full", ("block",), True),
    ("fused c_attn; LoRA on every Linear incl. the head", ("qkv_fused", "o", "up", "down", "head"), False),
    ("fused c_attn; LoRA on the 48 block Linears; head trained in full", ("qkv_fused", "o", "up", "down"), True),
)


def lora_table(
    archs: Iterable[str | Architecture] = ("gpt2-small", "llama-7b", "gpt3-175b", "vit-b16"),
    ranks: Iterable[int] = (1, 4, 16, 64),
    target_sets: Iterable[str | tuple[str, ...]] = (("q", "v"), "attn", "all_linear"),  # all_linear: head excluded
    dtype="fp16",
) -> list[dict]:
    """One row per (arch, targets, r): trainable, total (counted), fraction, ×fewer, adapter size."""
    rows = []
    for a in archs:
        arch = get_architecture(a)
        total = arch.total_params()
        for targets in target_sets:
            label = targets if isinstance(targets, str) else "+".join(targets)
            for r in ranks:
                n = lora_params(arch, r, targets)
                rows.append(
                    {
                        "arch": arch.name,
                        "targets": label,
                        "r": r,
                        "trainable": n,
                        "total": total,
                        "fraction": n / total,
                        "x_fewer": total / n,
                        "adapter_bytes": checkpoint_bytes(n, dtype),
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of ``lora_table`` rows (for notebooks and the CLI)."""
    header = f"{'arch':<14} {'targets':<12} {'r':>3} {'trainable':>14} {'total':>17} {'%':>8} {'x fewer':>9} {'adapter':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['arch']:<14} {row['targets']:<12} {row['r']:>3} {row['trainable']:>14,} {row['total']:>17,} "
            f"{100 * row['fraction']:>7.4f}% {row['x_fewer']:>9,.0f} {format_bytes(row['adapter_bytes']):>10}"
        )
    return "\n".join(lines)
