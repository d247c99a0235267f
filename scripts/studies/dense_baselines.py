"""How fast is dense? The dense baselines every speedup is a ratio to: eager, cuDNN graph, the
best dense engine, and the cuBLAS / cuSPARSE GEMM sweep, in one process on one card.

    source scripts/gpu_env.sh && python3 scripts/studies/dense_baselines.py --out results/dense-baselines/DATE-CARD
    python3 scripts/studies/dense_baselines.py --dry-run --out /tmp/dense  # CPU, tiny nets: checks the script runs

Measures, in one run on one card:
- ResNet-18, VGG-19, TrafficCamNet (random weights) in fp16 and fp32-cuda-core (TF32 off) at
  batch 1 and 32: PyTorch eager, torch runtime + CUDA graph with cuDNN (NCHW), the best dense
  engine (dense_conv=best: per layer cuDNN NCHW / NHWC / im2col + cuBLAS); at batch 1 also
  uniform cuDNN NHWC and im2col + cuBLAS graphs. Each timed twice (spread); per-layer times
  for every torch engine with the best dense engine's per-layer choices and candidate times.
- GEMM sweep: the seed's conv-as-GEMM shapes at batch 1, sparsity 0.5-0.98, cuBLAS fp32
  (TF32 off), TF32 and fp16, cuSPARSE (torch CSR) fp32 and fp16, each vs fp64.

Writes <out>/dense_baselines.json (every raw number; rewritten after every part, so a kill keeps what
was done), <out>/bench.md (tables), gemm_speedup.png, layers_vgg19.png, summary.png; prints a
short table last. Parts run most-important-first and stop starting new ones when the time
budget (--budget-s, default 270 s) is spent; one failing part is recorded and the rest go on.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from sparsecnn.converter.study import study_parser

RESULT_FILE = "dense_baselines.json"
# Dense CUDA-graph batch-1 reference points measured on the H100 with cuDNN only (2026-11-25).
REFERENCE_MS = {("resnet18", "fp16"): 0.40, ("resnet18", "fp32-cuda-core"): 1.21,
                ("vgg19", "fp16"): 0.52, ("vgg19", "fp32-cuda-core"): 2.43,
                ("trafficcamnet", "fp16"): 0.60, ("trafficcamnet", "fp32-cuda-core"): 2.66}


def main() -> int:
    ap = study_parser(__doc__, dry_run="CPU, tiny nets and GEMMs, no timing claims")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new parts after this long")
    ap.add_argument("--measure-ms", type=float, default=200.0, help="length of one timing of one configuration")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--gemm-methods", default="cublas,cusparse",
                    help="GEMM methods (default cublas,cusparse; add csr,sparsert once they are registered)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from sparsecnn.converter.bench import BenchConfig, new_result, run_networks, summary_rows
    from sparsecnn.converter.bench_report import write_json, write_reports
    from sparsecnn.converter.regimes import parse_regimes
    from sparsecnn.converter.study import environment, error_record

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA GPU: run with --dry-run on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        torch.set_num_threads(1)
    models = ["tinynet", "tinyresnet"] if dry else ["resnet18", "vgg19", "trafficcamnet"]
    batches = [1, 2] if dry else [1, 32]
    regimes = parse_regimes("fp16,fp32-cuda-core")
    result = new_result(None, environment(device))
    result["settings"] = {"script": "scripts/studies/dense_baselines.py", "dry_run": dry, "models": models, "batches": batches,
                          "regimes": [r.name for r in regimes], "device": str(device), "repeats": 2,
                          "flush_l2": False, "prunes": ["none"], "runtimes": [], "measure_ms": args.measure_ms,
                          "reference_ms_cudnn_graph_batch1": {f"{m}/{r}": v for (m, r), v in REFERENCE_MS.items()}}
    errors = result["errors"]
    cache: dict = {}
    parts_done, parts_skipped = [], []

    def save():
        result["summary"] = summary_rows(result["networks"], result["models"], None)
        result["elapsed_s"] = time.perf_counter() - t_start
        result["parts_done"], result["parts_skipped"] = parts_done, parts_skipped
        write_json(result, out / RESULT_FILE)

    def part(name: str, fn, always: bool = False) -> None:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s and not always:
            parts_skipped.append(name)
            print(f"[{elapsed:6.1f} s] skipping {name}: time budget spent", flush=True)
            return
        print(f"[{elapsed:6.1f} s] {name}", flush=True)
        try:
            fn()
            parts_done.append(name)
        except Exception as exc:  # one part failing must not lose the others' numbers
            errors.append(error_record(exc, where=name))
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        save()

    def networks(model: str, batch: int, dense_modes: list[str]):
        def go():
            cfg = BenchConfig(models=[model], runtimes=[], prunes=["none"], regimes=regimes, batches=[batch],
                              device=device, dense_modes=dense_modes, budget_ms=20.0 if dry else args.measure_ms,
                              min_reps=3 if dry else 10, max_reps=20 if dry else 300, layer_reps=3 if dry else 15,
                              repeats=2, progress=False, quick=dry)
            nets, layers, info = run_networks(cfg, errors, cache)
            result["networks"].extend(nets)
            result["layers"].extend(layers)
            result["models"].update(info)
            for r in nets:
                if r.get("median_ms"):
                    print(f"  {r['model']:<14}{r['regime']:<16}b{r['batch']:<3} {r['engine']:<26}{r['median_ms']:9.3f} ms"
                          f"  spread {100 * (r['spread'] or 0):4.1f}%", flush=True)
        return go

    def gemm():
        from sparsecnn.converter.gemm_sweep import run_sweep

        result["gemm"] = run_sweep(
            device, shapes=[(8, 36, 64), (16, 72, 49)] if dry else None, sparsities=[0.5, 0.9] if dry else None,
            methods=[m for m in args.gemm_methods.split(",") if m], regimes=["fp32-cuda-core", "fp32", "fp16"], reps=5 if dry else 40,
            repeats=2, progress=False, errors=errors)

    # Most important first: the batch-1 dense table, then the GEMM sweep, then batch 32.
    for model in models:
        part(f"{model} batch {batches[0]}", networks(model, batches[0], ["cudnn", "cudnn_nhwc", "im2col", "best"]))
    if not args.no_gemm:
        part("GEMM sweep (cuBLAS fp32/TF32/fp16, cuSPARSE)", gemm)
    for model in models:
        part(f"{model} batch {batches[1]}", networks(model, batches[1], ["cudnn", "best"]))
    cache.clear()
    part("tables and plots", lambda: write_reports(result, out, RESULT_FILE), always=True)
    save()
    short_table(result, dry)
    print(f"\nwrote {out}/{RESULT_FILE}, bench.md and plots in {time.perf_counter() - t_start:.0f} s; "
          f"{len(errors)} error(s); skipped: {', '.join(parts_skipped) or 'none'}")
    return 0


def short_table(result: dict, dry: bool) -> None:
    nets = [r for r in result["networks"] if r.get("median_ms")]
    by = {(r["model"], r["regime"], r["batch"], r["engine"]): r for r in nets}
    keys = sorted({(r["model"], r["regime"], r["batch"]) for r in nets}, key=lambda k: (k[2], k[0], k[1]))
    print(f"\n{'model':<14}{'regime':<15}{'b':>3}{'eager':>9}{'cuDNN':>9}{'best':>9}{'best/cuDNN':>11}"
          f"{'ref':>7}{'spread':>8}  best-dense plan")
    for k in keys:
        e, c, b = (by.get((*k, n)) for n in ("eager", "torch cuDNN", "best dense"))
        ms = lambda r: f"{r['median_ms']:9.3f}" if r else f"{'–':>9}"  # noqa: E731
        ref = REFERENCE_MS.get((k[0], k[1])) if k[2] == 1 and not dry else None
        spreads = [r["spread"] for n, r in by.items() if n[:3] == k and r["kind"] != "eager" and r.get("spread") is not None]
        plan = ""
        if b and b.get("plans"):
            p = next(iter(b["plans"].values()))
            plan = p["chosen"]
        ratio = f"{c['median_ms'] / b['median_ms']:10.2f}x" if b and c else f"{'–':>11}"
        print(f"{k[0]:<14}{k[1]:<15}{k[2]:>3}{ms(e)}{ms(c)}{ms(b)}{ratio}{(f'{ref:7.2f}' if ref else '      –')}"
              f"{(f'{100 * max(spreads):7.1f}%' if spreads else '      –')}  {plan}")
    gemm = result.get("gemm") or {}
    rows = [r for r in gemm.get("rows", []) if r["method"] == "cusparse" and r.get("speedup_vs_cublas")]
    if rows:
        import math

        print("\ncuSPARSE speedup over cuBLAS, same regime (geomean over shapes):")
        for regime in sorted({r["regime"] for r in rows}):
            cells = []
            for s in sorted({r["sparsity"] for r in rows}):
                xs = [r["speedup_vs_cublas"] for r in rows if r["regime"] == regime and r["sparsity"] == s]
                cells.append(f"{s:g}: {math.exp(sum(map(math.log, xs)) / len(xs)):.2f}x")
            print(f"  {regime:<15} " + "  ".join(cells))
    bad = [r for r in gemm.get("rows", []) if r.get("ok") is False]
    if bad:
        print(f"GEMM results outside tolerance: {len(bad)} (see bench.md)")


if __name__ == "__main__":
    sys.exit(main())
