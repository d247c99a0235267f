"""GEMM-level sweep: conv-as-GEMM shapes x sparsity, every method timed in the same run.

A conv layer as a GEMM is C[M, N] = W[M, K] @ B[K, N] with M = Cout, K = Cin*kh*kw,
N = H*W (batch 1). A *method* is a factory registered under a name:

    factory(weight: Tensor[M, K] (dense with zeros, on the device, fp32),
            dtype: torch.dtype) -> run(B: Tensor[K, N] of `dtype`) -> Tensor[M, N]

The factory does all one-time work (compression, handles, compilation); the sweep times
only `run`. Dense methods (cuBLAS in fp32 / TF32 / fp16) and sparse ones (cuSPARSE CSR,
sparsecnn's kernels) register the same way; plug-in modules listed in SWEEP_PLUGINS
register theirs on import.

The sweep (`run_sweep`, driven by `sparsecnn bench spmm`) runs each method in precision
regimes (converter/regimes.py): a method runs in METHOD_REGIMES[name], by default
fp32-cuda-core and fp16 (fp32 operands are given with TF32 off; the factory gets the
dtype). A factory that cannot handle a dtype raises (NotImplementedError or anything
else): the row records the error and the sweep goes on. cuBLAS also runs in the fp32
regime (TF32 on), which is how "cuBLAS TF32" is measured.

Every result is checked against the fp64 product of the operands as the method sees them
(the weight rounded to the regime's dtype, B in that dtype): max |C - ref| / max |ref|
within TOLERANCE[regime]. Timing: `time_calls` (CUDA-graph replays, per-call numbers),
B rotated through enough copies to overflow L2, twice per configuration for the spread.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..common.numerics import rel_err

# The seed's grid: VGG-19 / ResNet-18 conv layers at batch 1 (M, K, N).
SWEEP_SHAPES: list[tuple[int, int, int]] = [
    (64, 576, 50176), (128, 1152, 12544), (256, 2304, 3136), (512, 4608, 784),
    (64, 576, 3136), (128, 1152, 784), (256, 2304, 196), (512, 4608, 49),
]
SWEEP_SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SEED_SHAPES = "seed"  # the name of SWEEP_SHAPES among `bench --gemm-shapes` sets


def sweep_shapes(sets: list[str]) -> list[tuple[int, int, int]]:
    """The sweep's (M, K, N) for `sets`, in order, each shape once: 'seed' is SWEEP_SHAPES; a registry
    model (resnet50, trafficcamnet, ...) or an ONNX file gives every conv of it as a GEMM at batch 1
    (`passes.roofline.conv_gemm_shapes`: derived from the model, not typed in)."""
    from ..passes.roofline import conv_gemm_shapes
    from .source import load_source

    shapes: list[tuple[int, int, int]] = []
    for name in sets:
        shapes += SWEEP_SHAPES if name == SEED_SHAPES else conv_gemm_shapes(load_source(name, quiet=True).model, 1)
    return list(dict.fromkeys(shapes))

MethodFactory = Callable[[torch.Tensor, torch.dtype], Callable[[torch.Tensor], torch.Tensor]]
METHODS: dict[str, MethodFactory] = {}

# Modules that register sparse methods when imported (one line per runtime). A plug-in's methods
# are GPU kernels: they run on the device types its DEVICE_TYPES names (default CUDA only); elsewhere
# they are skipped and listed, not failed.
SWEEP_PLUGINS: list[str] = [
    "sparsecnn.runtimes.csr.sweep",
    "sparsecnn.runtimes.sparsert.sweep",
]


def register(name: str):
    def deco(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = factory
        return factory

    return deco


# --- dense and library methods -------------------------------------------------------------

# Methods whose time does not depend on the weight's values (dense GEMMs): timed once per
# shape and regime, their number shared by every sparsity of that shape.
DENSE_METHODS: set[str] = set()
# Regimes each method runs in; a method not listed runs in DEFAULT_METHOD_REGIMES.
METHOD_REGIMES: dict[str, tuple[str, ...]] = {}
DEFAULT_METHOD_REGIMES = ("fp32-cuda-core", "fp16")
# Device types a method runs on (absent: any); plug-ins' methods get theirs from the plug-in.
METHOD_DEVICES: dict[str, tuple[str, ...]] = {}
# Regimes a method runs in on the CPU when fewer than elsewhere, and why.
CPU_REGIMES: dict[str, tuple[tuple[str, ...], str]] = {
    "cusparse": (("fp32-cuda-core", "fp32"), "torch's CPU CSR product (MKL) has no fp16"),
}


def unsupported(method: str, regime: str, device: torch.device) -> str | None:
    """Why `method` cannot run in `regime` on `device` (None when it can): such parts are skipped."""
    types = METHOD_DEVICES.get(method)
    if types is not None and device.type not in types:
        return f"runs on {' / '.join(types)} only (its kernels are compiled for the GPU)"
    if device.type == "cpu" and method in CPU_REGIMES and regime not in CPU_REGIMES[method][0]:
        return CPU_REGIMES[method][1]
    return None


def register_dense(name: str, regimes: tuple[str, ...] = ("fp32-cuda-core", "fp32", "fp16")):
    """`register` for a method whose time does not depend on the sparsity (a dense GEMM)."""
    DENSE_METHODS.add(name)
    METHOD_REGIMES[name] = regimes
    return register(name)


@register_dense("cublas")
def _cublas(weight: torch.Tensor, dtype: torch.dtype):
    """cuBLAS GEMM on the dense weight (zeros included): fp32 with TF32 off or on per regime, fp16."""
    a = weight.to(dtype).contiguous()
    return lambda b: torch.mm(a, b)


@register("cusparse")
def _cusparse(weight: torch.Tensor, dtype: torch.dtype):
    """cuSPARSE SpMM through PyTorch's CSR tensor (`to_sparse_csr()` @ dense)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        a = weight.to(dtype).to_sparse_csr()
    return lambda b: a @ b


