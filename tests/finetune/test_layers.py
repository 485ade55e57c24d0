"""Layer groups, freezing by glob, discriminative rates and gradual unfreezing, in real runs."""

from __future__ import annotations

import pytest
import torch
from conftest import QUIET
from torch import nn

import gradwise as gw
from gradwise.finetune import discriminative_rates, head_names, layer_groups

PLAIN = {**QUIET, "recipe": None, "doctor": {"mode": "off"}, "batch_size": 16}


def net() -> nn.Module:
    """Three layer groups: [0, 1] (a Linear and its BatchNorm), [3], [5] (the head)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


class Weights:
    """A callback keeping a copy of every parameter and buffer after each step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, trainer: gw.Trainer) -> None:
        state = trainer.model.state_dict()
        self.after[trainer.state.position.step] = {k: v.clone() for k, v in state.items()}


def changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def test_auto_layer_groups_of_a_stack_and_of_a_transformers_model():
    groups = layer_groups(net())
    assert [g.params for g in groups] == [
        ["0.weight", "0.bias", "1.weight", "1.bias"],  # a BatchNorm joins its layer
        ["3.weight", "3.bias"],
        ["5.weight", "5.bias"],
    ]
    assert head_names(net()) == ["5"]
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    bert = transformers.BertForSequenceClassification(config)
    groups = layer_groups(bert)
    assert [g.name for g in groups][1:4] == [f"bert.encoder.layer.{i}" for i in range(3)]
    assert groups[0].params[0].startswith("bert.embeddings")
    assert "classifier" in head_names(bert)
    explicit = layer_groups(bert, ["bert.embeddings*", "bert.encoder*", "*"])
    assert [len(g.params) for g in explicit] == [len(groups[0].params), 48, 4]


def test_discriminative_rates_are_in_the_optimizers_groups(blobs):
    assert discriminative_rates(3, 1e-3, decay=2.6) == pytest.approx(
        [1e-3 / 2.6**2, 1e-3 / 2.6, 1e-3]
    )
    assert discriminative_rates(3, 1.0, lr_range=(1e-5, 1e-3)) == pytest.approx([1e-5, 1e-4, 1e-3])
    trainer = gw.Trainer(net(), blobs, epochs=1, lr=1e-2, finetune={"lr_decay": 2.6}, **PLAIN)
    trainer.fit()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["5/decay"]["initial_lr"] == pytest.approx(1e-2)
    assert groups["3/decay"]["initial_lr"] == pytest.approx(1e-2 / 2.6)
    assert groups["0/no_decay"]["initial_lr"] == pytest.approx(1e-2 / 2.6**2)
    assert groups["5/no_decay"]["weight_decay"] == 0.0 and groups["5/decay"]["weight_decay"] > 0


def test_gradual_unfreezing_starts_updating_a_group_at_its_step(blobs):
    weights = Weights()
    trainer = gw.Trainer(
        net(), blobs, epochs=1, max_steps=14, callbacks=[weights],
        finetune={"unfreeze_steps": 5, "lr_decay": 2.6}, **PLAIN,
    )  # fmt: skip
    trainer.fit()
    w = weights.after
    assert all(changed(w[s - 1], w[s], "5.") for s in range(2, 15))  # the head from the start
    assert not any(changed(w[s - 1], w[s], "3.") for s in range(2, 6))
    assert all(changed(w[s - 1], w[s], "3.") for s in range(6, 15))  # unfrozen before step 6
    assert not any(changed(w[s - 1], w[s], "0.") for s in range(2, 11))
    assert not any(changed(w[s - 1], w[s], "1.running_mean") for s in range(2, 11))  # eval mode
    assert all(changed(w[s - 1], w[s], "0.") for s in range(11, 15))
    assert all(changed(w[s - 1], w[s], "1.running_mean") for s in range(11, 15))


def test_head_epochs_then_everything_at_half_the_rates(blobs):
    weights = Weights()
    trainer = gw.Trainer(
        net(), blobs, epochs=3, lr=1e-2, callbacks=[weights], finetune={"head_epochs": 1},
        schedule={"name": "constant", "warmup": 0}, **PLAIN,
    )  # fmt: skip
    trainer.fit()
    w, per_epoch = weights.after, trainer.steps_per_epoch
    first, last = w[1], w[per_epoch]
    assert not changed(first, last, "0.") and not changed(first, last, "3.")
    assert changed(first, last, "5.")
    assert changed(w[per_epoch], w[per_epoch + 1], "0.")
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([5e-3] * 6)


def test_frozen_globs_keep_weights_and_batchnorm_statistics(blobs):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = gw.Trainer(model, blobs, epochs=2, finetune={"freeze": ["0", "1"]}, **PLAIN).fit()
    after = trained.model.state_dict()
    assert not changed(before, after, "0.") and not changed(before, after, "1.")
    assert changed(before, after, "3.")

    model = net()
    gw.Trainer(
        model, blobs, epochs=1, finetune={"freeze": ["0*", "1*"], "freeze_bn": False}, **PLAIN
    ).fit()
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])  # statistics move
    assert torch.equal(model[1].weight, before["1.weight"])

    model = net()
    gw.Trainer(
        model, blobs, epochs=1, finetune={"freeze": ["*"], "unfreeze": ["head"]}, **PLAIN
    ).fit()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["5.weight", "5.bias"]
    assert not changed(before, model.state_dict(), "3.") and changed(
        before, model.state_dict(), "5."
    )

    with pytest.raises(gw.ConfigError, match=r"finetune\.freeze: got 'encoder\.\*'"):
        gw.Trainer(net(), blobs, epochs=1, finetune={"freeze": ["encoder.*"]}, **PLAIN).fit()
    with pytest.raises(gw.ConfigError, match=r"finetune\.freeze"):
        gw.Trainer(net(), blobs, epochs=1, finetune={"freeze": ["*"]}, lr_decay=2.6, **PLAIN).fit()


@pytest.mark.parametrize("schedule", [{"unfreeze_every": 1, "lr_decay": 2.6}, {"head_epochs": 1}])
def test_resuming_mid_schedule_is_exact(blobs, schedule):
    x, y = blobs
    data, val = (x[:200], y[:200]), (x[200:], y[200:])
    settings = {"epochs": 4, "finetune": schedule, **PLAIN}
    whole = gw.Trainer(net(), data, val, **settings).fit()
    halfway = gw.Trainer(net(), data, val, on_evaluate=lambda e: e["epoch"] == 2, **settings).fit()
    assert halfway.state == "stopped"
    trainer = gw.Trainer.resume(halfway.dir, net(), data, val, progress="off")
    resumed = trainer.fit()
    for a, b in zip(
        whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
