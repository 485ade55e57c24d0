"""Fine-tuning rules on real small models: GW207's two wordings, GW208 frozen by mistake, GW209
frozen BatchNorm drifting, GW403 catastrophic forgetting; each fires on its fault and stays silent
on the healthy counterpart."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor import Doctor
from gradwise.doctor.cases import _blobs, pretrained_backbone
from gradwise.doctor.rules import generalisation
from gradwise.doctor.rules import model as model_rules
from gradwise.doctor.signals import Series, Signals
from gradwise.errors import ConfigError, GradwiseWarning


def _codes(doctor: Doctor) -> list[str]:
    return [f.code for f in doctor.findings]


def _finding(doctor: Doctor, code: str):
    return next(f for f in doctor.findings if f.code == code)


def _loop(model, x, y, params, steps, doctor_kwargs=None, lr=1e-3, on_step=None):
    """A plain loop as a user writes it; ``on_step(step)`` may freeze or unfreeze."""
    opt = torch.optim.AdamW(params, lr=lr)
    doctor = Doctor(model, opt, loss_fn=F.cross_entropy, on_finding=None, **(doctor_kwargs or {}))
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        idx = torch.randint(0, len(x), (32,), generator=g)
        model.train()
        opt.zero_grad()
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx])
        loss.backward()
        doctor.step(loss, inputs=x[idx], outputs=out, targets=y[idx])
        opt.step()
    return doctor


# ---------------------------------------------------------------------------- pure rules


def test_rule_functions_on_their_inputs():
    assert "nothing will train" in model_rules.frozen_by_mistake(10, 0, None, [])[0]
    message, evidence = model_rules.frozen_by_mistake(10, 4, "head", ["head.weight"])
    assert "output layer head is frozen" in message and evidence["undeclared_frozen"] == 1
    assert "not declared" in model_rules.frozen_by_mistake(10, 4, None, ["neck.weight"])[0]
    assert model_rules.frozen_by_mistake(10, 4, None, []) is None

    assert (
        model_rules.frozen_batchnorm_drift({"bn": model_rules.BN_DRIFT / 2}) is None
    )  # rounding noise
    message, evidence = model_rules.frozen_batchnorm_drift({"a": 0.2, "b": 0.01, "c": 0.0})
    assert evidence == {"drifting_layers": 2, "max_relative_drift": 0.2} and "(e.g. a)" in message

    def probe(values, noise=0.0):
        series = Series()
        for i, v in enumerate(values):
            series.append(100 * i, v)
        return Signals(probe_loss=series, probe_noise=noise)

    assert generalisation.forgetting(probe([0.5])) is None  # the baseline alone
    assert generalisation.forgetting(probe([0.5, 0.7])) is None  # 1.4x: not clearly
    assert generalisation.forgetting(probe([0.5, 0.8]))[1]["ratio"] == pytest.approx(1.6)
    assert generalisation.forgetting(probe([0.5, 0.8], noise=0.2)) is None  # within the noise
    assert generalisation.forgetting(probe([0.001, 0.004])) is None  # a tiny loss that doubles
    assert generalisation.forgetting(probe([0.5, math.nan])) is not None  # diverged


# ---------------------------------------------------------------------------- GW207


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def test_gw207_unfrozen_but_not_in_the_optimizer_vs_gradwise_style_optimizer():
    x, y = _blobs(512)

    def gradual(model):
        def on_step(step):  # gradual unfreezing: the lower layers join at step 25
            if step == 25:
                model[:3].requires_grad_(True)

        return on_step

    model = _model()
    model[:3].requires_grad_(False)
    trainable_only = [p for p in model.parameters() if p.requires_grad]
    doctor = _loop(model, x, y, trainable_only, 45, on_step=gradual(model))
    finding = _finding(doctor, "GW207")
    assert "unfrozen (requires_grad) but not in the optimizer" in finding.message
    assert "will never update" in finding.message and finding.step >= 25
    assert finding.evidence["not_in_optimizer"] == 4  # two Linear layers: weights and biases

    model = _model()  # gradwise's way: every parameter in the optimizer from the start
    model[:3].requires_grad_(False)
    doctor = _loop(model, x, y, list(model.parameters()), 65, on_step=gradual(model))
    assert "GW207" not in _codes(doctor)  # and no "never received a gradient" after unfreezing
    assert doctor.signals.layers == ["0", "2", "4"]  # the unfrozen layers are watched too
    assert len(doctor.signals.layer_grad_norm["0"]) == 2  # sampled at steps 40 and 60


def test_gw207_in_the_optimizer_but_never_a_gradient():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.spare = _model(), nn.Linear(4, 4)

        def forward(self, x):
            return self.body(x)

    x, y = _blobs(512)
    model = Unused()
    doctor = _loop(model, x, y, list(model.parameters()), 25)
    message = _finding(doctor, "GW207").message
    assert "are in the optimizer but never received a gradient (e.g. spare.weight)" in message


# ---------------------------------------------------------------------------- GW208


def test_gw208_head_frozen_fires_backbone_frozen_on_purpose_does_not():
    model, (x, y, _, _) = pretrained_backbone(outputs=2)
    model.head.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    doctor = _loop(model, x, y // 2, trainable, 3)
    finding = _finding(doctor, "GW208")
    assert finding.step == 0 and "output layer head is frozen" in finding.message

    model, (x, y, _, _) = pretrained_backbone(outputs=2)
    model.backbone.requires_grad_(False)  # linear probing: nobody declared it, still certain
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert "GW208" not in _codes(_loop(model, x, y // 2, trainable, 3))
    declared = {"frozen_on_purpose": ["backbone"]}  # a module path covers its parameters
    assert "GW208" not in _codes(_loop(model, x, y // 2, trainable, 3, declared))


def test_gw208_undeclared_frozen_parts_and_nothing_trainable():
    model, (x, y, _, _) = pretrained_backbone(outputs=2)
    model.backbone.requires_grad_(False)
    declared = [n for n, _ in model.named_parameters() if n.startswith("backbone.0.")]
    trainable = [p for p in model.parameters() if p.requires_grad]
    doctor = _loop(model, x, y // 2, trainable, 3, {"frozen_on_purpose": declared})
    finding = _finding(doctor, "GW208")
    assert "not declared frozen on purpose (e.g. backbone.1.weight)" in finding.message
    assert finding.evidence["undeclared_frozen"] == 4  # backbone.1 (BatchNorm) and backbone.3
    ignored = {"frozen_on_purpose": declared, "ignore": ["GW208"]}
    assert "GW208" not in _codes(_loop(model, x, y // 2, trainable, 3, ignored))

    model.requires_grad_(False)  # everything: backward() would fail, so the Doctor says it first
    seen = []
    doctor = Doctor(model, on_finding=seen.append)
    assert [f.code for f in seen] == ["GW208"] and "nothing will train" in seen[0].message
    doctor.close()


def test_gw208_silent_on_a_lora_model_whose_head_is_frozen_by_design():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["0"]))
    assert not any(p.requires_grad for p in base[2].parameters())  # the head is frozen
    x, y = _blobs(256)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert "GW208" not in _codes(_loop(model, x, y, trainable, 3))


# ---------------------------------------------------------------------------- GW209


@pytest.mark.parametrize("keep_bn_eval", [False, True])
def test_gw209_frozen_batchnorm_in_train_mode_drifts_in_eval_mode_not(keep_bn_eval):
    model, (x, y, _, _) = pretrained_backbone(outputs=2, keep_bn_eval=keep_bn_eval)
    model.backbone.requires_grad_(False)
    before = model.backbone[1].running_mean.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    doctor = _loop(model, x * 1.5 + 0.5, y // 2, trainable, 41, {"sample_every": 20})
    moved = not torch.equal(before, model.backbone[1].running_mean)
    assert moved is not keep_bn_eval
    if keep_bn_eval:
        assert "GW209" not in _codes(doctor)
    else:
        finding = _finding(doctor, "GW209")
        assert finding.step == 20 and "backbone.1" in finding.message
        assert finding.evidence["max_relative_drift"] > 0.01


def test_gw209_silent_when_the_batchnorm_trains():
    model, (x, y, _, _) = pretrained_backbone(outputs=2)  # nothing frozen: BN statistics move
    doctor = _loop(model, x * 1.5 + 0.5, y // 2, list(model.parameters()), 41)
    assert "GW209" not in _codes(doctor)


# ---------------------------------------------------------------------------- GW403


def _finetune(labels, lr, probe, steps=120, **kwargs):
    """Fine-tune the pretrained blob classifier on ``labels(y)``, validating every 40 steps."""
    model, (x, y, xv, yv) = pretrained_backbone()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    doctor = Doctor(model, opt, loss_fn=F.cross_entropy, on_finding=None, probe=probe, **kwargs)
    g = torch.Generator().manual_seed(0)
    target = labels(y)
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), target[idx])
        loss.backward()
        doctor.step(loss)
        opt.step()
        if (step + 1) % 40 == 0:
            model.eval()
            with torch.no_grad():
                doctor.validate(loss=F.cross_entropy(model(xv), labels(yv)).item())
    return doctor


def test_gw403_remapped_labels_make_the_probe_loss_rise_same_labels_do_not():
    _, (_, _, xv, yv) = pretrained_backbone(steps=0)  # the original task's validation split
    probe = (xv, yv)

    doctor = _finetune(lambda t: (t + 1) % 4, 3e-3, probe)
    finding = _finding(doctor, "GW403")
    assert finding.step == 40 and finding.evidence["ratio"] > 10
    assert doctor.signals.probe_loss.steps == [0, 40, 80, 120]  # before any update, then each val
    assert "McCloskey" in finding.references[0] and "EWC" in finding.references[1]

    doctor = _finetune(lambda t: t, 1e-3, probe)  # more of the original task: stable
    assert "GW403" not in _codes(doctor)
    first, *later = doctor.signals.probe_loss.values
    assert all(v < 1.5 * first + 0.01 for v in later)


def test_the_probe_restores_modes_and_random_generators_and_takes_a_dataloader():
    model, (_, _, xv, yv) = pretrained_backbone()
    model.train()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xv, yv), batch_size=50, shuffle=True
    )
    doctor = Doctor(model, loss_fn=F.cross_entropy, on_finding=None, probe=loader)
    rng = torch.get_rng_state()
    doctor.validate(loss=1.0)  # the baseline: measured here, as nothing was stepped yet
    assert torch.equal(rng, torch.get_rng_state())  # the shuffled loader drew no global numbers
    assert model.training and model.backbone[1].training  # eval mode only for the probe
    assert len(doctor.signals.probe_loss) == 1 and doctor.signals.probe_noise > 0  # 8 batches
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(xv), yv).item()
    assert doctor.signals.probe_loss.values[0] == pytest.approx(expected, rel=1e-5)
    assert "GW203" not in _codes(doctor)  # the probe ran in eval mode
    doctor.close()


def test_the_probe_uses_a_hugging_face_models_own_loss_on_a_mapping_batch():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    batch = {"input_ids": torch.randint(0, 100, (100, 12)), "labels": torch.randint(0, 2, (100,))}
    doctor = Doctor(model, on_finding=None, probe=batch)  # no loss_fn: the model's own loss
    doctor.validate()
    model.eval()
    with torch.no_grad():
        chunks = [model(**{k: v[i : i + 64] for k, v in batch.items()}).loss for i in (0, 64)]
    expected = (chunks[0] * 64 + chunks[1] * 36) / 100  # PROBE_CHUNK rows per batch, weighted
    assert doctor.signals.probe_loss.values[0] == pytest.approx(float(expected), rel=1e-5)
    doctor.close()


def test_a_failing_probe_degrades_to_a_warning_and_bad_probes_are_refused():
    model, (_, _, xv, yv) = pretrained_backbone()
    doctor = Doctor(model, loss_fn=F.cross_entropy, on_finding=None, probe=(xv, yv[:, None] * 1.0))
    with pytest.warns(GradwiseWarning, match="GW403"):
        doctor.validate(loss=1.0)  # float targets of the wrong shape: cross_entropy raises
    assert doctor.probe is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        doctor.validate(loss=1.0)  # off from now on, and quiet
    with pytest.raises(ConfigError, match="probe"):
        Doctor(model, probe=xv)  # no targets
    with pytest.raises(ConfigError, match="probe"):
        Doctor(model, probe=(xv, yv[:10]))  # rows differ


# ---------------------------------------------------------------------------- GW307, GW308


def test_a_fine_tuned_models_low_noisy_loss_is_neither_plateau_nor_oscillation():
    """A pretrained classifier starts far below chance: its batch noise is not a swing, and a flat
    loss there is learned, not stuck (both judged against at least ln C)."""
    from gradwise.doctor.rules import dynamics

    noisy = [0.05, 0.1, 0.3, 0.1] * 50  # batch noise around 0.14, far below chance (ln 10 = 2.3)
    flat = [0.1] * 200

    def signals(values, kind):
        series = Series()
        for i, v in enumerate(values):
            series.append(i, v)
        return Signals(step=200, loss=series, loss_kind=kind, num_classes=10)

    assert dynamics.oscillating(signals(noisy, "mse")) is not None  # no chance level to judge by
    assert dynamics.oscillating(signals(noisy, "cross_entropy")) is None
    assert dynamics.plateau(signals(flat, "mse")) is not None
    assert dynamics.plateau(signals(flat, "cross_entropy")) is None
    stuck = [math.log(10)] * 200  # at chance: still a plateau
    assert dynamics.plateau(signals(stuck, "cross_entropy")) is not None
