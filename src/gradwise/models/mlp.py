"""``mlp``: a multilayer perceptron over flattened inputs, the baseline for tabular data."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from gradwise.models.build import check_choice, check_positive, infer_flat, register_model
from gradwise.nn import init_weights

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


@register_model("mlp", infer=infer_flat)
def mlp(
    in_features: int,
    num_outputs: int,
    hidden: Sequence[int] = (256, 256),
    activation: str = "gelu",
    norm: str | None = "layernorm",
    dropout: float = 0.1,
) -> nn.Sequential:
    """Flatten -> [Linear -> norm -> activation -> dropout] per hidden width -> Linear.

    Any input shape works (it is flattened, so ``in_features = prod(input_shape)``). He init for
    ReLU-family activations (He et al. 2015), Xavier for tanh (Glorot & Bengio 2010); LayerNorm
    (Ba et al. 2016) or BatchNorm (Ioffe & Szegedy 2015) stabilise deeper stacks. Raw outputs.
    """
    check_positive("in_features", in_features)
    check_positive("num_outputs", num_outputs)
    check_choice("activation", activation, tuple(ACTIVATIONS))
    check_choice("norm", norm, ("layernorm", "batchnorm", None))
    hidden = (hidden,) if isinstance(hidden, int) else hidden
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        check_positive("hidden", h)
        layers.append(nn.Linear(width, h))
        if norm == "layernorm":
            layers.append(nn.LayerNorm(h))
        elif norm == "batchnorm":
            layers.append(nn.BatchNorm1d(h))
        layers += [ACTIVATIONS[activation](), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    model = nn.Sequential(*layers)
    return init_weights(model, "xavier" if activation == "tanh" else "he", nonlinearity=activation)
