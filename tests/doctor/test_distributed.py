"""The Doctor under torch.distributed: real 2-process gloo runs on the CPU, DDP and FSDP2.

Each test starts two processes the way torchrun does (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
running this file as a script; each rank trains a tiny MLP on its half of every global batch with
Doctors attached and writes what they saw (findings, series, what it printed) to JSON. The test
process compares that with one process training on the whole global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

WORLD = 2
STEPS = 24
SAMPLE = 4  # the Doctor's sample_every
GLOBAL_BATCH = 16
LR = 0.1


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 3-class problem with standardised inputs: STEPS global batches."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 2
    y = torch.arange(STEPS * GLOBAL_BATCH) % 3
    y = y[torch.randperm(len(y), generator=g)]
    x = centers[y] + torch.randn(len(y), 8, generator=g)
    return (x - x.mean(0)) / x.std(0), y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
    )


class _Scaled(nn.Module):
    """The MLP with a rank-dependent buffer that scales its output (a desync DDP does not fix
    when broadcast_buffers=False)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.net = _model()
        self.register_buffer("temperature", torch.tensor(1.0 + 0.1 * rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) / self.temperature


def _batch(step: int, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``, or rank ``rank``'s half of it."""
    x, y = _data()
    lo = step * GLOBAL_BATCH
    if rank is None:
        return x[lo : lo + GLOBAL_BATCH], y[lo : lo + GLOBAL_BATCH]
    half = GLOBAL_BATCH // WORLD
    lo += rank * half
    return x[lo : lo + half], y[lo : lo + half]


# -- what each rank runs --------------------------------------------------------------------------


def _train(doctors, engine, opt, rank, *, zero_grad=True, plant=None, total_norm=None):
    """A plain loop: every rank steps every Doctor at every step; ``plant`` is a fault planted
    on rank 1 (a NaN loss given to the Doctor, a weight changed after the optimizer step)."""
    for step in range(STEPS):
        x, y = _batch(step, rank)
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        out = engine(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        norm = total_norm() if total_norm is not None else None
        planted = (plant or {}).get if rank == 1 else {}.get
        for i, d in enumerate(doctors):
            given = loss.detach()
            if planted("nan_loss_at") == step:
                given = torch.tensor(float("nan"))
            if planted("bad_grad_norm_at") == step:  # the Doctor's own check fails on rank 1
                norm = "not a number"
            d.step(given, inputs=x, outputs=out, targets=y, grad_norm=norm if i else None)
        opt.step()
        if planted("perturb_at") == step:
            with torch.no_grad():  # a parameter changed on one rank, outside DDP
                engine.module[2].weight.add_(1e-3)


def _summary(doctor) -> dict:
    t = doctor.telemetry()
    return {
        "findings": [f.to_dict() for f in doctor.findings],
        "loss": t["loss"],
        "grad_norm": t["grad_norm"],
        "layer_grad_norm": t["layer_grad_norm"],
        "update_ratio": t["update_ratio"],
        "cosines": list(doctor._cosines),
        "rank": doctor.rank,
        "world_size": doctor.world_size,
    }


def _ddp_phases(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradwise.doctor import Doctor

    out = {}
    # healthy: one Doctor on the DDP wrapper, one on the module inside it (as the Trainer does)
    model = _model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    outer = Doctor(ddp, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE)
    inner = Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE)
    _train([outer, inner], ddp, opt, rank)
    outer.sync(), inner.sync()
    out["healthy_outer"], out["healthy_inner"] = _summary(outer), _summary(inner)
    outer.close(), inner.close()
    # zero_grad() forgotten under DDP: GW202 must still be found (the check was not just muted)
    model = _model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    stale = Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE, on_finding=None)
    _train([stale], ddp, opt, rank, zero_grad=False)
    out["stale"] = _summary(stale)
    stale.close()
    # rank 1 changes a weight outside DDP after step 9
    model = _model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    desync = Doctor(ddp, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE)
    _train([desync], ddp, opt, rank, plant={"perturb_at": 9})
    out["desync"] = _summary(desync)
    desync.close()
    # rank 1 reports a NaN loss at step 6, the other rank's losses are finite
    model = _model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    nan = Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE, on_finding=None)
    _train([nan], ddp, opt, rank, plant={"nan_loss_at": 6})
    out["nan"] = _summary(nan)
    nan.close()
    # a buffer that differs by rank and that DDP does not broadcast; the Doctor on the inner module
    model = _Scaled(rank)
    ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    buffer = Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE, on_finding=None)
    _train([buffer], ddp, opt, rank)
    out["buffer"] = _summary(buffer)
    buffer.close()
    # a check of rank 1's own Doctor raises at step 5: a warning there, the exchanges go on
    model = _model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    doctors = [Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(doctors, ddp, opt, rank, plant={"bad_grad_norm_at": 5})
        doctors[0].sync(), doctors[1].sync()
    out["failing"] = _summary(doctors[1])
    out["failing"]["warnings"] = [str(w.message) for w in caught]
    return out


def _fsdp_phases(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    from gradwise.doctor import Doctor

    model = _model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    own = Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE)
    given = Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE)

    def total_norm():  # what clipping computes: a replicated DTensor
        return nn.utils.get_total_norm([p.grad for p in model.parameters()])

    _train([own, given], model, opt, rank, total_norm=total_norm)
    own.sync(), given.sync()
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    return {"own": _summary(own), "given": _summary(given), "sharded": sharded}


