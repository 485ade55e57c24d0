"""The advisor: facts about each model, advice that differs where an expert's would, reasons for all."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import QUIET, gradwise_cli, gradwise_main

import gradwise as gw
from gradwise.assemble import advise
from gradwise.data import load_data
from gradwise.facts import facts
from gradwise.models import build_model

ZOO = {  # model, data set, kwargs, expected architecture and modality
    "mlp": ("breast_cancer", {}, "mlp", "tabular"),
    "cnn": ("digits", {}, "cnn", "image"),
    "resnet": ("digits", {}, "cnn", "image"),
    "transformer": ("synthetic_sequences", {"n_samples": 200}, "transformer", "tokens"),
    "gpt": ("synthetic_sequences", {"n_samples": 200, "task": "lm"}, "transformer", "tokens"),
    "rnn": ("synthetic_sequences", {"n_samples": 200}, "rnn", "tokens"),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_facts_on_every_zoo_model(name):
    data, kwargs, architecture, modality = ZOO[name]
    bundle = load_data(data, kwargs)
    kind = bundle.info.task
    width = (
        bundle.info.vocab_size
        if kind == "lm"
        else (1 if kind == "binary" else bundle.info.num_classes)
    )
    model = build_model(name, {}, bundle.info, width)
    f = facts(model, bundle.train)
    assert f.architecture == architecture and f.modality == modality
    assert f.params == sum(p.numel() for p in model.parameters()) > 0
    assert f.depth > 0 and f.n_samples == len(bundle.train)
    assert f.device == "cpu" and f.bf16 is False and f.cpu_count >= 1
    if kind in ("binary", "multiclass"):
        assert sum(f.class_counts) == len(bundle.train) and f.imbalance >= 1
    if name == "resnet":
        assert f.kinds["batchnorm"] >= 4
    if name == "rnn":
        assert f.kinds["recurrent"] == 1 and f.kinds["embedding"] == 1
    if name in ("transformer", "gpt"):
        assert f.width == 128  # the zoo default d_model


def _advice(recipe: dict, **kwargs) -> dict[str, gw.advisor.Advice]:
    return {a.setting: a for a in advise(recipe=recipe, **kwargs).advice}


def test_advice_differs_where_an_experts_would():
    resnet = _advice({"model": {"name": "resnet"}, "data": {"name": "digits"}})
    transformer = _advice(
        {
            "model": {"name": "transformer"},
            "data": {"name": "synthetic_sequences", "kwargs": {"n_samples": 1500}},
        }
    )
    lstm = _advice(
        {
            "model": {"name": "rnn"},
            "data": {"name": "synthetic_sequences", "kwargs": {"n_samples": 1500}},
        }
    )
    tiny = _advice(
        {
            "model": {"name": "mlp"},
            "data": {"name": "synthetic_classification", "kwargs": {"n_samples": 625}},
        }
    )

    assert transformer["schedule.warmup"].value > resnet["schedule.warmup"].value  # longer warmup
    assert transformer["optim.betas"].value[1] < resnet["optim.betas"].value[1]  # shorter beta2
    assert transformer["optim.weight_decay"].value == 0.1
    assert "steps" in tiny["data.batch_size"].why  # batch sized by the updates the budget gives
    assert (
        "essential" in lstm["train.grad_clip"].why
        and "essential" in transformer["train.grad_clip"].why
    )
    assert "insurance" in resnet["train.grad_clip"].why
    assert (
        "model.kwargs.drop_path" in resnet and "model.kwargs.dropout" not in resnet
    )  # what the model takes
    assert (
        tiny["data.batch_size"].value < resnet["data.batch_size"].value
    )  # 500 samples: smaller batches
    assert tiny["model.kwargs.dropout"].value > transformer["model.kwargs.dropout"].value
    assert tiny["optim.weight_decay"].value == 0.1 and "500" in tiny["optim.weight_decay"].why
    assert resnet["train.label_smoothing"].value == 0.1  # 10 classes
    for advice in [resnet, transformer, lstm, tiny]:
        for a in advice.values():
            assert a.why
            if a.setting.startswith(("optim.", "schedule.", "train.grad_clip", "model.kwargs")):
                assert a.references, a.setting


def test_wider_transformers_get_lower_learning_rates():
    def lr(d_model: int) -> gw.advisor.Advice:
        model = {"name": "gpt", "kwargs": {"d_model": d_model, "n_heads": 4, "n_layers": 2}}
        data = {"name": "synthetic_sequences", "kwargs": {"n_samples": 400, "task": "lm"}}
        return _advice({"model": model, "data": data})["optim.lr"]

    narrow, wide = lr(64), lr(512)
    assert narrow.value == pytest.approx(wide.value * 512 / 64, rel=0.05)  # 1/width (muP)
    assert "width" in narrow.why and any("muP" in ref for ref in narrow.references)


def test_imbalanced_classes_get_weights_or_focal_loss():
    moderate = _advice(
        {
            "model": {"name": "mlp"},
            "data": {
                "name": "synthetic_classification",
                "kwargs": {"n_classes": 2, "weights": [0.93, 0.07]},
            },
        }
    )
    assert (
        moderate["train.class_weights"].value == "balanced"
        and "imbalanced" in moderate["train.class_weights"].why
    )
    severe = _advice(
        {
            "model": {"name": "mlp"},
            "data": {
                "name": "synthetic_classification",
                "kwargs": {
                    "n_samples": 5000,
                    "n_classes": 2,
                    "weights": [0.995, 0.005],
                    "noise": 0.0,
                },
            },
        }
    )
    assert severe["train.loss"].value == "focal"
    balanced = _advice({"model": {"name": "mlp"}, "data": {"name": "iris"}})
    assert "train.class_weights" not in balanced and balanced["train.loss"].value == "auto"


def test_explicit_settings_are_kept_and_the_advice_says_so():
    advised = advise(
        recipe={"model": {"name": "mlp"}, "data": {"name": "iris"}, "optim": {"lr": 0.5}}
    )
    lr = next(a for a in advised.advice if a.setting == "optim.lr")
    assert advised.recipe.optim.lr == 0.5 and lr.value == 0.5 and "kept your setting" in lr.why


def test_trainer_auto_records_the_advice(blobs):
    x, y = blobs
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    run = gw.Trainer(model, (x, y), epochs=2, lr=0.02, **QUIET).fit()
    advice = json.loads((run.dir / "advice.json").read_text())
    settings = {a["setting"]: a for a in advice}
    assert (
        settings["optim.lr"]["value"] == 0.02 and "kept your setting" in settings["optim.lr"]["why"]
    )
    assert run.recipe.optim.lr == 0.02 and run.advice
    assert settings["train.epochs"]["value"] == 2


def test_probe_refines_the_learning_rate_and_shows_its_evidence():
    data = {"name": "synthetic_classification", "batch_size": 32}  # yours: the probe uses it
    advised = advise(recipe={"model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "data": data},
                     probe=True)  # fmt: skip
    lr = next(a for a in advised.advice if a.setting == "optim.lr")
    probe = advised.probe
    assert advised.recipe.optim.lr == lr.value == probe["chosen"]
    assert min(probe["candidates"]) < probe["prior"] < max(probe["candidates"])  # around the rule
    for candidate, loss in zip(probe["candidates"], probe["losses"], strict=True):  # the evidence
        assert f"{candidate:.2g}: {'diverged' if loss is None else f'{loss:.4g}'}" in lr.why
    finite = [loss for loss in probe["losses"] if loss is not None]
    assert min(finite) < probe["initial_loss"]  # the candidates trained
    assert f"the run's first {probe['steps']} steps each" in lr.why and "held-out loss" in lr.why
    assert advised.recipe.data.batch_size == 32
    assert probe["run_steps"] == advised.recipe.train.epochs * math.ceil(800 / 32)


def test_a_run_too_short_to_probe_keeps_the_rule_and_says_why():
    recipe = {"model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "data": {"name": "iris"}}
    advised = advise(recipe=recipe, budget=10, probe=True)  # 120 samples for 10 epochs
    lr = next(a for a in advised.advice if a.setting == "optim.lr")
    assert (
        advised.probe is None and advised.recipe.optim.lr == advise(recipe=recipe).recipe.optim.lr
    )
    steps = 10 * math.ceil(120 / advised.recipe.data.batch_size)
    assert f"not probed: {steps} optimizer steps are too few" in lr.why


def test_the_probe_leaves_a_learning_rate_you_chose_alone():
    recipe = {"model": {"name": "mlp", "kwargs": {"hidden": [32]}}, "data": {"name": "iris"}}
    advised = advise(recipe={**recipe, "optim": {"lr": 0.02}}, probe=True)
    assert advised.probe is None and advised.recipe.optim.lr == 0.02


def test_cli_advise_writes_a_recipe_that_trains(tmp_path, monkeypatch, capsys):
    # the CLI's entry point in this process: two subprocesses would import torch twice
    args = ("advise", "--model", "mlp", "--data", "iris", "--budget", "3")
    code, out, err = gradwise_main(monkeypatch, capsys, *args, "--write", "advised.yaml")
    assert code == 0, err
    assert "optim.lr" in out and "why:" in out and "Loshchilov" in out
    recipe = gw.load_recipe(tmp_path / "advised.yaml")
    assert recipe.train.epochs == 3 and recipe.model.name == "mlp"
    train = ("train", "advised.yaml", "-q", "--set", "tracking.mlflow=false")
    code, _, err = gradwise_main(monkeypatch, capsys, *train)
    assert code == 0, err


def test_cli_advise_probe_says_what_it_is_doing(tmp_path):
    result = gradwise_cli(
        "advise", "--model", "mlp", "--data", "synthetic_classification", "--probe", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "probing the learning rate" in result.stderr
    assert "lr probe: " in result.stderr and "advised in" in result.stderr  # alive while it runs
    assert re.search(r"probed \d rates around", result.stdout)  # the lr's reason: the evidence
