"""Assembly: one public step turns a recipe, data and a model into a ready run, each part once."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import QUIET

import gradwise as gw
from gradwise import assemble as assembly
from gradwise.data import sources
from gradwise.data.bundle import DataInfo
from gradwise.models import build, build_model
from gradwise.nn import DropPath, set_rates


def _counting(monkeypatch) -> dict[str, int]:
    calls = {"data": 0, "model": 0}
    load, make = sources.load_data, build.build_model

    def counted_load(*args, **kwargs):
        calls["data"] += 1
        return load(*args, **kwargs)

    def counted_build(*args, **kwargs):
        calls["model"] += 1
        return make(*args, **kwargs)

    monkeypatch.setattr("gradwise.data.load_data", counted_load)
    monkeypatch.setattr("gradwise.models.build_model", counted_build)
    return calls


def test_a_default_auto_run_loads_the_data_and_builds_the_model_once(monkeypatch):
    calls = _counting(monkeypatch)
    run = gw.Trainer(**{"model.name": "mlp", "data.name": "iris"}, epochs=1, **QUIET).fit()
    assert calls == {"data": 1, "model": 1}, calls
    assert run.advice and run.state == "finished"
    advised = {a.setting: a.value for a in run.advice}
    assert run.recipe.model.kwargs["dropout"] == advised["model.kwargs.dropout"]


def test_the_advised_model_is_the_model_built_with_the_advice():
    # dropout is set in place after advice: same weights and rates as a model built with it
    a = assembly.assemble(
        recipe={"model": {"name": "cnn"}, "data": {"name": "digits"}}, advise=True
    )
    dropout = a.recipe.model.kwargs["dropout"]
    torch.manual_seed(a.recipe.seed)
    again = build_model("cnn", {**a.recipe.model.kwargs}, a.info, 10)
    ours = [m.p for m in a.model.modules() if isinstance(m, torch.nn.Dropout)]
    theirs = [m.p for m in again.modules() if isinstance(m, torch.nn.Dropout)]
    assert ours == theirs == [dropout] * len(ours)


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("mlp", (8,), {}),
        ("cnn", (3, 8, 8), {}),
        ("resnet", (3, 8, 8), {"drop_path": 0.0}),
        ("transformer", (8, 4), {"drop_path": 0.0}),
        ("rnn", (8, 4), {"layers": 2}),
    ],
)
def test_set_rates_matches_building_with_the_rates(name, shape, kwargs):
    seq = len(shape) == 2
    info = DataInfo("x", shape, "float32", (), "int64", task="multiclass", num_classes=3,
                    seq_len=shape[0] if seq else None)  # fmt: skip
    torch.manual_seed(0)
    built = build_model(name, {**kwargs}, info, 3)
    rates = {k: v for k, v in {"dropout": 0.3, "drop_path": 0.2}.items()
             if k in built.gradwise_build["kwargs"]}  # fmt: skip
    torch.manual_seed(0)
    direct = build_model(name, {**kwargs, **rates}, info, 3)
    set_rates(built, **rates)

    def rates_of(model):
        out = []
        for m in model.modules():
            if isinstance(m, (torch.nn.Dropout, DropPath)):
                out.append(round(m.p, 6))
            elif isinstance(m, torch.nn.RNNBase) or isinstance(getattr(m, "dropout", None), float):
                out.append(m.dropout)
        return out

    assert rates_of(built) == rates_of(direct) and rates_of(direct)
    for (k, a), (_, b) in zip(built.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_advise_leaves_the_global_random_generators_alone():
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    gw.advise(recipe={"model": {"name": "mlp"}, "data": {"name": "iris"}})
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_assemble_is_public_and_fails_before_anything_is_written(tmp_path):
    a = gw.assemble(recipe={"model": {"name": "mlp"}, "data": {"name": "iris"}})
    assert a.task.kind == "multiclass" and a.monitor == "val_accuracy" and a.total_steps > 0
    assert a.recipe.model.kwargs["in_features"] == 4 and a.train_dataset is not None
    with pytest.raises(gw.ConfigError, match=r"early_stopping\.monitor"):
        gw.assemble(
            recipe={
                "model": {"name": "mlp"},
                "data": {"name": "iris"},
                "early_stopping": {"monitor": "r2"},
            }
        )
    assert not (tmp_path / "runs").exists()
