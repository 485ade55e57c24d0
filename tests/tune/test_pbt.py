"""Population-based training: exploit copies whole checkpoints, explore changes the continued run's
optimizer, the lineage is complete, the run is deterministic, and bad input fails before training.

Real training of a tiny MLP on iris (8 steps per epoch, one epoch per generation).
"""

from __future__ import annotations

import copy
import filecmp
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import QUIET, mlp
from safetensors.torch import load_file

import gradwise as gw
from gradwise.errors import ConfigError
from gradwise.tracking import read_metrics
from gradwise.trainer import Trainer
from gradwise.tune.pbt import PBTResult, pbt

RECIPE = {
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "data": {"name": "iris", "batch_size": 16},
    "tracking": {"mlflow": False, "tensorboard": False, "progress": False},
    "doctor": {"mode": "off"},
    "checkpoint": {"keep_last": 5},  # keep every generation's checkpoint for the checks
}
# deliberately badly chosen: most of this range is far too low a learning rate for AdamW
HYPER = {"optim.lr": (1e-6, 1e-1), "optim.weight_decay": (1e-5, 0.3)}
SETTINGS = {"population": 4, "generations": 3, "objective": "val_loss", "seed": 0}
STEPS = 8  # optimizer steps per epoch: 120 training samples of iris in batches of 16


def _pbt(root: Path, **kwargs) -> PBTResult:
    return pbt(RECIPE, HYPER, root=root, progress=False, **{**SETTINGS, **kwargs})


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> tuple[PBTResult, dict]:
    """One PBT run, with what every resumed member held right after its checkpoint was restored."""
    restored: dict[tuple[str, int], dict] = {}  # (member, step) -> weights, optimizer, groups
    original = Trainer._restore

    def spy(self: Trainer) -> None:
        original(self)
        pos = self.state.position
        restored[(self.dir.name, pos.step)] = {
            "weights": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "groups": [
                {"lr": g["lr"], "weight_decay": g["weight_decay"]}
                for g in self.optimizer.param_groups
            ],
        }

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_restore", spy)
        result = _pbt(tmp_path_factory.mktemp("pbt"))
    return result, restored


def _exploits(result: PBTResult) -> list[tuple[int, dict]]:
    return [
        (gen["generation"], entry)
        for gen in result.lineage["generations"]
        for entry in gen["members"]
        if entry["exploit"] is not None
    ]


def test_exploit_copies_the_weights_and_optimizer_state(population):
    result, restored = population
    exploits = _exploits(result)
    assert len(exploits) == 2  # one per generation boundary (bottom 25% of 4)
    for generation, entry in exploits:
        event = entry["exploit"]
        source, copied = result.dir / event["checkpoint"], result.dir / event["copy"]
        assert event["from"] != entry["member"] and event["generation"] == generation
        assert source.name == f"step-{generation * STEPS:08d}" == copied.name
        for name in ("model.safetensors", "state.pt"):
            assert filecmp.cmp(source / name, copied / name, shallow=False)
        # what the member trained from in the next generation is the source's checkpoint
        held = restored[(f"member-{entry['member']}", generation * STEPS)]
        weights = load_file(source / "model.safetensors")
        assert held["weights"].keys() == weights.keys()
        for key, value in weights.items():
            assert torch.equal(held["weights"][key], value), key
        saved = torch.load(source / "state.pt", weights_only=True)["optimizer"]["state"]
        assert saved.keys() == held["optimizer"]["state"].keys() and saved
        for index, state in saved.items():
            for key, value in state.items():
                assert torch.equal(held["optimizer"]["state"][index][key], value), (index, key)


