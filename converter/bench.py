"""The benchmark harness behind `sparsecnn bench`: whole networks, per layer, and the bounds.

For each model x precision regime x batch size it builds, on one device in one run:

- **eager**: PyTorch eager on the dense nn.Module (what users have; the ONNX executor run
  eagerly for an ONNX-file source);
- **dense engines**: the torch runtime (whole network in one CUDA graph) with each
  requested `dense_conv` mode -- "cudnn" is cuDNN as PyTorch calls it, "best" is the best
  dense engine (per layer the fastest of cuDNN NCHW / NHWC and im2col + cuBLAS, see
  runtimes/torch/dense_conv.py);
- **runtimes x prune settings**: each requested runtime's rewrite + compile of the model
  pruned each way, its dense fallback layers compiled with `dense_conv` (default "best").

Every engine is timed twice, in two passes over all engines (so the two runs of one
configuration are separated by the others), through `time_fn` on CUDA-graph replays; the
spread between the two medians is reported, and the median over both runs' samples is the
number used. Whole-network replays read one static input: it is read once per inference,
so rotating it would change nothing measurable (weights and activations are the traffic);
`flush_l2` gives the cold-cache case. Speedups are reported against eager and against the
best dense time, which is the fastest of the dense engines measured in the same run (the
claim is always against it).

Per layer (`Engine.profile`: each step captured and timed alone) every engine's steps are
matched to the best dense engine's steps that compute the same tensors (a fused op is
matched to the chain it replaces), giving a per-layer speedup; the "why no speedup" bound
is the share of the dense network time spent in the layers a runtime accelerates and the
whole-network speedup that share allows (Amdahl: 1 / (1 - share) with infinitely fast
accelerated layers; and the speedup the measured per-layer times predict).
"""
from __future__ import annotations

import copy
import gc
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
import torch

from ..common.errors import UserError
from ..common.numerics import rel_err
from .regimes import Regime, regime_flags
from .study import best_dense, environment  # noqa: F401 -- environment: the harness's report, shared with the studies
from ..runtimes.timing import auto_reps, pooled, spread, time_fn

SCHEMA = "sparsecnn-bench"
SCHEMA_VERSION = 1

UNSUPPORTED = "unsupported"  # an error record's kind for a part this runtime or device cannot run (skipped)
# A measurement whose two runs differ by more than SPREAD_LIMIT, or whose p90 exceeds its fastest sample by
# more than P90_MIN_LIMIT times, is noisy: ratios resting on it are marked unreliable (on CPU most are).
SPREAD_LIMIT = 0.10
P90_MIN_LIMIT = 1.5

DENSE_LABEL = {"cudnn": "torch cuDNN", "cudnn_nhwc": "torch cuDNN NHWC", "im2col": "torch im2col+cuBLAS",
               "im2col_nhwc": "torch im2col NHWC+cuBLAS", "best": "best dense"}


@dataclass
class BenchConfig:
    models: list[str]
    runtimes: list[str]
    prunes: list[str]
    regimes: list[Regime]
    batches: list[int]
    device: torch.device
    dense_modes: list[str] = field(default_factory=lambda: ["cudnn", "best"])
    runtime_dense_conv: str = "best"
    scope: str = "layer"
    weights: str | None = None
    per_layer: bool = True
    flush_l2: bool = False
    budget_ms: float = 300.0
    min_reps: int = 10
    max_reps: int = 300
    layer_reps: int = 20
    repeats: int = 2
    seed: int = 0
    progress: bool = True
    quick: bool = False
    runtime_options: dict = field(default_factory=dict)  # runtime -> its typed --option values
    calibration: str | None = None  # images or .npz the activation-sparse runtimes choose on (else random)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["regimes"] = [r.name for r in self.regimes]
        d["device"] = str(self.device)
        return d


# --- models --------------------------------------------------------------------------------

def onnx_bytes(model: onnx.ModelProto) -> int:
    """The serialised size of `model` (to a few bytes per tensor), without serialising the weights.

    protobuf's ByteSize() on a 550 MB VGG-19 takes seconds; raw tensors are dims x itemsize.
    """
    from ..passes.graph import skeleton

    light = skeleton(model)
    kept = {t.name for t in light.graph.initializer}
    total = light.ByteSize()
    for t in model.graph.initializer:
        if t.name in kept:
            continue
        n = 1
        for d in t.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize + len(t.name) + 16
    return total


