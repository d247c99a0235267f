"""Do 2:4 sparse tensor cores (cuSPARSELt) pay, per GEMM and per whole network? Checked and timed in one process.

    source scripts/gpu_env.sh && python3 scripts/studies/two_four_cusparselt.py --out results/two-four-cusparselt/DATE-CARD
    python scripts/studies/two_four_cusparselt.py --dry-run --out /tmp/two-four   # CPU: tiny nets, no timing claims

The H100 run (about 3-5 min) was split: `--parts gemm,ops`, then `--parts nets --models ...`
per model (files two-four-gemm-ops-*.json, two-four-nets-*.json).

Parts (each caught and recorded on its own, so one failure keeps the others' numbers):
  gemm     the GEMM check in CUDA graphs: 2:4 cuSPARSELt vs dense cuBLAS fp16 at 4096^3 and
           8192^3 (expected: 148 vs 188 us, 1098 vs 1600 us; must be >= 1.2x at 4096^3), eager
           cuSPARSELt cost, and two batch-1 conv-GEMM shapes
  ops      every 2:4 op of ResNet-18, VGG-19 and TrafficCamNet (and odd synthetic shapes) on
           cuSPARSELt fp16 vs the reference op in fp32 on the same fp16-rounded input:
           relative error max|a-b|/max|b| <= 2e-3
  nets     per model and batch (1, 32): the per-layer table (sparse vs dense time, choice and
           why), the whole network vs the best dense fp16 engine of this run (torch runtime,
           cuDNN NCHW and channels-last, CUDA graph; extra dense_conv=best passed), the
           ratio, and which layers made the difference
Writes <out>/two-four.json (every number) and <out>/two-four.md; prints a short table last.
"""
from __future__ import annotations

import os
import json
import time
from pathlib import Path

import torch

from sparsecnn.common.fileio import write_text_atomic
from sparsecnn.common.numerics import rel_err
from sparsecnn.converter.export import export_onnx
from sparsecnn.converter.study import best_dense, dense_engines, environment, error_record, study_parser
from sparsecnn.runtimes.timing import time_fn, time_interleaved
from sparsecnn.models import load_model
from sparsecnn.passes.masks import mask_2to4
from sparsecnn.passes.prune import prune_2to4
from sparsecnn.runtimes.cusparselt import runtime as cs
from sparsecnn.runtimes import get_runtime
from sparsecnn.runtimes.base import CompileOptions
from sparsecnn.runtimes.executor import Executor
from sparsecnn.runtimes.reference_ops import reference_ops

REL_TOL = 2e-3
RESULT_FILE = "two-four.json"


def env_info(device: str) -> dict:
    return {**environment(device, modules=("cuda.bindings",)), "cusparselt": cs.cusparselt_available()}


# --- part 1: the GEMM check --------------------------------------------------------------

