"""``resnet``: a ResNet of BasicBlocks with a stem for small images (CIFAR-style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradwise.errors import ConfigError
from gradwise.models.build import check_positive, infer_image, register_model
from gradwise.nn import DropPath, init_weights


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity (or 1x1 projection) skip (He et al. 2016).

    The last BN's gamma starts at zero (Goyal et al. 2017), so at init the block is
    ``relu(skip(x))``: an identity on post-ReLU inputs, which makes deep nets easy to start.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(self.skip(x) + self.drop_path(out))


class ResNet(nn.Module):
    """3x3 stem (no stride, no max-pool: small images keep their resolution), stages, GAP, head."""

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        drop_path: float,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        total = sum(blocks_per_stage)
        blocks, c_in, i = [], widths[0], 0
        for stage, (width, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            for j in range(n):
                rate = drop_path * i / max(1, total - 1)  # linearly increasing with depth
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and j == 0 else 1, rate))
                c_in, i = width, i + 1
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_outputs)
        init_weights(self, "he")
        for block in self.blocks:
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


@register_model("resnet", infer=infer_image)
def resnet(
    in_channels: int,
    num_outputs: int,
    widths: Sequence[int] = (32, 64, 128),
    blocks_per_stage: Sequence[int] = (1, 1, 1),
    drop_path: float = 0.0,
) -> ResNet:
    """ResNet (He et al. 2016) for small images: [B, C, H, W] -> raw logits [B, num_outputs].

    Each stage after the first halves the resolution. He init, zero-init last BN per block
    (Goyal et al. 2017), optional stochastic depth ``drop_path`` (Huang et al. 2016).
    """
    check_positive("in_channels", in_channels)
    check_positive("num_outputs", num_outputs)
    if len(widths) == 0 or len(widths) != len(blocks_per_stage):
        raise ConfigError(
            "model.kwargs.blocks_per_stage",
            list(blocks_per_stage),
            f"one block count per stage ({len(widths)} widths given, at least one)",
        )
    for w, n in zip(widths, blocks_per_stage, strict=True):
        check_positive("widths", w)
        check_positive("blocks_per_stage", n)
    if not 0.0 <= drop_path < 1.0:
        raise ConfigError("model.kwargs.drop_path", drop_path, "a probability in [0, 1)")
    return ResNet(in_channels, num_outputs, widths, blocks_per_stage, drop_path)
