"""System metrics for the training log: throughput, process memory and CPU, device memory and use.

    system = SystemMetrics(device)
    ...
    record.update(system.sample(samples_since_last, seconds))  # {"sys/samples_per_s": ..., ...}

Every value is cheap to read (no device synchronisation, no subprocess): the process's resident
memory from /proc (psutil where there is no /proc, else the peak from ``resource``), its CPU time
from ``os.times``, CUDA's allocator counters, and the device's utilisation through NVML when pynvml
is installed. A query that fails is dropped from then on; ``sample`` never raises.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from typing import Any

MB = 2**20


class SystemMetrics:
    """Samples this process's system metrics; keys start with ``sys/`` (see :meth:`sample`)."""

    def __init__(self, device: Any = None) -> None:
        """device: the training device (a ``torch.device`` or string; None or "cpu": the CPU)."""
        self.device = _device(device)
        self._clock = time.monotonic()
        self._cpu = _cpu_seconds()
        self._failed: set[str] = set()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._statm = os.path.exists("/proc/self/statm")
        self._nvml = (
            self.device is not None
            and self.device.type == "cuda"
            and importlib.util.find_spec("pynvml") is not None
        )

    def sample(self, samples_since_last: int, seconds: float) -> dict[str, float]:
        """Metrics since the previous call (or since construction).

        samples_since_last and seconds: the samples this rank processed and the wall time they
        took, giving ``sys/samples_per_s`` (per rank). Also ``sys/cpu_percent`` (the process's
        CPU time over wall time, 100 per busy core; ``os.times`` counts 10 ms ticks, so it means
        something over a tenth of a second or more), ``sys/rss_mb`` (resident memory now) and
        ``sys/peak_rss_mb``; on CUDA ``sys/cuda_mem_mb`` (allocated by tensors),
        ``sys/cuda_max_mem_mb`` (the peak since the start or the last reset),
        ``sys/cuda_reserved_mb`` (held by the caching allocator) and, with pynvml,
        ``sys/cuda_util_percent``; on MPS ``sys/mps_mem_mb``.
        """
        out: dict[str, float] = {}
        try:
            rate = samples_since_last / seconds if seconds and seconds > 0 else None
            if rate is not None and math.isfinite(rate) and rate >= 0:
                out["sys/samples_per_s"] = float(rate)
        except (TypeError, ZeroDivisionError):
            pass
        self._guarded("cpu", self._cpu_percent, out)
        self._guarded("rss", self._rss, out)
        if self.device is not None and self.device.type == "cuda":
            self._guarded("cuda", self._cuda, out)
            if self._nvml:
                self._guarded("nvml", self._utilisation, out)
        elif self.device is not None and self.device.type == "mps":
            self._guarded("mps", self._mps, out)
        return out

    def _guarded(self, key: str, query: Any, out: dict[str, float]) -> None:
        if key in self._failed:
            return
        try:
            query(out)
        except Exception:  # a metric is never worth a failed training step
            self._failed.add(key)

    def _cpu_percent(self, out: dict[str, float]) -> None:
        now, cpu = time.monotonic(), _cpu_seconds()
        wall = now - self._clock
        if wall > 0:
            out["sys/cpu_percent"] = 100.0 * (cpu - self._cpu) / wall
        self._clock, self._cpu = now, cpu

    def _rss(self, out: dict[str, float]) -> None:
        if self._statm:
            with open("/proc/self/statm", "rb") as f:
                out["sys/rss_mb"] = int(f.read().split()[1]) * self._page / MB
        elif "psutil" in sys.modules or importlib.util.find_spec("psutil") is not None:
            import psutil

            out["sys/rss_mb"] = psutil.Process().memory_info().rss / MB
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["sys/peak_rss_mb"] = peak / (MB if sys.platform == "darwin" else 1024)  # KiB
        except (ImportError, OSError, ValueError):
            pass

    def _cuda(self, out: dict[str, float]) -> None:
        import torch

        device = self.device
        out["sys/cuda_mem_mb"] = torch.cuda.memory_allocated(device) / MB
        out["sys/cuda_max_mem_mb"] = torch.cuda.max_memory_allocated(device) / MB
        out["sys/cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / MB

    def _utilisation(self, out: dict[str, float]) -> None:
        import torch

        out["sys/cuda_util_percent"] = float(torch.cuda.utilization(self.device))

    def _mps(self, out: dict[str, float]) -> None:
        import torch

        out["sys/mps_mem_mb"] = torch.mps.current_allocated_memory() / MB


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _device(device: Any) -> Any:
    """The device as a ``torch.device`` (CUDA with its index); None for the CPU, a device this
    machine lacks, or a value that is not a device."""
    if device is None:
        return None
    try:
        import torch

        d = torch.device(device)
        if d.type == "cuda" and not torch.cuda.is_available():
            return None  # its counters would read 0, as if a device were there and empty
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        return None if d.type == "cpu" else d
    except (RuntimeError, TypeError, ValueError, AssertionError):
        return None
