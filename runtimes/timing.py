"""Timing on the GPU done one way everywhere: warm-up, CUDA events, median and p90.

Every benchmark in sparsecnn times through `time_fn`, so numbers from different commands
are comparable. On CPU it falls back to a monotonic clock.

`time_calls` is `time_fn` for work shorter than the host's launch cost (one layer, one
GEMM at batch 1: 2-50 us, while a Python-level launch costs about 10 us): the call is
captured in a CUDA graph, several times in a row when one is too short to keep the GPU
busy, and the replays are timed; samples are per call.
"""
from __future__ import annotations

import math
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
    inner: int = 1  # calls per timed sample (time_calls); every number above is per call
    how: str = ""   # "cuda-events", "cpu-clock" or "graph" (time_calls' CUDA-graph replays)

    def to_dict(self, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        return d


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    size = torch.cuda.get_device_properties(device).L2_cache_size
    return torch.empty(max(2 * size, 1 << 20) // 4, dtype=torch.float32, device=device)


def time_fn(fn: Callable[[int], object], device: torch.device | str, reps: int = 100, warmup: int = 10,
            flush_l2: bool = False, warmup_ms: float = 30.0) -> Timing:
    """Time `fn(i)` (i = repetition index, for rotating inputs) `reps` times after warm-up.

    Warm-up is `warmup` calls and at least `warmup_ms` of device work, so an idle GPU has
    raised its clocks before the first timed repetition (short configurations otherwise
    read slow in whichever pass comes first).

    On CUDA each repetition is bracketed by its own events, so the median excludes host
    gaps between repetitions; with `flush_l2` a buffer twice the L2 size is overwritten
    before each repetition (outside the timed region), so weights come from DRAM.
    """
    device = torch.device(device)
    for i in range(warmup):
        fn(i)
    if device.type == "cuda" and warmup_ms > 0:
        torch.cuda.synchronize(device)
        t_end = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < t_end:
            fn(0)
            torch.cuda.synchronize(device)
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
    return Timing(statistics.median(ordered), percentile(ordered, 0.9), ordered[0], reps, samples,
                  how="cuda-events" if device.type == "cuda" else "cpu-clock")


def auto_reps(fn: Callable[[int], object], device: torch.device | str, budget_ms: float, lo: int = 10,
              hi: int = 300, flush_l2: bool = False) -> int:
    """Repetitions that make one `time_fn` of `fn` last about `budget_ms` (clamped to [lo, hi]).

    Slow configurations (batch 32 at 30 ms a run) get fewer repetitions than fast ones
    (batch 1 at 0.4 ms), so a sweep's length is bounded without starving the fast ones.
    """
    probe = time_fn(fn, device, reps=3, warmup=1, flush_l2=flush_l2)
    return int(max(lo, min(hi, budget_ms / max(probe.median_ms, 1e-3))))


def percentile(samples: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `samples` by nearest rank: the rule of every p90 (and p99) reported here."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def pooled(timings: list[Timing]) -> tuple[float, float]:
    """(median, p90) over the samples of several timings of one configuration."""
    ordered = sorted(x for t in timings for x in t.samples_ms)
    return statistics.median(ordered), percentile(ordered, 0.9)


def spread(a: Timing, b: Timing) -> float:
    """Relative difference of two medians of the same configuration: |a - b| / min(a, b)."""
    lo = min(a.median_ms, b.median_ms)
    return abs(a.median_ms - b.median_ms) / lo if lo > 0 else 0.0


def time_calls(call: Callable[[int], object], device: torch.device | str, reps: int = 50, warmup: int = 5,
               flush_l2: bool = False, graph: bool = True, min_sample_ms: float = 0.25, max_inner: int = 64,
               min_inner: int = 1, warmup_ms: float = 30.0) -> Timing:
    """Time `call(j)` (j = call index, for rotating inputs) as CUDA-graph replays; per-call numbers.

    On CUDA (with `graph`) the call is captured into a graph `inner` times in a row, j = 0..inner-1,
    with `inner` chosen so one replay lasts at least `min_sample_ms` (at least `min_inner`, at most
    `max_inner`; 1 with `flush_l2`, so every call starts cold), and `time_fn` times the replays.
    Elsewhere, or if the call cannot be captured (a host synchronisation inside it), `time_fn`
    times `call` eagerly. Tensors the call reads must stay alive until this returns. `warmup_ms`
    goes to `time_fn` (a sweep of many short timings on a GPU kept busy can pass less).
    """
    device = torch.device(device)
    wkw = {} if warmup_ms == 30.0 else {"warmup_ms": warmup_ms}  # time_fn's default unless asked
    if device.type != "cuda" or not graph:
        return time_fn(call, device, reps=reps, warmup=warmup, flush_l2=flush_l2, **wkw)
    from .base import GraphReplay

    try:
        one = GraphReplay(lambda: call(0), (), warmup=2)
    except Exception:  # not capturable: eager timing is the honest fallback
        torch.cuda.synchronize(device)
        return time_fn(call, device, reps=reps, warmup=warmup, flush_l2=flush_l2, **wkw)
    inner = 1
    if not flush_l2:
        probe = time_fn(lambda i: one.replay(), device, reps=5, warmup=2, **wkw).median_ms
        inner = int(min(max_inner, max(min_inner, math.ceil(min_sample_ms / max(probe, 1e-4)))))
    if inner > 1:
        # call(0) ran in the single graph's warm-up (the other j only read other buffers):
        # capture at once, no more eager calls
        one = GraphReplay(lambda: [call(j) for j in range(inner)], (), warmup=0, first_call=False)
    replay = one
    t = time_fn(lambda i: replay.replay(), device, reps=reps, warmup=warmup, flush_l2=flush_l2, **wkw)
    samples = [s / inner for s in t.samples_ms]
    return Timing(t.median_ms / inner, t.p90_ms / inner, t.min_ms / inner, t.reps, samples, inner, "graph")


def time_interleaved(fns: dict[str, Callable[[int], object]], device: torch.device | str, reps: int = 100,
                     rounds: int = 5, warmup: int = 5) -> dict[str, Timing]:
    """Time several callables against each other: `rounds` rounds, each timing every callable
    for reps/rounds repetitions (the order rotating per round), samples pooled per callable.

    Used where two configurations are compared to decide or to claim "not slower": clock and
    thermal drift over the run then hits every candidate alike instead of whichever ran last.
    """
    names = list(fns)
    per = max(1, reps // rounds)
    runs: dict[str, list[Timing]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            runs[n].append(time_fn(fns[n], device, reps=per, warmup=warmup, warmup_ms=30.0 if r == 0 else 5.0))
    out = {}
    for n, ts in runs.items():
        median, p90 = pooled(ts)
        samples = [x for t in ts for x in t.samples_ms]
        out[n] = Timing(median, p90, min(samples), len(samples), samples, how=ts[0].how + ", interleaved")
    return out


def time_interleaved_calls(calls: dict[str, Callable[[int], object]], device: torch.device | str, reps: int = 30,
                           rounds: int = 3, min_sample_ms: float = 0.25, max_inner: int = 64) -> dict[str, Timing]:
    """`time_interleaved` for short calls (one layer): on CUDA each call is captured in a CUDA graph,
    several times in a row when one call is shorter than `min_sample_ms` (as `time_calls` does),
    and the replays are timed interleaved; per-call numbers. A call that cannot be captured is
    timed eagerly (and says so in `how`). Elsewhere the calls are timed eagerly, interleaved."""
    device = torch.device(device)
    if device.type != "cuda":
        return time_interleaved(calls, device, reps=max(rounds, reps), rounds=rounds, warmup=1)
    from .base import GraphReplay

    fns, inner = {}, {}
    for name, call in calls.items():
        try:
            one = GraphReplay(lambda call=call: call(0), (), warmup=2)
        except Exception:  # not capturable: eager timing is the honest fallback
            torch.cuda.synchronize(device)
            fns[name], inner[name] = call, 1
            continue
        probe = time_fn(lambda i, one=one: one.replay(), device, reps=5, warmup=2, warmup_ms=5.0).median_ms
        n = int(min(max_inner, max(1, math.ceil(min_sample_ms / max(probe, 1e-4)))))
        if n > 1:
            one = GraphReplay(lambda call=call, n=n: [call(j) for j in range(n)], (), warmup=0, first_call=False)
        fns[name], inner[name] = (lambda i, one=one: one.replay()), n
    timed = time_interleaved(fns, device, reps=reps, rounds=rounds, warmup=2)
    out = {}
    for name, t in timed.items():
        k = inner[name]
        out[name] = Timing(t.median_ms / k, t.p90_ms / k, t.min_ms / k, t.reps, [s / k for s in t.samples_ms], k,
                           ("graph" if k >= 1 and name in inner else "eager") + ", interleaved")
    return out
