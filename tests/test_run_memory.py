"""Activation checkpointing and system metrics inside a real run."""

from __future__ import annotations

import torch
from conftest import QUIET

import gradwise as gw
from gradwise.tracking.files import read_metrics

GPT = {
    "task": "lm",
    "model": {"name": "gpt", "kwargs": {"d_model": 32, "n_layers": 2, "n_heads": 2}},
    "data": {"name": "text", "kwargs": {"seq_len": 32, "stride": 256}, "batch_size": 8},
    "train": {"max_steps": 4, "log_every": 2},
    "doctor": {"mode": "off"},
}


def test_activation_checkpointing_trains_the_same_weights_with_the_same_keys():
    plain = gw.Trainer(recipe=GPT, name="plain", **QUIET).fit()
    trainer = gw.Trainer(recipe=GPT, name="ckpt", activation_checkpointing=True, **QUIET)
    checkpointed = trainer.fit()
    assert trainer.assembly.checkpointed == ["trunk.blocks.0", "trunk.blocks.1"]
    a, b = plain.model.state_dict(), checkpointed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # non-reentrant recompute: the same numbers
    rows = read_metrics(checkpointed.dir, "train")
    assert rows and all(r["sys/samples_per_s"] > 0 and r["sys/rss_mb"] > 0 for r in rows)
