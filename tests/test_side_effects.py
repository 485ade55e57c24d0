"""gradwise's measuring calls leave the caller's global state alone: advise, facts and check (with and
without the learning-rate probe) change none of Python's, NumPy's or torch's random generators, so a
model built after them still follows the seed the user set."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import mlp

import gradwise as gw


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _assert_unchanged(before: tuple) -> None:
    python, numpy, torch_state = _rng_state()
    assert python == before[0], "Python's global random state changed"
    assert all(
        np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
        for a, b in zip(numpy, before[1], strict=True)
    ), "NumPy's global random state changed"
    assert torch.equal(torch_state, before[2]), "torch's global random state changed"


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _scrambled() -> None:
    """Global generators at a state no seeding of gradwise's would produce."""
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)
    random.random(), np.random.rand(), torch.rand(1)


CALLS = {
    "advise": lambda model, d: gw.advise(model, d, budget=2),
    "advise, probe": lambda model, d: gw.advise(model, d, budget=80, probe=True),  # it probes
    "advise, zoo model": lambda model, d: gw.advise(  # the model is built inside, from the seed
        None, d, budget=2, recipe={"model": {"name": "mlp", "kwargs": {"hidden": [8]}}}
    ),
    "facts": lambda model, d: gw.facts(model, d),
    "check": lambda model, d: gw.check(model, d, overfit=False, lr_range=False),
    "check, probes": lambda model, d: gw.check(model, d),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_global_random_state_is_unchanged(call, data):
    model = mlp()
    _scrambled()
    before = _rng_state()
    CALLS[call](model, data)
    _assert_unchanged(before)


def test_models_built_after_advise_follow_the_users_seed(data):
    model = mlp()  # conftest's mlp() seeds torch itself: built before the user's seed

    def first_weights(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        gw.advise(model, data, budget=2)
        return torch.nn.Linear(8, 4).weight.detach().clone()

    assert not torch.equal(first_weights(1), first_weights(2))
    assert torch.equal(first_weights(3), first_weights(3))


def test_advise_leaves_deterministic_algorithms_as_they_were(data) -> None:
    recipe = {"train": {"deterministic": True}}  # for the run it plans, not for the caller
    before = torch.are_deterministic_algorithms_enabled()
    gw.advise(mlp(), data, budget=2, recipe=recipe)
    assert torch.are_deterministic_algorithms_enabled() == before
