"""Do unstructured-sparse CSR kernels beat cuBLAS / cuDNN, and the `csr` runtime the best dense engine?
The CSR (Sputnik-style) kernels and the `csr` runtime, measured in one process.

  source scripts/gpu_env.sh && python3 scripts/studies/csr_kernels.py --out results/csr-kernels/DATE-CARD
  python scripts/studies/csr_kernels.py --dry-run --out /tmp/csr   # CPU: tiny sizes, kernels emulated, no timing claims

Parts (--parts, default all):
  correctness  every kernel instantiation (staged csr_conv, SpMV, the Sputnik port directly,
               as im2col + SpMM and on shifted input copies) vs a float64 CPU reference on the
               masked dense weight;
               fresh random inputs (seed recorded); odd sizes, small K, empty rows, several
               K chunks, split-K; tolerance 1e-5 (fp32), 2e-3 (fp16)
  sweep        Sputnik's (M, K, N) x sparsity grid, fp32 TF32 off: cuBLAS time / CSR SpMM
               time (both as CUDA-graph replays, same run), the tuner's choice over both
               kernel families (staged csr_conv SpMM and the Sputnik port) and its family,
               every candidate, the port with Sputnik's own heuristic config alone ("port"),
               the floor; geomean at 90 % and 98 % vs Sputnik's 1.25x / 2.28x
  conv         the same shapes as 3x3 convs: the tuner's best of the implicit-im2col conv,
               im2col + Sputnik SpMM and shifted copies + Sputnik SpMM (the preparation timed
               in) vs cuDNN (best of NCHW, channels_last; cudnn.benchmark on)
  nets         resnet18, vgg19, trafficcamnet at batch 1, 90 % unstructured: csr engine vs the
               best dense engine (torch runtime NCHW / channels_last, dense_conv=best passed
               through), whole network in one CUDA graph, fp32 TF32 off and fp16; per-layer
               report; errors vs ONNX Runtime; ONNX sizes and engine weight memory
Writes <out>/csr.json (every number, after each part) and <out>/csr.md; prints a
short table last. A failing part is recorded and the others still run.

Expected on the H100: correctness ~5 s, sweep + conv ~1.5-2 min, nets ~4-5 min (three
models, fp32 + fp16, every layer tuned over ~17-22 candidates). If one call must stay
short, split it:  --parts correctness,sweep   and   --parts nets  (or --models per call).
"""
from __future__ import annotations

import json
import math
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsecnn.converter.study import best_dense, dense_engines, environment, error_record, rel_err, study_parser

ROOT = Path(__file__).resolve().parents[2]
SPUTNIK = {  # cuBLAS time / Sputnik time on the H100, as published with Sputnik
    (64, 576, 50176): (0.65, 0.74, 0.99, 1.21, 1.78), (128, 1152, 12544): (0.65, 0.90, 1.18, 1.60, 2.16),
    (256, 2304, 3136): (0.66, 0.92, 1.44, 2.06, 3.23), (512, 4608, 784): (0.44, 0.60, 1.04, 1.84, 3.19),
    (64, 576, 3136): (1.10, 1.25, 1.45, 1.51, 1.86), (128, 1152, 784): (0.89, 1.16, 1.45, 1.59, 1.80),
    (256, 2304, 196): (0.64, 0.85, 1.30, 1.69, 2.21), (512, 4608, 49): (0.55, 0.76, 1.22, 1.78, 2.48),
}
SPARSITIES = (0.7, 0.8, 0.9, 0.95, 0.98)
TOL = {"fp32": 1e-5, "fp16": 2e-3}
TARGETS = {"resnet18": 1.2, "vgg19": 1.3, "trafficcamnet": 1.2}


class Run:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.results: dict = {"args": vars(args), "parts": {}, "errors": {}}
        self.backend = None

    def save(self) -> None:
        from sparsecnn.common.fileio import write_text_atomic

        write_text_atomic(self.out / "csr.json", json.dumps(self.results, indent=1, default=str))

    def kernel_backend(self):
        if self.backend is None:
            if self.dry:
                sys.path.insert(0, str(ROOT / "tests"))
                from cuda_emu import EmuBackend

                self.backend = EmuBackend()
            else:
                from sparsecnn.runtimes.csr.kernels import NvrtcBackend

                self.backend = NvrtcBackend(self.device)
        return self.backend

    def sms(self) -> int:
        return torch.cuda.get_device_properties(0).multi_processor_count if not self.dry else 132


