"""Lineage in every run directory (data fingerprints, git state, versions) and ``gradwise runs
--compare`` on real runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import QUIET, gradwise_main, mlp
from torch.utils.data import Dataset, TensorDataset

import gradwise as gw
from gradwise.tracking.environment import git_state
from gradwise.tracking.lineage import DATASET_ITEMS, fingerprint, same_data


def _blobs(seed: int = 0, n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(3, 8, generator=g)[y] * 3 + torch.randn(n, 8, generator=g), y


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two tiny real runs on the same data, with different learning rates and seeds."""
    root = tmp_path_factory.mktemp("runs")
    x, y = _blobs()
    dirs = []
    for name, lr in (("a", 0.01), ("b", 0.03)):
        run = gw.Trainer(
            mlp(), (x[:90], y[:90]), (x[90:], y[90:]), task="multiclass", recipe=None,
            root=str(root), name=name, epochs=2, lr=lr, **QUIET,
        ).fit()  # fmt: skip
        dirs.append(run.dir)
    return root, dirs[0], dirs[1]


def test_every_run_records_its_lineage(two_runs):
    _, a, b = two_runs
    env = json.loads((a / "environment.json").read_text())
    x, y = _blobs()
    train, val = env["data"]["train"], env["data"]["val"]
    assert train["method"] == "full" and train["samples"] == train["hashed"] == 90
    assert val["samples"] == 30
    assert train["sha256"] == fingerprint(TensorDataset(x[:90], y[:90]))["sha256"]
    assert env["versions"]["torch"] == torch.__version__ and "gradwise" in env["versions"]
    assert "git" in env  # null outside a repository (the test's temporary directory)
    env_b = json.loads((b / "environment.json").read_text())
    assert env_b["data"] == env["data"]  # same data, same fingerprint, run after run


def test_the_same_data_gives_the_same_fingerprint_and_a_changed_sample_another():
    x, y = _blobs()
    first = fingerprint(TensorDataset(x, y))
    assert fingerprint(TensorDataset(x.clone(), y.clone())) == first
    changed = x.clone()
    changed[57, 3] += 1e-3
    assert fingerprint(TensorDataset(changed, y))["sha256"] != first["sha256"]
    relabelled = y.clone()
    relabelled[0] = 2
    assert fingerprint(TensorDataset(x, relabelled))["sha256"] != first["sha256"]
    # same bytes, other dtype or shape: another fingerprint
    assert fingerprint(TensorDataset(x.view(120, 2, 4), y))["sha256"] != first["sha256"]
    assert same_data(first, fingerprint(TensorDataset(x, y))) is True
    assert same_data(first, {"sha256": None, "method": "unreadable"}) is None


class _Files(Dataset):
    """A map-style dataset with a random augmentation, as an image folder with transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.x[i] + 0.1 * torch.randn(8), "label": int(self.y[i]), "id": f"{i}"}


class _Counting(_Files):
    """A user's dataset that counts its reads (as a test's Ctrl-C trigger or a stream does)."""

    reads = 0

    def __getitem__(self, i: int) -> dict:
        type(self).reads += 1
        return super().__getitem__(i)


def test_a_users_own_dataset_is_never_read_for_lineage():
    x, y = _blobs(n=1000)
    record = fingerprint(_Counting(x, y))
    assert _Counting.reads == 0
    assert record["method"] == "not-read" and record["sha256"] is None
    assert record["samples"] == 1000 and "side effects" in record["reason"]


class _GradwiseFiles(_Files):
    """Stands for one of gradwise's own file-backed data sets, whose samples are read."""

    __module__ = "gradwise.data.images"


def test_gradwise_datasets_are_sampled_deterministically_without_touching_the_rng():
    x, y = _blobs(n=1000)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = fingerprint(_GradwiseFiles(x, y))
    assert torch.equal(torch.get_rng_state(), before)  # the run's randomness is untouched
    assert first["method"] == "sample" and first["hashed"] == DATASET_ITEMS
    assert first["samples"] == 1000
    assert fingerprint(_GradwiseFiles(x, y)) == first  # the augmentation repeats, seeded
    changed = x.clone()
    changed[0] += 1  # the first sample is always in the sample
    assert fingerprint(_GradwiseFiles(changed, y))["sha256"] != first["sha256"]
    shorter = _GradwiseFiles(x[:999], y[:999])
    assert fingerprint(shorter)["sha256"] != first["sha256"]  # the length counts

    class Objects(_GradwiseFiles):
        __module__ = _GradwiseFiles.__module__

        def __getitem__(self, i: int) -> object:
            return object()

    unhashable = fingerprint(Objects(x, y))
    assert unhashable["sha256"] is None and "object" in unhashable["reason"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo, check=True, capture_output=True,
    )  # fmt: skip


def test_a_dirty_repository_is_flagged(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("print(1)\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "first")
    clean = git_state(repo)
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    (repo / "train.py").write_text("print(2)\n")
    dirty = git_state(repo)
    assert dirty["dirty"] is True and dirty["commit"] == clean["commit"]
    assert git_state(tmp_path) is None  # outside a repository


def test_runs_compare_side_by_side(two_runs, monkeypatch, capsys):
    root, a, b = two_runs
    code, stdout, _ = gradwise_main(
        monkeypatch, capsys, "runs", "--compare", "a", str(b), "--root", str(root)
    )
    assert code == 0, stdout
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in stdout.splitlines()}
    assert rows[""] == ["a", "b", "compare"]  # piped: tab-separated, like the listing
    assert rows["recipe optim.lr"] == ["0.01", "0.03", "different"]
    assert rows["recipe name"][2] == "different"
    assert "recipe data.batch_size" not in rows  # only what differs
    assert rows["data train"][2] == rows["data val"][2] == "same"
    assert rows["data train"][0].endswith("(90 samples, full)")
    assert rows["versions"][2] == "same"
    best = [float(v) for v in rows["best val_accuracy"][:2]]
    statuses = [json.loads((d / "status.json").read_text())["best_metric"] for d in (a, b)]
    assert best == pytest.approx(statuses, abs=1e-3)
    assert "last val_loss" in rows and rows["state"][:2] == ["finished", "finished"]


def test_runs_compare_tells_different_data_and_bad_names(two_runs, monkeypatch, capsys, tmp_path):
    root, a, _ = two_runs
    x, y = _blobs(seed=1)
    other = gw.Trainer(
        mlp(), (x[:90], y[:90]), (x[90:], y[90:]), task="multiclass", recipe=None,
        root=str(root), name="c", epochs=1, lr=0.01, **QUIET,
    ).fit()  # fmt: skip
    code, stdout, _ = gradwise_main(
        monkeypatch, capsys, "runs", "--compare", str(a), str(other.dir), "--root", str(root)
    )
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in stdout.splitlines()}
    assert code == 0 and rows["data train"][2] == "different"
    code, _, stderr = gradwise_main(
        monkeypatch, capsys, "runs", "--compare", "a", "nope", "--root", str(root)
    )
    assert code == 2 and "nope" in stderr and "Traceback" not in stderr
    code, _, stderr = gradwise_main(
        monkeypatch, capsys, "runs", "--compare", "a", "--root", str(root)
    )
    assert code == 2 and "two or more runs" in stderr