def test_explore_changes_the_optimizer_of_the_continued_run(population):
    result, restored = population
    for generation, entry in _exploits(result):
        event = entry["exploit"]
        source = result.lineage["generations"][generation - 1]["members"][event["from"]]
        new = event["hyperparams"]
        assert set(event["explore"]) == set(HYPER)
        for path, how in event["explore"].items():
            low, high = HYPER[path]
            assert low <= new[path] <= high
            if how != "resampled":  # perturbed: the source's value times a factor, within range
                factor = float(how.removeprefix("x"))
                assert factor in (0.8, 1.2)
                expected = min(max(source["hyperparams"][path] * factor, low), high)
                assert new[path] == pytest.approx(expected)
        assert new != source["hyperparams"]
        # the restored optimizer runs with the new values, not the copied checkpoint's
        decay, no_decay = restored[(f"member-{entry['member']}", generation * STEPS)]["groups"]
        assert decay["lr"] == pytest.approx(new["optim.lr"]) == no_decay["lr"]
        assert decay["weight_decay"] == pytest.approx(new["optim.weight_decay"])
        assert no_decay["weight_decay"] == 0.0  # biases stay undecayed
    # every generation really trained with the learning rate its lineage entry records
    # (constant schedule: after warmup the rate is the hyperparameter itself)
    for gen in result.lineage["generations"]:
        for entry in gen["members"]:
            meta = json.loads((result.dir / entry["checkpoint"] / "meta.json").read_text())
            if entry["exploit"]:  # its checkpoint was replaced by the copy of the source's
                entry = gen["members"][entry["exploit"]["from"]]
            assert meta["lr"] == pytest.approx(entry["hyperparams"]["optim.lr"])
            assert meta["val_loss"] == pytest.approx(entry["metric"])


def test_lineage_is_complete_and_bottom_members_are_replaced_by_top_ones(population):
    result, _ = population
    on_disk = json.loads((result.dir / "pbt.json").read_text())
    assert on_disk == json.loads(json.dumps(result.lineage))
    assert on_disk["state"] == "finished" and on_disk["monitor"] == result.monitor == "val_loss"
    assert result.mode == "min" and on_disk["settings"]["truncated"] == 1
    assert on_disk["hyperparams"]["optim.lr"] == {"low": 1e-6, "high": 0.1, "scale": "log"}
    generations = on_disk["generations"]
    assert [g["generation"] for g in generations] == [1, 2, 3]
    for gen in generations:
        entries = gen["members"]
        assert [e["member"] for e in entries] == [0, 1, 2, 3]
        assert sorted(e["rank"] for e in entries) == [1, 2, 3, 4]
        by_rank = sorted(entries, key=lambda e: e["rank"])
        assert [e["metric"] for e in by_rank] == sorted(e["metric"] for e in entries)
        for e in entries:
            assert (
                e["checkpoint"]
                == f"member-{e['member']}/checkpoints/step-{gen['epoch'] * STEPS:08d}"
            )
            assert set(e["hyperparams"]) == set(HYPER) and math.isfinite(e["metric"])
        exploited = [e for e in entries if e["exploit"]]
        if gen["generation"] == 3:
            assert not exploited  # nothing to exploit for after the last generation
            continue
        assert len(exploited) == 1
        (loser,) = exploited
        assert loser["rank"] == 4  # the bottom 25%...
        assert entries[loser["exploit"]["from"]]["rank"] == 1  # ...copies the top 25%
        following = generations[gen["generation"]]["members"]
        for (
            e
        ) in entries:  # the next generation trains with the explored values, the rest keep theirs
            kept = e["exploit"]["hyperparams"] if e["exploit"] else e["hyperparams"]
            assert following[e["member"]]["hyperparams"] == kept
    # the result: the best member of the last generation, its checkpoint and its lineage
    last = generations[-1]["members"]
    best = next(e for e in last if e["rank"] == 1)
    assert result.best_member == best["member"] and result.best_metric == best["metric"]
    assert result.best_hyperparams == best["hyperparams"]
    assert result.best_checkpoint == result.dir / best["checkpoint"]
    assert (result.best_checkpoint / "model.safetensors").is_file()
    assert len(result.history) == 12 and result.history[-4:][best["member"]]["rank"] == 1
    schedule = result.schedule
    assert [s["generation"] for s in schedule] == [1, 2, 3] and schedule[-1]["member"] == best[
        "member"
    ]
    for earlier, later in itertools.pairwise(schedule):
        event = generations[earlier["generation"] - 1]["members"][later["member"]]["exploit"]
        assert earlier["member"] == (event["from"] if event else later["member"])
        entry = generations[earlier["generation"] - 1]["members"][earlier["member"]]
        assert {k: earlier[k] for k in HYPER} == entry["hyperparams"]
    assert on_disk["best"]["schedule"] == schedule
    # members are ordinary run directories; the recipe holds what the member trained with last
    for i, member in enumerate(result.members):
        assert member == result.dir / f"member-{i}"
        recipe = gw.load_recipe(member / "recipe.yaml")
        assert recipe.optim.lr == pytest.approx(last[i]["hyperparams"]["optim.lr"])
        assert recipe.schedule.name == "constant" and recipe.train.epochs == 3
        assert json.loads((member / "status.json").read_text())["state"] == "finished"