@dataclass
class Prepared:
    name: str
    module: torch.nn.Module | None  # the dense nn.Module (None for an ONNX-file source)
    dense: onnx.ModelProto
    input_shape: tuple[int, ...]     # without the batch axis
    pruned: dict[str, onnx.ModelProto]
    info: dict
    report_rows: dict = field(default_factory=dict)  # prune setting -> the layer report's pruning rows
    spec: object = None                # the input spec (size, normalisation), to read calibration images
    calibration: object = None         # the calibration batch read for this model (bench --calibration)


def prepare_model(name: str, prunes: list[str], scope: str = "layer", weights: str | None = None,
                  quiet: bool = True) -> Prepared:
    """The dense nn.Module, its dense ONNX export (BN folded) and each pruned version."""
    from ..models.registry import MODELS
    from ..passes.graph import run_pipeline
    from ..passes.inspect import layer_table, sparsity_summary
    from ..passes.prune import prune_pipeline
    from .export import export_onnx
    from .source import load_source

    if name in MODELS:
        from ..models.registry import load_model

        module, spec, entry = load_model(name, weights)
        dense = export_onnx(module, spec, entry.exclude)
        shape = tuple(spec.shape)
    else:
        spec = None
        src = load_source(name, weights, quiet=quiet)
        module, dense = None, src.model
        dims = [d.dim_value for d in dense.graph.input[0].type.tensor_type.shape.dim][1:]
        if src.spec is None and not all(dims):
            raise UserError(f"{name}: the input size is not fixed in the ONNX file; export it with a fixed size")
        shape = tuple(src.spec.shape) if src.spec else tuple(dims)
        spec = src.spec
    pruned = {}
    info = {"dense_onnx_bytes": onnx_bytes(dense), "prune": {}}
    for p in prunes:
        pipeline = prune_pipeline(p, scope)
        model = run_pipeline(dense, pipeline)[0] if pipeline else dense
        pruned[p] = model
        summary = sparsity_summary(layer_table(model))
        info["prune"][p] = {"prunable_sparsity": summary["prunable_sparsity"], "dense_bytes": summary["dense_bytes"],
                            "nonzero_bytes": summary["nonzero_bytes"], "onnx_bytes": onnx_bytes(model),
                            "prunable_layers": summary["prunable_layers"], "two_four_layers": summary["two_four_layers"]}
    return Prepared(name, module, dense, shape, pruned, info, spec=spec)


# --- engines -------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One engine of one (model, regime, batch): how to run it once, and what it is."""

    label: str
    kind: str                 # eager | dense | runtime
    runtime: str | None
    prune: str | None
    dense_conv: str | None
    run: Any = None           # fn(i) -> outputs: one inference (a graph replay on GPU)
    engine: Any = None        # the Engine (for profile / report), None for eager
    inputs: tuple = ()
    reps: int = 0
    timings: list = field(default_factory=list)
    row: dict = field(default_factory=dict)


def _first_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _eager_candidate(prep: Prepared, regime: Regime, x: torch.Tensor, device: torch.device) -> Candidate:
    if prep.module is None:
        from ..runtimes import get_runtime

        eng = get_runtime("torch").compile(prep.dense, device, regime.compile_options(cuda_graph=False))
        xs = eng.prepare(x)
        return Candidate("eager (ONNX executor)", "eager", None, None, None,
                         run=lambda i: eng.executor(*xs), engine=None, inputs=xs)
    module = copy.deepcopy(prep.module).to(device, regime.torch_dtype).eval()
    xe = x.to(device, regime.torch_dtype)
    return Candidate("eager", "eager", None, None, None, run=lambda i: module(xe), inputs=(xe,))


def _engine_candidate(label, kind, runtime_name, prune, dense_conv, model, regime, x, device,
                      options: dict | None = None, calibration=None) -> Candidate:
    from ..runtimes import compile_engine, require_runtime

    rt = require_runtime(runtime_name)
    opts = regime.compile_options(extra={"dense_conv": dense_conv, **(options or {})})
    sparse = rt.rewrite(model, opts)
    # without --calibration the activation-sparse choices are made on random input, and the report says so
    eng = compile_engine(rt, sparse, device, opts, calibration=calibration)
    xs = eng.prepare(x)
    with torch.no_grad(), eng._precision_context():
        runner = eng.runner(*xs)  # on GPU: captures the graph (and, for best, decides per layer)
    run = (lambda i: runner.replay()) if hasattr(runner, "replay") else (lambda i: runner(*xs))
    c = Candidate(label, kind, runtime_name, prune, dense_conv, run=run, engine=eng, inputs=xs)
    if sparse is not model:  # a rewritten (compressed) model; otherwise the prune setting's size
        c.row["model_onnx_bytes"] = onnx_bytes(sparse)
    c.row["weight_bytes"] = eng.weight_bytes()
    c.row["cuda_graph"] = hasattr(runner, "replay")
    if kind != "runtime":
        return c
    # The engine people deploy is guarded (base.Engine: never slower than its dense plans);
    # the library "as it is" is the graph its layers chose. Both are reported; where the guard
    # kept the layers' own graph they are one engine and one row.
    plan = next(iter(eng.plans.values()), {}) if eng.plans else {}
    c.row["guard"] = plan.get("chosen", "as chosen")
    as_is = eng.unguarded_runner(*xs)
    if as_is is runner or not hasattr(as_is, "replay"):
        return c
    c.row["guard_reason"] = plan.get("reason", "")
    raw = Candidate(f"{label} as is", kind, runtime_name, prune, dense_conv, run=lambda i: as_is.replay(),
                    engine=eng, inputs=xs)
    raw.row.update({k: v for k, v in c.row.items() if k in ("model_onnx_bytes", "weight_bytes", "cuda_graph")},
                   guard="off")
    return [c, raw]


