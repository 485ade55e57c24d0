"""``gpt``: a decoder-only causal language model in the style of GPT-2 / nanoGPT."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradwise.models.blocks import Positions, Stack, check_transformer_args
from gradwise.models.build import check_positive, infer_lm, register_model
from gradwise.nn import init_weights


class GPT(nn.Module):
    """Token embedding, positions, causal pre-norm blocks, LM head (optionally tied to the embedding)."""

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int | None,
        d_model: int,
        n_heads: int,
        n_layers: int,
        dropout: float,
        norm: str,
        pos: str,
        mlp: str,
        tie_weights: bool,
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = Positions(pos, d_model, n_heads, max_seq_len)
        self.drop = nn.Dropout(dropout)
        self.trunk = Stack(d_model, n_heads, n_layers, 4.0, dropout, norm, mlp, causal=True)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:  # Press & Wolf 2017
            self.head.weight = self.tok.weight
        # GPT-2 init (Radford et al. 2019): N(0, 0.02), residual projections scaled by 1/sqrt(2L)
        init_weights(self, "normal", std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> next-token logits [B, T, vocab_size]."""
        h, rope = self.pos(self.tok(idx))
        return self.head(self.trunk(self.drop(h), rope))


@register_model("gpt", infer=infer_lm)
def gpt(
    vocab_size: int,
    max_seq_len: int | None = 256,
    d_model: int = 128,
    n_heads: int = 4,
    n_layers: int = 4,
    dropout: float = 0.1,
    norm: str = "layernorm",
    pos: str = "learned",
    mlp: str = "gelu",
    tie_weights: bool = True,
) -> GPT:
    """Decoder-only LM (Radford et al. 2019): token ids [B, T] -> logits [B, T, vocab_size].

    Causal scaled-dot-product attention; learned positions (bounded by ``max_seq_len``) or RoPE
    (Su et al. 2021, any length); GELU or SwiGLU (Shazeer 2020) MLPs; LayerNorm or RMSNorm.
    """
    check_transformer_args(d_model, n_heads, n_layers, norm, pos, mlp, ("learned", "rope"))
    check_positive("vocab_size", vocab_size)
    return GPT(
        vocab_size, max_seq_len, d_model, n_heads, n_layers, dropout, norm, pos, mlp, tie_weights
    )
