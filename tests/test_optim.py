"""Parameter groups by module type, optimizers, and schedule values."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUIET, gradwise_main, mlp
from torch import nn

import gradwise as gw
from gradwise.errors import ConfigError
from gradwise.optim import (
    OPTIMIZERS,
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    param_groups,
    register_optimizer,
    warmup_steps,
)
from gradwise.recipe import OptimSpec, Recipe, ScheduleSpec


class Net(nn.Module):
    """Names chosen to fool name-based rules: 'bn1' is a BatchNorm, 'norm' is a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.bn1 = nn.BatchNorm1d(8)
        self.norm = nn.Linear(8, 8)  # a Linear, whatever its name: decayed
        self.weird_name = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.rms = nn.RMSNorm(8)
        self.scale = nn.Parameter(torch.ones(8))  # a 1-D gain: not decayed
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_groups_by_module_type():
    model = Net()
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert _names(model, groups["decay"]["params"]) == {"conv.weight", "norm.weight"}
    assert _names(model, groups["no_decay"]["params"]) == {
        "emb.weight", "conv.bias", "bn1.weight", "bn1.bias", "norm.bias", "weird_name.weight",
        "weird_name.bias", "gn.weight", "gn.bias", "rms.weight", "scale",
    }  # fmt: skip
    # frozen parameters belong to no group
    assert not _names(model, groups["decay"]["params"] + groups["no_decay"]["params"]) & {
        "frozen.weight"
    }


def test_tied_embedding_is_placed_once_and_not_decayed():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    groups = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == 1
    assert groups[0]["name"] == "no_decay"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_reduces_a_loss(name):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[0.5], [-0.3], [0.2], [0.1]])
    lr = {"sgd": 0.05}.get(name, 1e-2)
    opt = build_optimizer(model, OptimSpec(name=name, lr=lr))
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_sgd_uses_nesterov_momentum_and_lion_its_own_betas():
    sgd = build_optimizer(nn.Linear(2, 2), OptimSpec(name="sgd", lr=0.1))
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    lion = build_optimizer(nn.Linear(2, 2), OptimSpec(name="lion", lr=1e-4))
    assert tuple(lion.defaults["betas"]) == (0.9, 0.99)


# -- the optimizer table, import paths, the caller's parameter groups ----------------------------


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch):
    """OPTIMIZERS, with the rows a test adds removed after it."""
    monkeypatch.setattr(OPTIMIZERS, "_entries", dict(OPTIMIZERS._entries))
    return OPTIMIZERS


@pytest.fixture
def rmsprops(monkeypatch: pytest.MonkeyPatch) -> list[torch.optim.RMSprop]:
    """Every torch.optim.RMSprop built during the test (the class is replaced by a recording one)."""
    built = []

    class Recorded(torch.optim.RMSprop):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(torch.optim, "RMSprop", Recorded)
    return built


def _two_steps(blobs, **overrides) -> gw.Run:
    x, y = blobs
    data = (x[:128], y[:128])  # two batches of 64: two optimizer steps
    return gw.Trainer(mlp(), data, epochs=1, batch_size=64, **QUIET, **overrides).fit()


def test_the_recipe_knows_every_row_and_nothing_else(table):
    assert {"adamw", "adam", "sgd", "lion"} <= set(OPTIMIZERS)
    for name in OPTIMIZERS:
        assert Recipe.parse({"optim": {"name": name}}).optim.name == name
    with pytest.raises(ConfigError, match="did you mean 'rmsprop'"):
        register_optimizer("rmsprop", "torch.optim:RMSprop")
        Recipe.parse({"optim": {"name": "rmsprp"}})


def test_a_new_row_is_usable_by_name_end_to_end(table, rmsprops, blobs):
    register_optimizer("rmsprop", torch.optim.RMSprop, settings=("eps", "momentum"))
    run = _two_steps(blobs, optim={"name": "rmsprop", "momentum": 0.5, "eps": 1e-6})
    assert run.state == "finished" and run.steps == 2
    optimizer = rmsprops[-1]
    assert optimizer.defaults["momentum"] == 0.5 and optimizer.defaults["eps"] == 1e-6
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert optimizer.state  # it stepped


def test_an_optimizer_by_import_path_gets_gradwise_groups_and_its_kwargs(rmsprops, blobs):
    recipe = {"name": "torch.optim:RMSprop", "kwargs": {"alpha": 0.9}, "weight_decay": 0.01}
    Path("recipe.yaml").write_text(yaml.safe_dump({"optim": recipe}))
    run = _two_steps(blobs, recipe="recipe.yaml")
    assert run.state == "finished" and run.steps == 2
    optimizer = rmsprops[-1]
    assert isinstance(optimizer, torch.optim.RMSprop) and optimizer.defaults["alpha"] == 0.9
    groups = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert groups == {"decay": 0.01, "no_decay": 0.0}
    saved = yaml.safe_load((run.dir / "recipe.yaml").read_text())["optim"]
    assert (saved["name"], saved["kwargs"]) == ("torch.optim:RMSprop", {"alpha": 0.9})


