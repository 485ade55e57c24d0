"""The advisor's distributed strategy (DDP when the training state fits a device, FSDP when not, none
for one process, with the memory arithmetic) and the world size in gradwise.facts."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

from gradwise.advisor import Advice, decide, respect
from gradwise.assemble import advise
from gradwise.data import load_data
from gradwise.facts import Facts, facts
from gradwise.models import build_model
from gradwise.recipe import Recipe

H100 = {"device": "NVIDIA H100 80GB HBM3", "device_memory_gb": 79.2}


@pytest.fixture(scope="module")
def mlp_facts() -> Facts:
    bundle = load_data("iris", {})
    torch.manual_seed(0)
    return facts(build_model("mlp", {}, bundle.info, bundle.info.num_classes), bundle.train)


def _strategy(f: Facts, epochs: int | None = None) -> Advice:
    return {a.setting: a for a in decide(f, epochs)}["distributed.strategy"]


def _gpus(f: Facts, params: int, ranks: int, trainable: int | None = None, **kw) -> Facts:
    return dataclasses.replace(
        f,
        params=params,
        trainable_params=params if trainable is None else trainable,
        world_size=ranks,
        local_world_size=ranks,
        device_count=ranks,
        **{**H100, **kw},
    )


def test_facts_report_the_world_size_from_torchrun_variables(monkeypatch, mlp_facts):
    assert mlp_facts.world_size == 1 and mlp_facts.local_world_size == 1
    if not torch.cuda.is_available():
        assert mlp_facts.device_count == 0 and mlp_facts.device_memory_gb is None
    bundle = load_data("iris", {})
    model = build_model("mlp", {}, bundle.info, bundle.info.num_classes)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    f = facts(model, bundle.train)
    assert (f.world_size, f.local_world_size) == (4, 2)
    monkeypatch.setenv("WORLD_SIZE", "many")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    f = facts(model, bundle.train)
    assert (f.world_size, f.local_world_size) == (1, 1)


def test_one_process_on_this_cpu_is_none_and_says_why(mlp_facts):
    advice = _strategy(mlp_facts)
    assert advice.value == "none"
    assert "one process (world size 1): nothing to distribute" in advice.why
    params = mlp_facts.params
    assert f"{params / 1e3:.3g}K params x (4 weights + 4 grads + 8 AdamW)" in advice.why
    assert "on the CPU" in advice.why


def test_through_the_assembly_the_recipe_keeps_auto():
    advised = advise(recipe={"model": {"name": "mlp"}, "data": {"name": "iris"}})
    advice = {a.setting: a for a in advised.advice}["distributed.strategy"]
    assert advised.recipe.distributed.strategy == "auto" and advice.value == "auto"
    assert advice.why.startswith("auto chooses none: one process (world size 1)")


def test_ddp_when_the_state_fits_one_gpu_with_the_arithmetic(mlp_facts):
    advice = _strategy(_gpus(mlp_facts, 124_000_000, 2))
    assert advice.value == "ddp"
    state = 124e6 * 16 / 2**30  # 1.85 GiB
    assert f"124M params x (4 weights + 4 grads + 8 AdamW) = {state:.3g} GiB per rank" in advice.why
    assert "fits in half of 79.2 GiB of one GPU (39.6 GiB" in advice.why
    assert (
        f"{124e6 * 16 / 2 / 2**20:.3g} MiB per rank over 2 ranks" in advice.why
    )  # what FSDP gives
    assert any("Li et al. 2020" in r for r in advice.references)
    assert any("Zhao et al. 2023" in r for r in advice.references)


def test_fsdp_when_it_does_not_fit_and_what_sharding_gives(mlp_facts):
    advice = _strategy(_gpus(mlp_facts, 7_000_000_000, 8))
    assert advice.value == "fsdp"
    assert "7B params x (4 weights + 4 grads + 8 AdamW) = 104 GiB per rank with DDP" in advice.why
    assert "13 GiB per rank over 8 ranks, which fits" in advice.why
    too_big = _strategy(_gpus(mlp_facts, 70_000_000_000, 2))
    assert too_big.value == "fsdp"
    assert "522 GiB per rank over 2 ranks, still more than 39.6 GiB" in too_big.why
    assert "train.activation_checkpointing" in too_big.why


def test_frozen_parameters_and_sgd_count_less_state(mlp_facts):
    partial = _strategy(_gpus(mlp_facts, 1_000_000_000, 2, trainable=10_000_000))
    need = (4e9 + 10e6 * 12) / 2**30
    assert f"1B params x 4 weights + 10M trainable x (4 grads + 8 AdamW) = {need:.3g} GiB" in (
        partial.why
    )
    assert partial.value == "ddp"
    # a CNN on 60k samples for 30 epochs gets SGD: one momentum buffer, 4 bytes
    cnn = dataclasses.replace(
        _gpus(mlp_facts, 3_000_000_000, 4), architecture="cnn", n_samples=60_000
    )
    advice = _strategy(cnn, epochs=30)
    assert "3B params x (4 weights + 4 grads + 4 SGD momentum) = 33.5 GiB" in advice.why
    assert advice.value == "ddp"  # 33.5 GiB < 39.6 GiB; with AdamW's 8 bytes it would not fit


def test_one_process_on_a_machine_with_several_gpus_points_at_nproc(mlp_facts):
    f = dataclasses.replace(_gpus(mlp_facts, 124_000_000, 1), device_count=4)
    advice = _strategy(f)
    assert advice.value == "none"
    assert "This machine has 4 GPUs: gradwise train --nproc 4" in advice.why and "DDP" in advice.why


def test_cpu_ranks_share_the_machines_ram(mlp_facts):
    f = dataclasses.replace(
        mlp_facts, params=2_000_000_000, trainable_params=2_000_000_000, memory_gb=64.0
    )
    two = dataclasses.replace(f, world_size=2, local_world_size=2)
    advice = _strategy(two)
    assert "half of 64 GiB of free RAM shared by 2 ranks (16 GiB" in advice.why
    assert advice.value == "fsdp"  # 29.8 GiB of state > 16 GiB; sharded 14.9 GiB fits
    assert "14.9 GiB per rank over 2 ranks, which fits" in advice.why
    unknown = _strategy(dataclasses.replace(two, memory_gb=None))
    assert unknown.value == "ddp" and "memory is unknown" in unknown.why


def test_strategy_is_recommended_never_written_into_the_recipe():
    recipe = Recipe()
    fsdp = Advice("distributed.strategy", "fsdp", "7B params ...", [])
    kept = respect(fsdp, recipe, explicit=set())
    assert kept.value == "auto"
    assert kept.why.startswith("recommended, not applied: the recipe keeps auto")
    assert "distributed.strategy: fsdp" in kept.why
    mine = respect(fsdp, recipe.override({"distributed.strategy": "ddp"}), {"distributed.strategy"})
    assert mine.value == "ddp" and mine.why.startswith("kept your setting")
    same = Advice("distributed.strategy", "ddp", "fits", [])
    assert respect(same, recipe, set()).why == "auto chooses ddp: fits"


def _rank(rank: int, store: str, out: str) -> None:
    import os

    import torch.distributed as dist

    from gradwise.facts import world_size

    os.environ["WORLD_SIZE"] = "5"  # the initialised group wins over the environment
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if rank == 0:
            torch.save({"world_size": world_size()}, out)
        dist.barrier()  # both ranks done before either tears gloo down (else an abort at exit)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_world_size_of_an_initialised_process_group(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "out.pt"
    mp.spawn(_rank, args=(tempfile.mktemp(dir=tmp_path), str(out)), nprocs=2)
    assert torch.load(out, weights_only=True) == {"world_size": 2}
