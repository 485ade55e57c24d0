"""Building blocks for model authors: stochastic depth, weight-init schemes and RMSNorm.

``RMSNorm`` is ``torch.nn.RMSNorm`` (Zhang & Sennrich 2019), re-exported so models can say
``from gradwise.nn import RMSNorm`` without caring which torch version added it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import RMSNorm

__all__ = ["DropPath", "RMSNorm", "he_init_", "init_weights", "xavier_init_"]

InitScheme = Literal["he", "xavier", "lecun", "normal"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, RMSNorm)
# smooth ReLU-likes have no entry in torch's gain table; ReLU's gain is the usual stand-in
_GAIN_ALIASES = {"gelu": "relu", "silu": "relu", "swish": "relu", "mish": "relu", "elu": "relu"}


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample with probability ``p``.

    Survivors are rescaled by ``1/(1-p)`` so the expected output is unchanged; identity in eval
    mode or when ``p == 0``. Works for inputs of any rank (the first axis is the batch).
    Reference: Huang et al. 2016, "Deep Networks with Stochastic Depth".
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _gain_name(nonlinearity: str) -> str:
    return _GAIN_ALIASES.get(nonlinearity, nonlinearity)


def init_weights(
    module: nn.Module,
    scheme: InitScheme = "he",
    nonlinearity: str = "relu",
    std: float = 0.02,
) -> nn.Module:
    """Re-initialise every Linear/Conv weight in ``module`` with one scheme; returns ``module``.

    Schemes: ``"he"`` Kaiming-normal, fan-in (He et al. 2015) for ReLU-family nets;
    ``"xavier"`` Glorot-uniform scaled by the nonlinearity's gain (Glorot & Bengio 2010);
    ``"lecun"`` normal with std ``1/sqrt(fan_in)`` (LeCun et al. 1998); ``"normal"`` N(0, std),
    GPT-2 style, which also covers Embedding tables. Biases become 0; norm layers get weight 1,
    bias 0. ``gelu``/``silu`` use ReLU's gain, the usual approximation.
    """
    if scheme not in ("he", "xavier", "lecun", "normal"):
        raise ValueError(f"unknown init scheme {scheme!r}; expected he, xavier, lecun or normal")
    gain_name = _gain_name(nonlinearity)
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=gain_name)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(gain_name))
            elif scheme == "lecun":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            else:
                nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and scheme == "normal":
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, _NORMS):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return module


def he_init_(module: nn.Module, nonlinearity: str = "relu") -> nn.Module:
    """Kaiming-normal init of all Linear/Conv weights (He et al. 2015); see :func:`init_weights`."""
    return init_weights(module, "he", nonlinearity)


def xavier_init_(module: nn.Module, nonlinearity: str = "linear") -> nn.Module:
    """Glorot-uniform init of all Linear/Conv weights (Glorot & Bengio 2010); see :func:`init_weights`."""
    return init_weights(module, "xavier", nonlinearity)


def set_rates(
    model: nn.Module, dropout: float | None = None, drop_path: float | None = None
) -> None:
    """Change a built model's dropout and stochastic-depth rates in place (no shape or weight
    depends on them, so the model need not be built again).

    dropout: every ``nn.Dropout``-family module, every multi-layer RNN, and every module that keeps
    its attention dropout as a float ``dropout`` attribute (as gradwise's attention does).
    drop_path: the :class:`DropPath` modules in order, on the linear depth rule the zoo builds
    with (Huang et al. 2016): the i-th of n gets ``drop_path * i / (n - 1)``.
    """
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = float(dropout)
            elif isinstance(module, nn.RNNBase):
                module.dropout = float(dropout) if module.num_layers > 1 else 0.0
            elif isinstance(getattr(module, "dropout", None), float):
                module.dropout = float(dropout)
    if drop_path is not None:
        paths = [m for m in model.modules() if isinstance(m, DropPath)]
        for i, module in enumerate(paths):
            module.p = float(drop_path) * i / max(1, len(paths) - 1)
