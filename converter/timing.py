"""Timing on the GPU done one way everywhere: warm-up, CUDA events, median and p90.

Every benchmark in sparsecnn times through `time_fn`, so numbers from different commands
are comparable. On CPU it falls back to a monotonic clock.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    min_ms: float
    reps: int
    samples_ms: list[float]

    def to_dict(self, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        return d


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    size = torch.cuda.get_device_properties(device).L2_cache_size
    return torch.empty(max(2 * size, 1 << 20) // 4, dtype=torch.float32, device=device)


def time_fn(fn: Callable[[int], object], device: torch.device | str, reps: int = 100, warmup: int = 10,
            flush_l2: bool = False) -> Timing:
    """Time `fn(i)` (i = repetition index, for rotating inputs) `reps` times after `warmup` calls.

    On CUDA each repetition is bracketed by its own events, so the median excludes host
    gaps between repetitions; with `flush_l2` a buffer twice the L2 size is overwritten
    before each repetition (outside the timed region), so weights come from DRAM.
    """
    device = torch.device(device)
    for i in range(warmup):
        fn(i)
    samples = []
    if device.type == "cuda":
        flush = _l2_flush_buffer(device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize(device)
        for i in range(reps):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - t0) * 1e3)
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return Timing(statistics.median(ordered), p90, ordered[0], reps, samples)
