"""``transformer``: a pre-norm Transformer encoder that classifies or regresses whole sequences."""

from __future__ import annotations

import torch
from torch import nn

from gradwise.errors import ConfigError
from gradwise.models.blocks import Positions, Stack, check_transformer_args
from gradwise.models.build import check_choice, check_positive, infer_sequence, register_model
from gradwise.nn import init_weights


def sequence_input(vocab_size: int | None, in_features: int | None, dim: int) -> nn.Module:
    """Token ids [B, T] -> Embedding, or float features [B, T, F] -> Linear; exactly one is given."""
    if (vocab_size is None) == (in_features is None):
        raise ConfigError(
            "model.kwargs.vocab_size",
            vocab_size,
            "exactly one of vocab_size (token-id inputs) or in_features (float [T, F] inputs)",
            f"got in_features={in_features!r}",
        )
    if vocab_size is not None:
        check_positive("vocab_size", vocab_size)
        return nn.Embedding(vocab_size, dim)
    check_positive("in_features", in_features)
    return nn.Linear(in_features, dim)


class TransformerEncoder(nn.Module):
    """Embed, add positions, run pre-norm blocks, pool over time (mean or [CLS]), project."""

    def __init__(
        self,
        embed: nn.Module,
        num_outputs: int,
        max_seq_len: int | None,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mlp_ratio: float,
        dropout: float,
        norm: str,
        pos: str,
        mlp: str,
        pooling: str,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.embed = embed
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        extra = 1 if pooling == "cls" and max_seq_len is not None else 0
        self.pos = Positions(
            pos, d_model, n_heads, None if max_seq_len is None else max_seq_len + extra
        )
        self.drop = nn.Dropout(dropout)
        self.trunk = Stack(
            d_model, n_heads, n_layers, mlp_ratio, dropout, norm, mlp, False, drop_path
        )
        self.head = nn.Linear(d_model, num_outputs)
        init_weights(self, "normal", std=0.02)  # ViT/BERT-style N(0, 0.02)
        if isinstance(embed, nn.Linear):  # float features: keep unit scale (LeCun)
            init_weights(embed, "lecun")
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.cls is not None:
            h = torch.cat((self.cls.expand(h.shape[0], -1, -1), h), dim=1)
        h, rope = self.pos(h)
        h = self.trunk(self.drop(h), rope)
        return self.head(h[:, 0] if self.pooling == "cls" else h.mean(dim=1))


@register_model("transformer", infer=infer_sequence)
def transformer(
    num_outputs: int,
    vocab_size: int | None = None,
    in_features: int | None = None,
    max_seq_len: int | None = 512,
    d_model: int = 128,
    n_heads: int = 4,
    n_layers: int = 2,
    mlp_ratio: float = 4.0,
    dropout: float = 0.1,
    norm: str = "layernorm",
    pos: str = "learned",
    mlp: str = "gelu",
    pooling: str = "mean",
    drop_path: float = 0.0,
) -> TransformerEncoder:
    """Sequence classifier/regressor: token ids [B, T] or features [B, T, F] -> [B, num_outputs].

    Pre-norm encoder (Vaswani et al. 2017; Xiong et al. 2020) with learned, sinusoidal or rotary
    positions, GELU or SwiGLU MLPs, and mean or [CLS] pooling (Devlin et al. 2019). ``max_seq_len``
    bounds learned positions only. Returns raw logits.
    """
    check_transformer_args(
        d_model, n_heads, n_layers, norm, pos, mlp, ("learned", "rope", "sinusoidal")
    )
    check_positive("num_outputs", num_outputs)
    check_choice("pooling", pooling, ("mean", "cls"))
    embed = sequence_input(vocab_size, in_features, d_model)
    return TransformerEncoder(
        embed, num_outputs, max_seq_len, d_model, n_heads, n_layers, mlp_ratio, dropout,
        norm, pos, mlp, pooling, drop_path,
    )  # fmt: skip
