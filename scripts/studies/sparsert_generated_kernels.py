"""Do kernels generated per layer (SparseRT-style: the sparsity pattern compiled into the code)
beat the CSR kernel, cuBLAS and the best dense engine?

    source scripts/gpu_env.sh && python3 scripts/studies/sparsert_generated_kernels.py --out results/sparsert-generated-kernels/DATE-CARD
    python3 scripts/studies/sparsert_generated_kernels.py --dry-run --out /tmp/sparsert   # CPU: tiny sizes, no timing claims

The H100 run was split: `--parts 1,2` (sparsert-correctness-sweep.*) and `--parts 3` (sparsert-nets.*).

1. correctness of generated kernels on real layer shapes (fresh random weights and inputs;
   <= 1e-5 fp32, <= 2e-3 fp16 relative to max |reference|, reference in float64);
2. the GEMM sweep (converter/gemm_sweep.py SWEEP_SHAPES at 90% and 95%, batch 1, fp32,
   TF32 off): cuBLAS, the CSR (Sputnik-design) kernel when its sweep method "csr" is
   registered, the generated kernel; the bar (generated >= 1.15x CSR, geomean, on shapes
   with M <= 256 or K <= 1152) and, per point, why it loses where it does; compile cost per
   (shape, sparsity);
3. whole networks at 90%, batch 1, fp32 TF32 off: the sparsert runtime vs the CSR runtime
   (when registered) vs the best dense engine, with the one-time compile cost (first run,
   and again with the kernel and tuning caches warm).

Every raw number goes to <out>/sparsert.json, tables to <out>/sparsert.md; a short table last.
One failing part is recorded and the others go on. NVRTC compiles run on all CPU cores.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsecnn.common.numerics import rel_err
from sparsecnn.converter.study import best_dense, dense_engines, environment, error_record, study_parser

T_START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T_START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def env_info(device) -> dict:
    from sparsecnn.runtimes import RUNTIME_MODULES
    from sparsecnn.runtimes.nvrtc import nvrtc_available

    info = environment(device, modules=("cuda.bindings",))
    info["nvrtc"] = nvrtc_available()[1]
    info["runtimes"] = list(RUNTIME_MODULES)
    return info


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

def exact_sparse(shape, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    from sparsecnn.passes.masks import mask_magnitude

    w = torch.randn(shape, generator=gen)
    return w * mask_magnitude(w, sparsity)


def make_kernel(prog, src, device):
    from sparsecnn.runtimes.sparsert.codegen import EmulatedKernel, GeneratedKernel

    if device.type != "cuda":
        return EmulatedKernel(prog)
    return GeneratedKernel(prog, device, source=src)


def time_warm(fn, args, device, reps):
    """Median ms per call from a CUDA graph of 10 back-to-back calls (L2 warm)."""
    from sparsecnn.runtimes.timing import time_calls

    return time_calls(lambda j: fn(*args), device, reps=max(5, reps // 5), warmup=1, min_inner=10,
                      warmup_ms=2.0).median_ms


def time_cold(fn, args, device, reps):
    """Median ms of single calls after overwriting L2 (weights and inputs come from DRAM)."""
    from sparsecnn.runtimes.timing import time_fn

    return time_fn(lambda i: fn(*args), device, reps=max(5, reps // 3), warmup=3, flush_l2=True).median_ms


# --------------------------------------------------------------------------------------------
# part 1: correctness on real layer shapes
# --------------------------------------------------------------------------------------------

REAL_LAYERS = [  # label, M, cin, h, w, k, stride, pad, residual
    ("resnet18.layer1 3x3", 64, 64, 56, 56, 3, 1, 1, True),
    ("resnet18.layer2.0.conv1 3x3/2", 128, 64, 56, 56, 3, 2, 1, False),
    ("resnet18.layer2.0.downsample 1x1/2", 128, 64, 56, 56, 1, 2, 0, False),
    ("resnet18.layer3 3x3", 256, 256, 14, 14, 3, 1, 1, True),
    ("vgg19.features.2 3x3 @224", 64, 64, 224, 224, 3, 1, 1, False),
    ("trafficcamnet.layer1 3x3 @136x240", 64, 64, 136, 240, 3, 1, 1, True),
    ("1x1 256<-64 @56 (contiguous)", 256, 64, 56, 56, 1, 1, 0, False),
]
DRY_LAYERS = [
    ("tiny 3x3", 12, 5, 9, 11, 3, 1, 1, True),
    ("tiny 3x3/2", 10, 6, 10, 9, 3, 2, 1, False),
    ("tiny 1x1", 16, 8, 6, 6, 1, 1, 0, False),
]


def part_correctness(args, device, seed) -> dict:
    from sparsecnn.passes.csr.layout import csr_from_dense, gemm_view
    from sparsecnn.runtimes.sparsert import codegen as cg

    gen = torch.Generator().manual_seed(seed)
    layers = DRY_LAYERS if args.dry_run else REAL_LAYERS
    jobs = []
    for dtype in ("fp32", "fp16"):
        for i, (label, m, cin, h, w, k, st, pad, residual) in enumerate(layers):
            weight = exact_sparse((m, cin, k, k), 0.9, gen)
            bias = torch.randn(m, generator=gen)
            geo = cg.LayerGeometry.conv(m, cin, h, w, k, k, (st, st), (pad,) * 4)
            csr = csr_from_dense(gemm_view(weight))
            configs = cg.candidate_configs(csr, geo, dtype, max_configs=3)
            if not (i == 0 and dtype == "fp32"):
                configs = configs[:1]  # every configuration on one layer, the first guess elsewhere
            for cfg in configs:
                prog = cg.build_program(csr, geo, cfg, bias, relu=True, residual=residual, dtype=dtype)
                jobs.append({"label": label, "dtype": dtype, "weight": weight, "bias": bias, "geo": geo,
                             "residual": residual, "prog": prog, "src": cg.render_cuda(prog)})
    arch = "sm_90" if device.type != "cuda" else None
    from sparsecnn.runtimes.nvrtc import device_arch

    t0 = time.perf_counter()
    records = cg.compile_programs([j["src"] for j in jobs], arch or device_arch(device), args.workers, progress=True)
    compile_wall = time.perf_counter() - t0
    rows = []
    for job, rec in zip(jobs, records):
        geo, dtype = job["geo"], job["dtype"]
        tdt = torch.float16 if dtype == "fp16" else torch.float32
        row = {"layer": job["label"], "dtype": dtype, "config": job["prog"].config.name,
               "instructions": job["prog"].instructions(), "nnz": job["prog"].nnz, "gen_s": round(job["prog"].gen_seconds, 3),
               "compile_s": round(rec.seconds, 3), "compile_cpu_s": round(rec.cpu_seconds, 3), "cubin_bytes": rec.cubin_bytes}
        try:
            if rec.error:
                raise RuntimeError(rec.error)
            batch = 1 if args.dry_run else 2
            x = torch.randn(batch, geo.cin, geo.h, geo.w, generator=gen).to(tdt)
            r = torch.randn(batch, geo.M, geo.oh, geo.ow, generator=gen).to(tdt) if job["residual"] else None
            kern = make_kernel(job["prog"], job["src"][0], device)
            out = kern(x.to(device), residual=r.to(device) if r is not None else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            pad = geo.pads[0]
            ref_dev = device if device.type == "cuda" else torch.device("cpu")
            ref = F.conv2d(x.to(ref_dev).double(), job["weight"].to(ref_dev).double(), job["bias"].to(ref_dev).double(),
                           geo.strides, pad)
            if r is not None:
                ref = ref + r.to(ref_dev).double()
            ref = torch.relu(ref)
            err = rel_err(out, ref)
            tol = 1e-5 if dtype == "fp32" else 2e-3
            row.update(rel_err=err, tol=tol, ok=bool(err <= tol))
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        rows.append(row)
        log(f"correctness {row['layer']:<36} {dtype} {row['config']:<14} err={row.get('rel_err', float('nan')):.2e} "
            f"{'ok' if row.get('ok') else 'FAIL ' + row.get('error', '')}")
    return {"rows": rows, "compile_wall_s": round(compile_wall, 2),
            "compile_cpu_s": round(sum(r.cpu_seconds for r in records), 2),
            "effective_parallelism": round(sum(r.cpu_seconds for r in records) / max(compile_wall, 1e-9), 2),
            "all_ok": all(r.get("ok") for r in rows)}


# --------------------------------------------------------------------------------------------
# part 2: GEMM sweep
# --------------------------------------------------------------------------------------------

def why_it_loses(entry: dict, prog_stats: dict | None, n: int) -> str:
    if entry.get("error"):
        return entry["error"]
    if not prog_stats:
        return "no statistics"
    col_warps = math.ceil(n / 32)
    warps = prog_stats.get("warps_total", 0)
    l2_mb = prog_stats.get("l2_mb", 0)
    parts = []
    if warps < 132 * 8:
        parts.append(f"little parallelism: {warps} warps of ~{prog_stats.get('instr_per_warp', 0)} straight-line "
                     f"instructions each (N={n} gives {col_warps} column warps)")
    if prog_stats.get("fmas_per_load", 9) < 2.5:
        parts.append(f"low reuse: {prog_stats.get('fmas_per_load')} FMAs per loaded input row, {l2_mb:.0f} MB from L2")
    if prog_stats.get("instructions", 0) * 16 > 512 * 1024:
        parts.append(f"code of {prog_stats['instructions'] * 16 / 2**20:.1f} MiB streams through the instruction cache")
    return "; ".join(parts) or "-"


def part_sweep(args, device, seed) -> dict:
    from sparsecnn.converter import gemm_sweep
    from sparsecnn.runtimes.sparsert import codegen as cg

    for mod in gemm_sweep.SWEEP_PLUGINS:
        try:
            importlib.import_module(mod)
        except Exception as exc:
            log(f"sweep plugin {mod} failed to import: {exc}")
    from sparsecnn.runtimes.sparsert.sweep import build_spmm, spmm_programs

    methods = gemm_sweep.METHODS
    csr_factory = methods.get("csr")
    gen = torch.Generator().manual_seed(seed + 1)
    shapes = [(16, 36, 64), (32, 72, 49), (8, 20, 300)] if args.dry_run else list(gemm_sweep.SWEEP_SHAPES)
    sparsities = (0.9, 0.95)
    points = []
    for s in sparsities:
        for (m, k, n) in shapes:
            points.append({"M": m, "K": k, "N": n, "sparsity": s, "weight": exact_sparse((m, k), s, gen)})
    # generate every candidate program of every point, then compile them all in parallel
    t0 = time.perf_counter()
    for p in points:
        p["programs"] = spmm_programs(p["weight"], p["N"], torch.float32, args.sweep_configs,
                                      args.sweep_max_instructions)
        p["gen_s"] = sum(pr.gen_seconds for pr, _ in p["programs"])
    gen_s = time.perf_counter() - t0
    all_src = [src for p in points for _, src in p["programs"]]
    from sparsecnn.runtimes.nvrtc import device_arch

    arch = device_arch(device) if device.type == "cuda" else "sm_90"
    log(f"sweep: {len(all_src)} programs, {sum(pr.instructions() for p in points for pr, _ in p['programs'])} "
        f"instructions; compiling")
    t0 = time.perf_counter()
    records = cg.compile_programs(all_src, arch, args.workers, progress=True)
    compile_wall = time.perf_counter() - t0
    it = iter(records)
    for p in points:
        p["records"] = [next(it) for _ in p["programs"]]
    rows = []
    for p in points:
        m, k, n, s = p["M"], p["K"], p["N"], p["sparsity"]
        row = {"M": m, "K": k, "N": n, "sparsity": s, "nnz": int((p["weight"] != 0).sum()),
               "in_bar": bool(m <= 256 or k <= 1152),
               "sparsert_gen_s": round(p["gen_s"], 3),
               "sparsert_compile_s_sum": round(sum(r.seconds for r in p["records"]), 3),
               "sparsert_compile_s_max": round(max([r.seconds for r in p["records"]] or [0]), 3),
               "sparsert_instructions": [pr.instructions() for pr, _ in p["programs"]]}
        w = p["weight"].to(device)
        b = torch.randn(k, n, generator=gen).to(device)
        ref = (w.double() @ b.double())
        runs = {"cublas": lambda x, w=w: torch.matmul(w, x)}
        if csr_factory is not None:
            try:
                runs["csr"] = csr_factory(w, torch.float32)
            except Exception as exc:
                row["csr_error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            row["csr_error"] = "sweep method 'csr' is not registered"
        try:
            if device.type == "cuda":
                kern, entry = build_spmm(w, n, torch.float32, device, programs=p["programs"], workers=args.workers)
            else:
                kern, entry = (make_kernel(p["programs"][0][0], None, device) if p["programs"] else None), \
                    {"config": p["programs"][0][0].config.name if p["programs"] else None}
                if not p["programs"]:
                    entry["error"] = "code size cap"
            row["sparsert_config"] = entry.get("config")
            row["sparsert_candidates_ms"] = entry.get("candidates_ms")
            row["sparsert_tune_s"] = entry.get("tune_s")
            if kern is None:
                row["sparsert_error"] = entry.get("error", "not generated")
            else:
                runs["sparsert"] = lambda x, kern=kern: kern(x)
                chosen = next(pr for pr, _ in p["programs"] if pr.config.name == entry.get("config"))
                st = chosen.stats()
                cfg = chosen.config
                col_warps = math.ceil(n / (32 * cfg.vec))
                warps_total = math.ceil(col_warps / cfg.warps_n) * cfg.warps_n * st["groups"] * cfg.k_split
                st.update(warps_total=warps_total, instr_per_warp=int(st["instructions"] / (st["groups"] * cfg.k_split)),
                          l2_mb=round(col_warps * st["loads"] * 32 * cfg.vec * 4 / 2**20, 1))
                row["sparsert_stats"] = st
        except Exception as exc:
            row["sparsert_error"] = f"{type(exc).__name__}: {exc}"[:500]
        for name, fn in runs.items():
            try:
                out = fn(b)
                row[f"{name}_rel_err"] = rel_err(out, ref)
                if not row[f"{name}_rel_err"] <= 1e-4:
                    row[f"{name}_error"] = f"wrong result: rel err {row[f'{name}_rel_err']:.2e}"
                    continue
                if device.type == "cuda":
                    row[f"{name}_ms"] = time_warm(fn, (b,), device, args.reps)
                    row[f"{name}_cold_ms"] = time_cold(fn, (b,), device, args.reps)
                else:
                    from sparsecnn.runtimes.timing import time_fn

                    row[f"{name}_ms"] = time_fn(lambda i: fn(b), device, reps=2, warmup=1).median_ms
            except Exception as exc:
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if row.get("sparsert_ms") and row.get("csr_ms"):
            row["sparsert_vs_csr"] = row["csr_ms"] / row["sparsert_ms"]
        if row.get("sparsert_ms") and row.get("cublas_ms"):
            row["sparsert_vs_cublas"] = row["cublas_ms"] / row["sparsert_ms"]
        if row.get("csr_ms") and row.get("cublas_ms"):
            row["csr_vs_cublas"] = row["cublas_ms"] / row["csr_ms"]
        if not row.get("sparsert_ms") or (row.get("sparsert_vs_csr") or 9) < 1.0:
            row["why_slower"] = why_it_loses({"error": row.get("sparsert_error")}, row.get("sparsert_stats"), n)
        rows.append(row)
        log(f"sweep {m}x{k}x{n} s={s}: cublas {row.get('cublas_ms', float('nan')):.4f} csr "
            f"{row.get('csr_ms', float('nan')):.4f} sparsert {row.get('sparsert_ms', float('nan')):.4f} ms "
            f"({row.get('sparsert_config')}) {row.get('sparsert_error', '')}")
        del b, w, runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar = {}
    for s in sparsities:
        ratios = [r.get("sparsert_vs_csr") for r in rows if r["sparsity"] == s and r["in_bar"]]
        g = geomean(ratios)
        missing = sum(1 for r in rows if r["sparsity"] == s and r["in_bar"] and not r.get("sparsert_vs_csr"))
        bar[str(s)] = {"geomean_sparsert_vs_csr": g, "points": len(ratios), "missing": missing,
                       "pass": (g is not None and g >= 1.15 and missing == 0) if csr_factory else None,
                       "geomean_sparsert_vs_cublas": geomean(r.get("sparsert_vs_cublas") for r in rows
                                                             if r["sparsity"] == s and r["in_bar"])}
    return {"rows": rows, "bar": bar, "gen_s": round(gen_s, 2), "compile_wall_s": round(compile_wall, 2),
            "compile_cpu_s": round(sum(r.cpu_seconds for r in records), 2), "programs": len(records),
            "effective_parallelism": round(sum(r.cpu_seconds for r in records) / max(compile_wall, 1e-9), 2),
            "csr_method": csr_factory is not None}


# --------------------------------------------------------------------------------------------
# part 3: whole networks
# --------------------------------------------------------------------------------------------

def _time_engine(engine, x, device, reps) -> tuple[float, list]:
    from sparsecnn.runtimes.timing import time_fn

    xs = engine.prepare(x)
    with torch.no_grad(), engine._precision_context():
        runner = engine.runner(*xs)
        outs = [o.float().clone() for o in runner(*xs)]
        if device.type == "cuda":
            t = time_fn(lambda i: runner.replay(), device, reps=reps, warmup=10)
        else:
            t = time_fn(lambda i: runner(*xs), device, reps=2, warmup=1)
    return t.median_ms, outs


def part_networks(args, device, seed, deadline) -> dict:
    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models import load_model
    from sparsecnn.passes.prune import prune_unstructured
    from sparsecnn.runtimes import RUNTIME_MODULES, get_runtime, load_engine

    models = ["tinyresnet"] if args.dry_run else args.models.split(",")
    out = {}
    gen = torch.Generator().manual_seed(seed + 2)
    base = {"dtype": "fp32", "tf32": False}
    for name in models:
        if elapsed() > deadline:
            out[name] = {"skipped": f"time budget ({deadline:.0f} s) reached"}
            continue
        res = {}
        out[name] = res
        try:
            t0 = time.perf_counter()
            module, spec, entry = load_model(name)
            model = prune_unstructured(export_onnx(module, spec, entry.exclude), 0.9).model
            res["export_prune_s"] = round(time.perf_counter() - t0, 2)
            x = torch.randn(1, *spec.shape, generator=gen)
            torch_rt = get_runtime("torch")
            ref_outs = None
            # cuDNN as PyTorch calls it, in both layouts, and the per-layer best dense conv
            for label, make in (("torch_nchw", lambda: torch_rt.compile(model, device, base)),
                                ("torch_channels_last", lambda: torch_rt.compile(model, device, {**base, "channels_last": True})),
                                ("torch_dense_best", lambda: dense_engines(model, device, base, layouts=("NCHW",))["NCHW"])):
                try:
                    eng = make()
                    ms, outs = _time_engine(eng, x, device, args.reps)
                    res[f"{label}_ms"] = ms
                    if ref_outs is None:
                        ref_outs = outs
                    del eng
                except Exception as exc:
                    res[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            dense = {k: v for k, v in res.items() if k.startswith("torch_") and k.endswith("_ms")}
            best, best_ms = best_dense(dense)
            if best is not None:
                res["best_dense"] = best.removesuffix("_ms")
                res["best_dense_ms"] = best_ms
            log(f"{name}: dense {dense}")
            # sparsert, first run: caches cold for these fresh weights
            rt = get_runtime("sparsert")
            opts = {**base, "max_configs": args.net_configs, "max_instructions": args.max_instructions,
                    "compile_workers": args.workers}
            if device.type != "cuda":
                opts["emulate_kernels"] = True
            t0 = time.perf_counter()
            sparse = rt.rewrite(model, opts)
            res["sparsert_rewrite_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            eng = rt.compile(sparse, device, opts)
            res["sparsert_compile_first_s"] = round(time.perf_counter() - t0, 2)
            res["sparsert_compile_costs_first"] = eng.compile_costs
            ms, outs = _time_engine(eng, x, device, args.reps)
            res["sparsert_ms"] = ms
            res["sparsert_rel_err_vs_torch"] = max(rel_err(a, b) for a, b in zip(outs, ref_outs)) if ref_outs else None
            report = eng.report()
            res["sparsert_layers"] = report
            fused = [r for r in report if r.get("op", "").startswith("sparsecnn::")]
            res["sparsert_choices"] = {k: sum(1 for r in fused if r.get("kind") == k) for k in ("generated", "csr", "dense")}
            log(f"{name}: sparsert {ms:.3f} ms, first compile {res['sparsert_compile_first_s']} s, choices "
                f"{res['sparsert_choices']}")
            # again with the kernel and tuning caches warm (a new process would see the same)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.engine"
                eng.save(path)
                del eng
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                t0 = time.perf_counter()
                eng2 = load_engine(path, str(device)) if device.type == "cuda" else rt.compile(sparse, device, opts)
                res["sparsert_reload_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            eng3 = rt.compile(rt.rewrite(model, opts), device, opts)
            res["sparsert_compile_cached_s"] = round(time.perf_counter() - t0, 2)
            res["sparsert_compile_costs_cached"] = eng3.compile_costs
            ms2, _ = _time_engine(eng2, x, device, args.reps)
            res["sparsert_reloaded_ms"] = ms2
            del eng2, eng3
            if "csr" in RUNTIME_MODULES:
                try:
                    crt = get_runtime("csr")
                    t0 = time.perf_counter()
                    ceng = crt.compile(crt.rewrite(model, base), device, base)
                    res["csr_compile_s"] = round(time.perf_counter() - t0, 2)
                    cms, couts = _time_engine(ceng, x, device, args.reps)
                    res["csr_ms"] = cms
                    res["csr_rel_err_vs_torch"] = max(rel_err(a, b) for a, b in zip(couts, ref_outs)) if ref_outs else None
                    del ceng
                except Exception as exc:
                    res["csr_error"] = f"{type(exc).__name__}: {exc}"[:300]
            else:
                res["csr_error"] = "no runtime named 'csr' registered"
            if res.get("best_dense_ms"):
                res["sparsert_vs_best_dense"] = res["best_dense_ms"] / res["sparsert_ms"]
                if res.get("csr_ms"):
                    res["csr_vs_best_dense"] = res["best_dense_ms"] / res["csr_ms"]
        except Exception as exc:
            res.update(error_record(exc))
            log(f"{name}: FAILED {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def fmt(v, spec=".4f"):
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def markdown(result: dict) -> str:
    L = [f"# SparseRT-style generated kernels on {result['env'].get('card', 'CPU (dry run)')}", "",
         f"seed {result['seed']}; total {result['elapsed_s']} s; NVRTC {result['env'].get('nvrtc')}; "
         f"cuda-bindings {result['env'].get('cuda.bindings')}; {result['env'].get('cpus')} CPUs", ""]
    c = result.get("correctness", {})
    if "rows" in c:
        L += ["## 1. Correctness (fresh random weights and inputs, 90% sparse, relative to max |float64 reference|)", "",
              f"compile: {c['compile_wall_s']} s wall, {c['compile_cpu_s']} s CPU (parallelism {c['effective_parallelism']})", "",
              "| layer | dtype | config | instructions | compile s | rel err | ok |", "|---|---|---|---:|---:|---:|---|"]
        for r in c["rows"]:
            L.append(f"| {r['layer']} | {r['dtype']} | {r['config']} | {r['instructions']} | {r['compile_s']} | "
                     f"{fmt(r.get('rel_err'), '.2e')} | {'yes' if r.get('ok') else 'NO ' + r.get('error', '')} |")
        L.append("")
    elif c:
        L += ["## 1. Correctness", "", f"FAILED: {c.get('error')}", ""]
    s = result.get("sweep", {})
    if "rows" in s:
        L += ["## 2. GEMM sweep (batch 1, fp32, TF32 off; ms per call from a CUDA graph of 10 calls, L2 warm; "
              "cold = single call after an L2 flush)", "",
              f"{s['programs']} programs: generation {s['gen_s']} s, compile {s['compile_wall_s']} s wall / "
              f"{s['compile_cpu_s']} s CPU (parallelism {s['effective_parallelism']})", "",
              "| M | K | N | sparsity | cuBLAS | CSR | generated | config | gen/CSR | gen/cuBLAS | cold cuBLAS | cold CSR | "
              "cold gen | compile s (sum/max) | why slower |",
              "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for r in s["rows"]:
            L.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['sparsity']} | {fmt(r.get('cublas_ms'))} | "
                     f"{fmt(r.get('csr_ms')) if r.get('csr_ms') else 'missing'} | "
                     f"{fmt(r.get('sparsert_ms')) if r.get('sparsert_ms') else 'not generated'} | "
                     f"{r.get('sparsert_config') or '-'} | {fmt(r.get('sparsert_vs_csr'), '.2f')} | "
                     f"{fmt(r.get('sparsert_vs_cublas'), '.2f')} | {fmt(r.get('cublas_cold_ms'))} | {fmt(r.get('csr_cold_ms'))} | "
                     f"{fmt(r.get('sparsert_cold_ms'))} | {r['sparsert_compile_s_sum']}/{r['sparsert_compile_s_max']} | "
                     f"{r.get('why_slower', '')} |")
        L += ["", "Bar: generated >= 1.15x CSR (geomean) on shapes with M <= 256 or K <= 1152:", ""]
        for sp, b in s["bar"].items():
            L.append(f"- {sp}: geomean {fmt(b['geomean_sparsert_vs_csr'], '.2f')}x over {b['points']} points "
                     f"({b['missing']} missing) -> {'PASS' if b['pass'] else ('FAIL' if b['pass'] is False else 'n/a (no CSR method)')}; "
                     f"vs cuBLAS {fmt(b['geomean_sparsert_vs_cublas'], '.2f')}x")
        L.append("")
    elif s:
        L += ["## 2. GEMM sweep", "", f"FAILED: {s.get('error')}", ""]
    n = result.get("networks", {})
    if isinstance(n, dict) and n and "error" not in n:
        L += ["## 3. Whole networks (90%, batch 1, fp32, TF32 off, one CUDA graph; ms)", "",
              "| model | best dense | sparsert | x dense | CSR runtime | x dense | compile first s | compile cached s | "
              "reload s | generated/csr/dense layers | err vs torch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for name, r in n.items():
            if "sparsert_ms" not in r:
                L.append(f"| {name} | {r.get('skipped') or r.get('error', '')[:100]} |")
                continue
            ch = r.get("sparsert_choices", {})
            L.append(f"| {name} | {fmt(r.get('best_dense_ms'))} ({r.get('best_dense')}) | {fmt(r['sparsert_ms'])} | "
                     f"{fmt(r.get('sparsert_vs_best_dense'), '.2f')} | {fmt(r.get('csr_ms')) if r.get('csr_ms') else 'missing'} | "
                     f"{fmt(r.get('csr_vs_best_dense'), '.2f')} | {r.get('sparsert_compile_first_s')} | "
                     f"{r.get('sparsert_compile_cached_s')} | {r.get('sparsert_reload_s')} | "
                     f"{ch.get('generated', 0)}/{ch.get('csr', 0)}/{ch.get('dense', 0)} | "
                     f"{fmt(r.get('sparsert_rel_err_vs_torch'), '.1e')} |")
        for name, r in n.items():
            if not r.get("sparsert_layers"):
                continue
            L += ["", f"### {name}: per layer (candidates in ms per call, L2 warm)", "",
                  "| layer | ran | config | candidates | nnz | gen s | compile s | note |", "|---|---|---|---|---:|---:|---:|---|"]
            for lr in r["sparsert_layers"]:
                if not lr.get("op", "").startswith("sparsecnn::"):
                    continue
                cands = ", ".join(f"{k.replace('generated:', '')} {v:.4f}" for k, v in (lr.get("candidates_ms") or {}).items())
                note = lr.get("reason", "") + (" " + json.dumps(lr["notes"]) if lr.get("notes") else "")
                L.append(f"| {lr['name']} | {lr.get('choice')} | {lr.get('config', '-')} | {cands} | {lr.get('nnz')} | "
                         f"{lr.get('gen_s', '-')} | {lr.get('compile_s', '-')} | {note[:200]} |")
        L.append("")
    return "\n".join(L)


def short_table(result: dict) -> str:
    L = ["", "=== generated kernels summary ==="]
    c = result.get("correctness", {})
    if "rows" in c:
        worst = {d: max((r.get("rel_err", float("inf")) for r in c["rows"] if r["dtype"] == d), default=None)
                 for d in ("fp32", "fp16")}
        L.append(f"correctness: {'all ok' if c['all_ok'] else 'FAILURES'}; worst rel err fp32 {fmt(worst['fp32'], '.1e')} "
                 f"fp16 {fmt(worst['fp16'], '.1e')}")
    s = result.get("sweep", {})
    if "bar" in s:
        for sp, b in s["bar"].items():
            L.append(f"sweep {sp}: generated/CSR geomean {fmt(b['geomean_sparsert_vs_csr'], '.2f')}x "
                     f"({'PASS' if b['pass'] else ('FAIL' if b['pass'] is False else 'CSR missing')}), "
                     f"generated/cuBLAS {fmt(b['geomean_sparsert_vs_cublas'], '.2f')}x")
    n = result.get("networks", {})
    L.append(f"{'model':<14}{'dense ms':>10}{'sparsert':>10}{'x':>6}{'csr':>9}{'1st compile s':>15}{'cached s':>10}")
    for name, r in (n.items() if isinstance(n, dict) else []):
        if "sparsert_ms" in r:
            L.append(f"{name:<14}{fmt(r.get('best_dense_ms'), '.3f'):>10}{fmt(r['sparsert_ms'], '.3f'):>10}"
                     f"{fmt(r.get('sparsert_vs_best_dense'), '.2f'):>6}{fmt(r.get('csr_ms'), '.3f'):>9}"
                     f"{fmt(r.get('sparsert_compile_first_s'), '.1f'):>15}{fmt(r.get('sparsert_compile_cached_s'), '.1f'):>10}")
        else:
            L.append(f"{name:<14} {r.get('skipped') or r.get('error', '')[:80]}")
    return "\n".join(L)


def main() -> None:
    ap = study_parser(__doc__, writes="sparsert.json and sparsert.md", dry_run="CPU, tiny sizes, interpreted kernels: checks the script")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    ap.add_argument("--models", default="resnet18,vgg19,trafficcamnet")
    ap.add_argument("--reps", type=int, default=100, help="timing repetitions (default 100)")
    ap.add_argument("--sweep-configs", type=int, default=3, help="tile configurations per sweep point (default 3)")
    ap.add_argument("--net-configs", type=int, default=3, help="tile configurations per network layer (default 3)")
    ap.add_argument("--max-instructions", type=int, default=None,
                    help="code-size cap per generated network kernel (default: the runtime's, 120000)")
    ap.add_argument("--sweep-max-instructions", type=int, default=160_000,
                    help="code-size cap in the sweep (default 160000: 512x4608 at 95%% is generated, at 90%% not)")
    ap.add_argument("--workers", type=int, default=None, help="NVRTC threads (default: all CPU cores)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip models not started by then (default 330)")
    ap.add_argument("--cache", help="kernel cache folder (default: a fresh temporary one: first runs are cold)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["SPARSECNN_CACHE"] = args.cache or tempfile.mkdtemp(prefix="sparsecnn-sparsert-")
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        sys.exit("no CUDA GPU here: run with --dry-run")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seed = int.from_bytes(os.urandom(4), "little")
    result = {"env": env_info(device), "seed": seed, "args": vars(args), "cache": os.environ["SPARSECNN_CACHE"]}
    log(json.dumps(result["env"]))
    parts = set(args.parts.split(","))

    def save():
        result["elapsed_s"] = round(elapsed(), 1)
        from sparsecnn.common.fileio import write_text_atomic

        write_text_atomic(out / "sparsert.json", json.dumps(result, indent=1, default=str))
        write_text_atomic(out / "sparsert.md", markdown(result))

    for part, key, fn in (("1", "correctness", lambda: part_correctness(args, device, seed)),
                          ("2", "sweep", lambda: part_sweep(args, device, seed)),
                          ("3", "networks", lambda: part_networks(args, device, seed, args.budget_s))):
        if part not in parts:
            continue
        log(f"part {part}: {key}")
        try:
            result[key] = fn()
        except Exception as exc:
            result[key] = error_record(exc, trace_chars=4000)
            log(f"part {part} FAILED: {exc}")
        save()
    save()
    print(short_table(result))


if __name__ == "__main__":
    main()
