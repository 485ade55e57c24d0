"""Search spaces: parsing by dotted path and bare name, conditions, grids, proposals, and every error."""

from __future__ import annotations

import optuna
import pytest

from gradwise.errors import ConfigError
from gradwise.recipe import Recipe
from gradwise.tune.space import load_space, parse_space, propose_space

RECIPE = Recipe.parse({"model": {"name": "mlp"}, "data": {"name": "iris"}})

SPACE = {
    "lr": {"type": "log_uniform", "low": 1.0e-4, "high": 1.0e-1},
    "optim.momentum": {"type": "uniform", "low": 0.8, "high": 0.99, "when": {"optim.name": "sgd"}},
    "optim.name": {"type": "categorical", "choices": ["adamw", "sgd"]},
    "batch_size": [16, 32, 64],
    "train.epochs": {"type": "int", "low": 2, "high": 8, "step": 2},
    "model.kwargs.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
    "model.kwargs.hidden": {"type": "categorical", "choices": [[16], [32, 32]]},
}


def test_names_resolve_and_conditions_come_after_what_they_test():
    space = parse_space(SPACE, RECIPE)
    assert space.paths == [
        "optim.lr",
        "optim.name",
        "optim.momentum",
        "data.batch_size",
        "train.epochs",
        "model.kwargs.dropout",
        "model.kwargs.hidden",
    ]
    assert space["optim.lr"].log and space["train.epochs"].grid() == [2, 4, 6, 8]
    again = parse_space(space.to_dict(), RECIPE)  # the YAML form round-trips
    assert again.to_dict() == space.to_dict()


def test_yaml_file_round_trips(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(parse_space(SPACE, RECIPE).to_yaml())
    assert load_space(path, RECIPE).to_dict() == parse_space(SPACE, RECIPE).to_dict()


def test_sampling_honours_conditions_and_gives_recipe_values():
    space = parse_space(SPACE, RECIPE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = space.sample(trial)
        study.tell(trial, 0.0)
        assert ("optim.momentum" in values) == (values["optim.name"] == "sgd")
        assert values["model.kwargs.hidden"] in ([16], [32, 32])  # lists come back as lists
        RECIPE.override(values)  # every sample is a valid recipe
        seen.add(values["optim.name"])
    assert seen == {"adamw", "sgd"}
    assert space.values(study.trials[0].params)["model.kwargs.hidden"] in ([16], [32, 32])


def test_grid_of_discrete_parameters_and_error_for_continuous_ones():
    grid = parse_space(
        {"lr": {"type": "uniform", "low": 0.1, "high": 0.3, "step": 0.1}, "batch_size": [8, 16]},
        RECIPE,
    ).grid()
    assert grid == {"optim.lr": [0.1, 0.2, 0.3], "data.batch_size": [8, 16]}
    with pytest.raises(ConfigError, match=r"sampler grid: optim\.lr.*discrete"):
        parse_space({"lr": {"type": "log_uniform", "low": 1e-3, "high": 1e-1}}, RECIPE).grid()


BAD = [
    ({"optim.lrr": {"type": "uniform", "low": 0, "high": 1}}, "optim.lrr", "did you mean 'lr'"),
    ({"learning_rate": [0.1]}, "learning_rate", "a known recipe setting"),
    ({"optim": [1]}, "optim", "one setting of 'optim'"),
    ({"optim.lr": {"type": "uniform", "low": 0.5, "high": 0.1}}, "optim.lr.low", "at most high"),
    ({"optim.lr": {"type": "log_uniform", "low": 0, "high": 1}}, "optim.lr.low", "positive"),
    ({"optim.lr": {"type": "uniform", "low": -1, "high": 1}}, "optim.lr.low", "greater than 0"),
    ({"data.batch_size": {"type": "categorical", "choices": []}}, "choices", "non-empty"),
    ({"data.batch_size": [0, 16]}, "choices[0]", "greater than 0"),
    ({"optim.lr": {"type": "unifrom", "low": 0.1, "high": 1}}, "optim.lr.type", "'uniform'"),
    ({"optim.lr": {"type": "uniform", "lo": 0.1, "high": 1}}, "optim.lr.lo", "did you mean 'low'"),
    ({"optim.lr": {"type": "uniform", "low": "a", "high": 1}}, "optim.lr.low", "a number"),
    ({"epochs": {"type": "uniform", "low": 1, "high": 3}}, "train.epochs", "integer setting"),
    ({"epochs": {"type": "int", "low": 1, "high": 3.5}}, "epochs.high", "an integer"),
    ({"model.kwargs.dropot": [0.1]}, "model.kwargs.dropot", "did you mean 'dropout'"),
    (
        {"optim.momentum": {"type": "uniform", "low": 0.8, "high": 0.9, "when": {"optim.nam": "sgd"}}, "optim.name": ["sgd"]},
        "optim.momentum.when",
        "did you mean 'optim.name'",
    ),
    (
        {"optim.momentum": {"type": "uniform", "low": 0.8, "high": 0.9, "when": {"optim.name": "sdg"}}, "optim.name": ["adamw", "sgd"]},
        "optim.momentum.when.optim.name",
        "one of ['adamw', 'sgd']",
    ),
    (
        {"optim.momentum": {"type": "uniform", "low": 0.8, "high": 0.9, "when": {"lr": 0.1}}, "lr": {"type": "uniform", "low": 0.1, "high": 1}},
        "when.lr",
        "a categorical parameter",
    ),
    (
        {"optim.name": {"type": "categorical", "choices": ["sgd"], "when": {"batch_size": 8}}, "batch_size": {"type": "categorical", "choices": [8], "when": {"optim.name": "sgd"}}},
        "when",
        "without a cycle",
    ),
    ({}, "space", "a mapping of recipe settings"),
]  # fmt: skip


@pytest.mark.parametrize(("space", "field", "expected"), BAD)
def test_invalid_space_names_field_value_and_expectation(space, field, expected):
    with pytest.raises(ConfigError) as info:
        parse_space(space, RECIPE, "space.yaml")
    message = str(info.value)
    assert field in message and expected in message, message


def test_proposed_space_centres_on_the_advice():
    space, advised = propose_space({"model": {"name": "mlp"}, "data": {"name": "iris"}})
    lr = space["optim.lr"]
    assert lr.log and lr.low < advised.optim.lr < lr.high
    assert lr.high / lr.low == pytest.approx(100, rel=0.2)  # a decade either side
    assert advised.data.batch_size in space["data.batch_size"].choices
    assert {"optim.weight_decay", "schedule.warmup", "model.kwargs.dropout"} <= set(space.paths)
    # kept settings stay the user's: the range is around their learning rate
    space, advised = propose_space({"optim": {"lr": 0.05}, "data": {"name": "iris"}})
    assert advised.optim.lr == 0.05 and space["optim.lr"].low == pytest.approx(0.005)


def test_proposal_from_a_file_keeps_what_the_file_sets(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {name: iris}\ntrain: {epochs: 2}\noptim: {weight_decay: 0.02}\n")
    space, advised = propose_space(path)
    assert advised.train.epochs == 2 and advised.optim.weight_decay == 0.02
    assert space["optim.weight_decay"].low == pytest.approx(0.002)
