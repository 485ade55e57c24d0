"""The doctor inside the Trainer: watch writes findings and telemetry, repair rescues faulty recipes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import QUIET, gradwise_cli

import gradwise as gw
from gradwise.doctor.cases import REPAIR_RECIPES
from gradwise.doctor.docs import MARKDOWN, render, render_index


def test_watch_writes_findings_and_telemetry_for_the_report(blobs):
    x, y = blobs
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    run = gw.Trainer(
        model, (x[:200] * 255, y[:200]), (x[200:] * 255, y[200:]), epochs=2, **QUIET
    ).fit()
    findings = json.loads((run.dir / "doctor" / "findings.json").read_text())
    assert "GW102" in [f["code"] for f in findings]  # unnormalised inputs
    telemetry = json.loads((run.dir / "doctor" / "telemetry.json").read_text())
    assert len(telemetry["loss"]) == run.steps and telemetry["layers"] == ["0", "2"]
    assert telemetry["val"] and telemetry["val"][0]["loss"] is not None
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed


def test_doctor_off_and_ignore(blobs):
    x, y = blobs
    run = gw.Trainer(
        torch.nn.Linear(8, 3), (x * 255, y), epochs=1, doctor={"mode": "off"}, **QUIET
    ).fit()
    assert not (run.dir / "doctor").exists()
    run = gw.Trainer(torch.nn.Linear(8, 3), (x * 255, y), epochs=1, ignore=["GW102"], **QUIET).fit()
    assert json.loads((run.dir / "doctor" / "findings.json").read_text()) == []
    with pytest.raises(gw.ConfigError, match=r"doctor\.ignore"):
        gw.Trainer(torch.nn.Linear(8, 3), (x, y), epochs=1, ignore=["GW999"], **QUIET).fit()


def _val_score(run) -> float:
    return run.best_metric if run.monitor != "val_loss" else -run.best_metric


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REPAIR_RECIPES))
def test_faulty_recipe_fails_in_watch_mode_and_repair_rescues_it(name):
    recipe = REPAIR_RECIPES[name]
    watched = gw.Trainer(recipe=recipe, **QUIET).fit()
    assert watched.state == "diverged"  # the loss went non-finite; training stopped
    repaired = gw.Trainer(recipe=recipe, **{"doctor.mode": "repair"}, **QUIET).fit()
    assert repaired.state == "finished"
    repairs = json.loads((repaired.dir / "doctor" / "repairs.json").read_text())
    assert 1 <= len(repairs) <= 3 and "rolled back to step" in repairs[0]["action"]
    healthy = {"val_accuracy": 0.85, "val_loss": -0.2}[repaired.monitor]
    if name == "rnn-without-clipping":  # chance is 0.5; repaired runs reach 0.75-0.88 by seed
        healthy = 0.7
    assert _val_score(repaired) > healthy, (name, repaired.best_metric)


def test_docs_doctor_md_and_rules_json_are_generated_from_the_registry():
    from gradwise.doctor.pages import INDEX

    assert MARKDOWN.read_text() == render(), "regenerate: python -m gradwise.doctor.docs"
    assert INDEX.read_text() == render_index(), "regenerate: python -m gradwise.doctor.docs"


def test_explain_does_not_import_torch():
    code = (
        "import sys; from gradwise.cli import main; sys.argv = ['gradwise', 'explain', 'GW302']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.argv = ['gradwise', 'explain', 'label smoothing']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "exploding-gradients" in result.stdout and "Label smoothing" in result.stdout
    assert result.stdout.rstrip().endswith("no torch"), result.stderr


def test_explain_prints_a_rule_page():
    result = gradwise_cli("explain", "GW302")
    assert (
        result.returncode == 0
        and "exploding-gradients" in result.stdout
        and "Fixes" in result.stdout
    )
    assert gradwise_cli("explain", "exploding-gradients").stdout == result.stdout
    listing = gradwise_cli("explain", "--list")
    assert listing.stdout.count("GW") == len(gw.RULES)
    bad = gradwise_cli("explain", "GW3O2")
    assert bad.returncode == 2 and "did you mean" in bad.stderr