def test_an_unknown_optimizer_is_one_line_with_a_did_you_mean(monkeypatch, capsys):
    Path("recipe.yaml").write_text("optim:\n  name: adamww\n")
    code, _, err = gradwise_main(monkeypatch, capsys, "train", "recipe.yaml", "-q")
    assert code == 2
    assert err.startswith("error: optim.name: got 'adamww'; expected one of 'adam', 'adamw'")
    assert err.rstrip().endswith("did you mean 'adamw'?") and err.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("torch.optim:RMSprop", {"alpah": 0.9}, r"optim\.kwargs\.alpah: .*did you mean 'alpha'"),
        ("torch.optim:RMSprop", {"alpha": -1.0}, r"optim\.kwargs\.alpha: got -1\.0.*Invalid alpha"),
        ("torch.optim:RMSprop", {"lr": 0.1}, r"optim\.kwargs\.lr: .*set optim\.lr"),
        ("adamw", {"betas": [0.9, 0.9]}, r"optim\.kwargs\.betas: .*set optim\.betas"),
        ("os:getcwd", {}, r"optim\.name: got 'os:getcwd'; expected an optimizer class or factory"),
        ("torch.optim:RMSProp", {}, r"optim\.name: .*did you mean 'RMSprop'"),
    ],
)
def test_optimizer_arguments_and_import_paths_are_checked(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_optimizer(nn.Linear(2, 2), OptimSpec(name=name, kwargs=kwargs))


def test_a_factory_must_return_an_optimizer(table):
    register_optimizer("broken", lambda params, lr: object())
    with pytest.raises(
        ConfigError, match=r"returns a torch\.optim\.Optimizer\. it returned object"
    ):
        build_optimizer(nn.Linear(2, 2), OptimSpec(name="broken"))


def test_caller_groups_keep_their_settings_and_default_to_the_recipe():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    groups = [
        {"params": model[0].parameters(), "lr": 0.1},
        {"params": list(model[1].parameters()), "weight_decay": 0.0, "name": "head"},
    ]
    opt = build_optimizer(model, OptimSpec(name="sgd", lr=0.01, weight_decay=0.3), groups)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.3), (0.01, 0.0)]
    assert opt.param_groups[1]["name"] == "head" and "weight_decay" not in groups[0]
    twice = [{"params": model.parameters()}, {"params": model[0].parameters()}]
    with pytest.raises(ConfigError, match=r"param_groups\[1\]\.params: .*no other group"):
        build_optimizer(model, OptimSpec(), twice)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]: .*'params'"):
        build_optimizer(model, OptimSpec(), [{"lr": 0.1}])


def test_warmup_is_linear_and_cosine_reaches_the_floor_at_the_last_step():
    spec = ScheduleSpec(warmup=0.1, min_lr=0.05)
    total = 200
    f = lr_multiplier(spec, total)
    warm = warmup_steps(spec, total)
    assert warm == 20
    ramp = [f(s) for s in range(warm + 1)]
    diffs = [b - a for a, b in itertools.pairwise(ramp)]
    assert all(math.isclose(d, diffs[0], rel_tol=1e-9) for d in diffs)  # linear
    assert f(0) > 0 and f(warm) == pytest.approx(1.0)
    assert f(total - 1) == pytest.approx(0.05)
    assert all(f(s) >= f(s + 1) for s in range(warm, total - 1))  # monotone decay
    assert f((warm + total - 1) / 2) == pytest.approx(0.05 + 0.95 * 0.5)  # halfway down the cosine


def test_warmup_in_steps_and_step_decay():
    spec = ScheduleSpec(name="step", warmup=10, milestones=[0.5, 0.75], gamma=0.1)
    f = lr_multiplier(spec, 100)
    assert f(9) == pytest.approx(10 / 11) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(75) == pytest.approx(0.01)


def test_constant_schedule_without_warmup():
    f = lr_multiplier(ScheduleSpec(name="constant", warmup=0), 50)
    assert {f(s) for s in range(50)} == {1.0}


def test_onecycle_and_plateau_schedulers():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, OptimSpec(lr=0.01))
    one = build_scheduler(opt, ScheduleSpec(name="onecycle"), 100)
    lrs = []
    for _ in range(100):
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        one.step()
    assert max(lrs) == pytest.approx(0.01, rel=1e-3) and lrs[-1] < 1e-5
    opt = build_optimizer(model, OptimSpec(lr=0.01))
    plateau = build_scheduler(
        opt, ScheduleSpec(name="plateau", plateau_patience=0, gamma=0.5), 100, mode="max"
    )
    plateau.step(0.9)
    plateau.step(0.8)  # worse for mode=max
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
