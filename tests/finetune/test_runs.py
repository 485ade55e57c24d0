"""Fine-tuning end to end: a pretrained run adapted to other classes, from the CLI and Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUIET, gradwise_main
from safetensors.torch import save_file

import gradwise as gw

PLAIN = {**QUIET, "doctor": {"mode": "off"}}


@pytest.fixture(scope="module")
def iris_base(tmp_path_factory) -> str:
    """A zoo MLP pretrained for one epoch on iris (3 classes)."""
    root = tmp_path_factory.mktemp("runs")
    recipe = {"model": {"name": "mlp"}, "data": {"name": "iris"}, "train": {"epochs": 2}}
    run = gw.Trainer(recipe=recipe, name="base", root=str(root), **PLAIN).fit()
    return str(run.dir)


def test_cli_fine_tunes_a_pretrained_run(iris_base, monkeypatch, capsys):
    recipe = {
        "model": {"name": "mlp"},
        "data": {"name": "iris"},
        "train": {"epochs": 2},
        "finetune": {"pretrained": iris_base, "lr_decay": 2.6, "unfreeze_every": 1},
        "tracking": {"mlflow": False, "tensorboard": False},
    }
    with open("ft.yaml", "w") as f:
        yaml.safe_dump(recipe, f)
    code, out, err = gradwise_main(monkeypatch, capsys, "train", "ft.yaml")
    assert code == 0, err
    log = out + err
    assert f"fine-tuning: loaded 10/10 tensors from {iris_base}" in log
    assert "gradual unfreezing of" in log and "unfroze layer group" in log
    (run_dir,) = Path("runs").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert (
        yaml.safe_load((run_dir / "recipe.yaml").read_text())["finetune"]["pretrained"] == iris_base
    )


def test_a_new_head_is_reported_and_trains(iris_base, blobs):
    torch.manual_seed(0)
    model = gw.build_model("mlp", {}, gw.load_data("iris", {}).info, 5)  # 5 classes, not 3
    trainer = gw.Trainer(
        model, *_five_classes(), epochs=3, recipe=None, finetune={"pretrained": iris_base}, **PLAIN
    )
    run = trainer.fit()
    report = trainer.finetune.report
    assert report.new_modules == [report.heads[-1]] and len(report.mismatched) == 2
    assert run.history[-1]["val_accuracy"] > 0.5  # chance is 0.2
    with pytest.raises(gw.ConfigError, match=r"finetune\.strict"):
        gw.Trainer(
            model,
            *_five_classes(),
            recipe=None,
            finetune={"pretrained": iris_base, "strict": True},
            **PLAIN,
        ).fit()


def _five_classes():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 4, generator=g) * 3
    y = torch.arange(300) % 5
    x = centers[y] + torch.randn(300, 4, generator=g)
    return (x[:240], y[:240]), (x[240:], y[240:])


def test_a_state_dict_file_that_fits_nothing_fails_before_a_run_exists(blobs, tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    model = torch.nn.Sequential(torch.nn.Linear(8, 3))
    with pytest.raises(gw.ConfigError, match=r"finetune\.pretrained"):
        gw.Trainer(
            model,
            blobs,
            recipe=None,
            finetune={"pretrained": str(tmp_path / "w.safetensors")},
            **PLAIN,
        ).fit()
    assert not (tmp_path / "runs").exists()


def test_the_doctor_follows_fine_tuning(blobs):
    """Gradual unfreezing raises no false 'never received a gradient' (GW207) or 'frozen by
    mistake' (GW208); training on swapped labels forgets the original task: GW403 on its probe."""
    x, y = blobs
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 3),
    )  # fmt: skip
    settings = {**QUIET, "recipe": None, "batch_size": 16, "sample_every": 5}
    trainer = gw.Trainer(
        model, (x, y), epochs=3, finetune={"unfreeze_every": 1, "lr_decay": 2.6}, **settings
    )
    trainer.fit()
    assert not {"GW207", "GW208"} & {f.code for f in trainer.doctor.findings}
    swapped = gw.Trainer(
        model, (x[:200], (y[:200] + 1) % 3), (x[200:], (y[200:] + 1) % 3), epochs=4, lr=1e-2,
        forgetting_probe=(x[200:], y[200:]), **settings,
    )  # fmt: skip
    swapped.fit()
    assert "GW403" in {f.code for f in swapped.doctor.findings}


def test_layer_groups_of_a_model_with_its_own_parameter():
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))
            self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    groups = gw.finetune.layer_groups(Scaled())
    assert [(g.name, g.params) for g in groups] == [
        ("(root)", ["scale"]),
        ("body", ["body.weight", "body.bias"]),
        ("head", ["head.weight", "head.bias"]),
    ]
