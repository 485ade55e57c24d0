"""Transformer pieces shared by the ``transformer`` encoder and the ``gpt`` decoder.

Pre-norm blocks (Xiong et al. 2020) with fused scaled-dot-product attention; positions are
learned, sinusoidal (Vaswani et al. 2017) or rotary (RoPE, Su et al. 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.errors import ConfigError
from gradwise.models.build import check_choice, check_positive
from gradwise.nn import DropPath, RMSNorm

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [T, head_dim]


def make_norm(kind: str, dim: int) -> nn.Module:
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019) over the last axis."""
    return RMSNorm(dim) if kind == "rmsnorm" else nn.LayerNorm(dim)


def rope_angles(seq_len: int, head_dim: int, device: torch.device, base: float = 10000.0) -> Rope:
    """cos/sin tables for rotary position embedding (Su et al. 2021), rotate-half layout."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate query/key features ``x`` [B, H, T, D] by their position's angle."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sinusoidal(seq_len: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed sine/cosine position encodings [T, dim] (Vaswani et al. 2017)."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(seq_len, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class Attention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``; causal for decoders."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)  # residual projection (scaled init in gpt)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).split(C, dim=-1)
        )
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (Hendrycks & Gimpel 2016) or SwiGLU (Shazeer 2020).

    SwiGLU uses a hidden width of 2/3 * ratio * d_model so its parameter count matches GELU's.
    """

    def __init__(self, d_model: int, ratio: float, kind: str, dropout: float) -> None:
        super().__init__()
        self.swiglu = kind == "swiglu"
        hidden = int(ratio * d_model)
        if self.swiglu:
            hidden = max(8, (2 * hidden // 3 + 7) // 8 * 8)  # multiple of 8
        self.fc = nn.Linear(d_model, 2 * hidden if self.swiglu else hidden)
        self.proj = nn.Linear(hidden, d_model)  # residual projection (scaled init in gpt)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            a, gate = h.chunk(2, dim=-1)
            h = a * F.silu(gate)
        else:
            h = F.gelu(h)
        return self.drop(self.proj(h))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mlp_ratio: float,
        dropout: float,
        norm: str,
        mlp: str,
        causal: bool,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1, self.norm2 = make_norm(norm, d_model), make_norm(norm, d_model)
        self.attn = Attention(d_model, n_heads, dropout, causal)
        self.mlp = MLP(d_model, mlp_ratio, mlp, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Positions(nn.Module):
    """Adds learned or sinusoidal position embeddings to ``x``, or hands RoPE angles to attention."""

    def __init__(self, kind: str, d_model: int, n_heads: int, max_len: int | None) -> None:
        super().__init__()
        self.kind, self.max_len, self.head_dim = kind, max_len, d_model // n_heads
        if kind == "learned":
            if max_len is None:
                raise ConfigError(
                    "model.kwargs.max_seq_len", None, "a positive integer for pos='learned'"
                )
            self.table = nn.Embedding(max_len, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Rope | None]:
        n = x.shape[1]
        if self.kind == "learned":
            if n > self.max_len:
                raise ValueError(f"sequence length {n} exceeds max_seq_len={self.max_len}")
            return x + self.table(torch.arange(n, device=x.device)), None
        if self.kind == "sinusoidal":
            return x + sinusoidal(n, x.shape[-1], x.device).to(x.dtype), None
        return x, rope_angles(n, self.head_dim, x.device)


class Stack(nn.Module):
    """``n_layers`` blocks followed by a final norm: the trunk of both encoder and decoder."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mlp_ratio: float,
        dropout: float,
        norm: str,
        mlp: str,
        causal: bool,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        rates = [drop_path * i / max(1, n_layers - 1) for i in range(n_layers)]  # linear decay rule
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, dropout, norm, mlp, causal, r) for r in rates
        )
        self.norm = make_norm(norm, d_model)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)


def check_transformer_args(
    d_model: int, n_heads: int, n_layers: int, norm: str, pos: str, mlp: str, positions: tuple
) -> None:
    """Validate the shared transformer hyperparameters, raising ConfigErrors naming the field."""
    for arg, value in (("d_model", d_model), ("n_heads", n_heads), ("n_layers", n_layers)):
        check_positive(arg, value)
    check_choice("norm", norm, ("layernorm", "rmsnorm"))
    check_choice("pos", pos, positions)
    check_choice("mlp", mlp, ("gelu", "swiglu"))
    if d_model % n_heads:
        raise ConfigError("model.kwargs.n_heads", n_heads, f"a divisor of d_model={d_model}")
    if pos == "rope" and (d_model // n_heads) % 2:
        raise ConfigError(
            "model.kwargs.n_heads", n_heads, "an even head size (d_model/n_heads) for RoPE"
        )
