"""What `sparsecnn bench` and the GPU studies (scripts/studies/*.py) share, once.

- `environment(device)`: the card, driver and versions a number needs beside it;
- `dense_engines` + `best_dense`: the denominator of every speedup claim, the best dense
  engine -- the torch runtime with dense_conv=best (per layer the fastest of cuDNN NCHW / NHWC
  and im2col + cuBLAS, runtimes/torch/dense_conv.py), whole network in one CUDA graph, and of
  the dense engines timed in the same run the fastest;
- `study_parser`: every study's --out and --dry-run, and its module docstring as --help;
- `error_record`: what a failed part of a study leaves in its results, so one failure is
  recorded and the other parts still run;
- the error measure is `sparsecnn.common.numerics.rel_err` (re-exported here for the studies).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import traceback
from typing import Any, Mapping

import torch

from ..common.numerics import rel_err

__all__ = ["study_parser", "environment", "dense_engines", "best_dense", "fastest", "error_record", "rel_err", "DENSE_LAYOUTS"]


def study_parser(doc: str | None, out: str = "out", writes: str | None = None,
                 dry_run: str | None = None) -> argparse.ArgumentParser:
    """A study's command line: its docstring as --help, --out (the folder `writes` names what goes
    into) and, where the study has one, --dry-run (what the CPU stand-in run checks)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out, help=f"folder for {writes}" if writes else f"results folder (default {out})")
    if dry_run:
        ap.add_argument("--dry-run", action="store_true", help=dry_run)
    return ap


def environment(device: torch.device | str, modules: tuple[str, ...] = ()) -> dict:
    """Card, driver and versions: what a number needs beside it to mean anything.

    `modules`: further importable modules whose versions the study depends on
    (e.g. "cuda.bindings", "MinkowskiEngine"); a missing one is reported, never raised.
    """
    import importlib
    import importlib.metadata as md

    device = torch.device(device)
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "device": str(device), "cpu": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for pkg in ("sparsecnn", "onnx", "onnxruntime", "numpy", "matplotlib"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    for mod in modules:
        try:
            env[mod] = getattr(importlib.import_module(mod), "__version__", "present")
        except Exception as exc:  # noqa: BLE001 -- an environment report never fails
            env[mod] = f"missing ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), l2_bytes=getattr(props, "L2_cache_size", None))
        try:
            q = subprocess.run(["nvidia-smi", f"--id={device.index or 0}",
                                "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu",
                                "--format=csv,noheader"], capture_output=True, encoding="utf-8", errors="replace", timeout=20)
            fields = [f.strip() for f in q.stdout.strip().split(",")]
            if q.returncode == 0 and len(fields) == 5:
                env.update(driver=fields[0], sm_clock=fields[1], sm_clock_max=fields[2], power_limit=fields[3],
                           temperature_c=fields[4])
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["card"] = f"CPU ({env['cpu']})"
        env["driver"] = None
    return env


# Activation layouts the best dense engine is built in; its per-layer choice runs inside each.
DENSE_LAYOUTS = ("NCHW", "NHWC")


def dense_engines(model, device, options: Mapping | None = None, layouts: tuple[str, ...] = DENSE_LAYOUTS) -> dict:
    """The candidates for the best dense engine of `model`, one per activation layout.

    Each is the torch runtime with dense_conv=best under `options` (dtype, tf32, cuda_graph...)
    and channels_last set by the layout; time them in the same run and take `best_dense`.
    """
    from ..runtimes import compile_engine, get_runtime

    rt = get_runtime("torch")
    options = dict(options or {})
    extra = {**options.pop("extra", {}), "dense_conv": "best"}
    return {layout: compile_engine(rt, model, device, {**options, "channels_last": layout == "NHWC", "extra": extra})
            for layout in layouts}


def fastest(times: Mapping[str, float | None]) -> tuple[str | None, float | None]:
    """(label, ms) of the fastest timed candidate; untimed (None) ones are skipped; (None, None) if none."""
    timed = {k: v for k, v in times.items() if v is not None and v > 0}
    if not timed:
        return None, None
    label = min(timed, key=timed.get)
    return label, timed[label]


def best_dense(times: Mapping[str, float | None]) -> tuple[str | None, float | None]:
    """The best dense engine: the fastest of the dense engines timed in this run, (label, ms)."""
    return fastest(times)


def error_record(exc: BaseException, where: str | None = None, trace_chars: int = 3000) -> dict:
    """A failed part's record: where, the error in one line, the traceback's tail ."""
    rec = {"where": where} if where else {}
    rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-trace_chars:]
    return rec