# --- the runner ----------------------------------------------------------------------------

# Relative error bound per regime vs the fp64 product of the operands as the method sees them.
TOLERANCE = {"fp32-cuda-core": 1e-5, "fp32": 5e-3, "fp16": 2e-3}


def load_plugins(errors: list | None = None) -> None:
    """Import SWEEP_PLUGINS and add their METHODS; a broken plug-in is recorded, not fatal.

    Plug-ins sit in the runtimes' folders and import nothing from here (imports go down)."""
    import importlib

    for name in SWEEP_PLUGINS:
        try:
            module = importlib.import_module(name)
            METHODS.update(module.METHODS)
            for method in module.METHODS:
                METHOD_DEVICES.setdefault(method, tuple(getattr(module, "DEVICE_TYPES", ("cuda",))))
        except Exception as exc:
            if errors is None:
                raise
            errors.append({"where": f"gemm plug-in {name}", "error": f"{type(exc).__name__}: {exc}"})


def sparse_weight(m: int, k: int, sparsity: float, seed: int) -> torch.Tensor:
    """A random [m, k] fp32 weight magnitude-pruned to exactly `sparsity` (the prune passes' rule)."""
    from ..passes.masks import mask_magnitude

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g)
    return w * mask_magnitude(w, sparsity) if sparsity > 0 else w


def rotation_count(bytes_per_buffer: int, device: torch.device, cap: int = 16) -> int:
    """Copies of the dense operand to cycle through so that, together, they overflow L2 twice."""
    if device.type != "cuda":
        return 2
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return int(max(1, min(cap, math.ceil(2 * l2 / max(1, bytes_per_buffer)))))


def _methods_for(regime: str, methods: list[str]) -> list[str]:
    return [m for m in methods if regime in METHOD_REGIMES.get(m, DEFAULT_METHOD_REGIMES)]


