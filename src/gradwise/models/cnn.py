"""``cnn``: a small VGG-style convolutional net for small images (8x8 digits to 32x32 CIFAR)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from gradwise.models.build import check_positive, infer_image, register_model
from gradwise.nn import init_weights


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 conv (no bias: BatchNorm has one) -> BatchNorm (Ioffe & Szegedy 2015) -> ReLU."""
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


@register_model("cnn", infer=infer_image)
def cnn(
    in_channels: int,
    num_outputs: int,
    channels: Sequence[int] = (32, 64),
    dropout: float = 0.1,
) -> nn.Sequential:
    """Per stage two Conv-BN-ReLU blocks and a 2x2 max-pool, then global average pooling and a head.

    Pooling uses ``ceil_mode`` so even a 1x1 map survives: works for 8x8 inputs and up, any
    number of stages. VGG-style stacks (Simonyan & Zisserman 2015) with He init (He et al. 2015)
    and global average pooling (Lin et al. 2014). Input [B, C, H, W] -> raw logits [B, num_outputs].
    """
    check_positive("in_channels", in_channels)
    check_positive("num_outputs", num_outputs)
    channels = (channels,) if isinstance(channels, int) else channels
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in channels:
        check_positive("channels", c)
        layers += [*conv_bn_relu(c_in, c), *conv_bn_relu(c, c), nn.MaxPool2d(2, ceil_mode=True)]
        c_in = c
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(c_in, num_outputs),
    ]
    return init_weights(nn.Sequential(*layers), "he")