def env_info(run: Run) -> dict:
    from sparsecnn.runtimes.nvrtc import nvrtc_available

    info = environment(run.device, modules=("cuda.bindings",))
    info["nvrtc"] = nvrtc_available()[1]
    return info


def pruned_weight(shape, density, gen, empty_rows=(0,), full_row=1):
    w = torch.randn(*shape, generator=gen) * (torch.rand(*shape, generator=gen) < density)
    for r in empty_rows:
        if r < shape[0]:
            w[r] = 0
    if full_row is not None and full_row < shape[0]:
        w[full_row] = torch.randn(*shape[1:], generator=gen)
    return w


# --- 1. correctness -----------------------------------------------------------------------

def _conv_relu_error(plan, g, x, w, b, gen, residual: bool, dev) -> float:
    """Relative error of plan(x [, r]) against a float64 relu(conv(x) + b [+ r]); r fresh random."""
    xf = F.pad(x.double(), (g.pl, g.pr, g.pt, g.pb))
    ref = F.conv2d(xf, w.to(x.dtype).double(), b.double(), (g.sh, g.sw), 0, (g.dh, g.dw))
    r = torch.randn(ref.shape, generator=gen).to(x.dtype) if residual else None
    y = plan(x.to(dev), None if r is None else r.to(dev))
    return rel_err(y.float(), torch.relu(ref if r is None else ref + r.double()))


