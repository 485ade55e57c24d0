"""gradwise.nn: DropPath statistics, init schemes' standard deviations, RMSNorm re-export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwise.nn import DropPath, RMSNorm, he_init_, init_weights, xavier_init_


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_droppath_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(8, 3, 4)
    dp = DropPath(0.5).eval()
    assert torch.equal(dp(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


@pytest.mark.parametrize("shape", [(20000,), (20000, 3), (20000, 2, 2, 2)])
def test_droppath_drops_whole_samples_and_keeps_expectation(shape: tuple[int, ...]) -> None:
    p = 0.3
    out = DropPath(p).train()(torch.ones(shape))
    per_sample = out.reshape(shape[0], -1)
    # every sample is either dropped entirely or kept entirely, scaled by 1/(1-p)
    assert torch.all(per_sample == per_sample[:, :1])
    values = per_sample[:, 0]
    assert torch.all((values == 0) | torch.isclose(values, torch.tensor(1 / (1 - p))))
    assert (values == 0).float().mean().item() == pytest.approx(p, abs=0.02)
    assert out.mean().item() == pytest.approx(1.0, abs=0.03)


def test_droppath_rejects_bad_probability() -> None:
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_he_init_std_matches_sqrt_2_over_fan_in() -> None:
    layer = nn.Linear(1024, 1024)
    assert init_weights(layer, "he") is layer
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.03)
    assert torch.all(layer.bias == 0)
    conv = he_init_(nn.Conv2d(64, 256, 3))  # fan_in = 64 * 3 * 3
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        ("xavier", math.sqrt(2 / (512 + 1024))),  # gain 1 for "linear"
        ("lecun", 1 / math.sqrt(512)),
        ("normal", 0.02),
    ],
)
def test_other_schemes_std(scheme: str, expected: float) -> None:
    layer = init_weights(nn.Linear(512, 1024), scheme, nonlinearity="linear")
    assert layer.weight.std().item() == pytest.approx(expected, rel=0.03)


def test_init_resets_norms_handles_gelu_and_rejects_unknown_scheme() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), RMSNorm(8))
    for norm in model[1:]:
        nn.init.constant_(norm.weight, 3.0)
    init_weights(model, "he", nonlinearity="gelu")
    for norm in model[1:]:
        assert torch.all(norm.weight == 1)
        assert getattr(norm, "bias", None) is None or torch.all(norm.bias == 0)
    xavier_init_(model)  # runs on the same model
    with pytest.raises(ValueError, match="unknown init scheme"):
        init_weights(model, "orthogonal")  # type: ignore[arg-type]


def test_rmsnorm_is_torch_rmsnorm() -> None:
    assert RMSNorm is torch.nn.RMSNorm
    y = RMSNorm(16)(torch.randn(4, 16) * 5).detach()
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(4), atol=1e-3, rtol=0)