def _worker(scenario: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    try:
        result = _ddp_phases(rank) if scenario == "ddp" else _fsdp_phases(rank)
        dist.barrier()  # both ranks done before either tears gloo down (else an abort at exit)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


# -- the tests ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, tmp: Path) -> tuple[list[dict], list[str]]:
    """Run ``scenario`` on 2 ranks; each rank's JSON result and its stderr."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, scenario, str(tmp)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=90)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)], errs


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[list[dict], list[str]]:
    return _launch("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[list[dict], list[str]]:
    return _launch("fsdp", tmp_path_factory.mktemp("fsdp"))


def _reference() -> dict:
    """One process on the whole global batch: its Doctor's series, and the weights before every
    optimizer step (for the update ratios)."""
    from gradwise.doctor import Doctor

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    doctor = Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=SAMPLE, on_finding=None)
    weights = []
    for step in range(STEPS):
        x, y = _batch(step, None)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        doctor.step(loss, inputs=x, outputs=out, targets=y)
        opt.step()
    summary = _summary(doctor)
    summary["weights"] = weights
    return summary


def _values(pairs: list) -> torch.Tensor:
    return torch.tensor([v for _, v in pairs], dtype=torch.float64)


def test_a_healthy_ddp_run_has_no_findings_and_the_single_process_statistics(ddp_run):
    results, errs = ddp_run
    ref = _reference()
    assert ref["findings"] == []
    for rank, res in enumerate(results):
        for key in ("healthy_outer", "healthy_inner"):
            doc = res[key]
            assert (doc["rank"], doc["world_size"]) == (rank, WORLD)
            assert doc["findings"] == [], (rank, key, doc["findings"])
            # the GW202 check ran at every sampled step on the all-reduced gradient, and agreed
            assert len(doc["cosines"]) == STEPS // SAMPLE
            assert min(doc["cosines"]) > 0.999999
            # loss: the mean over the ranks = the global batch's; the norm of the averaged gradient
            assert len(doc["loss"]) == STEPS
            torch.testing.assert_close(
                _values(doc["loss"]), _values(ref["loss"]), rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(
                _values(doc["grad_norm"]), _values(ref["grad_norm"]), rtol=1e-5, atol=1e-6
            )
    # the only line any rank printed is the desync phase's GW210, on rank 0
    printed = [line for line in errs[0].splitlines() if "gradwise doctor" in line]
    assert len(printed) == 1 and "GW210" in printed[0]


def test_ddp_still_finds_gradients_that_are_never_zeroed(ddp_run):
    results, _ = ddp_run
    for res in results:
        codes = [f["code"] for f in res["stale"]["findings"]]
        assert "GW202" in codes and "GW210" not in codes


def test_a_rank_whose_weights_drift_is_gw210_naming_the_rank_and_the_parameter(ddp_run):
    results, errs = ddp_run
    for res in results:
        found = {f["code"]: f for f in res["desync"]["findings"]}
        assert "GW210" in found, res["desync"]["findings"]
        f = found["GW210"]
        assert f["severity"] == "error" and f["name"] == "ranks-out-of-sync"
        assert f["step"] == 12  # the first sampled step after the change at step 9
        assert "rank 1 holds a different model from rank 0, first at 2.weight" in f["message"]
        assert f["evidence"]["rank"] == 1.0 and f["evidence"]["world_size"] == 2.0
        assert any("broadcast_buffers" in fix for fix in f["fixes"])
    # reported once: rank 0 prints, rank 1 keeps silent
    assert errs[0].count("GW210 ranks-out-of-sync") == 1
    assert "gradwise doctor" not in errs[1]


def test_a_rank_dependent_buffer_is_gw210_from_the_first_step(ddp_run):
    results, _ = ddp_run
    for res in results:
        found = {f["code"]: f for f in res["buffer"]["findings"]}
        assert set(found) == {"GW210"}, res["buffer"]["findings"]
        assert found["GW210"]["step"] == 0
        assert (
            "rank 1 holds a different model from rank 0, first at temperature"
            in (found["GW210"]["message"])
        )


def test_a_rank_with_a_non_finite_loss_is_named(ddp_run):
    results, _ = ddp_run
    for res in results:
        found = {f["code"]: f for f in res["nan"]["findings"]}
        assert "GW210" in found and "GW301" in found, res["nan"]["findings"]
        assert "not finite on rank 1" in found["GW210"]["message"]
        assert found["GW210"]["step"] == 8  # the sampled step after step 6
        assert found["GW301"]["evidence"]["step_first_seen"] == 6.0
        losses = [v for _, v in res["nan"]["loss"]]
        assert losses[6] != losses[6]  # the ranks' mean is NaN at that step


def test_a_check_failing_on_one_rank_skips_no_exchange(ddp_run):
    results, _ = ddp_run
    failing = [res["failing"] for res in results]
    assert any("gradient norm failed" in w for w in failing[1]["warnings"])
    assert not any("gradwise doctor" in w for w in failing[0]["warnings"])
    for doc in failing:  # both ranks exchanged at every sampled step and agree
        assert len(doc["loss"]) == STEPS and doc["findings"] == []
        assert doc["loss"] == failing[0]["loss"]
        norms = _values(doc["grad_norm"])
        assert norms[5].isnan() and norms[[4, 6]].isfinite().all()  # rank 1's step 5 is unknown


def test_the_rule_compares_steps_then_weights_then_losses():
    from gradwise.doctor.rules.model import ranks_out_of_sync

    same = [[4.0, 1.0, 2.0], [4.0, 1.0, 2.0]]
    assert ranks_out_of_sync([3, 3], ["w"], same, [True, True]) is None
    message, evidence = ranks_out_of_sync([3, 4], ["w"], same)
    assert "rank 1 is at step 4 while rank 0 is at step 3" in message
    message, evidence = ranks_out_of_sync(
        [3, 3, 3], ["a", "b"], [[4, 1, 2, 4, 1, 2]] * 2 + [[4, 1, 2, 4, 1.01, 2]]
    )
    assert "rank 2 holds a different model from rank 0, first at b" in message
    assert evidence["rank"] == 2 and evidence["relative_difference"] > 1e-3
    nan = [[4.0, float("nan"), float("nan")]] * 2  # both diverged alike: not out of sync
    assert ranks_out_of_sync([3, 3], ["w"], nan) is None
    rounding = [[4.0, 1.0, 2.0], [4.0, 1.0 + 1e-9, 2.0]]
    assert ranks_out_of_sync([3, 3], ["w"], rounding) is None
    message, evidence = ranks_out_of_sync([3, 3], None, None, [True, False])
    assert "not finite on rank 1" in message and evidence["nonfinite_ranks"] == 1
    assert ranks_out_of_sync([3, 3], None, None, [False, False]) is None  # GW301's, not a desync


def test_process_group_is_checked_and_a_single_process_exchanges_nothing():
    from gradwise.doctor import Doctor
    from gradwise.errors import ConfigError

    with pytest.raises(ConfigError, match="process_group"):
        Doctor(_model(), process_group="world")
    doctor = Doctor(_model(), on_finding=None)
    assert (doctor.rank, doctor.world_size, doctor._exchange) == (0, 1, None)
    assert doctor.sync() == []


def test_fsdp2_on_the_cpu_gives_no_findings_and_the_global_statistics(fsdp_run):
    results, errs = fsdp_run
    ref = _reference()
    for res in results:
        assert res["sharded"]  # fully_shard ran: every parameter is a DTensor
        for key in ("own", "given"):
            doc = res[key]
            assert doc["findings"] == [], (key, doc["findings"])
            torch.testing.assert_close(
                _values(doc["loss"]), _values(ref["loss"]), rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(
                _values(doc["grad_norm"]), _values(ref["grad_norm"]), rtol=1e-5, atol=1e-6
            )
            # per-layer gradient norms relative to the weights, over both ranks' shards
            assert set(doc["layer_grad_norm"]) == set(ref["layer_grad_norm"]) == {"0", "2", "4"}
            for layer, pairs in doc["layer_grad_norm"].items():
                torch.testing.assert_close(
                    _values(pairs), _values(ref["layer_grad_norm"][layer]), rtol=1e-5, atol=1e-7
                )
            # update ratios of the step before each sampled step, from the single-process weights
            w = ref["weights"]
            for layer, pairs in doc["update_ratio"].items():
                assert [s for s, _ in pairs] == list(range(SAMPLE, STEPS, SAMPLE))
                for s, value in pairs:
                    keys = [k for k in w[s] if k.startswith(f"{layer}.")]
                    new = torch.cat([w[s][k].flatten() for k in keys]).double()
                    old = torch.cat([w[s - 1][k].flatten() for k in keys]).double()
                    expected = float((new - old).norm() / old.norm())
                    assert value == pytest.approx(expected, rel=1e-4)
    assert "gradwise doctor" not in errs[0] + errs[1]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