def part_correctness(run: Run) -> dict:
    from sparsecnn.passes.csr.layout import csr_from_dense, gemm_view
    from sparsecnn.runtimes.csr.kernels import (CONV_VARIANTS, SPMV_BATCH, SPUTNIK_VARIANTS, ConvGeometry, ConvPlan,
                                                GemvPlan, SputnikConfig, SputnikPlan, conv_expression,
                                                gemm_as_conv_geometry, gemm_conv_plan_call, kernel_name, spmm_config,
                                                spmv_expression, window_config, with_split)

    seed = int(time.time() * 1e6) % (2**31)
    gen = torch.Generator().manual_seed(seed)
    backend, dev = run.kernel_backend(), run.device
    window_cases = [ConvGeometry(37, 19, 23, 29, 3, 3, 1, 1, 1, 1, 1, 1),           # odd sizes, 3x3 same
                    ConvGeometry(45, 7, 17, 15, 3, 3, 2, 2, 0, 1, 1, 0),            # stride 2, asymmetric pads
                    ConvGeometry(21, 2, 9, 13, 1, 1, 2, 2),                         # K = 2, 1x1 stride 2
                    ConvGeometry(19, 5, 12, 11, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2)]      # dilation 2
    vec_cases = [ConvGeometry(53, 3, 7, 11), ConvGeometry(70, 96, 10, 100)]       # K = 3 odd N; aligned N
    if run.dry:
        window_cases, vec_cases = window_cases[:2], vec_cases[:1]
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        for p, rpt, threads, vec, ss in CONV_VARIANTS:
            if run.dry and (threads == 512 or rpt == 8):
                continue
            for gi, g in enumerate(vec_cases if vec else window_cases):
                mk = spmm_config if vec else window_config
                for budget_name, budget in (("default", 8192), ("small", (5 if vec else 2) * 32 * p * 3)):
                    cfg = mk(g, p, rpt, threads=threads, budget=budget)
                    if ss:
                        cfg = replace(cfg, ss=True)
                    if budget_name == "small":
                        cfg = with_split(g, cfg, sms=10_000) or cfg
                    w = pruned_weight((g.m, g.c, g.kh, g.kw), 0.2, gen, empty_rows=(0, g.m // 2))
                    x = torch.randn(2, g.c, g.h, g.w, generator=gen).to(dtype)
                    b = torch.randn(g.m, generator=gen)
                    plan = ConvPlan(csr_from_dense(gemm_view(w)), g, cfg, dtype, dev, backend, b, relu=True)
                    # the small-budget (several chunks, split-K) variant also adds a fused residual
                    r = budget_name == "small"
                    err = _conv_relu_error(plan, g, x, w, b, gen, r, dev)
                    rows.append({"kernel": conv_expression(dtype, p, rpt, threads, vec, ss), "case": gi,
                                 "config": cfg.label(), "dtype": dtype_name, "rel_err": err,
                                 "residual": r, "pass": err <= TOL[dtype_name]})
        for nb in SPMV_BATCH:
            for batch in ((1,) if nb == 1 else (3, 6)):
                w = pruned_weight((45, 301), 0.15, gen)
                w[7] = 0
                w[7, :3] = 1.0
                x = torch.randn(batch, 301, generator=gen).to(dtype)
                b = torch.randn(45, generator=gen)
                y = GemvPlan(csr_from_dense(w), dtype, dev, backend, b, relu=True)(x.to(dev))
                ref = torch.relu(F.linear(x.double(), w.to(dtype).double(), b.double()))
                err = rel_err(y.float(), ref)
                rows.append({"kernel": spmv_expression(dtype, nb), "case": batch, "dtype": dtype_name, "rel_err": err,
                             "pass": err <= TOL[dtype_name]})
        # Sputnik's SpMM: every variant on B read directly (N odd / not a multiple of the tile, but of
        # the vector width; K from 3 to several tiles, empty rows, ROMA prefixes) and, as im2col + SpMM,
        # on the conv cases
        for variant in SPUTNIK_VARIANTS[dtype]:
            for mode in ("direct", "im2col", "shifted"):
                cfg = SputnikConfig(*variant, im2col=mode == "im2col", shifted=mode == "shifted")
                if mode == "direct":
                    cases = [ConvGeometry(45, k, 1, cfg.dv * (2 * cfg.bx // cfg.dv + 3))
                             for k in ((3, 301) if not run.dry else (3,))]
                elif mode == "im2col":
                    cases = window_cases
                else:  # stride-1 convs, dense vectors of <= 4
                    cases = [g for g in window_cases if (g.sh, g.sw) == (1, 1)] if cfg.dv <= 4 else []
                for gi, g in enumerate(cases):
                    w = pruned_weight((g.m, g.c, g.kh, g.kw), 0.2, gen, empty_rows=(0, g.m // 2))
                    x = torch.randn(2, g.c, g.h, g.w, generator=gen).to(dtype)
                    b = torch.randn(g.m, generator=gen)
                    plan = SputnikPlan(csr_from_dense(gemm_view(w)), g, cfg, dtype, dev, backend, b, relu=True)
                    r = gi % 2 == 1  # odd cases: with a fused residual
                    err = _conv_relu_error(plan, g, x, w, b, gen, r, dev)
                    rows.append({"kernel": kernel_name(cfg, dtype), "case": gi, "config": cfg.label(),
                                 "dtype": dtype_name, "rel_err": err, "residual": r,
                                 "pass": err <= TOL[dtype_name]})
        w = pruned_weight((23, 70), 0.2, gen)
        x = torch.randn(11, 70, generator=gen).to(dtype)
        g = gemm_as_conv_geometry(23, 70, 11)
        plan = ConvPlan(csr_from_dense(w), g, spmm_config(g, 1, 4), dtype, dev, backend, None)
        err = rel_err(gemm_conv_plan_call(plan, x.to(dev)).float(), F.linear(x.double(), w.to(dtype).double()))
        rows.append({"kernel": "gemm batch 11 via spmm", "dtype": dtype_name, "rel_err": err, "pass": err <= TOL[dtype_name]})
    worst = {}
    for r in rows:
        k = (r["kernel"], r["dtype"])
        worst[k] = max(worst.get(k, 0.0), r["rel_err"])
    fails = [r for r in rows if not r["pass"]]
    print(f"correctness: {len(rows) - len(fails)}/{len(rows)} checks pass over {len(worst)} kernel/dtype pairs "
          f"(seed {seed}); worst fp32 {max(v for (k, d), v in worst.items() if d == 'fp32'):.2e}, "
          f"fp16 {max(v for (k, d), v in worst.items() if d == 'fp16'):.2e}", flush=True)
    for r in fails:
        print("  FAIL", r, flush=True)
    return {"seed": seed, "checks": rows, "failures": len(fails), "kernels": len(worst)}


# --- 2 and 3. GEMM sweep and the same shapes as convs ---------------------------------------

def _magnitude_pruned(m: int, k: int, sparsity: float, gen, device) -> torch.Tensor:
    from sparsecnn.passes.masks import mask_magnitude

    w = torch.randn(m, k, generator=gen)
    return (w * mask_magnitude(w, sparsity)).to(device)


def part_sweep(run: Run, conv_view: bool) -> dict:
    import sparsecnn.runtimes.csr.sweep  # noqa: F401  (registers "csr")
    from sparsecnn.converter.gemm_sweep import METHODS
    from sparsecnn.passes.csr.layout import csr_from_dense, gemm_view
    from sparsecnn.runtimes.csr.kernels import (ConvGeometry, candidate_configs, expected_floor_us, make_plan,
                                                sputnik_candidates, time_in_graph_us, tune)

    dev = run.device
    shapes = list(SPUTNIK) if not run.dry else [(16, 36, 49), (8, 18, 9)]
    sparsities = run.args.sparsities or (SPARSITIES if not run.dry else (0.9,))
    gen = torch.Generator().manual_seed(1234)
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for (m, k, n) in shapes:
        b = torch.randn(k, n, generator=gen).to(dev)
        for s in sparsities:
            row = {"M": m, "K": k, "N": n, "sparsity": s}
            try:
                w = _magnitude_pruned(m, k, s, gen, dev)
                nnz = int((w != 0).sum())
                row["nnz"] = nnz
                row["floor_us"] = round(expected_floor_us(nnz, n, k * n * 4), 2)
                ref = (w.double() @ b.double())
                row["cublas_us"] = time_in_graph_us(lambda a: torch.mm(w, a), b, dev)
                if run.dry:
                    method = METHODS["csr"](w, torch.float32, backend=run.kernel_backend())
                else:
                    method = METHODS["csr"](w, torch.float32)
                y = method(b)
                tuned = method.tuned[n]
                row["csr_err"] = rel_err(y, ref)
                row["csr_us"] = time_in_graph_us(method, b, dev)
                row["csr_config"], row["csr_candidates"] = tuned["config"], tuned["candidates"]
                row["csr_family"] = tuned["family"]
                row["speedup_vs_cublas"] = row["cublas_us"] / row["csr_us"]
                # the port with Sputnik's own heuristic config alone (its time as a candidate of the tuner)
                port = sputnik_candidates(n)[0].label()
                port_us = next((c.get("us") for c in tuned["candidates"] if c["config"] == port), None)
                if port_us:
                    row["sputnik_port_config"], row["sputnik_port_us"] = port, port_us
                    row["sputnik_port_vs_cublas"] = row["cublas_us"] / port_us
                best_staged = [c["us"] for c in tuned["candidates"] if not c["config"].startswith("sputnik") and "us" in c]
                if best_staged:
                    row["staged_best_us"] = min(best_staged)
                row["csr_useful_tflops"] = 2 * nnz * n / row["csr_us"] / 1e6
                row["cublas_tflops"] = 2 * m * k * n / row["cublas_us"] / 1e6
                row["floor_fraction"] = row["floor_us"] / row["csr_us"]
                if (m, k, n) in SPUTNIK and s in SPARSITIES:
                    row["sputnik_vs_cublas"] = SPUTNIK[(m, k, n)][SPARSITIES.index(s)]
                if conv_view and k % 9 == 0 and int(round(math.sqrt(n))) ** 2 == n:
                    c, hw = k // 9, int(round(math.sqrt(n)))
                    wc = w.reshape(m, c, 3, 3)
                    x = torch.randn(1, c, hw, hw, generator=gen).to(dev)
                    xcl = x.contiguous(memory_format=torch.channels_last)
                    wcl = wc.contiguous(memory_format=torch.channels_last)
                    t_nchw = time_in_graph_us(lambda a: F.conv2d(a, wc, padding=1), x, dev)
                    t_nhwc = time_in_graph_us(lambda a: F.conv2d(a, wcl, padding=1), xcl, dev)
                    row["cudnn_us"], row["cudnn_layout"] = min((t_nchw, "nchw"), (t_nhwc, "channels_last"))
                    row["cudnn_nchw_us"], row["cudnn_nhwc_us"] = t_nchw, t_nhwc
                    g = ConvGeometry(m, c, hw, hw, 3, 3, 1, 1, 1, 1, 1, 1)
                    csr = csr_from_dense(gemm_view(wc.cpu()))
                    cfg, plan, us, timed = tune(candidate_configs(g, run.sms()),
                                                lambda cf: make_plan(csr, g, cf, torch.float32, dev, run.kernel_backend()),
                                                lambda p, a: p.conv(a), x, dev)
                    row["csr_conv_family"] = getattr(cfg, "family", "staged")
                    row["conv_err"] = rel_err(plan.conv(x), F.conv2d(x.double().cpu(), wc.double().cpu(), padding=1))
                    row["csr_conv_us"], row["csr_conv_config"], row["csr_conv_candidates"] = us, cfg.label(), timed
                    row["conv_speedup_vs_cudnn"] = row["cudnn_us"] / us
            except Exception as exc:
                row.update(error_record(exc))
                traceback.print_exc()
            rows.append(row)
            print(_sweep_line(row), flush=True)
            run.results["parts"]["sweep_partial"] = rows
    summary = {}
    for s in sparsities:
        sp = [r["speedup_vs_cublas"] for r in rows if r["sparsity"] == s and "speedup_vs_cublas" in r]
        cv = [r["conv_speedup_vs_cudnn"] for r in rows if r["sparsity"] == s and "conv_speedup_vs_cudnn" in r]
        ref = [r["sputnik_vs_cublas"] for r in rows if r["sparsity"] == s and "sputnik_vs_cublas" in r]
        port = [r["sputnik_port_vs_cublas"] for r in rows if r["sparsity"] == s and "sputnik_port_vs_cublas" in r]
        summary[str(s)] = {"geomean_vs_cublas": _geomean(sp), "geomean_conv_vs_cudnn": _geomean(cv),
                           "sputnik_geomean_vs_cublas": _geomean(ref), "port_heuristic_geomean_vs_cublas": _geomean(port),
                           "shapes": len(sp),
                           "winners": {f: sum(r.get("csr_family") == f for r in rows if r["sparsity"] == s)
                                       for f in ("staged", "sputnik")},
                           "conv_winners": {f: sum(r.get("csr_conv_family") == f for r in rows if r["sparsity"] == s)
                                            for f in ("staged", "sputnik")}}
    return {"rows": rows, "summary": summary}


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return float(np.exp(np.mean(np.log(xs)))) if xs else None


def _candidate(c: dict) -> str:
    """One timed candidate, or one the tuner skipped (PlanDoesNotFit: no time)."""
    return f"{c['config']}={c['us']:.1f}" if "us" in c else f"{c['config']}=skipped"


def _sweep_line(r: dict) -> str:
    if "error" in r:
        return f"  ({r['M']},{r['K']},{r['N']}) s={r['sparsity']}: ERROR {r['error']}"
    line = (f"  ({r['M']},{r['K']},{r['N']}) s={r['sparsity']}: cuBLAS {r['cublas_us']:.1f}us ({r['cublas_tflops']:.1f} TF/s)  "
            f"csr {r['csr_us']:.1f}us (floor {r['floor_us']:.1f}, {r['csr_useful_tflops']:.1f} useful TF/s)  "
            f"x{r['speedup_vs_cublas']:.2f} [sputnik x{r.get('sputnik_vs_cublas', float('nan')):.2f}, "
            f"port x{r.get('sputnik_port_vs_cublas', float('nan')):.2f}] "
            f"err {r['csr_err']:.1e}  {r['csr_config']}\n      candidates: "
            + ", ".join(_candidate(c) for c in r["csr_candidates"]))
    if "csr_conv_us" in r:
        line += (f"\n      conv: cuDNN {r['cudnn_us']:.1f}us ({r['cudnn_layout']}; nchw {r['cudnn_nchw_us']:.1f})  "
                 f"csr {r['csr_conv_us']:.1f}us x{r['conv_speedup_vs_cudnn']:.2f} err {r['conv_err']:.1e}  "
                 f"{r['csr_conv_config']}\n      candidates: "
                 + ", ".join(_candidate(c) for c in r["csr_conv_candidates"]))
    return line


# --- 4. whole networks ----------------------------------------------------------------------

def _float_bytes(model) -> int:
    from onnx import TensorProto

    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def _time_engine(engine, x, reps: int) -> dict:
    from sparsecnn.runtimes.timing import time_fn

    xs = engine.prepare(x)
    with torch.no_grad(), engine._precision_context():
        runner = engine.runner(*xs)
        fn = runner.replay if hasattr(runner, "replay") else (lambda: runner(*xs))
        t = time_fn(lambda i: fn(), engine.device, reps=reps, warmup=10)
    return t.to_dict()


def part_nets(run: Run) -> dict:
    import onnxruntime as ort

    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models import load_model
    from sparsecnn.passes.prune import prune_unstructured
    from sparsecnn.runtimes.csr import runtime as csr_rt

    models = run.args.models or (("resnet18", "vgg19", "trafficcamnet") if not run.dry else ("tinyresnet", "tinynet"))
    reps = run.args.reps if not run.dry else 3
    out = {}
    for name in models:
        res: dict = {}
        out[name] = res
        try:
            t0 = time.time()
            module, spec, entry = load_model(name)
            dense = export_onnx(module, spec, entry.exclude)
            pruned = prune_unstructured(dense, 0.9).model
            sparse, passes = csr_rt.rewrite_with_report(pruned, {})
            res["rewrite"] = passes[0].summary()
            res["onnx_bytes"] = {"dense": len(dense.SerializeToString()), "pruned": len(pruned.SerializeToString()),
                                 "sparse": len(sparse.SerializeToString()), "dense_fp32_weights": _float_bytes(dense)}
            res["onnx_ratio"] = res["onnx_bytes"]["sparse"] / res["onnx_bytes"]["dense"]
            x = torch.randn(1, *spec.shape, generator=torch.Generator().manual_seed(0))
            sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
            ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
            res["prep_s"] = time.time() - t0
            print(f"{name}: {res['rewrite']}; sparse ONNX {res['onnx_ratio']:.3f} of dense", flush=True)
            for dtype in ("fp32", "fp16"):
                d = res[dtype] = {}
                base = {"dtype": dtype, "tf32": False, "dense_conv": "best"}
                for layout, key in (("NCHW", "dense_nchw"), ("NHWC", "dense_channels_last")):
                    try:
                        eng = dense_engines(pruned, run.device, base, layouts=(layout,))[layout]
                        d[key] = _time_engine(eng, x, reps)
                        if dtype == "fp32" and layout == "NCHW":
                            res["dense_weight_bytes"] = eng.weight_bytes()
                        del eng
                    except Exception as exc:
                        d[key] = error_record(exc)
                        traceback.print_exc()
                best, best_ms = best_dense({k: d[k].get("median_ms") for k in ("dense_nchw", "dense_channels_last")})
                if best is not None:
                    d["best_dense_ms"], d["best_dense"] = best_ms, best
                t1 = time.time()
                if run.dry:
                    eng = csr_rt.compile_with_backend(sparse, run.device, {**base, "csr_autotune": False},
                                                      backend=run.kernel_backend())
                else:
                    eng = csr_rt.compile(sparse, run.device, base)
                d["compile_s"] = time.time() - t1
                outs = eng(x)
                d["rel_err_vs_ort"] = max(rel_err(o, r) for o, r in zip(outs, ref))
                d["csr"] = _time_engine(eng, x, reps)
                d["layers"] = eng.report()
                d["csr_layers"] = sum(1 for r in d["layers"] if r.get("format") == "csr")
                d["dense_fallback_layers"] = sum(1 for r in d["layers"] if r.get("format") == "dense")
                d["sputnik_layers"] = sum(1 for r in d["layers"] if str(r.get("config_label", "")).startswith("sputnik"))
                d["kept_sparse_by_budget"] = [r["name"] for r in d["layers"] if r.get("budget")]
                d["csr_weight_bytes"] = eng.weight_bytes()
                # the same engine with every CSR layer kept sparse (where measuring chose dense)
                fell_back = [r for r in d["layers"] if r.get("format") == "dense" and "csr_bytes" in r]
                d["all_csr_weight_bytes"] = d["csr_weight_bytes"] - sum(r["dense_bytes"] for r in fell_back) + sum(
                    r["csr_bytes"] for r in fell_back)
                if "best_dense_ms" in d:
                    d["speedup"] = d["best_dense_ms"] / d["csr"]["median_ms"]
                print(f"  {dtype}: csr {d['csr']['median_ms']:.3f} ms vs best dense {d.get('best_dense_ms', float('nan')):.3f} ms "
                      f"({d.get('best_dense')}) -> x{d.get('speedup', float('nan')):.2f}; err vs ORT {d['rel_err_vs_ort']:.1e}; "
                      f"{d['csr_layers']} csr ({d['sputnik_layers']} on Sputnik's SpMM, "
                      f"{len(d['kept_sparse_by_budget'])} kept sparse by the weight budget) / "
                      f"{d['dense_fallback_layers']} dense-by-measure; compile {d['compile_s']:.1f}s",
                      flush=True)
                for r in d["layers"]:
                    if r.get("op", "").startswith("sparsecnn::"):
                        csr_us = r.get("sparse_us", r.get("time_us")) if r.get("format") == "dense" else r.get("time_us")
                        print(f"    {r['name'][:38]:<38} {r.get('format', '?'):<5} nnz {r.get('nnz', 0):>8} "
                              f"csr {csr_us or float('nan'):>8.1f}us dense {r.get('dense_us', float('nan')):>8.1f}us "
                              f"{r.get('config_label', r.get('reason', ''))}"
                              + (f"  [{r['budget']}]" if r.get("budget") else ""), flush=True)
                del eng
                torch.cuda.empty_cache() if not run.dry else None
            res["memory"] = {"dense_fp32_weight_bytes": res.get("dense_weight_bytes"),
                             "csr_fp32_weight_bytes": res["fp32"].get("csr_weight_bytes"),
                             "all_csr_fp32_weight_bytes": res["fp32"].get("all_csr_weight_bytes")}
            if res["memory"]["dense_fp32_weight_bytes"]:
                dense_b = res["memory"]["dense_fp32_weight_bytes"]
                res["memory"]["engine_ratio"] = res["memory"]["csr_fp32_weight_bytes"] / dense_b
                res["memory"]["all_csr_engine_ratio"] = res["memory"]["all_csr_fp32_weight_bytes"] / dense_b
        except Exception as exc:
            res.update(error_record(exc))
            traceback.print_exc()
        run.results["parts"]["nets_partial"] = out
        run.save()
    return out


# --- report ---------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = [f"# CSR kernels on {results.get('env', {}).get('card', 'CPU (dry run)')}", ""]
    sweep = results["parts"].get("sweep")
    if sweep:
        lines += ["## GEMM sweep, fp32 TF32 off: cuBLAS time / CSR time (Sputnik in brackets)", "",
                  "| (M, K, N) | " + " | ".join(str(s) for s in SPARSITIES) + " |", "|---" * (len(SPARSITIES) + 1) + "|"]
        for shape in SPUTNIK:
            cells = []
            for s in SPARSITIES:
                r = next((r for r in sweep["rows"] if (r["M"], r["K"], r["N"]) == shape and r["sparsity"] == s), None)
                cells.append(f"{r['speedup_vs_cublas']:.2f} ({r.get('sputnik_vs_cublas', 0):.2f})"
                             if r and "speedup_vs_cublas" in r else "-")
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        lines += ["", "Conv view (CSR implicit-im2col conv vs cuDNN, same layer):", "",
                  "| (M, K, N) | " + " | ".join(str(s) for s in SPARSITIES) + " |", "|---" * (len(SPARSITIES) + 1) + "|"]
        for shape in SPUTNIK:
            cells = []
            for s in SPARSITIES:
                r = next((r for r in sweep["rows"] if (r["M"], r["K"], r["N"]) == shape and r["sparsity"] == s), None)
                cells.append(f"{r['conv_speedup_vs_cudnn']:.2f}" if r and "conv_speedup_vs_cudnn" in r else "-")
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        lines += ["", "Winning kernel family per shape (GEMM / conv): " + "; ".join(
            f"({r['M']},{r['K']},{r['N']}) s={r['sparsity']}: {r.get('csr_family', '-')}/{r.get('csr_conv_family', '-')}"
            for r in sweep["rows"]), ""]
        lines += ["", "| sparsity | geomean vs cuBLAS | Sputnik | port, Sputnik's heuristic config | geomean conv vs cuDNN "
                  "| winners GEMM staged/sputnik | winners conv staged/sputnik |", "|---|---|---|---|---|---|---|"]
        for s, v in sweep["summary"].items():
            w, cw = v.get("winners", {}), v.get("conv_winners", {})
            lines.append(f"| {s} | {_f(v['geomean_vs_cublas'])} | {_f(v['sputnik_geomean_vs_cublas'])} | "
                         f"{_f(v.get('port_heuristic_geomean_vs_cublas'))} | {_f(v['geomean_conv_vs_cudnn'])} | "
                         f"{w.get('staged', 0)}/{w.get('sputnik', 0)} | {cw.get('staged', 0)}/{cw.get('sputnik', 0)} |")
    nets = results["parts"].get("nets")
    if nets:
        lines += ["", "## Whole networks, batch 1, one CUDA graph, 90 % unstructured", "",
                  "| model | dtype | best dense ms | csr ms | speedup | target | err vs ORT | sparse ONNX / dense | engine weights / dense fp32 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, res in nets.items():
            for dtype in ("fp32", "fp16"):
                d = res.get(dtype, {})
                if "csr" not in d:
                    continue
                lines.append(f"| {name} | {dtype} | {_f(d.get('best_dense_ms'), 3)} ({d.get('best_dense')}) | "
                             f"{d['csr']['median_ms']:.3f} | {_f(d.get('speedup'))} | "
                             f"{TARGETS.get(name, '-') if dtype == 'fp32' else 'none'} | {d['rel_err_vs_ort']:.1e} | "
                             f"{res.get('onnx_ratio', 0):.3f} | {_f(res.get('memory', {}).get('engine_ratio'), 3)} |")
    return "\n".join(lines) + "\n"


def _f(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def short_table(results: dict) -> str:
    rows = [("check", "value", "target")]
    corr = results["parts"].get("correctness")
    if corr:
        rows.append(("kernel checks failing", f"{corr['failures']} of {len(corr['checks'])}", "0"))
    sweep = results["parts"].get("sweep")
    if sweep:
        for s, tgt in (("0.9", 1.25), ("0.98", 2.28)):
            v = sweep["summary"].get(s)
            if v:
                rows.append((f"sweep geomean vs cuBLAS @{s}", _f(v["geomean_vs_cublas"]), f">= {tgt}"))
                rows.append((f"  port (Sputnik's config) @{s}", _f(v.get("port_heuristic_geomean_vs_cublas")),
                             f"report (Sputnik {tgt})"))
                w = v.get("winners", {})
                rows.append((f"  winners staged/sputnik @{s}", f"{w.get('staged', 0)}/{w.get('sputnik', 0)}", "report"))
                rows.append((f"conv geomean vs cuDNN @{s}", _f(v["geomean_conv_vs_cudnn"]), "report"))
    for name, res in (results["parts"].get("nets") or {}).items():
        for dtype in ("fp32", "fp16"):
            d = res.get(dtype, {})
            if "speedup" in d:
                rows.append((f"{name} {dtype} vs best dense", _f(d["speedup"]),
                             f">= {TARGETS.get(name)}" if dtype == "fp32" else "none"))
        if "onnx_ratio" in res:
            rows.append((f"{name} sparse ONNX / dense", _f(res["onnx_ratio"], 3), "<= 0.25"))
        if res.get("memory", {}).get("engine_ratio") is not None:
            rows.append((f"{name} engine weights / dense fp32", _f(res["memory"]["engine_ratio"], 3), "<= 0.25"))
            rows.append((f"{name} (all layers CSR) / dense fp32", _f(res["memory"]["all_csr_engine_ratio"], 3), "<= 0.25"))
    for part, err in results.get("errors", {}).items():
        rows.append((f"part {part}", "FAILED", (err["error"] if isinstance(err, dict) else err)[:40]))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c}" for a, b, c in rows)


def main() -> None:
    ap = study_parser(__doc__, writes="csr.json and csr.md", dry_run="CPU, tiny sizes, emulated kernels: checks the script runs")
    ap.add_argument("--parts", default="correctness,sweep,nets", help="comma list of correctness, sweep, conv, nets "
                    "(sweep includes the conv view unless --no-conv)")
    ap.add_argument("--no-conv", action="store_true", help="skip the conv (vs cuDNN) view of the sweep shapes")
    ap.add_argument("--models", nargs="*", help="networks for the nets part (default resnet18 vgg19 trafficcamnet)")
    ap.add_argument("--sparsities", nargs="*", type=float, help="sweep sparsities (default the five of Sputnik's table)")
    ap.add_argument("--reps", type=int, default=200, help="timed replays per whole-network measurement")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no new part after this many seconds (a lease's command limit; default none)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    run = Run(args)
    if not run.dry:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: use --dry-run on a CPU machine")
        torch.backends.cudnn.benchmark = True  # the dense baselines get cuDNN's best algorithm per layer
    t_start = time.time()
    run.results["env"] = env_info(run)
    print(json.dumps(run.results["env"], default=str), flush=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for part in parts:
        t0 = time.time()
        if t0 - t_start > args.budget_s:
            run.results["errors"][part] = f"skipped: {args.budget_s:.0f} s budget spent before this part"
            print(run.results["errors"][part], flush=True)
            continue
        try:
            if part == "correctness":
                run.results["parts"]["correctness"] = part_correctness(run)
            elif part in ("sweep", "conv"):
                if "sweep" not in run.results["parts"]:
                    run.results["parts"]["sweep"] = part_sweep(run, conv_view=not args.no_conv)
            elif part == "nets":
                run.results["parts"]["nets"] = part_nets(run)
            else:
                raise ValueError(f"unknown part {part}")
        except Exception as exc:
            run.results["errors"][part] = error_record(exc)
            traceback.print_exc()
        run.results.setdefault("part_seconds", {})[part] = time.time() - t0
        run.save()
        print(f"[{part} done in {time.time() - t0:.1f} s]", flush=True)
    run.results["total_seconds"] = time.time() - t_start
    for k in ("sweep", "nets"):  # a part that failed keeps what it measured before the failure
        if k in run.results["parts"]:
            run.results["parts"].pop(f"{k}_partial", None)
    run.save()
    from sparsecnn.common.fileio import write_text_atomic

    write_text_atomic(run.out / "csr.md", markdown(run.results))
    print()
    print(short_table(run.results))


if __name__ == "__main__":
    main()
