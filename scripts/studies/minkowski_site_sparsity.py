"""At what site sparsity does MinkowskiEngine beat dense? MinkowskiEngine (CUDA build) as a
whole-network runtime and per conv layer vs the best dense engine.

Run on the lent H100, with the CUDA wheel built by scripts/build_minkowski.py in .whl/:
    source scripts/gpu_env.sh && python3 scripts/studies/minkowski_site_sparsity.py --out results/minkowski-site-sparsity/DATE-CARD
Locally, without a GPU (tiny sizes, no timing claims):
    python scripts/studies/minkowski_site_sparsity.py --dry-run --out /tmp/minkowski

Parts (each one recorded even if another fails):
  1. env      versions, ME's availability line (CUDA or CPU build)
  2. suite    the GPU tests: `pytest -m gpu tests/test_minkowski.py`
  3. networks ResNet-18, VGG-19, TrafficCamNet (90 % unstructured-pruned weights, fp32, TF32 off),
              batch 1 and 32: ME eager vs the torch runtime (CUDA graph, extra dense_conv=best),
              relative error, measured site sparsity per layer and
              per-layer coordinate bookkeeping / kernel-map build / convolution times
  4. sweep    single conv layers at synthetic site sparsity 0 ... 0.99: ME (sites as the dense
              conv needs them, and submanifold) vs the best dense engine on the dense map (torch
              runtime, dense_conv=best, CUDA graph); break-even sparsity
Writes <out>/minkowski.json (every number), minkowski_sweep.png, minkowski.md; prints a short table last.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsecnn.common.fileio import atomic_path
from sparsecnn.common.numerics import rel_err
from sparsecnn.converter.export import export_onnx
from sparsecnn.converter.figures import save_figure
from sparsecnn.converter.study import dense_engines, environment, error_record, study_parser
from sparsecnn.runtimes.timing import time_fn
from sparsecnn.models import load_model
from sparsecnn.passes.prune import prune_unstructured
from sparsecnn.runtimes import get_runtime

REPO = Path(__file__).resolve().parents[2]
NETWORKS = {  # name: full-size input (C, H, W); --dry-run shrinks them
    "resnet18": (3, 224, 224), "vgg19": (3, 224, 224), "trafficcamnet": (3, 544, 960)}
SWEEP_LAYERS = [  # (label, Cin, Cout, H, W, kernel, stride): ResNet-18 / VGG-19 conv shapes, batch 1
    ("64x56x56 3x3", 64, 64, 56, 56, 3, 1), ("128x28x28 3x3", 128, 128, 28, 28, 3, 1),
    ("256x14x14 3x3", 256, 256, 14, 14, 3, 1), ("512x7x7 3x3", 512, 512, 7, 7, 3, 1),
    ("64x112x112 3x3 (VGG)", 64, 64, 112, 112, 3, 1)]
SWEEP_SPARSITIES = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def part(results: dict, name: str):
    """Decorator-ish runner: one failing part records its error and the script goes on."""
    def run(fn, *args, **kwargs):
        t0 = time.time()
        try:
            results[name] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — keep the other parts' numbers
            results[name] = error_record(exc)
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        log(f"{name} done in {time.time() - t0:.0f} s")
    return run


def env_info(device: torch.device) -> dict:
    ok, why = get_runtime("minkowski").available()
    return {**environment(device, modules=("MinkowskiEngine",)), "minkowski_available": ok, "minkowski": why}


def gpu_suite(dry: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_minkowski.py"]
    cmd += ["-m", "not slow", "-k", "tiny or offsets"] if dry else ["-m", "gpu"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=240)
    tail = (res.stdout + res.stderr).strip().splitlines()
    return {"cmd": " ".join(cmd[1:]), "rc": res.returncode, "summary": tail[-1] if tail else "", "tail": tail[-30:]}


def _pruned(name: str, shape):
    module, spec, entry = load_model(name)
    return prune_unstructured(export_onnx(module, spec, entry.exclude), 0.9).model


def _input(shape, seed=0):
    """A normalised random image: every pixel non-zero, the dense-image case users meet."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _dense_engine_ms(model, x, device, reps):
    """The best dense engine: the torch runtime with dense_conv=best (per-layer cuDNN NCHW/NHWC/im2col
    choice, whole-network CUDA graph), fp32 with TF32 off. Returns (median ms, outputs, its plan)."""
    eng = dense_engines(model, device, {"dtype": "fp32", "tf32": False, "cuda_graph": True}, layouts=("NCHW",))["NCHW"]
    xs = eng.prepare(x)
    with torch.no_grad():
        outs = [o.float().cpu() for o in eng(x)]  # the first call measures and decides
        run = eng.runner(*xs)
        t = time_fn(lambda i: run(*xs), device, reps=reps, warmup=5)
    plan = getattr(eng, "plans", {})
    del eng
    return t.median_ms, outs, plan