def gemm_check(dry: bool, reps: int) -> list[dict]:
    device = "cuda"
    rows = []
    # (M, K, N, layout): "square" is C = A @ B (the published 4096^3 / 8192^3 check); "conv" is the runtime's form
    # Y^T = B^T @ A^T (transpose_result) at batch-1 conv shapes.
    cases = [(4096, 4096, 4096, "square"), (8192, 8192, 8192, "square"),
             (256, 2304, 196 + 4, "conv"), (512, 4608, 56, "conv")]
    if dry:
        return [{"skipped": "dry run: cuSPARSELt needs a GPU"}]
    for m, k, n, layout in cases:
        g = torch.Generator(device=device).manual_seed(m + k + n)
        a = torch.randn(m, k, device=device, dtype=torch.float16, generator=g)
        a = a * mask_2to4(a, 1)
        packed = torch._cslt_compress(a)
        if layout == "square":
            b = torch.randn(k, n, device=device, dtype=torch.float16, generator=g)
            dense = lambda _: torch.mm(a, b)  # noqa: E731
            sparse_args = (packed, b, None)
            tr = False
        else:
            bt = torch.randn(n, k, device=device, dtype=torch.float16, generator=g)
            dense = lambda _: torch.nn.functional.linear(bt, a)  # noqa: E731
            sparse_args = (packed, bt.t(), None)
            tr = True
        alg = {}
        search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
        if search is not None and os.environ.get("SPARSECNN_CSLT_SEARCH") == "1":  # faulted on the H100: opt-in
            try:
                found = search(*sparse_args, None, None, tr)
                # pass back the algorithm id only (see SparseGemm.search in the runtime)
                alg = {"alg_id": int(found[0]), "search_returned": [int(v) for v in found]}
            except Exception as exc:
                alg = {"search_error": str(exc)}
        call_alg = {k2: v for k2, v in alg.items() if k2 == "alg_id"}
        sparse_default = lambda _: cs._cslt_mm(*sparse_args, {}) if tr else torch._cslt_sparse_mm(*sparse_args)  # noqa
        sparse_searched = lambda _: torch._cslt_sparse_mm(*sparse_args, transpose_result=tr, **call_alg)  # noqa
        ref = (a.float() @ (b.float() if layout == "square" else bt.float().t()))
        got = sparse_searched(None)
        got = got.t() if tr else got
        t_dense = cs.graph_time_ms(dense, a, reps=reps)
        t_default = cs.graph_time_ms(sparse_default, a, reps=reps)
        t_searched = cs.graph_time_ms(sparse_searched, a, reps=reps) if call_alg else t_default
        eager = time_fn(lambda i: sparse_searched(None), device, reps=20, warmup=3).median_ms
        t_sparse = min(t_default, t_searched)
        row = {"M": m, "K": k, "N": n, "layout": layout, "dense_us": t_dense * 1e3, "sparse_us": t_sparse * 1e3,
               "sparse_default_alg_us": t_default * 1e3, "sparse_searched_us": t_searched * 1e3, "alg": alg,
               "sparse_eager_us": eager * 1e3, "speedup": t_dense / t_sparse, "rel_err": rel_err(got, ref)}
        if (m, k, n) == (4096, 4096, 4096):
            row["meets_1.2x"] = row["speedup"] >= 1.2
        rows.append(row)
        print(f"gemm {m}x{k}x{n} {layout}: dense {row['dense_us']:.1f} us, 2:4 {row['sparse_us']:.1f} us "
              f"({row['speedup']:.2f}x), eager 2:4 {row['sparse_eager_us']:.0f} us, err {row['rel_err']:.1e}", flush=True)
        del a, packed
    return rows


# --- part 2: every 2:4 op vs the reference -----------------------------------------------

def op_check(label: str, sparse_model, x: torch.Tensor, device: str, backend: str) -> list[dict]:
    """Run the fp32 reference step by step; feed each 2:4 op's fp16-rounded input to both."""
    dtype = "fp16" if backend == "cslt" else "fp32"
    ref = Executor(sparse_model, device, "fp32", ops=reference_ops())
    low = cs.build_engine(sparse_model, torch.device(device), CompileOptions(dtype=dtype, extra={"force": "sparse"}),
                          backend).executor
    low_steps = {s.name: s for s in low.steps}
    env = dict(ref.consts)
    env[ref.input_names[0]] = x.to(device)
    rows = []
    with torch.no_grad():
        for step in ref.steps:
            args = [env[n] if n else None for n in step.inputs]
            if step.info.get("format") == "2:4":
                lstep = low_steps[step.name]
                inp = args[0].to(low.dtype)
                if inp.dim() == 4:
                    inp = inp.contiguous(memory_format=torch.channels_last)
                want = step.fn(inp.float(), *args[1:])
                got = lstep.fn(inp, *[low.consts.get(n) if n else None for n in lstep.inputs[1:]])
                entry = next(iter(lstep.info["choices"].values()))
                rows.append({"model": label, "layer": step.name, "op": step.op_type, "gemm": entry["gemm"],
                             "im2col": entry["im2col"], "padded": entry["padded"], "rel_err": rel_err(got, want)})
            outs = step.fn(*args)
            if isinstance(outs, (tuple, list)):
                env.update(zip(step.outputs, outs))
            else:
                env[step.outputs[0]] = outs
    return rows