def _timed(c: Candidate, regime: Regime, device: torch.device, cfg: BenchConfig):
    engine_ctx = c.engine._precision_context() if c.engine is not None else regime_flags(regime)
    with torch.no_grad(), engine_ctx:
        if not c.reps:
            c.reps = auto_reps(c.run, device, cfg.budget_ms, cfg.min_reps, cfg.max_reps, cfg.flush_l2)
        return time_fn(c.run, device, reps=c.reps, warmup=max(3, c.reps // 20), flush_l2=cfg.flush_l2)


def _outputs(c: Candidate, regime: Regime):
    engine_ctx = c.engine._precision_context() if c.engine is not None else regime_flags(regime)
    with torch.no_grad(), engine_ctx:
        out = _first_output(c.run(0))
        return out.float().clone()


# --- per-layer matching and the bound ----------------------------------------------------

def is_accelerated(row: dict) -> bool:
    """A step the runtime runs with its own (sparse) kernel rather than a dense fallback."""
    fmt = row.get("format")
    return row["op"].startswith("sparsecnn::") or (fmt is not None and fmt != "dense")


def match_layers(reference: list[dict], rows: list[dict]) -> list[list[int]]:
    """For each row, the reference steps computing the same outputs from the same inputs.

    A fused op (Conv+ReLU as one step) is matched to the chain of reference steps it
    replaces; identical graphs match one to one. An output the reference does not compute
    matches nothing.
    """
    producer = {}
    for i, r in enumerate(reference):
        for o in r["outputs"]:
            if o:
                producer[o] = i
    out = []
    for r in rows:
        stop = {n for n in r["inputs"] if n}
        seen, stack, found = set(), [o for o in r["outputs"] if o], []
        ok = all(o in producer for o in stack)
        while ok and stack:
            t = stack.pop()
            if t in stop or t in seen or t not in producer:
                continue
            seen.add(t)
            i = producer[t]
            if i not in found:
                found.append(i)
                stack.extend(n for n in reference[i]["inputs"] if n)
        out.append(sorted(found) if ok else [])
    return out


def layer_comparison(reference: list[dict], rows: list[dict]) -> tuple[list[dict], dict]:
    """Per-row dense time and speedup vs `reference`, and the whole-network bound."""
    matches = match_layers(reference, rows)
    total_ref = sum(r["ms"] for r in reference)
    total = sum(r["ms"] for r in rows)
    accel_ref = accel = 0.0
    out = []
    for r, m in zip(rows, matches):
        dense_ms = sum(reference[i]["ms"] for i in m) if m else None
        acc = is_accelerated(r) and bool(m)  # a sparse step that replaces dense work (not a layout shuffle)
        if acc:
            accel_ref += dense_ms
            accel += r["ms"]
        keep = {k: v for k, v in r.items() if k not in ("inputs", "outputs")}
        out.append({**keep, "dense_ms": dense_ms, "matched": [reference[i]["name"] for i in m],
                    "speedup": (dense_ms / r["ms"]) if dense_ms and r["ms"] > 0 else None, "accelerated": acc})
    share = accel_ref / total_ref if total_ref > 0 else 0.0
    rest = total_ref - accel_ref
    bound = {"dense_sum_ms": total_ref, "sum_ms": total, "accelerated_layers": sum(1 for o in out if o["accelerated"]),
             "accelerated_dense_ms": accel_ref, "accelerated_ms": accel, "share": share,
             "accelerated_speedup": accel_ref / accel if accel > 0 else None,
             # Amdahl: accelerated layers infinitely fast, everything else as dense
             "amdahl_max_speedup": (total_ref / rest) if rest > 0 else None,
             # what the per-layer times add up to (overheads such as layout conversions included)
             "predicted_speedup": total_ref / total if total > 0 else None}
    return out, bound


# --- the sweep -----------------------------------------------------------------------------

def run_networks(cfg: BenchConfig, errors: list[dict], cache: dict | None = None) -> tuple[list[dict], list[dict], dict]:
    """Whole-network rows, per-layer entries, and per-model info; failures go to `errors`.

    `cache` (name -> Prepared), when given, keeps exported and pruned models across calls.
    """
    from tqdm import tqdm

    device = cfg.device
    network_rows: list[dict] = []
    layer_entries: list[dict] = []
    models_info: dict[str, dict] = {}
    n_dense = len(cfg.dense_modes)
    n_rt = len(cfg.runtimes) * len(cfg.prunes)
    total = len(cfg.models) * len(cfg.regimes) * len(cfg.batches)
    bar = tqdm(total=total * (1 + n_dense + n_rt), desc="bench", unit="engine", disable=not cfg.progress)
    for model_name in cfg.models:
        bar.set_postfix_str(f"{model_name}: export and prune")
        try:
            prep = cache.get(model_name) if cache is not None else None
            if prep is None or any(p not in prep.pruned for p in cfg.prunes):
                prep = prepare_model(model_name, cfg.prunes, cfg.scope, cfg.weights)
            if cache is not None:
                cache[model_name] = prep
        except UserError:
            raise
        except Exception as exc:
            errors.append({"where": f"model {model_name}", "error": f"{type(exc).__name__}: {exc}"})
            bar.update(len(cfg.regimes) * len(cfg.batches) * (1 + n_dense + n_rt))
            continue
        models_info[model_name] = {**prep.info, "input_shape": list(prep.input_shape),
                                   "eager": "nn.Module" if prep.module is not None else "ONNX executor"}
        for regime in cfg.regimes:
            for batch in cfg.batches:
                where = f"{model_name} {regime.name} batch {batch}"
                x = torch.randn(batch, *prep.input_shape, generator=torch.Generator().manual_seed(cfg.seed))
                cands = _build_candidates(cfg, prep, regime, batch, x, where, errors, bar)
                _time_candidates(cfg, cands, regime, where, errors)
                rows = _network_rows(cfg, cands, model_name, regime, batch)
                network_rows.extend(rows)
                for r in rows:
                    if r.get("median_ms"):
                        _say(cfg, f"bench: {where}: {r['engine']} {r['median_ms']:.4f} ms, "
                                  f"{r.get('speedup_vs_best_dense') or 0:.3f}x the best dense engine")
                if cfg.per_layer:
                    layer_entries.extend(_layers(cfg, cands, model_name, regime, batch, x, rows, where, errors, prep))
                del cands
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del prep
        gc.collect()
    bar.close()
    return network_rows, layer_entries, models_info


def _say(cfg, line: str) -> None:
    """Without the progress bar (logs, CI), a line per engine built and timed: a run cut short by a time
    limit still tells how far it got and what each engine cost to build."""
    if not cfg.progress:
        print(line, file=sys.stderr, flush=True)


def _build_candidates(cfg, prep, regime, batch, x, where, errors, bar) -> list[Candidate]:
    device = cfg.device
    cands: list[Candidate] = []

    def attempt(what: str, make):
        bar.set_postfix_str(f"{where}: {what}")
        start = time.perf_counter()
        try:
            c = make()
            cands.extend(c if isinstance(c, list) else [c])
            _say(cfg, f"bench: {where}: {what} built in {time.perf_counter() - start:.1f} s")
        except UserError as exc:  # the runtime says it cannot run this (a precision, an op): skipped, not failed
            errors.append({"where": f"{where} {what}", "error": str(exc), "kind": UNSUPPORTED})
        except Exception as exc:
            errors.append({"where": f"{where} {what}", "error": f"{type(exc).__name__}: {exc}"})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        bar.update(1)

    attempt("eager", lambda: _eager_candidate(prep, regime, x, device))
    for mode in cfg.dense_modes:
        attempt(DENSE_LABEL[mode], lambda mode=mode: _engine_candidate(
            DENSE_LABEL[mode], "dense", "torch", "none", mode, prep.dense, regime, x, device))
    if cfg.calibration and prep.calibration is None:
        from ..runtimes import takes_calibration
        from .calibration import read_calibration

        if any(takes_calibration(rt) for rt in cfg.runtimes):
            prep.calibration = read_calibration(cfg.calibration, prep.dense, prep.spec)
    for rt in cfg.runtimes:
        for p in cfg.prunes:
            attempt(f"{rt} @ {p}", lambda rt=rt, p=p: _engine_candidate(
                f"{rt} @ {p}", "runtime", rt, p, cfg.runtime_dense_conv, prep.pruned[p], regime, x, device,
                cfg.runtime_options.get(rt), prep.calibration))
    # correctness: dense engines against eager, each runtime against the torch runtime on its pruned model
    ref_out = None
    for c in cands:
        if c.kind == "eager":
            ref_out = _outputs(c, regime)
    pruned_refs: dict[str, torch.Tensor] = {}
    for c in cands:
        try:
            out = _outputs(c, regime)
            if c.kind == "dense" and ref_out is not None:
                c.row["rel_err"], c.row["rel_err_vs"] = rel_err(out, ref_out), "eager"
            elif c.kind == "runtime":
                if c.prune not in pruned_refs:
                    from ..runtimes import get_runtime

                    ref_eng = get_runtime("torch").compile(prep.pruned[c.prune], device,
                                                           regime.compile_options(cuda_graph=False))
                    pruned_refs[c.prune] = ref_eng(x)[0]
                    del ref_eng
                c.row["rel_err"], c.row["rel_err_vs"] = rel_err(out, pruned_refs[c.prune]), "torch runtime (cuDNN)"
        except Exception as exc:
            errors.append({"where": f"{where} {c.label} check", "error": f"{type(exc).__name__}: {exc}"})
    return cands


def _time_candidates(cfg, cands, regime, where, errors) -> None:
    for _ in range(cfg.repeats):  # pass after pass: runs of one engine are separated by the others
        for c in cands:
            if c.timings is None:
                continue
            try:
                c.timings.append(_timed(c, regime, cfg.device, cfg))
            except Exception as exc:
                errors.append({"where": f"{where} {c.label} timing", "error": f"{type(exc).__name__}: {exc}"})
                c.timings = None


def _network_rows(cfg, cands, model, regime, batch) -> list[dict]:
    rows = []
    for c in cands:
        row = {"model": model, "regime": regime.name, "batch": batch, "engine": c.label, "kind": c.kind,
               "runtime": c.runtime, "prune": c.prune, "dense_conv": c.dense_conv, **c.row}
        if c.timings:
            row["timings"] = [t.to_dict(samples=True) for t in c.timings]
            row["median_ms"], row["p90_ms"] = pooled(c.timings)  # over both runs' samples
            row["spread"] = spread(c.timings[0], c.timings[-1]) if len(c.timings) > 1 else None
            row["p90_over_min"] = row["p90_ms"] / max(min(t.min_ms for t in c.timings), 1e-12)
            row["noisy"] = noisy(row)
        if c.engine is not None and hasattr(c.engine, "plans") and c.engine.plans:
            row["plans"] = c.engine.plans
        rows.append(row)
    timed = [r for r in rows if r.get("median_ms")]
    eager = next((r["median_ms"] for r in timed if r["kind"] == "eager"), None)
    best_label, best_ms = best_dense({r["engine"]: r["median_ms"] for r in timed if r["kind"] == "dense"})
    eager_noisy = next((r.get("noisy") for r in timed if r["kind"] == "eager"), None)
    best_noisy = next((r.get("noisy") for r in timed if r["engine"] == best_label), None)
    for r in timed:
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None
        r["speedup_vs_best_dense"] = best_ms / r["median_ms"] if best_ms else None
        r["best_dense_engine"] = best_label
        r["best_dense_ms"] = best_ms
        # a ratio is as reliable as the noisier of its two measurements
        r["unreliable_vs_eager"] = bool(r.get("noisy") or eager_noisy)
        r["unreliable_vs_best_dense"] = bool(r.get("noisy") or best_noisy)
    return rows


def noisy(row: dict) -> str | None:
    """Why a measurement is too noisy for its ratios to be trusted (None when it is not): its two runs
    differ by more than SPREAD_LIMIT, or its p90 is more than P90_MIN_LIMIT times its fastest sample."""
    why = []
    if row.get("spread") is not None and row["spread"] > SPREAD_LIMIT:
        why.append(f"runs differ by {100 * row['spread']:.0f} %")
    if row.get("p90_over_min") is not None and row["p90_over_min"] > P90_MIN_LIMIT:
        why.append(f"p90/min {row['p90_over_min']:.1f}")
    return ", ".join(why) or None


def failed_parts(result: dict) -> list[dict]:
    """The parts of a run that failed (an exception, or a GEMM result outside its tolerance); parts a
    runtime or device does not support are skipped, not failed."""
    failed = [e for e in result.get("errors") or [] if e.get("kind") != UNSUPPORTED]
    for r in (result.get("gemm") or {}).get("rows") or []:
        if r.get("ok") is False and not r.get("error"):
            failed.append({"where": f"gemm {r['method']} {r['regime']} {r['M']}x{r['K']}x{r['N']} s={r['sparsity']:g}",
                           "error": f"wrong result: rel err {r['rel_err']:.1e} > {r.get('tolerance')}"})
    return failed


def skipped_parts(result: dict) -> list[dict]:
    """Parts not run because the runtime or the device does not support them, each with why."""
    return [e for e in result.get("errors") or [] if e.get("kind") == UNSUPPORTED] + \
        list((result.get("gemm") or {}).get("skipped") or [])


def _layers(cfg, cands, model, regime, batch, x, net_rows, where, errors, prep=None) -> list[dict]:
    profiles: dict[str, list[dict]] = {}
    for c in cands:
        if c.engine is None:
            continue
        try:
            profiles[c.label] = c.engine.profile(x, reps=cfg.layer_reps, warmup=3, flush_l2=cfg.flush_l2)
        except Exception as exc:
            errors.append({"where": f"{where} {c.label} per-layer", "error": f"{type(exc).__name__}: {exc}"})
    ref_label = DENSE_LABEL["best"] if DENSE_LABEL["best"] in profiles else next(
        (c.label for c in cands if c.kind == "dense" and c.label in profiles), None)
    if ref_label is None:
        return []
    net = {r["engine"]: r.get("median_ms") for r in net_rows}
    entries = []
    for label, prof in profiles.items():
        c = next(c for c in cands if c.label == label)
        rows, bound = layer_comparison(profiles[ref_label], prof)
        bound["network_ms"] = net.get(label)
        bound["reference_network_ms"] = net.get(ref_label)
        if net.get(label) and net.get(ref_label):
            bound["measured_speedup"] = net[ref_label] / net[label]
        entry = {"model": model, "regime": regime.name, "batch": batch, "engine": label, "kind": c.kind,
                 "runtime": c.runtime, "prune": c.prune, "reference": ref_label, "rows": rows, "bound": bound}
        if c.kind == "runtime" and prep is not None:  # the one per-layer report: pruning rule, what ran, why
            entry["report"] = _layer_report(prep, c, prof, regime, batch)
        entries.append(entry)
    return entries


def _layer_report(prep: Prepared, c: Candidate, profile: list[dict], regime: Regime, batch: int) -> dict:
    from ..passes.prune import parse_prune
    from ..passes.roofline import layer_costs
    from ..runtimes.base import card_properties
    from .layer_report import build_report, prune_rows

    if c.prune not in prep.report_rows:
        parsed = parse_prune(c.prune)
        prep.report_rows[c.prune] = prune_rows(prep.pruned[c.prune], method=parsed[0] if parsed else None)
    card = card_properties(c.engine.device)
    # the roofline prices what the engine runs: its rewritten model (fused residuals), at the profile's batch
    costs = layer_costs(getattr(c.engine, "model", None) or prep.pruned[c.prune], batch) if card else None
    report = build_report(base=prep.report_rows[c.prune], steps=profile, runtime=c.runtime,
                          device=str(c.engine.device), dtype=regime.dtype, card=card, tf32=regime.tf32, batch=batch,
                          costs=costs)
    return {k: report[k] for k in ("layers", "summary", "warnings", "roofline") if k in report}


# --- accuracy from another command -----------------------------------------------------

ACCURACY_KEYS = ("top1", "accuracy", "acc", "top1_acc", "top1_accuracy")


def _norm_prune(value) -> str:
    if value is None:
        return "none"
    v = str(value).strip().lower()
    if v in ("none", "dense", "0", "0.0", ""):
        return "none"
    try:
        return f"{float(v):g}"
    except ValueError:
        return v


def load_accuracy(path) -> dict[tuple[str, str], dict]:
    """(model, prune) -> {"top1": ..., "label": ...} from another command's JSON.

    Accepted: `sparsecnn compare --json`'s own file ({"results": [{"model", "arch", "rows": [...]}]},
    each row naming its method -- "dense", "2:4", "unstructured 90%" -- and its variant); or a list of
    rows, or a dict holding one under "rows" / "results"; such a row needs "model", a prune setting
    ("prune", or "sparsity"/"method"; missing = dense) and an accuracy under one of ACCURACY_KEYS (a
    fraction or a percentage). Where several rows match, a fine-tuned one ("fine_tuned"/"finetuned"
    true, or a "stage"/"variant" naming fine-tuning) wins over one-shot ones.
    """
    from pathlib import Path

    from ..common.fileio import read_json

    p = Path(path)
    data = read_json(p, "accuracy file", "give the JSON written by `sparsecnn compare`")
    rows = data.get("rows", data.get("results")) if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise UserError(f"{p}: expected a list of rows (or a dict with 'rows'); see `sparsecnn bench --help`")
    rows = [x for r in rows for x in _compare_rows(r)]
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        if not isinstance(r, dict) or "model" not in r:
            continue
        key = next((k for k in ACCURACY_KEYS if isinstance(r.get(k), (int, float))), None)
        if key is None:
            continue
        prune = _norm_prune(r.get("prune", r.get("sparsity", r.get("method"))))
        stage = str(r.get("stage", r.get("variant", ""))).lower()
        fine = bool(r.get("fine_tuned") or r.get("finetuned") or "fine" in stage)
        acc = float(r[key])
        entry = {"top1": acc / 100.0 if acc > 1.0 else acc, "fine_tuned": fine, "source_key": key,
                 "label": r.get("label") or r.get("stage") or r.get("variant") or ""}
        for model in dict.fromkeys([str(r["model"]), *([str(r["arch"])] if r.get("arch") else [])]):
            k = (model, prune)
            if k not in out or (fine and not out[k]["fine_tuned"]):
                out[k] = entry
    if not out:
        raise UserError(f"{p} holds no row with a model and an accuracy ({', '.join(ACCURACY_KEYS)})")
    return out


def _compare_rows(entry) -> list:
    """A `compare --json` result ({"model", "arch", "rows"}) as rows of their own; anything else as is.

    compare names a row's setting in "method" ("dense", "2:4", "unstructured 90%", "channel -50% FLOPs")
    and keeps the sparsity it reached in "sparsity": the setting is read from the method."""
    if not (isinstance(entry, dict) and isinstance(entry.get("rows"), list) and "model" in entry):
        return [entry]
    out = []
    for r in entry["rows"]:
        if not isinstance(r, dict) or r.get("error"):
            continue
        method = str(r.get("method", "")).strip().lower()
        if method.startswith("unstructured"):
            try:
                prune = f"{float(method.split()[-1].rstrip('%')) / 100:g}"
            except ValueError:
                continue
        elif method in ("dense", "2:4", ""):
            prune = method or "none"
        else:
            continue  # channel pruning: a smaller dense model, not a prune setting bench runs
        out.append({**{k: v for k, v in r.items() if k not in ("sparsity", "method")}, "prune": prune,
                    "model": entry["model"], "arch": entry.get("arch")})
    return out


def summary_rows(network_rows: list[dict], models_info: dict, accuracy: dict | None) -> list[dict]:
    """Table 1: per model, prune setting and engine -- size, latency, speedups, accuracy."""
    out = []
    for r in network_rows:
        if not r.get("median_ms"):
            continue
        info = models_info.get(r["model"], {})
        prune = r.get("prune") or "none"
        pinfo = info.get("prune", {}).get(prune, {})
        size = r.get("model_onnx_bytes") or pinfo.get("onnx_bytes") or info.get("dense_onnx_bytes")
        acc = (accuracy or {}).get((r["model"], _norm_prune(prune)))
        out.append({"model": r["model"], "prune": prune, "engine": r["engine"], "regime": r["regime"],
                    "batch": r["batch"], "model_mb": size / 2**20 if size else None,
                    "nonzero_mb": pinfo.get("nonzero_bytes", 0) / 2**20 if pinfo else None,
                    "sparsity": pinfo.get("prunable_sparsity"), "median_ms": r["median_ms"],
                    "speedup_vs_best_dense": r.get("speedup_vs_best_dense"),
                    "speedup_vs_eager": r.get("speedup_vs_eager"),
                    "top1": acc["top1"] if acc else None})
    return out


def new_result(cfg: BenchConfig | None, env: dict) -> dict:
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "env": env,
            "settings": cfg.to_dict() if cfg else {}, "networks": [], "layers": [], "models": {},
            "gemm": None, "summary": [], "errors": [], "files": []}


# --- the whole harness, as the CLI (and scripts) call it ---------------------------------------

QUICK_MODELS = ["tinynet", "tinyresnet"]
QUICK_GEMM_SHAPES = [(8, 36, 64), (16, 72, 49), (12, 27, 30)]
QUICK_GEMM_SPARSITIES = [0.5, 0.9]


def run_bench(*, models: list[str], gemm: bool, quick: bool, regimes: list, batches: list[int], prunes: list[str],
              dense: list[str], runtime_dense_conv: str, runtimes: list[str] | None, devices: list,
              scope: str = "layer", weights: str | None = None, per_layer: bool = True, flush_l2: bool = False,
              budget_ms: float = 300.0, repeats: int = 2, progress: bool = True, accuracy: dict | None = None,
              gemm_sparsities: list[float] | None = None, gemm_methods: list[str] | None = None,
              gemm_regimes: list[str] | None = None, options: list[str] | None = None, log=None,
              calibration: str | None = None, gemm_shapes: list[str] | None = None) -> dict:
    """Validate the settings (before any work), then time every configuration (sharded over
    `devices`) and, with `gemm`, the GEMM sweep; returns the result `bench_report` writes.
    `options`: --option KEY=VALUE pairs, each going to the benchmarked runtimes that declare it;
    `gemm_shapes`: the sweep's shape sets (`gemm_sweep.sweep_shapes`: seed, a model's convs)."""
    from ..passes.prune import parse_prune
    from ..runtimes import availability, runtime_names
    from ..runtimes.torch.dense_conv import CHOICES
    from .bench_shards import cards_line, run_sharded
    from .calibration import check_path

    if quick and not models:
        models = list(QUICK_MODELS)
    elif not models and not gemm:
        models = ["resnet18"]
    for p_ in prunes:
        parse_prune(p_)  # a bad prune setting fails before any work
    dense = list(dense)
    for d in dense + [runtime_dense_conv]:
        if d not in CHOICES:
            raise UserError(f"unknown dense engine '{d}'; choose from {', '.join(CHOICES)}")
    if "best" not in dense:
        dense.append("best")
    avail = availability()
    if runtimes is None:
        runtimes = [n for n, (ok, _) in avail.items() if ok and n != "torch"]
        if quick:
            runtimes = ["torch"] + runtimes
    else:
        for r in runtimes:
            if r not in runtime_names():
                raise UserError(f"unknown runtime '{r}'; known runtimes: {', '.join(runtime_names())}")
            if not avail[r][0]:
                raise UserError(f"runtime '{r}' is not available here: {avail[r][1]}")
    from .options import options_per_runtime

    runtime_options = options_per_runtime(runtimes, options or []) if options else {}
    shapes = None
    if gemm_shapes is not None and not gemm:
        raise UserError("--gemm-shapes sets the GEMM sweep's shapes: add the word spmm (or --gemm) to run the sweep")
    if gemm_shapes is not None and not gemm_shapes:
        raise UserError("--gemm-shapes names no shape set: give seed, a registry model or an ONNX file")
    if gemm and gemm_shapes:  # a model's conv shapes: resolved (an unknown name fails) before any timing
        from .gemm_sweep import sweep_shapes

        shapes = sweep_shapes(gemm_shapes)
    device = devices[0]
    if quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny nets on a shared CPU: threads only add scheduling noise
    cfg = BenchConfig(models=models, runtimes=runtimes, prunes=prunes, regimes=regimes, batches=batches,
                      device=device, dense_modes=dense, runtime_dense_conv=runtime_dense_conv,
                      scope=scope, weights=weights, per_layer=per_layer,
                      flush_l2=flush_l2, budget_ms=(20.0 if quick else budget_ms),
                      min_reps=3 if quick else 10, max_reps=20 if quick else 300, layer_reps=3 if quick else 20,
                      repeats=repeats, progress=progress, quick=quick, runtime_options=runtime_options,
                      calibration=None if calibration is None else str(check_path(calibration)))
    result = new_result(cfg, environment(device))
    errors = result["errors"]
    if models:
        nets, layers, info, shards = run_sharded(cfg, devices, errors, log=log or (lambda s: None))
        result["shards"] = shards
        if len(shards) > 1:
            result["env"]["card"] = cards_line(shards)  # the report's header names every card
        result.update(networks=nets, layers=layers, models=info)
        result["summary"] = summary_rows(nets, info, accuracy)
    if gemm:
        from .gemm_sweep import run_sweep

        result["gemm"] = run_sweep(
            device, shapes=shapes or (QUICK_GEMM_SHAPES if quick else None),
            sparsities=gemm_sparsities or (QUICK_GEMM_SPARSITIES if quick else None),
            methods=gemm_methods, regimes=gemm_regimes, reps=5 if quick else 50, flush_l2=flush_l2,
            repeats=repeats, progress=progress, errors=errors)
    return result