def network_table(dry: bool, device: torch.device, reps: int) -> list[dict]:
    rows = []
    mk = get_runtime("minkowski")
    batches = [1, 2] if dry else [1, 32]
    for name, chw in NETWORKS.items():
        if dry:
            chw = (3, 64, 64) if name != "trafficcamnet" else (3, 64, 96)
            if name == "vgg19":
                continue  # VGG's classifier needs 224x224: too slow for a CPU dry run
        model = _pruned(name, chw)
        for batch in batches:
            row = {"model": name, "batch": batch, "input": list(chw)}
            rows.append(row)
            try:
                x = _input((batch, *chw))
                dense_ms, dense_out, row["dense_plan"] = _dense_engine_ms(model, x, device, reps)
                dense_best = row["dense_best_ms"] = dense_ms
                me = mk.compile(model, device, {"dtype": "fp32"})
                xs = me.prepare(x)
                with torch.no_grad():
                    outs = [o.float().cpu() for o in me.runner(*xs)(*xs)]
                    me_reps = 3 if batch >= 32 else max(3, reps // 4)  # batch 32 forwards take seconds
                    t = time_fn(lambda i: me.runner(*xs)(*xs), device, reps=me_reps, warmup=1)
                row["me_ms"] = t.median_ms
                row["me_p90_ms"] = t.p90_ms
                row["slowdown_vs_dense"] = t.median_ms / dense_best
                row["rel_err_vs_dense"] = max(rel_err(a, b) for a, b in zip(outs, dense_out))
                prof = me.profile_layers(x, reps=2 if batch >= 32 else 3)
                row["layers"] = prof
                coords = sum(r.get("coords_ms", 0.0) for r in prof)
                kmap = sum(r.get("kernel_map_ms", 0.0) for r in prof)
                conv = sum(r.get("conv_ms", 0.0) for r in prof)
                pool = sum(r.get("pool_ms", 0.0) for r in prof)
                row.update(coords_ms=coords, kernel_map_ms=kmap, conv_ms=conv, pool_ms=pool,
                           bookkeeping_share=(coords + kmap) / max(coords + kmap + conv + pool, 1e-9))
                conv_rows = [r for r in prof if r["op"] == "Conv"]
                row["site_sparsity_conv_inputs"] = [r.get("site_sparsity_in") for r in conv_rows]
                row["mean_site_sparsity"] = float(np.mean([r.get("site_sparsity_in", 0.0) for r in conv_rows]))
                del me
                log(f"{name} b{batch}: ME {row['me_ms']:.2f} ms vs dense {dense_best:.3f} ms "
                    f"({row['slowdown_vs_dense']:.1f}x), err {row['rel_err_vs_dense']:.1e}, "
                    f"bookkeeping {100 * row['bookkeeping_share']:.0f}%")
            except Exception as exc:  # noqa: BLE001
                row.update(error_record(exc, trace_chars=2000))
                log(f"{name} b{batch} FAILED: {row['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def site_modes(dry: bool, device: torch.device, reps: int) -> list[dict]:
    """What else was tried for the active sites: the three site rules on ResNet-18, time and error."""
    chw = (3, 64, 64) if dry else NETWORKS["resnet18"]
    model = _pruned("resnet18", chw)
    rows = []
    for batch, kind in ([(1, "dense image"), (1, "70% background")] if dry else
                        [(1, "dense image"), (32, "dense image"), (1, "70% background"), (32, "70% background")]):
        x = _input((batch, *chw), seed=1)
        if kind != "dense image":  # zero a background region: inactive input sites that propagate
            h, w = chw[1:]
            x[:, :, : int(0.7 * h)] = 0
        ref = get_runtime("torch").compile(model, device, {"dtype": "fp32", "tf32": False})(x)[0].cpu()
        for mode in ("relu", "generative", "submanifold"):
            row = {"batch": batch, "input": kind, "sites": mode}
            rows.append(row)
            try:
                eng = get_runtime("minkowski").compile(model, device, {"extra": {"sites": mode}})
                xs = eng.prepare(x)
                with torch.no_grad():
                    out = eng.runner(*xs)(*xs)[0].float().cpu()
                    t = time_fn(lambda i: eng.runner(*xs)(*xs), device, reps=3 if batch >= 32 else max(3, reps // 4),
                                warmup=1)
                row.update(me_ms=t.median_ms, rel_err_vs_dense=rel_err(out, ref),
                           conv_input_site_sparsity=[r.get("site_sparsity_in") for r in eng.report() if r["op"] == "Conv"])
                del eng
            except Exception as exc:  # noqa: BLE001
                row.update(error_record(exc))
            log(f"site rule {mode} b{batch}: {row}")
    return rows


def _site_mask(n, h, w, sparsity: float, gen: torch.Generator, block: int = 4) -> torch.Tensor:
    """Active-site mask with about `sparsity` inactive sites, in block x block clumps (objects on background)."""
    hb, wb = -(-h // block), -(-w // block)
    low = torch.rand(n, 1, hb, wb, generator=gen) >= sparsity
    return low.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :h, :w]


def sweep(dry: bool, device: torch.device, reps: int) -> list[dict]:
    """Per layer shape and site sparsity: the best dense engine vs ME (full layer, and its convolution alone)."""
    import onnx
    from onnx import TensorProto, helper

    import sparsecnn.runtimes.minkowski.runtime as mkmod

    ME = mkmod._me()
    layers = SWEEP_LAYERS[:2] if dry else SWEEP_LAYERS
    sparsities = [0.0, 0.9] if dry else SWEEP_SPARSITIES
    gen = torch.Generator().manual_seed(0)
    out = []
    for label, cin, cout, h, w, k, s in layers:
        if dry:
            h, w = h // 4, w // 4
        wt = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, h, w])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [onnx.numpy_helper.from_array(wt.numpy(), "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        wd = wt.to(device)
        dense_ms = None
        for sp in sparsities:
            row = {"layer": label, "cin": cin, "cout": cout, "h": h, "w": w, "kernel": k, "target_sparsity": sp}
            out.append(row)
            try:
                mask = _site_mask(1, h, w, sp, gen)
                x = (torch.rand(1, cin, h, w, generator=gen) + 0.1) * mask  # non-negative, like after a ReLU
                row["site_sparsity"] = 1.0 - float(mask.float().mean())
                xd = x.to(device)
                if dense_ms is None:  # dense time does not depend on the values: measured once per layer
                    dense_ms = _dense_engine_ms(model, x, device, reps)[0]
                row["dense_ms"] = dense_ms
                for mode in ("relu", "submanifold"):
                    eng = get_runtime("minkowski").compile(model, device, {"extra": {"sites": mode}})
                    step = eng.executor.steps[0]
                    st = eng.state
                    with torch.no_grad():
                        xs = mkmod.to_sparse(xd, st, "in")
                        # full layer on a sparse input: output sites, their hash map, kernel map, GEMMs
                        full = time_fn(lambda i: step.fn(xs), device, reps=max(5, reps // 4), warmup=2)
                        y = step.fn(xs)
                        fw = mkmod.backend_fn("ConvolutionForward", xs.feats)
                        me_w = mkmod.me_kernel(wd)
                        args = (xs.feats, me_w, [k, k], [s, s], [1, 1], ME.RegionType.HYPER_CUBE, torch.IntTensor(),
                                False, mkmod._backend().ConvolutionMode.DEFAULT, xs.key, y.key, xs.space.manager._manager)
                        conv = time_fn(lambda i: fw(*args), device, reps=reps, warmup=3)  # kernel map cached
                        sparsify = time_fn(lambda i: mkmod.to_sparse(xd, st, "in"), device,
                                           reps=max(5, reps // 4), warmup=2)
                    tag = "me" if mode == "relu" else "me_submanifold"
                    row[f"{tag}_layer_ms"] = full.median_ms
                    row[f"{tag}_conv_ms"] = conv.median_ms
                    row[f"{tag}_bookkeeping_ms"] = max(full.median_ms - conv.median_ms, 0.0)
                    row[f"{tag}_sparsify_ms"] = sparsify.median_ms
                    row[f"{tag}_out_sparsity"] = 1.0 - y.sites / max(h * w // (s * s), 1)
                    del eng, xs, y
            except Exception as exc:  # noqa: BLE001
                row.update(error_record(exc))
                log(f"sweep {label} @ {sp} FAILED: {row['error']}")
        log(f"sweep {label} done")
    return out


def break_even(rows: list[dict], key: str) -> dict[str, float | None]:
    """Per layer, the lowest site sparsity at which `key` <= dense (linear interpolation), None if never."""
    res = {}
    for label in dict.fromkeys(r["layer"] for r in rows):
        pts = [(r["site_sparsity"], r[key], r["dense_ms"]) for r in rows
               if r["layer"] == label and key in r and "dense_ms" in r]
        pts.sort()
        found = None
        for (s0, m0, d0), (s1, m1, d1) in zip(pts, pts[1:]):
            if m0 <= d0:
                found = s0
                break
            if m1 <= d1:
                g0, g1 = m0 - d0, m1 - d1
                found = s0 + (s1 - s0) * g0 / (g0 - g1)
                break
        if found is None and pts and pts[0][1] <= pts[0][2]:
            found = pts[0][0]
        res[label] = found
    return res


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False)
    for ax, label in zip(axes[0], labels):
        rs = sorted((r for r in rows if r["layer"] == label and "dense_ms" in r), key=lambda r: r["site_sparsity"])
        xs = [r["site_sparsity"] for r in rs]
        for key, style, text in [("dense_ms", "k-", "best dense engine (torch runtime)"),
                                 ("me_layer_ms", "r-o", "ME layer (exact sites)"),
                                 ("me_conv_ms", "r--", "ME GEMMs only (exact sites)"),
                                 ("me_submanifold_layer_ms", "b-s", "ME layer (submanifold)")]:
            ys = [r.get(key, float("nan")) for r in rs]
            ax.plot(xs, ys, style, label=text, markersize=3)
        ax.set_yscale("log")
        ax.set_xlabel("input site sparsity (fraction of empty pixels)")
        ax.set_ylabel("time per layer, batch 1 (ms)")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("MinkowskiEngine vs dense conv, fp32 (TF32 off): where sparsity pays", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def markdown(results: dict) -> str:
    lines = [f"# MinkowskiEngine on {results['env'].get('card', 'CPU (dry run)')}", ""]
    lines += ["| model | batch | ME ms | best dense ms | ME / dense | bookkeeping share | mean site sparsity | rel err |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results.get("networks", []) if isinstance(results.get("networks"), list) else []:
        if "me_ms" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['me_ms']:.2f} | {r['dense_best_ms']:.3f} | "
                         f"{r['slowdown_vs_dense']:.1f}x | {100 * r['bookkeeping_share']:.0f}% | "
                         f"{r['mean_site_sparsity']:.3f} | {r['rel_err_vs_dense']:.1e} |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | failed: {r.get('error', '?')} | | | | | |")
    modes = results.get("site_modes")
    if isinstance(modes, list) and modes:
        lines += ["", "ResNet-18, site rules (relu: prune after each ReLU; generative: never prune; "
                  "submanifold: ME's own rule, inexact once some sites are empty):", "",
                  "| input | batch | sites | ME ms | rel err vs dense | mean conv-input site sparsity |", "|---|---|---|---|---|---|"]
        for r in modes:
            sp = [v for v in r.get("conv_input_site_sparsity", []) if v is not None]
            lines.append(f"| {r['input']} | {r['batch']} | {r['sites']} | {r.get('me_ms', float('nan')):.2f} | "
                         f"{r.get('rel_err_vs_dense', float('nan')):.1e} | {np.mean(sp) if sp else float('nan'):.3f} |"
                         if "error" not in r else f"| {r['input']} | {r['batch']} | {r['sites']} | failed: {r['error'][:80]} | | |")
    be = results.get("break_even", {})
    if be:
        lines += ["", "Break-even input site sparsity per layer (ME faster than the best dense engine above it):", "",
                  "| layer | whole ME layer (exact sites) | ME GEMMs only | ME layer (submanifold) |", "|---|---|---|---|"]
        for label in be.get("me_layer_ms", {}):
            cells = [be[k].get(label) for k in ("me_layer_ms", "me_conv_ms", "me_submanifold_layer_ms")]
            lines.append(f"| {label} | " + " | ".join("never" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = study_parser(__doc__, writes="minkowski.json, minkowski_sweep.png, minkowski.md", dry_run="CPU, tiny sizes, no timing claims")
    ap.add_argument("--reps", type=int, default=40, help="timed repetitions of dense runs (ME runs use a quarter)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["suite", "networks", "sweep"], help="parts to skip")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    reps = 3 if args.dry_run else args.reps
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    results: dict = {"env": env_info(device), "dry_run": args.dry_run}
    log(json.dumps(results["env"]))
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: use --dry-run on a CPU machine")
    if "suite" not in args.skip:
        part(results, "suite")(gpu_suite, args.dry_run)
    if "networks" not in args.skip:
        part(results, "networks")(network_table, args.dry_run, device, reps)
    if "networks" not in args.skip:
        part(results, "site_modes")(site_modes, args.dry_run, device, reps)
    if "sweep" not in args.skip:
        part(results, "sweep")(sweep, args.dry_run, device, reps)
        if isinstance(results.get("sweep"), list):
            results["break_even"] = {k: break_even(results["sweep"], k)
                                     for k in ("me_layer_ms", "me_conv_ms", "me_submanifold_layer_ms")}
            try:
                plot(results["sweep"], out / "minkowski_sweep.png")
            except Exception as exc:  # noqa: BLE001
                results["plot_error"] = error_record(exc)
    with atomic_path(out / "minkowski.json") as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    with atomic_path(out / "minkowski.md") as tmp:
        Path(tmp).write_text(md)
    suite = results.get("suite", {})
    print(f"\nGPU suite: {suite.get('summary', suite.get('error', 'skipped'))}")
    print(md)


if __name__ == "__main__":
    main()