def test_pbt_rescues_a_badly_chosen_learning_rate_range(population):
    result, _ = population
    first, last = (
        [e["metric"] for e in result.lineage["generations"][g]["members"]] for g in (0, -1)
    )
    assert min(last) < min(first)  # the population's best improves
    assert max(last) < 0.7 * max(first)  # and its worst member (too low an lr) was replaced
    # the member that drew the lowest learning rate is the first to be replaced
    members = result.lineage["generations"][0]["members"]
    slowest = min(members, key=lambda e: e["hyperparams"]["optim.lr"])
    assert slowest["hyperparams"]["optim.lr"] < 1e-3 and slowest["exploit"] is not None


def test_the_same_seed_gives_the_same_lineage(population, tmp_path):
    result, _ = population
    again = _pbt(tmp_path)
    assert again.lineage["generations"] == result.lineage["generations"]
    assert again.schedule == result.schedule and again.best_metric == result.best_metric
    other = pbt(RECIPE, HYPER, population=2, generations=1, seed=1, root=tmp_path, progress=False)
    first = result.lineage["generations"][0]["members"][0]["hyperparams"]
    assert other.lineage["generations"][0]["members"][0]["hyperparams"] != first


def test_members_that_diverge_are_all_replaced(tmp_path):
    recipe = {**RECIPE, "optim": {"name": "sgd"}, "train": {"grad_clip": None}}
    space = {"lr": (1e-2, 1e6)}  # SGD without clipping: rates above ~10 blow up
    result = pbt(recipe, space, **{**SETTINGS, "generations": 2}, root=tmp_path, progress=False)
    first, second = (g["members"] for g in result.lineage["generations"])
    diverged = [e for e in first if e["metric"] is None]
    assert len(diverged) >= 2  # more than the bottom 25%: all of them copy a healthy member
    for entry in first:
        assert (entry["exploit"] is not None) == (entry in diverged or entry["rank"] == 4)
        if entry["exploit"]:
            assert first[entry["exploit"]["from"]]["metric"] is not None
    assert all(e["rank"] > 4 - len(diverged) for e in diverged)  # ranked last
    assert sum(e["metric"] is not None for e in second) >= 3
    assert math.isfinite(result.best_metric)


@pytest.mark.parametrize(
    ("hyperparams", "settings", "field", "message"),
    [
        ({"optim.lrr": (1e-4, 1e-1)}, {}, "optim.lrr", "did you mean 'lr'"),
        ({"optim.lr": (1e-1, 1e-4)}, {}, "hyperparams['optim.lr']", "low < high"),
        ({"optim.lr": (1e-3, 1e-3)}, {}, "hyperparams['optim.lr']", "low < high"),
        ({"optim.lr": (0.0, 1e-1)}, {}, "optim.lr", "greater than 0"),
        ({"optim.lr": (1e-4,)}, {}, "hyperparams['optim.lr']", "(low, high)"),
        ({"optim.lr": (1e-4, 1e-1, "cubic")}, {}, "hyperparams['optim.lr']", "'log' or 'linear'"),
        ({"label_smoothing": (0.0, 0.2, "log")}, {}, "hyperparams['label_smoothing']", "low > 0"),
        ({"data.batch_size": (16, 128)}, {}, "hyperparams['data.batch_size']", "continuous"),
        ({}, {}, "hyperparams", "recipe paths"),
        ({"lr": (1e-4, 1e-1)}, {"population": 1}, "population", "at least 2"),
        ({"lr": (1e-4, 1e-1)}, {"fraction": 0.0}, "fraction", "(0, 0.5]"),
        ({"lr": (1e-4, 1e-1)}, {"fraction": 0.75}, "fraction", "(0, 0.5]"),
        ({"lr": (1e-4, 1e-1)}, {"exploit": "tournament"}, "exploit", "truncation"),
        ({"lr": (1e-4, 1e-1)}, {"perturb": ()}, "perturb", "positive factors"),
        ({"lr": (1e-4, 1e-1)}, {"resample_probability": 1.5}, "resample_probability", "[0, 1]"),
        ({"lr": (1e-4, 1e-1)}, {"generations": 0}, "generations", "positive integer"),
    ],
)
def test_bad_input_is_a_clear_config_error_before_anything_is_written(
    hyperparams, settings, field, message
):
    with pytest.raises(ConfigError) as info:
        pbt(RECIPE, hyperparams, progress=False, **settings)
    assert info.value.field == field and message in str(info.value)
    assert not Path("runs").exists()


