"""``rnn``: an LSTM or GRU sequence classifier/regressor."""

from __future__ import annotations

import torch
from torch import nn

from gradwise.models.build import check_choice, check_positive, infer_sequence, register_model
from gradwise.models.transformer import sequence_input


class RNNClassifier(nn.Module):
    """Embed/project the inputs, run a (bi)directional LSTM/GRU, pool over time, project."""

    def __init__(
        self,
        embed: nn.Module,
        cell: str,
        embed_dim: int,
        num_outputs: int,
        hidden: int,
        layers: int,
        bidirectional: bool,
        dropout: float,
        pooling: str,
    ) -> None:
        super().__init__()
        self.pooling, self.bidirectional = pooling, bidirectional
        self.embed = embed
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            embed_dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_outputs)
        self._init_rnn(cell, hidden)

    def _init_rnn(self, cell: str, hidden: int) -> None:
        """Xavier input weights, orthogonal recurrent weights (Saxe et al. 2014), zero biases and
        LSTM forget-gate bias 1 (Jozefowicz et al. 2015) so memory is kept early in training."""
        for name, p in self.rnn.named_parameters():
            if "weight_ih" in name:
                nn.init.xavier_uniform_(p)
            elif "weight_hh" in name:
                for gate in p.split(hidden):  # one square block per gate
                    nn.init.orthogonal_(gate)
            else:
                nn.init.zeros_(p)
                if cell == "lstm" and name.startswith("bias_ih"):
                    p.data[hidden : 2 * hidden] = 1.0  # gate order i, f, g, o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(self.drop(self.embed(x)))
        if self.pooling == "mean":
            pooled = out.mean(dim=1)
        else:
            h_n = state[0] if isinstance(state, tuple) else state  # [layers*dirs, B, H]
            # last layer: forward state after t=T-1 and, if bidirectional, backward state after t=0
            pooled = torch.cat((h_n[-2], h_n[-1]), dim=-1) if self.bidirectional else h_n[-1]
        return self.head(self.drop(pooled))


@register_model("rnn", infer=infer_sequence)
def rnn(
    num_outputs: int,
    vocab_size: int | None = None,
    in_features: int | None = None,
    cell: str = "lstm",
    embed_dim: int = 128,
    hidden: int = 128,
    layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.1,
    pooling: str = "last",
) -> RNNClassifier:
    """LSTM (Hochreiter & Schmidhuber 1997) or GRU (Cho et al. 2014) over a sequence.

    Token ids [B, T] (``vocab_size``, embedded to ``embed_dim``) or features [B, T, F]
    (``in_features``, fed directly) -> raw outputs [B, num_outputs]. ``pooling="last"`` uses the
    final hidden state (both directions when bidirectional), ``"mean"`` averages over time.
    Sequences are assumed unpadded (same length in a batch).
    """
    check_choice("cell", cell, ("lstm", "gru"))
    check_choice("pooling", pooling, ("last", "mean"))
    for arg, value in (("num_outputs", num_outputs), ("hidden", hidden), ("layers", layers)):
        check_positive(arg, value)
    embed = sequence_input(vocab_size, in_features, embed_dim)
    if vocab_size is None:  # features go straight into the RNN
        embed, embed_dim = nn.Identity(), in_features
    return RNNClassifier(
        embed, cell, embed_dim, num_outputs, hidden, layers, bidirectional, dropout, pooling
    )
