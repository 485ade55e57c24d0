"""The model zoo: building from data or kwargs, shapes, learning, causality, init, and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.data.bundle import DataInfo
from gradwise.errors import ConfigError
from gradwise.models import MODELS, build_model
from gradwise.models.resnet import BasicBlock
from gradwise.nn import DropPath

B, T, V = 8, 12, 20


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def info(shape: tuple[int, ...], dtype: str = "float32", **kw: Any) -> DataInfo:
    return DataInfo("toy", shape, dtype, (), "int64", **kw)


IMAGE = info((1, 8, 8), num_classes=3)
TABLE = info((5,))
TOKENS = info((T,), "int64", vocab_size=V, seq_len=T)
SERIES = info((T, 3), seq_len=T)
LM = DataInfo("lm", (T,), "int64", (T,), "int64", task="lm", vocab_size=V, seq_len=T)

# small but real configurations; dropout off so a few steps of learning are deterministic
SMALL: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": (32,), "dropout": 0.0},
    "cnn": {"channels": (8, 16), "dropout": 0.0},
    "resnet": {"widths": (8, 16), "blocks_per_stage": (1, 1)},
    "transformer": {"d_model": 32, "n_heads": 2, "n_layers": 1, "dropout": 0.0},
    "gpt": {"d_model": 32, "n_heads": 2, "n_layers": 2, "dropout": 0.0},
    "rnn": {"hidden": 32, "embed_dim": 16, "dropout": 0.0},
}

CASES = [  # (model, data info, a batch of inputs, output shape)
    ("mlp", TABLE, lambda: torch.randn(B, 5), (B, 3)),
    ("mlp", IMAGE, lambda: torch.randn(B, 1, 8, 8), (B, 3)),
    ("cnn", IMAGE, lambda: torch.randn(B, 1, 8, 8), (B, 3)),
    ("resnet", IMAGE, lambda: torch.randn(B, 1, 8, 8), (B, 3)),
    ("transformer", TOKENS, lambda: torch.randint(0, V, (B, T)), (B, 3)),
    ("transformer", SERIES, lambda: torch.randn(B, T, 3), (B, 3)),
    ("rnn", TOKENS, lambda: torch.randint(0, V, (B, T)), (B, 3)),
    ("rnn", SERIES, lambda: torch.randn(B, T, 3), (B, 3)),
    ("gpt", LM, lambda: torch.randint(0, V, (B, T)), (B, T, V)),
]
IDS = [f"{c[0]}-{c[1].input_shape}" for c in CASES]


def test_registry_lists_the_zoo() -> None:
    assert set(MODELS) >= {"mlp", "cnn", "resnet", "transformer", "gpt", "rnn"}


@pytest.mark.parametrize(("name", "data", "make_x", "shape"), CASES, ids=IDS)
def test_build_from_data_info_and_learn(name, data, make_x, shape) -> None:
    model = build_model(name, SMALL[name], data, num_outputs=3)
    x = make_x()
    out = model(x)
    assert out.shape == shape
    # a few steps on one tiny batch lower the loss: gradients flow end to end
    y = torch.randint(0, V if name == "gpt" else 3, shape[:-1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x).reshape(-1, shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    ("name", "kwargs", "x", "shape"),
    [
        ("mlp", {"in_features": 6, "num_outputs": 2}, torch.randn(2, 2, 3), (2, 2)),
        ("cnn", {"in_channels": 3, "num_outputs": 4}, torch.randn(2, 3, 32, 32), (2, 4)),
        ("resnet", {"in_channels": 3, "num_outputs": 4}, torch.randn(2, 3, 16, 16), (2, 4)),
        ("transformer", {"vocab_size": 9, "num_outputs": 1}, torch.randint(0, 9, (2, 7)), (2, 1)),
        ("rnn", {"in_features": 4, "num_outputs": 2}, torch.randn(2, 7, 4), (2, 2)),
        ("gpt", {"vocab_size": 9, "n_layers": 1}, torch.randint(0, 9, (2, 7)), (2, 7, 9)),
    ],
)
def test_build_from_explicit_kwargs(name, kwargs, x, shape) -> None:
    model = build_model(name, kwargs)
    assert model.eval()(x).shape == shape
    assert model.gradwise_build == {"name": name, "kwargs": kwargs}


def test_user_kwargs_win_and_resolved_kwargs_are_recorded() -> None:
    model = build_model("mlp", {"num_outputs": 7, "hidden": [16]}, TABLE, num_outputs=3)
    assert model(torch.randn(2, 5)).shape == (2, 7)
    assert model.gradwise_build["kwargs"] == {"in_features": 5, "num_outputs": 7, "hidden": [16]}
    # a user-chosen input kind stops the sequence rule from also inferring vocab_size
    rnn = build_model("rnn", {"in_features": 1}, TOKENS, num_outputs=2)
    assert rnn(torch.randn(2, T, 1)).shape == (2, 2)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gpt_is_causal(pos: str) -> None:
    model = build_model("gpt", {**SMALL["gpt"], "pos": pos}, LM).eval()
    x = torch.randint(0, V, (2, T))
    t = 5
    x2 = x.clone()
    x2[:, t + 1 :] = (x2[:, t + 1 :] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_gpt_ties_weights_and_scales_residual_init() -> None:
    model = build_model("gpt", {"d_model": 64, "n_layers": 8}, LM)
    assert model.head.weight is model.tok.weight
    proj = model.trunk.blocks[0].mlp.proj.weight
    assert proj.std().item() == pytest.approx(0.02 / 4, rel=0.15)  # 0.02 / sqrt(2 * 8)
    untied = build_model("gpt", {"n_layers": 1, "tie_weights": False}, LM)
    assert untied.head.weight is not untied.tok.weight


def test_gpt_learned_positions_reject_too_long_inputs_rope_does_not() -> None:
    learned = build_model("gpt", SMALL["gpt"], LM)
    with pytest.raises(ValueError, match="max_seq_len"):
        learned(torch.randint(0, V, (1, T + 1)))
    rope = build_model("gpt", {**SMALL["gpt"], "pos": "rope"}, LM)
    assert rope(torch.randint(0, V, (1, T + 4))).shape == (1, T + 4, V)


@pytest.mark.parametrize(
    "options",
    [
        {"pos": "rope", "mlp": "swiglu", "norm": "rmsnorm"},
        {"pos": "sinusoidal", "pooling": "cls"},
        {"pos": "learned", "pooling": "cls", "drop_path": 0.1},
    ],
)
def test_transformer_options_run(options: dict) -> None:
    model = build_model("transformer", {**SMALL["transformer"], **options}, TOKENS, num_outputs=2)
    out = model(torch.randint(0, V, (3, T)))
    assert out.shape == (3, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gpt_options_run() -> None:
    opts = {**SMALL["gpt"], "pos": "rope", "mlp": "swiglu", "norm": "rmsnorm"}
    model = build_model("gpt", opts, LM)
    assert isinstance(model.trunk.norm, torch.nn.RMSNorm)
    assert model(torch.randint(0, V, (2, T))).shape == (2, T, V)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_rnn_last_pools_forward_end_and_backward_start(cell: str) -> None:
    kwargs = {**SMALL["rnn"], "cell": cell, "bidirectional": True, "layers": 2}
    model = build_model("rnn", kwargs, SERIES, num_outputs=4).eval()
    x = torch.randn(3, T, 3)
    with torch.no_grad():
        out, _ = model.rnn(x)
        h = 32
        expected = model.head(torch.cat((out[:, -1, :h], out[:, 0, h:]), dim=-1))
        got = model(x)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, expected)
    mean = build_model("rnn", {**kwargs, "pooling": "mean"}, SERIES, num_outputs=4)
    assert mean(x).shape == (3, 4)


def test_resnet_blocks_start_as_identity() -> None:
    model = build_model("resnet", {"widths": (8, 16), "blocks_per_stage": (2, 1)}, IMAGE, 3)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3
    x = torch.relu(torch.randn(4, 8, 8, 8))  # blocks see post-ReLU activations
    for block in blocks:
        assert torch.all(block.bn2.weight == 0)
        with torch.no_grad():
            y = block(x)
            torch.testing.assert_close(y, torch.relu(block.skip(x)))
        if isinstance(block.skip, nn.Identity):
            torch.testing.assert_close(y, x)
        x = y


def test_resnet_drop_path_increases_with_depth() -> None:
    model = build_model(
        "resnet", {"widths": (8, 8), "blocks_per_stage": (2, 1), "drop_path": 0.2}, IMAGE, 3
    )
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


# ---- errors -------------------------------------------------------------------------------


def test_unknown_model_name_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mlp'") as exc:
        build_model("mpl", None, TABLE, 2)
    assert exc.value.field == "model.name"


def test_unknown_kwarg_suggests_parameter() -> None:
    with pytest.raises(ConfigError, match="did you mean 'hidden'") as exc:
        build_model("mlp", {"hiden": [8]}, TABLE, 2)
    assert exc.value.field == "model.kwargs.hiden"
    assert exc.value.value == [8]


def test_bad_choice_names_field_and_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean 'gelu'") as exc:
        build_model("mlp", {"activation": "gleu"}, TABLE, 2)
    assert exc.value.field == "model.kwargs.activation"


@pytest.mark.parametrize(
    ("name", "data", "num_outputs", "field"),
    [
        ("mlp", None, 2, "model.kwargs.in_features"),
        ("cnn", IMAGE, None, "model.kwargs.num_outputs"),
        ("gpt", None, None, "model.kwargs.vocab_size"),
        ("transformer", None, 2, "model.kwargs.vocab_size"),  # neither vocab_size nor in_features
    ],
)
def test_uninferable_argument(name, data, num_outputs, field) -> None:
    with pytest.raises(ConfigError) as exc:
        build_model(name, None, data, num_outputs)
    assert exc.value.field == field


def linear_factory(in_features: int, num_outputs: int, bias: bool = True) -> nn.Module:
    return nn.Linear(in_features, num_outputs, bias=bias)


def not_a_module(in_features: int) -> dict:
    return {"in_features": in_features}


def test_import_path_factory_is_sized_from_data() -> None:
    model = build_model(f"{__name__}:linear_factory", {"bias": False}, TABLE, 4)
    assert isinstance(model, nn.Linear)
    assert (model.in_features, model.out_features, model.bias) == (5, 4, None)
    torch_linear = build_model("torch.nn:Linear", {"out_features": 2}, SERIES)
    assert torch_linear.in_features == 3  # per-position features of a sequence


def test_import_path_errors() -> None:
    with pytest.raises(ConfigError, match=r"torch\.nn\.Module") as exc:
        build_model(f"{__name__}:not_a_module", None, TABLE)
    assert exc.value.field == "model.name"
    with pytest.raises(ConfigError, match="did you mean 'bias'"):
        build_model(f"{__name__}:linear_factory", {"biass": False}, TABLE, 4)
    with pytest.raises(ConfigError) as exc:
        build_model(f"{__name__}:no_such_factory")
    assert exc.value.field == "model.name"
