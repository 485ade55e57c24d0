"""A study journal damaged by a worker killed mid-write is repaired, never appended onto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import gradwise_main

from gradwise.errors import GradwiseError, GradwiseWarning
from gradwise.tune import tune
from gradwise.tune.storage import journal_path, open_storage

RECIPE = {
    "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
    "data": {"name": "iris"},
    "train": {"epochs": 1},
    "doctor": {"mode": "off"},
    "tracking": {"mlflow": False, "tensorboard": False, "progress": False},
}
SPACE = {"optim.lr": {"type": "log_uniform", "low": 1.0e-3, "high": 0.3}}
JOURNAL = journal_path("runs", "cut")


def _study(cut: bool = True, process: bool = False) -> bytes:
    """A real study's journal, whose last line is cut in the middle (a killed writer); the cut
    part is returned. ``process``: run it in a process that is then gone, like a killed worker."""
    args = dict(trials=2, pruner="none", study_name="cut", plots=False, verbose=False)
    if process:
        code = f"from gradwise.tune import tune; tune({RECIPE!r}, {SPACE!r}, **{args!r})"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    else:
        tune(RECIPE, SPACE, **args)
    data = JOURNAL.read_bytes()
    if not cut:
        return b""
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    cut = last + (len(data) - last) // 2
    JOURNAL.write_bytes(data[:cut])
    return data[last:cut]


def _records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]  # every line is a whole record


@pytest.mark.slow
def test_tune_resumes_a_journal_cut_mid_line_to_its_cap_and_reports(monkeypatch, capsys):
    partial = _study(process=True)
    Path("recipe.yaml").write_text(json.dumps(RECIPE))
    Path("space.yaml").write_text(json.dumps(SPACE))
    code, out, err = gradwise_main(
        monkeypatch, capsys, "tune", "recipe.yaml", "--space", "space.yaml", "--trials", "3",
        "--study", "cut", "--pruner", "none",
    )  # fmt: skip
    assert code in (0, None), err
    assert f"warning: repaired the study journal {JOURNAL}: dropped {len(partial)} bytes" in err
    assert "Traceback" not in err
    (backup,) = JOURNAL.parent.glob("cut.journal.damaged-*")
    assert backup.read_bytes() == partial + b"\n"
    _records(JOURNAL)
    study = optuna.load_study(study_name="cut", storage=open_storage(str(JOURNAL)))
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3  # the cap: the trial whose last record was cut is failed and replaced
    code, out, err = gradwise_main(monkeypatch, capsys, "tune", "--report", "cut", "--root", "runs")
    assert code in (0, None) and "3 complete" in out, err


def test_a_record_already_glued_onto_a_partial_line_is_freed_of_it():
    partial = _study()
    plain = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(JOURNAL)))
    with pytest.raises(ValueError):  # what Optuna alone does: glue, then fail to read on
        study = optuna.load_study(study_name="cut", storage=plain)
        study.set_user_attr("glued", 1)
        study.set_user_attr("next", 2)
        optuna.load_study(study_name="cut", storage=plain)
    with pytest.warns(GradwiseWarning, match="a partial record glued onto the start of line"):
        store = open_storage(str(JOURNAL))
    attrs = optuna.load_study(study_name="cut", storage=store).user_attrs
    assert attrs["glued"] == 1 and attrs["next"] == 2
    assert len(_records(JOURNAL)) > 1
    (backup,) = JOURNAL.parent.glob("cut.journal.damaged-*")
    assert backup.read_bytes() == partial + b"\n"


def test_no_record_is_appended_onto_a_line_cut_after_the_journal_was_opened():
    _study(cut=False)
    store = open_storage(str(JOURNAL))
    study = optuna.load_study(study_name="cut", storage=store)
    with JOURNAL.open("ab") as f:  # another worker is killed in the middle of a write
        f.write(b'{"op_code":5,"worker_id":"w","trial_id":0,"us')
    with pytest.warns(GradwiseWarning, match="partial last line"):
        study.set_user_attr("after", 2)
    assert _records(JOURNAL)[-1]["user_attr"] == {"after": 2}
    again = optuna.load_study(study_name="cut", storage=open_storage(str(JOURNAL)))
    assert again.user_attrs["after"] == 2


def test_damage_in_the_middle_is_refused_with_the_command_that_cuts_it():
    _study(cut=False)
    data = JOURNAL.read_bytes()
    second = data.find(b"\n") + 1
    JOURNAL.write_bytes(data[:second] + b"\x00garbage\n" + data[second:])
    with pytest.raises(GradwiseError, match=rf"damaged at line 2 \(byte {second}\).*truncate -s"):
        open_storage(str(JOURNAL))
    assert JOURNAL.read_bytes()[second:].startswith(b"\x00garbage")  # left as it was