def synthetic_models():
    """Odd sizes: every dimension padded somewhere (Cout 20, K 108, N*Ho*Wo 75, Gemm N 1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = []
    for cout, cin, k, s, hw, batch in [(20, 12, 3, 2, (9, 11), 3), (36, 20, 1, 2, (7, 7), 1), (24, 8, 1, 1, (5, 5), 2)]:
        w = torch.randn(cout, cin, k, k)
        w = (w * mask_2to4(w, 1)).numpy()
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], name=f"conv{cout}x{cin}k{k}s{s}", kernel_shape=[k, k],
                              strides=[s, s], pads=[k // 2] * 4)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, "H", "W"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, "Ho", "Wo"])],
            [numpy_helper.from_array(w, "w")])
        out.append((f"conv {cout}x{cin} k{k} s{s}", onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
                    torch.randn(batch, cin, *hw)))
    w = torch.randn(1000, 520)
    w = (w * mask_2to4(w, 1)).numpy()
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm1000x520", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 520])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(torch.randn(1000).numpy(), "b")])
    out.append(("gemm 1000x520 N=1", onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
                torch.randn(1, 520)))
    return out


# --- part 3: whole networks --------------------------------------------------------------

TUNE_REPS = 20  # repetitions per sparse/dense timing of a layer (set by --tune-reps)

def bench_net(label: str, dense_model, sparse_model, shape, batch: int, device: str, backend: str, reps: int) -> dict:
    torch_rt = get_runtime("torch")
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
    dtype = "fp16" if backend == "cslt" else "fp32"
    res = {"model": label, "batch": batch, "dtype": dtype}
    ref_out = torch_rt.compile(dense_model, device, {"dtype": "fp32", "tf32": False, "cuda_graph": False})(x)
    steps, keep = {}, []
    for layout, eng in dense_engines(dense_model, device, {"dtype": dtype}).items():
        xs = eng.prepare(x)
        run = eng.runner(*xs)
        steps[layout] = (lambda i, run=run: run.replay()) if hasattr(run, "replay") else (lambda i, run=run, xs=xs: run(*xs))
        keep.append((eng, xs, run))
    t0 = time.perf_counter()
    engine = cs.build_engine(sparse_model, torch.device(device),
                             CompileOptions(dtype=dtype, extra={"dense_conv": "best", "tune_reps": TUNE_REPS}), backend)
    xs = engine.prepare(x)
    run = engine.runner(*xs)  # per-layer measurement and the whole-network check happen here
    res["tune_s"] = time.perf_counter() - t0
    steps["engine"] = (lambda i: run.replay()) if hasattr(run, "replay") else (lambda i: run(*xs))
    # dense engines and the sparse engine timed in alternating rounds: drift hits all alike
    timed = time_interleaved(steps, device, reps=3 * reps)
    dense_ms = {k: timed[k].median_ms for k in ("NCHW", "NHWC")}
    best_layout, _ = best_dense(dense_ms)
    res.update(dense_ms=dense_ms, best_dense=f"torch {dtype} {best_layout} (per-layer best dense conv"
               f"{', CUDA graph' if device == 'cuda' else ''})", best_dense_ms=dense_ms[best_layout],
               timing={k: t.to_dict() for k, t in timed.items()})
    del keep
    res["engine_ms"] = timed["engine"].median_ms
    res["speedup_vs_best_dense"] = res["best_dense_ms"] / res["engine_ms"]
    res["whole_network"] = engine.whole_network
    outs = engine(x)
    res["rel_err_vs_fp32"] = max(rel_err(o, r) for o, r in zip(outs, ref_out))
    layers = []
    for r in engine.report():
        if r.get("format") != "2:4":
            continue
        for shape_key, entry in r["choices"].items():
            layers.append({"layer": r["name"], "shape": shape_key, **{k: v for k, v in entry.items()}})
    res["layers"] = layers
    res["sparse_layers"] = [{"layer": e["layer"], "saved_us": e.get("dense_us", 0) - e.get("sparse_us", 0)}
                            for e in layers if e["choice"] == "sparse"]
    del engine, run
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


# --- report ------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = [f"# 2:4 on sparse tensor cores (cuSPARSELt) — {results['env'].get('card', 'no GPU (dry run)')}", ""]
    if results.get("dry_run"):
        lines += ["**Dry run on the CPU: tiny nets, dense stand-in for cuSPARSELt, no timing claims.**", ""]
    gemm = [r for r in results["parts"].get("gemm", {}).get("rows", []) if "M" in r]
    if gemm:
        lines += ["## GEMM check (CUDA graph, fp16)", "", "| M×K×N | layout | dense µs | 2:4 µs | speedup | 2:4 eager µs | rel err |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in gemm:
            lines.append(f"| {r['M']}×{r['K']}×{r['N']} | {r['layout']} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | "
                         f"{r['speedup']:.2f}× | {r['sparse_eager_us']:.0f} | {r['rel_err']:.1e} |")
        lines.append("")
    ops = results["parts"].get("ops", {}).get("rows", [])
    if ops:
        worst = max(r["rel_err"] for r in ops)
        lines += [f"## Every 2:4 op vs the reference: {len(ops)} ops, worst rel err {worst:.2e} (limit {REL_TOL:g})", "",
                  "| model | layer | GEMM M,K,N | im2col | padded | rel err |", "|---|---|---|---|---|---:|"]
        for r in ops:
            lines.append(f"| {r['model']} | {r['layer']} | {r['gemm']} | {r['im2col']} | {r['padded'] or ''} | {r['rel_err']:.2e} |")
        lines.append("")
    for net in results["parts"].get("nets", {}).get("rows", []):
        if "layers" not in net:
            continue
        wn = next(iter(net["whole_network"].values()), {}) if net["whole_network"] else {}
        lines += [f"## {net['model']} batch {net['batch']}: {net['engine_ms']:.3f} ms vs best dense {net['best_dense_ms']:.3f} ms "
                  f"({net['best_dense']}) = {net['speedup_vs_best_dense']:.3f}×", "",
                  f"Whole network: {wn.get('reason', 'n/a')}; times {wn.get('ms', wn.get('times_ms', {}))}. "
                  f"Output rel err vs fp32: {net['rel_err_vs_fp32']:.2e}.", "",
                  "| layer | GEMM M,K,N | im2col | sparse µs | dense µs | choice | why |", "|---|---|---|---:|---:|---|---|"]
        for e in net["layers"]:
            lines.append(f"| {e['layer']} | {e['gemm']} | {e['im2col']} | {e.get('sparse_us', '')} | {e.get('dense_us', '')} | "
                         f"{e['choice']} | {e['reason']}{'; ' + e['padding_note'] if e.get('padding_note') else ''} |")
        lines.append("")
    for part, body in results["parts"].items():
        if body.get("error"):
            lines += [f"## {part}: FAILED", "", "```", body.get("traceback", body["error"]), "```", ""]
    return "\n".join(lines)


def short_table(results: dict) -> str:
    out = []
    for r in results["parts"].get("gemm", {}).get("rows", []):
        if "M" in r:
            out.append(f"gemm {r['M']}x{r['K']}x{r['N']:<5} {r['layout']:<7} dense {r['dense_us']:8.1f} us  2:4 {r['sparse_us']:8.1f} us  "
                       f"{r['speedup']:.2f}x")
    ops = results["parts"].get("ops", {}).get("rows", [])
    if ops:
        worst = max(ops, key=lambda r: r["rel_err"])
        out.append(f"ops: {len(ops)} 2:4 ops, worst rel err {worst['rel_err']:.2e} ({worst['model']} {worst['layer']}), "
                   f"{'PASS' if worst['rel_err'] <= REL_TOL else 'FAIL'} at {REL_TOL:g}")
    out.append(f"{'model':<14}{'batch':>6}{'best dense ms':>15}{'2:4 engine ms':>15}{'ratio':>8}  sparse layers / engine choice")
    for n in results["parts"].get("nets", {}).get("rows", []):
        if "engine_ms" not in n:
            out.append(f"{n.get('model')} b{n.get('batch')}: FAILED {n.get('error', '')[:80]}")
            continue
        wn = next(iter(n["whole_network"].values()), {}) if n["whole_network"] else {}
        out.append(f"{n['model']:<14}{n['batch']:>6}{n['best_dense_ms']:>15.3f}{n['engine_ms']:>15.3f}"
                   f"{n['speedup_vs_best_dense']:>7.3f}x  {len(n['sparse_layers'])}/{len(n['layers'])}; {wn.get('chosen', 'n/a')}")
    for part, body in results["parts"].items():
        if body.get("error"):
            out.append(f"part {part} FAILED: {body['error'].strip().splitlines()[-1][:120]}")
    return "\n".join(out)


def main() -> None:
    ap = study_parser(__doc__, writes="two-four.json and two-four.md", dry_run="CPU, tiny nets, dense stand-in for cuSPARSELt")
    ap.add_argument("--models", default=None, help="comma-separated registry models (default resnet18,vgg19,trafficcamnet)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--parts", default="gemm,ops,nets", help="comma list of gemm, ops, nets (default all)")
    ap.add_argument("--tune-reps", type=int, default=20, help="repetitions when a layer times sparse vs dense")
    args = ap.parse_args()
    wanted = set(args.parts.split(","))
    global TUNE_REPS
    TUNE_REPS = args.tune_reps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run or not torch.cuda.is_available()
    device, backend = ("cpu", "dense") if dry else ("cuda", "cslt")
    models = (args.models or ("tinyresnet,tinynet" if dry else "resnet18,vgg19,trafficcamnet")).split(",")
    batches = [int(b) for b in args.batches.split(",")] if not dry else [1, 2]
    reps = 5 if dry else args.reps
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    t_start = time.perf_counter()
    results = {"env": env_info(device), "dry_run": dry, "models": models, "batches": batches, "parts": {}}
    print(json.dumps(results["env"], indent=1, default=str), flush=True)

    def part(name, fn):
        if name not in wanted:
            return
        t0 = time.perf_counter()
        try:
            results["parts"][name] = {"rows": fn()}
        except Exception as exc:
            results["parts"][name] = error_record(exc)
            print(f"part {name} failed:\n{results['parts'][name]['traceback']}", flush=True)
        results["parts"][name]["seconds"] = time.perf_counter() - t0
        write_text_atomic(out / RESULT_FILE, json.dumps(results, indent=1, default=str))

    part("gemm", lambda: gemm_check(dry, 10 if dry else 30))

    prepared = {}

    def prepare(name):
        module, spec, entry = load_model(name)
        dense = prune_2to4(export_onnx(module, spec, entry.exclude)).model
        prepared[name] = (dense, cs.rewrite(dense), spec)
        print(f"{name}: exported, pruned 2:4, rewritten ({time.perf_counter() - t_start:.0f} s so far)", flush=True)

    def ops():
        rows = []
        for label, model, x in synthetic_models():
            rows += op_check(label, cs.rewrite(model), x, device, backend)
        for name in models:
            if name not in prepared:
                prepare(name)
            dense, sparse, spec = prepared[name]
            rows += op_check(name, sparse, torch.randn(1, *spec.shape), device, backend)
            print(f"ops {name}: worst rel err {max(r['rel_err'] for r in rows if r['model'] == name):.2e}", flush=True)
        return rows

    part("ops", ops)

    def nets():
        rows = []
        for name in models:
            try:
                if name not in prepared:
                    prepare(name)
                dense, sparse, spec = prepared[name]
            except Exception as exc:
                rows.append({"model": name, **error_record(exc)})
                continue
            for b in batches:
                try:
                    r = bench_net(name, dense, sparse, spec.shape, b, device, backend, reps)
                    print(f"net {name} b{b}: engine {r['engine_ms']:.3f} ms vs best dense {r['best_dense_ms']:.3f} ms "
                          f"({r['speedup_vs_best_dense']:.3f}x), {len(r['sparse_layers'])} sparse layers, "
                          f"tuning {r['tune_s']:.1f} s ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
                except Exception as exc:
                    r = {"model": name, "batch": b, **error_record(exc)}
                    print(f"net {name} b{b} failed:\n{r['traceback']}", flush=True)
                rows.append(r)
                results["parts"]["nets"] = {"rows": rows}
                write_text_atomic(out / RESULT_FILE, json.dumps(results, indent=1, default=str))
            prepared.pop(name, None)
        return rows

    part("nets", nets)
    results["seconds"] = time.perf_counter() - t_start
    write_text_atomic(out / RESULT_FILE, json.dumps(results, indent=1, default=str))
    write_text_atomic(out / "two-four.md", markdown(results))
    print(f"\nwrote {out / RESULT_FILE} and {out / 'two-four.md'} in {results['seconds']:.0f} s "
          f"({results['env'].get('card', 'CPU dry run')})\n")
    print(short_table(results))


if __name__ == "__main__":
    main()
