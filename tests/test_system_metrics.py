"""System metrics (gradwise.tracking.system): throughput, CPU use and memory of this process, never an error."""

from __future__ import annotations

import time

import torch

from gradwise.tracking.system import SystemMetrics


def test_throughput_per_rank_and_no_division_by_zero():
    system = SystemMetrics("cpu")
    assert system.sample(100, 2.0)["sys/samples_per_s"] == 50.0
    metrics = system.sample(10, 0.0)  # a log step right after the last: no rate, no error
    assert "sys/samples_per_s" not in metrics
    assert "sys/rss_mb" in metrics
    assert all(isinstance(v, float) for v in metrics.values())
    assert not any(k.startswith("sys/cuda") for k in metrics)


def test_resident_memory_follows_a_large_allocation():
    system = SystemMetrics()
    before = system.sample(0, 1.0)["sys/rss_mb"]
    block = torch.ones(32 * 2**20 // 4)  # 32 MB, every page written
    after = system.sample(0, 1.0)
    assert after["sys/rss_mb"] - before > 24, (before, after)
    assert after["sys/peak_rss_mb"] >= after["sys/rss_mb"] * 0.9
    del block


def test_cpu_percent_is_the_process_cpu_time_since_the_last_sample():
    system = SystemMetrics("cpu")
    system.sample(0, 1.0)
    time.sleep(0.3)
    idle = system.sample(0, 0.3)["sys/cpu_percent"]
    end = time.monotonic() + 0.3
    n = 0
    while time.monotonic() < end:  # one busy Python thread
        n += 1
    busy = system.sample(0, 0.3)["sys/cpu_percent"]
    assert idle < 20 and busy > 40, (idle, busy)  # a busy core is 100 (shared machines: less)


def test_a_device_without_cuda_or_a_bad_value_never_raises():
    cuda = SystemMetrics("cuda")  # this CPU-only test machine: no CUDA counters, no error
    metrics = cuda.sample(8, 0.5)
    assert metrics["sys/samples_per_s"] == 16.0
    if not torch.cuda.is_available():
        assert not any(k.startswith("sys/cuda") for k in metrics)
    else:
        assert metrics["sys/cuda_mem_mb"] >= 0 and "sys/cuda_reserved_mb" in metrics
    for bad in ("not-a-device", object(), 3.5):
        assert "sys/rss_mb" in SystemMetrics(bad).sample(1, 1.0)
    assert "sys/samples_per_s" not in SystemMetrics().sample(None, 1.0)  # type: ignore[arg-type]
