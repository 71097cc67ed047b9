"""Two small transformers to put LoRA on: a decoder-only ``GPT`` and a ``ViT``.

Both are plain PyTorch and share one attention ``Block``. Every attention layer
has four separate projections named like the LoRA paper's weight matrices
(Hu et al. 2021, §4.2: W_q, W_k, W_v, W_o) and every MLP two named linears::

    blocks.{i}.attn.q_proj   k_proj   v_proj   o_proj      # nn.Linear(d_model, d_model)
    blocks.{i}.mlp.up_proj   down_proj                     # d_model -> d_ff -> d_model

so ``add_lora(model, targets=["q_proj", "v_proj"])`` reads the same on a language
model and on a vision model: the paper's claim that LoRA applies to GPT/LLaMA-style
LLMs and to ViTs is one line of code on either.

The GPT is LLaMA-flavoured (pre-norm RMSNorm, no biases by default) with learned
absolute positions and an untied ``lm_head``; the ViT (Dosovitskiy et al. 2020)
flattens non-overlapping patches, projects them with ``patch_proj``, prepends a
[CLS] token and classifies it with ``head``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# configs


@dataclass
class GPTConfig:
    vocab_size: int = 97  # lora_edu.lab.data.CharTokenizer: printable ASCII + "\n" + <unk>
    block_size: int = 64  # maximum context length T
    n_layer: int = 2  # number of transformer blocks
    n_head: int = 4  # attention heads; head size hs = d_model // n_head
    d_model: int = 64  # residual stream width C (the "d" of the LoRA paper)
    d_ff: int = 256  # MLP hidden width
    dropout: float = 0.0  # dropout on attention probabilities and residual branches
    bias: bool = False  # biases in the linear layers (LLaMA: none)

    # name -> overrides of the defaults above
    PRESETS = {
        # ~0.11 M params, 0.45 MB in float32: pretrains in about a minute on a laptop CPU
        "tiny": dict(n_layer=2, n_head=4, d_model=64, d_ff=256),
        # ~1.1 M params, 4.5 MB: d_model = 256 so that the chance level max(i, j)/d of the
        # subspace similarity (LoRA paper §7.2) stays small for ranks up to 64
        "wide": dict(n_layer=2, n_head=4, d_model=256, d_ff=512),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown GPTConfig preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ViTConfig:
    image_size: int = 16  # square input images, H = W
    patch_size: int = 4  # non-overlapping P x P patches -> (H/P)^2 tokens
    in_channels: int = 3  # RGB
    num_classes: int = 6  # lora_edu.lab.data.image_tasks: 6 shape classes
    n_layer: int = 2  # number of transformer blocks
    n_head: int = 4  # attention heads
    d_model: int = 64  # token width
    d_ff: int = 256  # MLP hidden width
    dropout: float = 0.0
    bias: bool = False

    PRESETS = {
        # ~0.1 M params: pretrains on the source shapes in well under a minute on a laptop CPU
        "tiny": dict(n_layer=2, n_head=4, d_model=64, d_ff=256),
        # d_model = 256 for subspace analysis, as GPTConfig "wide"
        "wide": dict(n_layer=2, n_head=4, d_model=256, d_ff=512),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> ViTConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown ViTConfig preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019; used by LLaMA).

    The statistic is computed in float32 (or float64 for float64 inputs) so that
    bf16 autocast does not lose it; the result has the input's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (the LoRA targets)."""

    def __init__(self, d_model: int, n_head: int, causal: bool, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # W_q
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W_k
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # W_v
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)  # W_o
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)
        # softmax(q k^T / sqrt(hs)) v, masked so that position t sees only positions <= t if causal
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """down_proj(gelu(up_proj(x))): the position-wise feed-forward network."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)  # (B, T, C) -> (B, T, d_ff)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)  # (B, T, d_ff) -> (B, T, C)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, causal: bool, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = Attention(d_model, n_head, causal=causal, dropout=dropout, bias=bias)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        x = x + self.mlp(self.mlp_norm(x))
        return x


def _init_weights(module: nn.Module) -> None:
    """GPT-2-style init: N(0, 0.02) for linears and embeddings, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def _scale_residual_projections(model: nn.Module, n_layer: int) -> None:
    """GPT-2: shrink the projections that write into the residual stream by 1/sqrt(2 n_layer)."""
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (or of trainable ones) in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -----------------------------------------------------------------------------
# GPT


class GPT(nn.Module):
    """Decoder-only transformer language model: tokens (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # token id -> vector
        self.pos_emb = nn.Embedding(c.block_size, c.d_model)  # learned absolute positions
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            [Block(c.d_model, c.n_head, c.d_ff, causal=True, dropout=c.dropout, bias=c.bias) for _ in range(c.n_layer)]
        )
        self.norm = RMSNorm(c.d_model)  # final norm before the head
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)  # NOT tied to tok_emb
        self.apply(_init_weights)
        _scale_residual_projections(self, c.n_layer)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence length {T} > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(self.norm(x))  # (B, T, C) -> (B, T, V)

    def num_params(self, trainable_only: bool = False) -> int:
        return num_params(self, trainable_only)

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)  # (B, T) -> (B, T + 1)
        return idx


# -----------------------------------------------------------------------------
# ViT


class ViT(nn.Module):
    """Vision Transformer classifier: images (B, 3, H, W) -> class logits (B, num_classes)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        assert c.image_size % c.patch_size == 0, "image_size must be divisible by patch_size"
        patch_dim = c.in_channels * c.patch_size**2
        self.patch_proj = nn.Linear(patch_dim, c.d_model, bias=True)  # flattened patch -> token
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.pos_emb = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.d_model))  # learned
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            [Block(c.d_model, c.n_head, c.d_ff, causal=False, dropout=c.dropout, bias=c.bias) for _ in range(c.n_layer)]
        )
        self.norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.num_classes, bias=True)  # classifier on [CLS]
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        _scale_residual_projections(self, c.n_layer)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, ch, H, W) -> (B, N, ch * P * P) with N = (H/P) * (W/P) patches in row-major order."""
        B, ch, H, W = images.shape
        P = self.config.patch_size
        x = images.reshape(B, ch, H // P, P, W // P, P)  # (B, ch, H/P, P, W/P, P)
        x = x.permute(0, 2, 4, 1, 3, 5)  # -> (B, H/P, W/P, ch, P, P)
        return x.reshape(B, (H // P) * (W // P), ch * P * P)  # -> (B, N, ch*P*P)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_proj(self.patchify(images))  # (B, N, ch*P*P) -> (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_emb.to(x.dtype)  # (B, N + 1, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)  # (B, N + 1, C)
        return self.head(self.norm(x[:, 0]))  # [CLS] token: (B, C) -> (B, num_classes)

    def num_params(self, trainable_only: bool = False) -> int:
        return num_params(self, trainable_only)


def build_model(kind: str, preset: str = "tiny", **overrides) -> nn.Module:
    """``build_model("gpt", "wide")`` or ``build_model("vit", "tiny", num_classes=4)``."""
    if kind == "gpt":
        return GPT(GPTConfig.preset(preset, **overrides))
    if kind == "vit":
        return ViT(ViTConfig.preset(preset, **overrides))
    raise ValueError(f"unknown model kind {kind!r}; choose 'gpt' or 'vit'")