def test_an_unknown_objective_fails_without_leaving_a_pbt_folder():
    with pytest.raises(ConfigError, match=r"early_stopping\.monitor"):
        pbt(RECIPE, {"lr": (1e-4, 1e-1)}, objective="val_bleu", progress=False)
    assert list(Path("runs/pbt").iterdir()) == []
    with pytest.raises(ConfigError, match="a divisor of epochs_per_generation"):
        pbt({**RECIPE, "train": {"eval_every": 2}}, {"lr": (1e-4, 1e-1)}, progress=False)


# -- the Trainer change PBT relies on: resume with changed optimizer settings ------------------


def test_resume_applies_explicit_optimizer_settings_and_rescales_the_schedule(blobs):
    x, y = blobs
    data = ((x[:200], y[:200]), (x[200:], y[200:]))
    settings = {**QUIET, "recipe": None, "epochs": 4, "lr": 1e-2, "weight_decay": 0.05}

    def half_run() -> Path:  # stops after epoch 2 of 4, mid-cosine; its checkpoint holds lr 1e-2
        stop = lambda entry: entry["epoch"] >= 2  # noqa: E731
        return Trainer(mlp(), *data, on_evaluate=stop, log_every=1, **settings).fit().dir

    kept = Trainer.resume(half_run(), mlp(), *data, **QUIET)  # no overrides: an exact resume
    kept.fit()
    assert kept.scheduler.base_lrs == pytest.approx([1e-2, 1e-2])
    assert kept.optimizer.param_groups[0]["weight_decay"] == 0.05

    changed = Trainer.resume(half_run(), mlp(), *data, lr=1e-3, weight_decay=0.2, **QUIET)
    changed.fit()
    assert changed.scheduler.base_lrs == pytest.approx([1e-3, 1e-3])
    decay, no_decay = changed.optimizer.param_groups
    assert decay["initial_lr"] == pytest.approx(1e-3) and decay["weight_decay"] == 0.2
    assert no_decay["weight_decay"] == 0.0  # biases stay undecayed
    # the cosine keeps its position: every step after the resume runs at a tenth of the rate
    before, after = (read_metrics(t.dir, "train") for t in (kept, changed))
    assert [m["step"] for m in after] == [m["step"] for m in before]
    resumed_at = 2 * changed.steps_per_epoch
    for old, new in zip(before, after, strict=True):
        factor = 0.1 if old["step"] > resumed_at else 1.0
        assert new["lr"] == pytest.approx(old["lr"] * factor), old["step"]
    assert any(m["step"] > resumed_at for m in after)


def test_members_of_a_model_given_by_import_path_resume_as_the_populations_own(tmp_path):
    # a run directory PBT wrote itself is trusted: generation 2 must not refuse the user's model
    (tmp_path / "pbt_user_model.py").write_text(
        "import torch\n\n"
        "def build(in_features: int, num_outputs: int) -> torch.nn.Module:\n"
        "    return torch.nn.Sequential(torch.nn.Linear(in_features, 8), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(8, num_outputs))\n"
    )
    recipe = {**RECIPE, "model": {"name": "pbt_user_model:build"}}
    result = pbt(recipe, HYPER, **{**SETTINGS, "population": 2, "generations": 2}, root=tmp_path)
    second = result.lineage["generations"][1]["members"]
    assert all(e["metric"] is not None for e in second) and math.isfinite(result.best_metric)
