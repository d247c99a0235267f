"""Running an engine over its inputs batch by batch, and timing it the way trtexec does.

`run_batches` feeds an engine one batch at a time (a folder of any size takes one batch of
memory), hands each batch's outputs to the printer and to an `NpzWriter` as they come, and
shows a progress bar. `time_engine` times the engine alone on one batch through
`runtimes.timing` (warm-up, then per-call samples), and `timing_lines` states min / median /
mean / p90 / p99 and throughput, with a warning when the spread makes them meaningless.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..common.fileio import atomic_path, check_output
from ..runtimes.timing import Timing, auto_reps, percentile, time_fn

# Images per batch when `run` reads a folder without --batch: enough to keep a GPU busy, little host
# memory. Measured (2-core CPU, torch 2.14.1, `run resnet18 --device cpu --input` 500 JPEGs at 224x224,
# /usr/bin/time -v): peak RSS 12.0 GiB as one batch, 1.73 GiB at 32 (1.09 at 1, 1.21 at 8); importing
# torch, torchvision and onnx alone is 0.79 GiB, and the executor holds a batch's every intermediate.
FOLDER_BATCH = 32
# --timing without --iterations: repetitions that last about this long (at least 10).
TIMING_BUDGET_MS = 3000.0
# (p90 - min) / median above this and the numbers say more about the machine than the model.
NOISY_SPREAD = 0.10


class NpzWriter:
    """An .npz filled batch by batch. Each array grows in its own .npy part in a hidden folder beside
    the target (memory: one batch); `commit` packs the parts into the target atomically. Without
    `commit` (an error, an interrupt) the parts are removed and the target is left as it was."""

    def __init__(self, path: str | Path, rows: int):
        self.path = check_output(path)
        self.rows = rows
        folder = self.path.parent if str(self.path.parent) else Path(".")
        self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".parts", dir=folder))
        self._parts: dict[str, list] = {}  # name -> [open file, rows written, row shape, dtype]

    def add(self, name: str, rows: np.ndarray) -> None:
        part = self._parts.get(name)
        if part is None:
            f = open(self._dir / f"{len(self._parts)}.npy", "wb")
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(rows.dtype),
                                                     "fortran_order": False, "shape": (self.rows, *rows.shape[1:])})
            part = self._parts[name] = [f, 0, rows.shape[1:], rows.dtype]
        f, done, shape, dtype = part
        if rows.shape[1:] != shape or rows.dtype != dtype or done + len(rows) > self.rows:
            raise ValueError(f"npz array '{name}': rows {rows.shape}/{rows.dtype} after {done} of {self.rows} "
                             f"rows of {shape}/{dtype}")
        f.write(np.ascontiguousarray(rows).tobytes())
        part[1] += len(rows)

    def commit(self) -> None:
        for name, (f, done, _, _) in self._parts.items():
            f.close()
            if done != self.rows:
                raise ValueError(f"npz array '{name}' has {done} of its {self.rows} rows")
        with atomic_path(self.path) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for i, name in enumerate(self._parts):  # np.savez's member names
                    z.write(self._dir / f"{i}.npy", arcname=f"{name}.npy")

    def close(self) -> None:
        for f, *_ in self._parts.values():
            f.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class OutputStats:
    """min / mean / max and shape of one output over every batch (what `run` prints for non-classifiers)."""

    shape: list[int] = field(default_factory=list)
    lo: float = float("inf")
    hi: float = float("-inf")
    total: float = 0.0
    count: int = 0

    def add(self, o: torch.Tensor) -> None:
        self.shape = [(self.shape[0] if self.shape else 0) + o.shape[0], *o.shape[1:]]
        self.lo, self.hi = min(self.lo, float(o.min())), max(self.hi, float(o.max()))
        self.total += float(o.double().sum())
        self.count += o.numel()

    def line(self, name: str) -> str:
        return f"{name}: shape {self.shape}, min {self.lo:.4g}, mean {self.total / max(self.count, 1):.4g}, max {self.hi:.4g}"


@dataclass
class RunStats:
    images: int = 0
    batches: int = 0
    first_ms: float = 0.0  # the first batch's call: includes the engine's plan for its shape
    rest_s: float = 0.0  # every later batch, reading its images included
    first_input: torch.Tensor | None = None  # what --timing times the engine on
    outputs: dict[str, OutputStats] = field(default_factory=dict)


def run_batches(engine, batches: Iterable[tuple[list | None, torch.Tensor]], total: int, *,
                fixed_batch: int | None = None, writer: NpzWriter | None = None, save_inputs: bool = False,
                lines: Callable[[list | None, int, tuple[torch.Tensor, ...]], list[str]] | None = None,
                progress: bool = True) -> RunStats:
    """Run `engine` on each (files or None, batch) of `batches` (`total` rows in all). A batch smaller
    than the model's fixed batch is padded with zeros and its outputs cut. `lines(files, first row,
    outputs)` gives what to print per batch; outputs (and with `save_inputs` the inputs) go to `writer`."""
    from tqdm import tqdm

    stats = RunStats()
    bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
               disable=True if not progress or total <= 1 else None)  # None: shown where stderr is a terminal
    say = (lambda s: tqdm.write(s, file=sys.stdout)) if not bar.disable else print
    t_rest = None
    try:
        for files, x in batches:
            n = x.shape[0]
            feed = x
            if fixed_batch is not None and n < fixed_batch:
                feed = torch.cat([x, x.new_zeros(fixed_batch - n, *x.shape[1:])])
            t0 = time.perf_counter()
            outputs = tuple(o[:n] for o in engine(feed))
            if stats.batches == 0:
                stats.first_ms = (time.perf_counter() - t0) * 1e3
                stats.first_input = feed
                t_rest = time.perf_counter()
            for name, o in zip(engine.output_names, outputs):
                stats.outputs.setdefault(name, OutputStats()).add(o)
                if writer is not None:
                    writer.add(name, o.detach().cpu().numpy())
            if writer is not None and save_inputs:
                writer.add(engine.input_names[0], x.detach().cpu().numpy())
            for s in (lines(files, stats.images, outputs) if lines else []):
                say(s)
            stats.images += n
            stats.batches += 1
            bar.update(n)
    finally:
        bar.close()
    stats.rest_s = time.perf_counter() - t_rest if t_rest is not None and stats.batches > 1 else 0.0
    return stats


def topk_lines(logits: torch.Tensor, k: int, names: list[str], labels: tuple[str, ...] | None) -> list[str]:
    """'<name>: <class> <probability>, ...' per row, the `k` likeliest classes first."""
    probs = torch.softmax(logits, dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [f"{who}: " + ", ".join(f"{labels[c] if labels else c} {p:.3f}"
                                   for p, c in zip(top.values[i].tolist(), top.indices[i].tolist()))
            for i, who in enumerate(names)]


def time_engine(engine, x: torch.Tensor, warmup: int = 10, iterations: int | None = None) -> Timing:
    """The engine alone on `x` (prepared once; on GPU its CUDA-graph replays), after `warmup` calls;
    `iterations` samples, or as many as fill TIMING_BUDGET_MS. Per-call samples in `samples_ms`."""
    xs = engine.prepare(x)
    with torch.no_grad(), engine._precision_context():
        runner = engine.runner(*xs)
        run = (lambda i: runner.replay()) if hasattr(runner, "replay") else (lambda i: runner(*xs))
        reps = iterations or auto_reps(run, engine.device, TIMING_BUDGET_MS, lo=10, hi=1000)
        return time_fn(run, engine.device, reps=reps, warmup=warmup)


def timing_lines(t: Timing, batch: int, warmup: int) -> list[str]:
    """trtexec's summary of a timing: the samples' spread, throughput, and a warning when it is noisy."""
    s = t.samples_ms
    mean = statistics.fmean(s)
    images_s = batch * len(s) / (sum(s) / 1e3) if sum(s) > 0 else float("inf")
    out = [f"timing ({t.how}, batch {batch}): {warmup} warm-up, {len(s)} iterations; min {t.min_ms:.3f}, median "
           f"{t.median_ms:.3f}, mean {mean:.3f}, p90 {t.p90_ms:.3f}, p99 {percentile(s, 0.99):.3f} ms; "
           f"throughput {images_s:.1f} images/s"]
    spread = (t.p90_ms - t.min_ms) / t.median_ms if t.median_ms > 0 else 0.0
    if spread > NOISY_SPREAD:
        out.append(f"warning: the samples spread {spread:.0%} ((p90 - min) / median, over {NOISY_SPREAD:.0%}): "
                   "other load, clock changes or a CPU make these numbers unfit to compare; rerun on a quiet "
                   "machine or with more --iterations")
    return out