def run_sweep(device: torch.device | str, shapes=None, sparsities=None, methods=None, regimes=None,
              reps: int = 50, flush_l2: bool = False, repeats: int = 2, seed: int = 0,
              progress: bool = True, errors: list | None = None) -> dict:
    """Time every (shape, sparsity, regime, method) and check it against the fp64 product.

    Each configuration is timed `repeats` times (separate `time_calls`) so the spread between
    runs is visible. The dense operand B[K, N] rotates through enough copies to overflow L2
    (`rotation`); with `flush_l2` L2 is also flushed before every call (cold weights).
    Returns {"settings", "rows", "errors"}; a failing method is recorded in "errors" and in
    its row, and the sweep goes on.
    """
    from tqdm import tqdm

    from .bench import noisy
    from .regimes import REGIMES, regime_flags
    from ..runtimes.timing import pooled, spread, time_calls

    device = torch.device(device)
    errors = [] if errors is None else errors
    load_plugins(errors)
    shapes = [tuple(s) for s in (shapes or SWEEP_SHAPES)]
    sparsities = list(sparsities or SWEEP_SPARSITIES)
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        from ..common.errors import UserError

        raise UserError(f"unknown GEMM method(s) {', '.join(unknown)}; registered: {', '.join(METHODS)}")
    regimes = list(regimes or ["fp32-cuda-core", "fp32", "fp16"])
    plan, skipped = [], {}
    for shape in shapes:
        for s in sparsities:
            for r in regimes:
                for m in _methods_for(r, methods):
                    why = unsupported(m, r, device)
                    if why is None:
                        plan.append((shape, s, r, m))
                    else:
                        skipped.setdefault((m, r), why)
    rows: list[dict] = []
    dense_done: dict[tuple, dict] = {}
    bar = tqdm(plan, desc="GEMM sweep", unit="config", disable=not progress, leave=False)
    current = None
    for shape, sparsity, regime_name, method in bar:
        m, k, n = shape
        bar.set_postfix_str(f"{method} {regime_name} {m}x{k}x{n} s={sparsity}")
        regime = REGIMES[regime_name]
        row = {"method": method, "regime": regime_name, "M": m, "K": k, "N": n, "sparsity": sparsity,
               "dense_method": method in DENSE_METHODS}
        rows.append(row)
        if (shape, sparsity) != (current and current[0]):
            weight = sparse_weight(m, k, sparsity, seed + hash(shape) % 1000).to(device)
            current = ((shape, sparsity), weight)
        weight = current[1]
        dense_key = (shape, regime_name, method)
        try:
            with regime_flags(regime), torch.no_grad():
                dtype = regime.torch_dtype
                g = torch.Generator(device=device).manual_seed(seed + 1)
                b0 = torch.randn(k, n, device=device, generator=g).to(dtype)
                run = METHODS[method](weight, dtype)
                c = run(b0)
                ref = weight.to(dtype).double() @ b0.double()
                row["rel_err"] = rel_err(c, ref)
                row["tolerance"] = TOLERANCE[regime_name]
                row["ok"] = row["rel_err"] <= row["tolerance"] and tuple(c.shape) == (m, n)
                if dense_key in dense_done:  # a dense GEMM's time does not depend on the zeros
                    row.update({key: dense_done[dense_key][key] for key in ("timings", "median_ms", "p90_ms", "spread",
                                                                            "p90_over_min", "noisy", "rotation")})
                    row["timed_at_sparsity"] = dense_done[dense_key]["sparsity"]
                    continue
                nbuf = rotation_count(b0.numel() * b0.element_size(), device)
                bufs = [b0] + [torch.randn(k, n, device=device, generator=g).to(dtype) for _ in range(nbuf - 1)]
                call = lambda j, bufs=bufs, run=run: run(bufs[j % len(bufs)])  # noqa: E731
                timings = [time_calls(call, device, reps=reps, flush_l2=flush_l2, min_inner=len(bufs))
                           for _ in range(repeats)]
                row["timings"] = [t.to_dict(samples=True) for t in timings]
                row["median_ms"], row["p90_ms"] = pooled(timings)  # over both runs' samples
                row["spread"] = spread(timings[0], timings[-1])
                row["p90_over_min"] = row["p90_ms"] / max(min(t.min_ms for t in timings), 1e-12)
                row["noisy"] = noisy(row)
                row["rotation"] = nbuf
                if method in DENSE_METHODS:
                    dense_done[dense_key] = row
                del bufs, run
        except Exception as exc:  # one method failing must not lose the others' numbers
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            errors.append({"where": f"gemm {method} {regime_name} {shape} s={sparsity}", "error": row["error"]})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    bar.close()
    _add_speedups(rows)
    return {"settings": {"shapes": [list(s) for s in shapes], "sparsities": sparsities, "methods": methods,
                         "regimes": regimes, "reps": reps, "repeats": repeats, "flush_l2": flush_l2,
                         "tolerance": TOLERANCE, "method_regimes": {m: list(METHOD_REGIMES.get(m, DEFAULT_METHOD_REGIMES))
                                                                    for m in methods}},
            "rows": rows, "errors": [e for e in errors if e["where"].startswith("gemm")],
            "skipped": [{"where": f"gemm {m} {r} on {device.type}", "error": why, "kind": "unsupported"}
                        for (m, r), why in skipped.items()]}


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_cublas: cuBLAS time / this method's time, same shape and regime."""
    cublas = {(r["M"], r["K"], r["N"], r["regime"]): r for r in rows if r["method"] == "cublas" and "median_ms" in r}
    for r in rows:
        base = cublas.get((r["M"], r["K"], r["N"], r["regime"]))
        if base is not None and r.get("median_ms"):
            r["speedup_vs_cublas"] = base["median_ms"] / r["median_ms"]
            r["unreliable"] = bool(r.get("noisy") or base.get("noisy"))  # as reliable as the noisier of the two
