"""When does feature-map sparsity pay? ECR conv and PECR conv+pool kernels (the seed's Figure 8
redone), checked and timed against the best dense conv, and the `ecr` runtime on whole networks.

    source scripts/gpu_env.sh && python3 scripts/studies/ecr_pecr.py --out results/ecr-pecr/DATE-CARD [--checkpoint fmnist_vgg19.pt]
    python3 scripts/studies/ecr_pecr.py --dry-run --out /tmp/ecr     # CPU, tiny sizes: plumbing only

The trained checkpoint is too large to bring back from the lent GPU machine (80 MB), so train
it in the same command (about 40 s on an H100), with the Fashion-MNIST files carried in
.carry/fashion-mnist (copied from /usr/share/datasets/fashion-mnist; `carry` it):
    source scripts/gpu_env.sh && export SPARSECNN_FASHION_MNIST=$PWD/.carry/fashion-mnist &&
    mkdir -p runs && python3 -m sparsecnn.converter.cli train vgg19 -o runs/vgg19-fmnist.pt --no-progress &&
    python3 scripts/studies/ecr_pecr.py --out $OUT --checkpoint runs/vgg19-fmnist.pt
The H100 runs in results/ecr-pecr/ (2026-12-07-h100, 2026-12-06-h100) also compiled
the kernels while the checkpoint trained, by starting `python3 -c "import torch; from
sparsecnn.runtimes.ecr.runtime import KernelSet; KernelSet.get(torch.device('cuda'))" &` before the
training, and passed `--fig8-budget-s 130 --budget-s 300` (about 240 s for this script, 305 s
with training and one ncu profile). The lent machine brings back at most 8 files: keep the
four plots, ecr.json and ecr.md, or tar the rest. `--replot ecr.json` redraws the
plots on any machine.

Parts (each recorded even if another fails; --parts picks some):
  correct  every kernel variant vs a float64 conv -> relu -> max-pool oracle on all VGG-19 conv
           layers (224x224, batch 1) and odd layers (odd sizes, strides, pads, 3x3/2 ceil pools,
           batch 2), input zero fractions 0/50/90/99/100%, fp32 and fp16; two launches each
           (split-K workspace must come back zeroed). Bar: rel err <= 1e-5 fp32, <= 2e-3 fp16.
  fig8     the seed's Figure 8 redone: per VGG-19 conv layer at batch 1, ECR (conv+ReLU) and,
           on the five conv-then-pool layers, PECR (conv+ReLU+max-pool) vs the best dense
           method (cuDNN NCHW, cuDNN NHWC, im2col + cuBLAS, the torch runtime's op table), all
           timed as CUDA-graph replays (kernels only), fp32 with TF32 off and fp16, input
           sparsity 0-95% (i.i.d. zeros) and on real activations (Fashion-MNIST through the
           --checkpoint VGG-19, or random weights when none is given: said in the output).
           Bar: PECR geomean >= 1.5x best dense, fp32, five pool layers x 70/80/90%.
           Every kernel candidate (warp, list and row kernels) is checked and screened at 80% zeros;
           the two fastest and the best of each other kernel family are timed at every sparsity. Jobs
           run bar first (fp32 PECR), then fp32 ECR, then fp16, until --fig8-budget-s is spent.
  vgg      whole VGG-19 at batch 1: `ecr` runtime (kernels chosen per layer by timing on a
           calibration image, then the whole graph checked against all-dense) vs the best dense
           engine (torch runtime, dense_conv=best), both one CUDA graph, same run, on held-out
           Fashion-MNIST images; fp32 (TF32 off) and fp16.
  nets     (not by default) ResNet-18 and TrafficCamNet end to end through the `ecr` runtime (random weights):
           outputs vs the torch runtime, time, which layers went sparse.
Writes <out>/ecr.json (every number), ecr.md, fig8_fp32.png, fig8_fp16.png,
breakeven.png, activations.png; prints a short table last.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsecnn.common.numerics import rel_err
from sparsecnn.converter.study import best_dense, dense_engines, environment, error_record, fastest, study_parser
from sparsecnn.runtimes.timing import time_calls, time_fn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
SWEEP = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
BAR_SPARSITIES = (0.7, 0.8, 0.9)
ZERO_FRACTIONS = (0.0, 0.5, 0.9, 0.99, 1.0)
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def log(*a):
    print(*a, flush=True)


# --- layers --------------------------------------------------------------------------------

def vgg19_layers(hw: int = 224, div: int = 1) -> list[dict]:
    """VGG-19's conv layers after the stem: name, cin, cout, h, w, whether a max-pool follows."""
    layers, cin, size, idx = [], 3, hw, 0
    for i, v in enumerate(VGG19_CFG):
        if v == "M":
            idx += 1
            size //= 2
            continue
        cout = max(4, v // div)
        pool = i + 1 < len(VGG19_CFG) and VGG19_CFG[i + 1] == "M"
        if idx > 0:
            layers.append({"name": f"features.{idx}", "cin": cin, "cout": cout, "h": size, "w": size, "pool": pool, "n": 1})
        cin = cout
        idx += 2
    return layers


ODD_LAYERS = [  # name, n, cin, h, w, cout, kernel, stride, pads (t, l, b, r), pool (k, s, pads, ceil) or None
    ("odd.3x3.pool2", 1, 64, 31, 29, 64, 3, 1, (1, 1, 1, 1), (2, 2, (0, 0, 0, 0), False)),
    ("odd.3x3.batch2", 2, 256, 15, 13, 192, 3, 1, (1, 1, 1, 1), None),
    ("odd.1x1.s2", 1, 96, 17, 19, 130, 1, 2, (0, 0, 0, 0), None),
    ("odd.3x3.pool3s2ceil", 1, 40, 11, 11, 72, 3, 1, (1, 1, 1, 1), (3, 2, (1, 1, 1, 1), True)),
    ("odd.3x3.s2.asym", 1, 33, 14, 9, 70, 3, 2, (1, 0, 2, 1), None),
    ("odd.3x3.384.pool2", 1, 72, 9, 13, 384, 3, 1, (1, 1, 1, 1), (2, 2, (0, 0, 0, 0), False)),
]


def layer_spec(layer: dict):
    from sparsecnn.passes.ecr.reference import ConvGeometry, PoolGeometry

    g = ConvGeometry(layer["n"], layer["cin"], layer["h"], layer["w"], layer.get("k", 3), layer.get("k", 3),
                     layer.get("s", 1), layer.get("s", 1), tuple(layer.get("pads", (1, 1, 1, 1))))
    pool = None
    if layer.get("pool"):
        pk = layer.get("pool_spec", (2, 2, (0, 0, 0, 0), False))
        pool = PoolGeometry(pk[0], pk[0], pk[1], pk[1], tuple(pk[2]), bool(pk[3]))
    return g, pool


def attrs_of(g, pool) -> dict:
    a = {"kernel_shape": [g.kh, g.kw], "strides": [g.sh, g.sw], "pads": list(g.pads), "relu": 1}
    if pool:
        a.update(pool_kernel_shape=[pool.kh, pool.kw], pool_strides=[pool.sh, pool.sw], pool_pads=list(pool.pads),
                 pool_ceil_mode=int(pool.ceil_mode))
    return a


def sparse_input(shape, zeros: float, dtype, device, seed: int = 0) -> torch.Tensor:
    """A post-ReLU-like map: |N(0,1)| + 1e-3 with each value zero with probability `zeros` (i.i.d.;
    0 and 1 are exact), generated on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device).abs_().add_(1e-3)
    x.masked_fill_(torch.rand(shape, generator=g, device=device) < zeros, 0.0)
    return x.to(dtype)


def oracle(x, w, b, g, pool, relu=True) -> torch.Tensor:
    """float64 conv -> relu -> max-pool (the independent reference)."""
    from sparsecnn.passes.ecr.reference import dense_conv_relu_pool

    return dense_conv_relu_pool(x.double(), w.double(), b.double(), g, relu, pool)


# --- sparse kernels and dense baselines for one layer --------------------------------------

class CpuLayer:
    """--dry-run stand-in for EcrLayer: same interface, the reference ops instead of kernels."""

    def __init__(self, w, b, attrs, pool, relu, scratch=None):
        from sparsecnn.runtimes.ecr.runtime import CANDIDATES, make_plan

        self.w, self.b, self.attrs, self.pool, self.relu = w, b, attrs, pool, relu
        # a few of each kernel family that plan for the layer (the plans are real; the math is the reference's)
        self._cands, self._make_plan = [c for c in CANDIDATES if c.split_scale == 1.0], make_plan

    def candidates(self, x):
        ok = [c for c in self._cands if self.plan(c, x) is not None]
        return [c for kind in ("warp", "list", "row") for c in [c for c in ok if c.variant.kind == kind][:2]]

    def plan(self, cand, x):
        from sparsecnn.passes.ecr.reference import conv_geometry

        return self._make_plan(cand, conv_geometry(self.attrs, x.shape), self.pool, self.w.shape[0], self.relu,
                               8, 227 * 1024)

    def run_candidate(self, cand, x):
        from sparsecnn.passes.ecr.reference import conv_geometry, ecr_conv, ecr_encode, pecr_conv_pool, pecr_encode

        g = conv_geometry(self.attrs, x.shape)
        if self.pool:
            return pecr_conv_pool(pecr_encode(x, g, self.pool), self.w, self.b).to(x.dtype)
        return ecr_conv(ecr_encode(x, g), self.w, self.b, self.relu).to(x.dtype)


def make_layer(w, b, attrs, pool, relu, scratch, dry):
    if dry:
        return CpuLayer(w, b, attrs, pool, relu)
    from sparsecnn.runtimes.ecr.runtime import EcrLayer

    return EcrLayer(w, b, attrs, pool, relu, scratch)


def timed(fn, x, reps: int, dry: bool) -> float:
    """Median ms of fn(x) as a CUDA-graph replay (kernels only); eager on the CPU dry run."""
    if dry:
        return time_fn(lambda i: fn(x), "cpu", reps=1, warmup=0).median_ms
    return time_calls(lambda j: fn(x), x.device, reps=reps, warmup_ms=5.0).median_ms


def dense_methods(w, b, g, pool, relu=True) -> dict:
    """Dense conv (+ReLU, +max-pool) implementations; each maps an NCHW input to the output."""
    from sparsecnn.runtimes.ops import STANDARD_OPS, NodeContext, attributes

    stride, pads = (g.sh, g.sw), g.pads
    sym = pads[0] == pads[2] and pads[1] == pads[3]

    def post(y):
        if relu or pool:
            y = torch.relu(y)
        if pool:
            y = F.max_pool2d(F.pad(y, (pool.pads[1], pool.pads[3], pool.pads[0], pool.pads[2]), value=float("-inf"))
                             if any(pool.pads) else y, (pool.kh, pool.kw), (pool.sh, pool.sw), ceil_mode=pool.ceil_mode)
        return y

    def conv(x, weight):
        if sym:
            return F.conv2d(x, weight, b, stride, (pads[0], pads[1]))
        return F.conv2d(F.pad(x, (pads[1], pads[3], pads[0], pads[2])), weight, b, stride)

    w_cl = w.contiguous(memory_format=torch.channels_last)
    w2d = w.reshape(w.shape[0], -1)
    methods = {
        "cudnn_nchw": lambda x: post(conv(x, w)),
        # the input arrives NHWC in a channels-last network: the conversion is not timed
        "cudnn_nhwc": ("nhwc", lambda x: post(conv(x, w_cl))),
    }

    def im2col_gemm(x):
        xp = F.pad(x, (pads[1], pads[3], pads[0], pads[2])) if any(pads) else x
        cols = F.unfold(xp, (g.kh, g.kw), stride=stride)  # [N, K, P]
        y = torch.matmul(w2d, cols) + b.view(1, -1, 1)
        return post(y.view(x.shape[0], w.shape[0], g.oh, g.ow))

    methods["im2col_cublas"] = im2col_gemm
    try:  # the torch runtime's own Conv builder, with its best-dense option if it has one
        import onnx

        node = onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[g.kh, g.kw], strides=list(stride),
                                     pads=list(pads))
        ctx = NodeContext(node, attributes(node), {"w": w, "b": b}, {}, w.device, w.dtype, False,
                          {"dense_conv": "best"})
        conv_fn = STANDARD_OPS[("", "Conv")](ctx)
        methods["torch_runtime"] = lambda x: post(conv_fn(x, w, b))
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        log(f"  torch runtime conv builder unavailable: {exc}")
    return methods


def time_dense(w, b, g, pool, x, reps, dry, relu=True) -> dict:
    out = {}
    for name, m in dense_methods(w, b, g, pool, relu).items():
        xx = x
        if isinstance(m, tuple):
            xx, m = x.contiguous(memory_format=torch.channels_last), m[1]
        try:
            out[name] = timed(m, xx, reps, dry)
        except Exception as exc:  # noqa: BLE001
            out[name] = None
            log(f"  dense {name} failed: {type(exc).__name__}: {exc}")
    return out


def time_sparse(layer, x, reps, dry, names=None, ref=None, rejected=None) -> dict:
    """Median ms per kernel variant; with `ref`, a variant whose output is wrong is not timed."""
    out = {}
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    for cand in layer.candidates(x):
        if names is not None and cand.name not in names:
            continue
        try:
            if ref is not None:
                err = rel_err(layer.run_candidate(cand, x), ref)
                if not err <= tol:
                    if rejected is not None:
                        rejected[cand.name] = err
                    log(f"  REJECTED {cand.name}: rel err {err:.2e}")
                    continue
            out[cand.name] = timed(lambda xx, c=cand: layer.run_candidate(c, xx), x, reps, dry)
        except Exception as exc:  # noqa: BLE001
            log(f"  {cand.name} failed: {type(exc).__name__}: {exc}")
    return out


def keep_variants(times: dict, n: int = 2, groups: bool = False) -> list[str]:
    """The `n` fastest candidates, plus the fastest of a kernel family (name prefix: `ecr` warp
    kernels, `list` list kernels, `row` row kernels) that is not among them, so each stays measured
    everywhere; with `groups`, also the fastest list kernel of each union group size (g1, g3, g4)
    and the fastest row kernel of each scan (s1, s2, s4) and block width: which wins moves with sparsity, and
    only kept candidates are timed away from 80%."""
    order = sorted(times, key=times.get)
    keep = order[:n]
    tags = ["ecr", "list", "row"] + (["list*g1-", "list*g3-", "list*g4-", "row*s1-", "row*s2-", "row*s4-",
                                       "row64x", "row128x", "row256x"] if groups else [])
    for tag in tags:
        head, _, part = tag.partition("*")
        match = [k for k in order if k.startswith(head) and part in k]
        if match and not any(k in keep for k in match):
            keep.append(match[0])
    return keep


# --- part 1: correctness -------------------------------------------------------------------

def part_correct(args, dev, res):
    from sparsecnn.runtimes.ecr.runtime import Scratch
    from sparsecnn.passes.ecr.reference import ecr_conv, ecr_encode, pecr_conv_pool, pecr_encode

    div = 16 if args.dry_run else 1
    layers = vgg19_layers(32 if args.dry_run else 224, div)
    for name, n, cin, h, w_, cout, k, s, pads, pool in ODD_LAYERS:
        layers.append({"name": name, "n": n, "cin": max(4, cin // div), "cout": max(4, cout // div), "h": h, "w": w_,
                       "k": k, "s": s, "pads": pads, "pool": pool is not None, "pool_spec": pool})
    scratch = None if args.dry_run else Scratch(dev)
    rows = []
    zero_fractions = ZERO_FRACTIONS[::2] if args.dry_run else ZERO_FRACTIONS
    for li, layer in enumerate(layers):
        g, pool = layer_spec(layer)
        gen = torch.Generator().manual_seed(100 + li)
        w32 = torch.randn(layer["cout"], g.cin, g.kh, g.kw, generator=gen) * math.sqrt(2.0 / g.k)
        b32 = torch.randn(layer["cout"], generator=gen) * 0.1
        for dname, dtype in DTYPES.items():
            if args.dry_run and dname == "fp16":
                continue
            w, b = w32.to(dev, dtype), b32.to(dev, dtype)
            kl = make_layer(w, b, attrs_of(g, pool), pool, True, scratch, args.dry_run)
            for zf in zero_fractions:
                x = sparse_input((g.n, g.cin, g.h, g.w), zf, dtype, dev, seed=1000 * li + int(zf * 100))
                ref = oracle(x, w, b, g, pool)
                errs = {}
                for cand in kl.candidates(x):
                    try:
                        y = kl.run_candidate(cand, x)
                        y = kl.run_candidate(cand, x)  # again: split-K workspace and tickets must be back at zero
                        errs[cand.name] = rel_err(y, ref)
                    except Exception as exc:  # noqa: BLE001
                        errs[cand.name] = float("inf")
                        log(f"  {layer['name']} {cand.name}: {type(exc).__name__}: {exc}")
                tol = 1e-5 if dname == "fp32" else 2e-3
                worst = max(errs.values()) if errs else float("inf")
                row = {"layer": layer["name"], "dtype": dname, "zeros": zf,
                       "zeros_measured": float((x == 0).float().mean()), "candidates": len(errs),
                       "max_rel_err": worst, "tol": tol, "pass": worst <= tol,
                       "failing": sorted(k for k, v in errs.items() if not v <= tol)}
                if layer["name"].startswith("odd") and dname == "fp32":  # the PyTorch reference ops too
                    # the reference ops are CPU code (DESIGN contract 2): run them there
                    xr, wr, br = x.double().cpu(), w.double().cpu(), b.double().cpu()
                    yr = (pecr_conv_pool(pecr_encode(xr, g, pool), wr, br) if pool
                          else ecr_conv(ecr_encode(xr, g), wr, br, True))
                    row["reference_op_rel_err"] = rel_err(yr, ref.cpu())
                rows.append(row)
            log(f"correct {layer['name']:<22} {dname}: worst {max(r['max_rel_err'] for r in rows[-len(zero_fractions):]):.2e}"
                f" over {rows[-1]['candidates']} variants x {len(zero_fractions)} zero fractions")
    if scratch is not None:
        torch.cuda.synchronize()
        res["correct_scratch_zero_after"] = bool(int(scratch.tickets.abs().sum()) == 0 and float(scratch.ws.abs().sum()) == 0)
    res["correct"] = rows
    res["correct_all_pass"] = all(r["pass"] for r in rows)


# --- real activations ---------------------------------------------------------------------------

def load_vgg(args, dev):
    """(onnx model, spec, label): the Fashion-MNIST checkpoint if given, else random weights."""
    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models import load_model

    if args.checkpoint:
        module, spec, entry = load_model("vgg19", args.checkpoint)
        label = f"trained checkpoint {Path(args.checkpoint).name}"
    else:
        module, spec, entry = load_model("vgg19", num_classes=10)
        label = "RANDOM weights (seed 0; no --checkpoint given)"
    return export_onnx(module, spec, entry.exclude), spec, label


def fashion_images(spec, count: int, offset: int = 0) -> tuple[torch.Tensor, str]:
    from sparsecnn.converter.activations import load_profile_images

    try:
        x, what = load_profile_images("fashion-mnist", spec, count + offset)
        return x[offset:], f"Fashion-MNIST test images {offset}..{offset + count - 1}"
    except Exception as exc:  # noqa: BLE001 - no dataset: say so, use noise
        x, what = load_profile_images("random", spec, count, seed=offset)
        return x, f"{what} (Fashion-MNIST unavailable: {exc})"


def real_activations(args, dev, res, model, spec, label):
    """Per conv: zero fraction over images, and one image's input tensor for timing."""
    from sparsecnn.converter.activations import conv_input_sparsity, plot_sparsity
    from sparsecnn.runtimes.executor import Executor

    images, what = fashion_images(spec, 2 if args.dry_run else 32)
    rows = conv_input_sparsity(model, images, dev, batch_size=8)
    res["activations"] = {"model": label, "data": what, "input": list(spec.shape),
                          "layers": [{k: v for k, v in r.items() if k != "per_image"} for r in rows]}
    try:
        plot_sparsity(rows, Path(args.out) / "activations.png", f"VGG-19 ({label}): conv input sparsity, {what}")
    except Exception as exc:  # noqa: BLE001
        log(f"activation plot failed: {exc}")
    tensors = {}
    ex = Executor(model, dev, "fp32")

    def grab(step, a):
        if step.op_type == "Conv" and len(step.inputs) > 1:
            tensors[step.inputs[1].removesuffix(".weight")] = a[0].detach().clone()

    with torch.no_grad():
        ex.walk(images[:1].to(dev), before=grab)
    means = {r["weight"].removesuffix(".weight"): r["mean"] for r in rows}
    for r in rows:
        log(f"activations {r['node']:<34} zeros {r['mean']:.3f} +- {r['std']:.3f}")
    return means, tensors


# --- part 2: Figure 8 ----------------------------------------------------------------------

def part_fig8(args, dev, res, real_means, real_tensors, real_label):
    from sparsecnn.runtimes.ecr.runtime import CANDIDATE_BY_NAME, Scratch, layer_cost

    dry = args.dry_run
    layers = vgg19_layers(32 if dry else 224)
    scratch = None if dry else Scratch(dev)
    reps = 3 if dry else args.reps
    rows, fig8_meta = [], []
    res["fig8_meta"] = fig8_meta
    # bar-critical measurements first (fp32 PECR), then fp32 ECR, then fp16: what the time budget
    # cuts is the least needed
    jobs = []
    for li, layer in enumerate(layers):
        pool = layer_spec(layer)[1]
        for dname in DTYPES:
            if dry and dname == "fp16":
                continue
            for target in ("ecr", "pecr") if pool else ("ecr",):
                jobs.append(((dname != "fp32", target != "pecr"), li, dname, target))
    jobs.sort(key=lambda j: j[0])  # stable: layer order within a priority
    t_start = time.perf_counter()
    skipped = []
    res["fig8_skipped"] = skipped
    for _, li, dname, target in jobs:
        layer = layers[li]
        if time.perf_counter() - t_start > args.fig8_budget_s:
            skipped.append(f"{layer['name']} {dname} {target}")
            continue
        g, pool = layer_spec(layer)
        tpool = pool if target == "pecr" else None
        gen = torch.Generator().manual_seed(7 + li)
        w32 = torch.randn(layer["cout"], g.cin, 3, 3, generator=gen) * math.sqrt(2.0 / g.k)
        b32 = torch.randn(layer["cout"], generator=gen) * 0.1
        dtype = DTYPES[dname]
        w, b = w32.to(dev, dtype), b32.to(dev, dtype)
        x0 = sparse_input((1, g.cin, g.h, g.w), 0.8, dtype, dev, seed=li)
        kl = make_layer(w, b, attrs_of(g, tpool), tpool, True, scratch, dry)
        dense = time_dense(w, b, g, tpool, x0, reps, dry)
        dname_best, dense_best = best_dense(dense)
        # all variants at 80% zeros (each checked against the oracle, timed briefly), then the two
        # fastest and the fastest of the other kernel family (warp / list), timed fully everywhere
        rejected = {}
        screen = time_sparse(kl, x0, max(3, reps // 3), dry, ref=oracle(x0, w, b, g, tpool), rejected=rejected)
        keep = keep_variants(screen, groups=(dname, target) == ("fp32", "pecr"))  # the bar's jobs: wider
        first = time_sparse(kl, x0, reps, dry, names=set(keep))
        cost80 = layer_cost(g, tpool, layer["cout"], 0.2)
        for name_ in sorted(first, key=first.get):
            plan = kl.plan(CANDIDATE_BY_NAME[name_], x0)
            log(f"   {layer['name']} {dname} {target} @80%: {name_:<22} {first[name_]:.4f} ms "
                f"{2 * cost80['sparse_macs'] / first[name_] / 1e6:8.0f} useful GFLOP/s  "
                f"{plan.describe() if plan else ''}")
        log(f"   dense: " + ", ".join(f"{k} {v:.4f}" for k, v in dense.items() if v) +
            f"  ({2 * cost80['dense_macs'] / dense_best / 1e6:.0f} GFLOP/s best)" if dense_best else "")
        fig8_meta.append({"layer": layer["name"], "dtype": dname, "target": target, "rejected": rejected,
                          "at80_all_ms": screen, "at80_screen_reps": max(3, reps // 3), "kept": keep,
                          "cost": layer_cost(g, tpool, layer["cout"], 1.0)})
        points = [(s, "iid") for s in SWEEP]
        rm = real_means.get(layer["name"])
        if rm is not None:
            points.append((round(rm, 4), "real-mean-iid"))
        for s, kind in points:
            x = x0 if (s == 0.8 and kind == "iid") else sparse_input((1, g.cin, g.h, g.w), s, dtype, dev, seed=li)
            t = first if x is x0 else time_sparse(kl, x, reps, dry, names=set(keep))
            sname, sms = fastest(t)
            cost = layer_cost(g, tpool, layer["cout"], 1 - s)
            rows.append({"layer": layer["name"], "dtype": dname, "target": target, "sparsity": s, "kind": kind,
                         "sparse_ms": sms, "sparse_variant": sname, "sparse_all_ms": t,
                         "dense_ms": dense_best, "dense_method": dname_best, "dense_all_ms": dense,
                         "speedup": (dense_best / sms) if sms and dense_best else None,
                         "useful_gflops": 2 * cost["sparse_macs"] / sms / 1e6 if sms else None,
                         "dense_gflops": 2 * cost["dense_macs"] / dense_best / 1e6 if dense_best else None,
                         "cost": cost, "shape": [g.cin, g.h, g.w, layer["cout"]]})
        xr = real_tensors.get(layer["name"])
        if dry and xr is not None and xr.shape[2] > 28:
            xr = None  # the CPU reference ops are slow on large maps
        if xr is not None and xr.shape[1] == g.cin:  # the real activation tensor (its own spatial size)
            xr = xr.to(dev, dtype)
            gr = layer_spec({**layer, "h": xr.shape[2], "w": xr.shape[3]})[0]
            d_r = time_dense(w, b, gr, tpool, xr, reps, dry)
            t_r = time_sparse(kl, xr, reps, dry, names=set(keep))
            sname, sms = fastest(t_r)
            dn, db = best_dense(d_r)
            s_r = float((xr == 0).float().mean())
            rows.append({"layer": layer["name"], "dtype": dname, "target": target, "sparsity": round(s_r, 4),
                         "kind": f"real-activation {xr.shape[2]}x{xr.shape[3]}", "sparse_ms": sms,
                         "sparse_variant": sname, "sparse_all_ms": t_r, "dense_ms": db, "dense_method": dn,
                         "dense_all_ms": d_r, "speedup": (db / sms) if sms and db else None,
                         "shape": [g.cin, int(xr.shape[2]), int(xr.shape[3]), layer["cout"]]})
        sp = {r["sparsity"]: r["speedup"] for r in rows if r["kind"] == "iid" and
              (r["layer"], r["dtype"], r["target"]) == (layer["name"], dname, target)}
        log(f"fig8 {layer['name']:<12} {dname} {target:<4} dense {dense_best and round(dense_best, 4)} ms "
            f"({dname_best}); speedup @0/.5/.7/.8/.9/.95: "
            + " ".join(f"{sp.get(s) or float('nan'):.2f}" for s in (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)))
    if skipped:
        log(f"fig8: {args.fig8_budget_s:.0f} s budget spent; skipped {len(skipped)}: {', '.join(skipped)}")
    res["fig8"] = rows
    res["fig8_real_model"] = real_label
    summarize_fig8(res)


def break_even(points: list[tuple[float, float]]) -> float | None:
    """Sparsity where speedup crosses 1 (log-linear interpolation); 0 if always >= 1, None if never."""
    pts = sorted((s, v) for s, v in points if v)
    if not pts:
        return None
    if pts[0][1] >= 1:
        return 0.0
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if v0 < 1 <= v1:
            a, b_ = math.log(v0), math.log(v1)
            return s0 + (s1 - s0) * (0 - a) / (b_ - a)
    return None


def summarize_fig8(res):
    rows = res.get("fig8", [])
    be = {}
    for r in rows:
        if r["kind"] == "iid":
            be.setdefault((r["layer"], r["dtype"], r["target"]), []).append((r["sparsity"], r["speedup"]))
    res["break_even"] = [{"layer": k[0], "dtype": k[1], "target": k[2], "break_even_sparsity": break_even(v)}
                         for k, v in be.items()]
    bar = [r for r in rows if r["dtype"] == "fp32" and r["target"] == "pecr" and r["kind"] == "iid"
           and r["sparsity"] in BAR_SPARSITIES and r["speedup"]]
    if bar:
        gm = math.exp(sum(math.log(r["speedup"]) for r in bar) / len(bar))
        res["bar"] = {"pecr_fp32_geomean_speedup": gm, "points": len(bar), "target": 1.5, "met": gm >= 1.5,
                      "per_point": [{k: r[k] for k in ("layer", "sparsity", "sparse_ms", "dense_ms", "dense_method",
                                                        "speedup", "sparse_variant")} for r in bar]}
        # the same geomean with one kernel family only (ecr* warp, list* list, row* row kernels)
        for family in ("ecr", "list", "row"):
            sp = []
            for r in bar:
                t = [v for k, v in (r.get("sparse_all_ms") or {}).items() if k.startswith(family) and v]
                if t:
                    sp.append(r["dense_ms"] / min(t))
            res["bar"][f"geomean_{family}_only"] = (math.exp(sum(map(math.log, sp)) / len(sp))
                                                    if len(sp) == len(bar) else None)


def plot_fig8(res, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.get("fig8", [])
    for dname in DTYPES:
        sel = [r for r in rows if r["dtype"] == dname and r["kind"] == "iid" and r["speedup"]]
        if not sel:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
        for ax, target, title in ((axes[0], "ecr", "ECR conv+ReLU vs best dense conv+ReLU"),
                                  (axes[1], "pecr", "PECR conv+ReLU+max-pool vs best dense")):
            names = sorted({r["layer"] for r in sel if r["target"] == target}, key=lambda n: int(n.split(".")[1]))
            cmap = plt.get_cmap("viridis", max(2, len(names)))
            for i, name in enumerate(names):
                pts = sorted((r["sparsity"], r["speedup"]) for r in sel if r["layer"] == name and r["target"] == target)
                ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=cmap(i), label=name)
            ax.axhline(1.0, color="k", lw=0.8)
            if target == "pecr":
                ax.axhline(1.5, color="tab:red", lw=0.8, ls="--", label="bar 1.5x")
            ax.set_yscale("log")
            ax.set_xlabel("input sparsity (% zeros, i.i.d.)")
            ax.set_title(f"{title} ({dname}{', TF32 off' if dname == 'fp32' else ''})", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, ncol=2)
        axes[0].set_ylabel("speedup over best dense (x, log scale)")
        fig.suptitle(f"VGG-19 conv layers, batch 1, {card(res)}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"fig8_{dname}.png", dpi=120)
        plt.close(fig)
    be = [r for r in res.get("break_even", [])]
    if be:
        fig, ax = plt.subplots(figsize=(11, 4.2))
        keys = sorted({(r["layer"]) for r in be}, key=lambda n: int(n.split(".")[1]))
        series = [(d, t) for d in DTYPES for t in ("ecr", "pecr")]
        width = 0.8 / len(series)
        for j, (d, t) in enumerate(series):
            vals, xs = [], np.arange(len(keys)) + j * width
            for k in keys:
                m = [r["break_even_sparsity"] for r in be if r["layer"] == k and r["dtype"] == d and r["target"] == t]
                vals.append(np.nan if not m else (-1.0 if m[0] is None else 100 * m[0]))  # -1: never
            bars = ax.bar(xs, [v if v > 0 else 0 for v in vals], width, label=f"{t.upper()} {d}")
            color = bars.patches[0].get_facecolor() if bars.patches else None
            for x, v in zip(xs, vals):  # a zero-height bar would read as missing: say 0 or never
                if v == 0 or v == -1:
                    ax.text(x, 1, "0" if v == 0 else "never", rotation=90, ha="center", va="bottom", fontsize=7,
                            color=color)
        never = [r for r in be if r["break_even_sparsity"] is None]
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
        ax.set_xticklabels(keys, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("break-even input sparsity (% zeros)")
        ax.set_ylim(0, 100)
        ax.set_title("Sparsity above which the sparse kernel beats the best dense method "
                     f"(0: faster at every sparsity; never: slower at 0-95%, {len(never)} cases)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "breakeven.png", dpi=120)
        plt.close(fig)


# --- part 3 and 4: whole networks ------------------------------------------------------------

def network_compare(args, dev, model, spec, label, calib, evals, dtype, reps, calib_reps=20):
    """ecr runtime vs the torch runtime (faster of NCHW / channels-last) on the same images."""
    from sparsecnn.runtimes import get_runtime

    dry = args.dry_run
    ecr_rt = get_runtime("ecr")
    extra = {"dense_conv": "best"}
    out = {"model": label, "dtype": dtype}
    t0 = time.perf_counter()
    # the best dense engine (per-layer fastest dense conv; whole network also tried all-NCHW / all-NHWC)
    dense = {"best": dense_engines(model, dev, {"dtype": dtype, "tf32": False}, layouts=("NCHW",))["NCHW"]}
    rewritten = ecr_rt.rewrite(model)
    sparse = ecr_rt.compile(rewritten, dev, {"dtype": dtype, "tf32": False, "extra": {**extra, "ecr_reps": calib_reps}},
                            calibration=calib)
    out["compile_s"] = time.perf_counter() - t0
    out["sparse_layers_per_layer_choice"] = sum(1 for r in sparse.report() if r.get("format") in ("ecr", "pecr"))

    def time_engine(eng):
        per_image, outs = [], []
        for i in range(evals.shape[0]):
            xs = eng.prepare(evals[i:i + 1])
            with torch.no_grad(), eng._precision_context():
                run = eng.runner(*xs)
                outs.append(run(*xs)[0].float().clone())
                if dry:
                    per_image.append(time_fn(lambda k: run(*xs), "cpu", reps=1, warmup=0).median_ms)
                else:
                    per_image.append(time_fn(lambda k: run.replay(), dev, reps=reps, warmup=10).median_ms)
        return per_image, outs

    d_times = {}
    d_outs = None
    for dn, eng in dense.items():
        t, o = time_engine(eng)
        d_times[dn] = t
        d_outs = d_outs or o
    s_times, s_outs = time_engine(sparse)
    out["whole_network_check"] = getattr(sparse, "whole_network", {})
    out["dense_plans"] = getattr(dense["best"], "plans", {})
    out["layers"] = sparse.report()  # after the whole-network check
    out["sparse_layers"] = sum(1 for r in out["layers"] if r.get("format") in ("ecr", "pecr"))
    out["ecr_candidates"] = sum(1 for r in out["layers"] if r["op"].startswith("sparsecnn::"))
    dense_med = {k: float(np.median(v)) for k, v in d_times.items()}
    best_label, best_ms = best_dense(dense_med)
    out.update(dense_ms_per_image=d_times, dense_ms=dense_med, dense_best=best_label,
               ecr_ms_per_image=s_times, ecr_ms=float(np.median(s_times)),
               speedup=best_ms / float(np.median(s_times)),
               rel_err=max(rel_err(a, b) for a, b in zip(s_outs, d_outs)),
               top1_agree=float(np.mean([int(a.argmax()) == int(b.argmax()) for a, b in zip(s_outs, d_outs)])))
    log(f"{label} {dtype}: dense {dense_med} ms, ecr {out['ecr_ms']:.4f} ms, speedup {out['speedup']:.3f}x, "
        f"{out['sparse_layers']}/{out['ecr_candidates']} layers sparse, rel err {out['rel_err']:.2e}")
    for r in out["layers"]:
        if r["op"].startswith("sparsecnn::"):
            t = r.get("times_ms", {})
            log(f"   {r['name']:<30} {r.get('format'):<6} sparsity {r.get('sparsity', float('nan')):.3f} "
                f"dense {t.get('dense', float('nan')):.4f} ms  best sparse "
                f"{min([v for k, v in t.items() if k != 'dense'] or [float('nan')]):.4f} ms -> {r.get('kernel')}")
    return out


def part_vgg(args, dev, res, model, spec, label):
    if args.dry_run:  # the whole-network plumbing on a small net: CPU reference ops are slow on VGG-19
        from sparsecnn.converter.export import export_onnx
        from sparsecnn.models import load_model

        module, spec, entry = load_model("tinynet")
        model, label = export_onnx(module, spec, entry.exclude), "tinynet standing in for VGG-19 (dry run)"
    calib, what = fashion_images(spec, 1, offset=100)
    evals, _ = fashion_images(spec, 2 if args.dry_run else 8, offset=200)
    rows = []
    for dtype in (("fp32",) if args.dry_run else ("fp32", "fp16")):
        try:
            rows.append(network_compare(args, dev, model, spec, f"VGG-19 ({label})", calib, evals, dtype,
                                        3 if args.dry_run else 100))
        except Exception as exc:  # noqa: BLE001
            rows.append({"dtype": dtype, **error_record(exc)})
            log(rows[-1]["traceback"])
    res["vgg"] = {"images": what, "rows": rows}


def part_nets(args, dev, res):
    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models import load_model

    rows = []
    for name in (("tinyresnet",) if args.dry_run else ("resnet18", "trafficcamnet")):
        try:
            module, spec, entry = load_model(name)
            model = export_onnx(module, spec, entry.exclude)
            calib, _ = fashion_images(spec, 1, offset=300)
            evals, _ = fashion_images(spec, 2, offset=400)
            rows.append(network_compare(args, dev, model, spec, f"{name} (random weights)", calib, evals, "fp32",
                                        3 if args.dry_run else 50, calib_reps=12))
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": name, **error_record(exc)})
            log(rows[-1]["traceback"])
    res["nets"] = rows


# --- report ------------------------------------------------------------------------------------

def card(res: dict) -> str:
    env = res.get("env", {})
    return env.get("card") or env.get("gpu", "")  # "gpu": files written before the shared environment report


def fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def write_markdown(res, out: Path):
    L = [f"# ECR / PECR on {card(res)}", "",
         f"torch {res['env'].get('torch')}, CUDA {res['env'].get('cuda')}, cuDNN {res['env'].get('cudnn')}; "
         "fp32 with TF32 off in cuDNN and cuBLAS; cudnn.benchmark on; times are medians of CUDA-graph replays "
         "(CUDA events).", ""]
    if "correct" in res:
        bad = [r for r in res["correct"] if not r["pass"]]
        L += ["## Correctness", "", f"{len(res['correct'])} (layer, dtype, zero fraction) cases, every kernel variant, "
              f"two launches each: {'all pass' if not bad else f'{len(bad)} FAIL'} "
              f"(worst fp32 {max((r['max_rel_err'] for r in res['correct'] if r['dtype'] == 'fp32'), default=float('nan')):.2e}, "
              f"worst fp16 {max((r['max_rel_err'] for r in res['correct'] if r['dtype'] == 'fp16'), default=float('nan')):.2e}).", ""]
    if "bar" in res:
        b = res["bar"]
        L += ["## Figure 8 bar (fp32, TF32 off)", "",
              f"PECR geomean speedup over the best dense conv+ReLU+max-pool on the five conv-then-pool layers at "
              f"70/80/90% zeros: **{b['pecr_fp32_geomean_speedup']:.2f}x** (bar 1.5x: {'met' if b['met'] else 'NOT met'}); "
              f"warp kernels (ecr*) alone {fmt_x(b.get('geomean_ecr_only'))}, list kernels (list*) alone "
              f"{fmt_x(b.get('geomean_list_only'))}, row kernels (row*) alone {fmt_x(b.get('geomean_row_only'))}.",
              "", "| layer | zeros | PECR ms | variant | dense ms | dense method | speedup |", "|---|---|---|---|---|---|---|"]
        for p in b["per_point"]:
            L.append(f"| {p['layer']} | {p['sparsity']:.0%} | {p['sparse_ms']:.4f} | {p['sparse_variant']} | "
                     f"{p['dense_ms']:.4f} | {p['dense_method']} | {p['speedup']:.2f}x |")
        L.append("")
    if res.get("fig8_skipped"):
        L += [f"Figure 8 jobs skipped (--fig8-budget-s {res['args'].get('fig8_budget_s')} spent): "
              + ", ".join(res["fig8_skipped"]), ""]
    if res.get("break_even"):
        L += ["## Break-even input sparsity", "", f"Real activations from: {res.get('fig8_real_model')}", "",
              "| layer | dtype | target | break-even zeros |", "|---|---|---|---|"]
        for r in res["break_even"]:
            v = r["break_even_sparsity"]
            L.append(f"| {r['layer']} | {r['dtype']} | {r['target']} | {'never (0-95%)' if v is None else f'{v:.0%}'} |")
        L.append("")
    for key in ("vgg", "nets"):
        rows = res.get(key, {}).get("rows") if key == "vgg" else res.get(key)
        if rows:
            L += [f"## Whole networks ({key})", "", "| model | dtype | dense ms | ecr ms | speedup | sparse layers | rel err |",
                  "|---|---|---|---|---|---|---|"]
            for r in rows:
                if "error" in r:
                    L.append(f"| {r.get('model', '')} | {r['dtype'] if 'dtype' in r else ''} | error: {r['error']} |||||")
                else:
                    L.append(f"| {r['model']} | {r['dtype']} | {r['dense_ms'][r['dense_best']]:.4f} ({r['dense_best']}) | "
                             f"{r['ecr_ms']:.4f} | {r['speedup']:.3f}x | {r['sparse_layers']}/{r['ecr_candidates']} | "
                             f"{r['rel_err']:.1e} |")
            L.append("")
    if res.get("errors"):
        L += ["## Errors", ""] + [f"- {k}: {v['error'] if isinstance(v, dict) else v}" for k, v in res["errors"].items()]
    (out / "ecr.md").write_text("\n".join(L) + "\n")


def short_table(res):
    log("\n=== ECR / PECR summary ===")
    log(f"device: {card(res)}")
    if "correct_all_pass" in res:
        log(f"correctness: {'PASS' if res['correct_all_pass'] else 'FAIL'} ({len(res['correct'])} cases; "
            f"scratch zero after: {res.get('correct_scratch_zero_after')})")
    if "fig8" in res:
        log(f"{'layer':<12}{'dt':<5}{'tgt':<5}{'dense ms':>9}{'@70%':>7}{'@80%':>7}{'@90%':>7}{'@real':>7}{'b-even':>7}")
        be = {(r["layer"], r["dtype"], r["target"]): r["break_even_sparsity"] for r in res.get("break_even", [])}
        keys = []
        for r in res["fig8"]:
            k = (r["layer"], r["dtype"], r["target"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            sel = [r for r in res["fig8"] if (r["layer"], r["dtype"], r["target"]) == k]
            sp = {r["sparsity"]: r["speedup"] for r in sel if r["kind"] == "iid"}
            real = [r["speedup"] for r in sel if r["kind"] != "iid" and r["speedup"]]
            d = sel[0]["dense_ms"]
            b = be.get(k)
            log(f"{k[0]:<12}{k[1]:<5}{k[2]:<5}{(d or float('nan')):>9.4f}"
                + "".join(f"{(sp.get(s) or float('nan')):>7.2f}" for s in BAR_SPARSITIES)
                + f"{(real[0] if real else float('nan')):>7.2f}" + f"{('never' if b is None else f'{b:.0%}'):>7}")
    if "bar" in res:
        b = res["bar"]
        log(f"BAR PECR fp32 geomean @70/80/90% over {b['points']} points: {b['pecr_fp32_geomean_speedup']:.2f}x "
            f"(target 1.5x: {'MET' if b['met'] else 'NOT MET'}; warp kernels alone {fmt_x(b.get('geomean_ecr_only'))}, "
            f"list kernels alone {fmt_x(b.get('geomean_list_only'))}, row kernels alone "
            f"{fmt_x(b.get('geomean_row_only'))})")
    for r in (res.get("vgg", {}).get("rows") or []) + (res.get("nets") or []):
        if "error" in r:
            log(f"{r.get('model', '?')} {r.get('dtype', '')}: ERROR {r['error']}")
        else:
            log(f"{r['model'][:48]:<48} {r['dtype']}: dense {r['dense_ms'][r['dense_best']]:.4f} ms, ecr {r['ecr_ms']:.4f} ms,"
                f" speedup {r['speedup']:.3f}x, {r['sparse_layers']}/{r['ecr_candidates']} sparse, err {r['rel_err']:.1e}")
    if res.get("errors"):
        log(f"parts with errors: {', '.join(res['errors'])}")


def main() -> None:
    ap = study_parser(__doc__, out="out/ecr-pecr", dry_run="CPU, tiny sizes, reference ops: checks the plumbing")
    ap.add_argument("--checkpoint", help="trained Fashion-MNIST VGG-19 sparsecnn checkpoint (else random weights)")
    ap.add_argument("--reps", type=int, default=30, help="graph replays per kernel timing (default 30)")
    ap.add_argument("--parts", default="correct,fig8,vgg", help="comma-separated parts (default correct,fig8,vgg; "
                                                                 "nets runs ResNet-18 and TrafficCamNet too)")
    ap.add_argument("--budget-s", type=float, help="start no new part after this many seconds (default 330 on "
                                                   "the GPU, none on the CPU dry run)")
    ap.add_argument("--fig8-budget-s", type=float, default=170.0,
                    help="fig8 starts no new (layer, dtype, target) after this many seconds of its own (default "
                         "170); the bar's fp32 PECR layers run first, fp16 last")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plots of a saved ecr.json into --out")
    args = ap.parse_args()
    if args.replot:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot_fig8(json.loads(Path(args.replot).read_text(encoding="utf-8")), out)
        return
    if args.budget_s is None:
        args.budget_s = float("inf") if args.dry_run else 330.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    parts = set(args.parts.split(","))
    res: dict = {"env": environment(dev), "args": vars(args), "errors": {}}
    log(json.dumps(res["env"]))
    t_start = time.perf_counter()
    if dev.type == "cuda":  # clocks up once; the many short timings after it warm up 5 ms each
        a = torch.randn(4096, 4096, device=dev)
        time_fn(lambda i: a @ a, dev, reps=5, warmup_ms=300.0)
        del a
        t0 = time.perf_counter()
        from sparsecnn.runtimes.ecr.runtime import KernelSet

        KernelSet.get(dev)
        res["kernel_compile_s"] = time.perf_counter() - t0
        log(f"kernels compiled and loaded in {res['kernel_compile_s']:.1f} s")

    def run_part(name, fn, *a):
        if name not in parts:
            return
        if time.perf_counter() - t_start > args.budget_s:
            res["errors"][name] = f"skipped: {args.budget_s:.0f} s budget spent before this part"
            log(res["errors"][name])
            return
        t0 = time.perf_counter()
        try:
            fn(*a)
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others
            res["errors"][name] = error_record(exc)
            log(res["errors"][name]["traceback"])
        res.setdefault("part_seconds", {})[name] = time.perf_counter() - t0
        (out / "ecr.json").write_text(json.dumps(res, indent=1, default=str))

    run_part("correct", part_correct, args, dev, res)
    model = spec = label = None
    real_means, real_tensors = {}, {}
    if parts & {"fig8", "vgg"}:
        try:
            model, spec, label = load_vgg(args, dev)
            real_means, real_tensors = real_activations(args, dev, res, model, spec, label)
        except Exception as exc:  # noqa: BLE001
            res["errors"]["activations"] = error_record(exc)
            log(res["errors"]["activations"]["traceback"])
    run_part("fig8", part_fig8, args, dev, res, real_means, real_tensors, label)
    try:
        plot_fig8(res, out)
    except Exception as exc:  # noqa: BLE001
        res["errors"]["plots"] = error_record(exc)
    if model is not None:
        run_part("vgg", part_vgg, args, dev, res, model, spec, label)
    run_part("nets", part_nets, args, dev, res)
    res["total_s"] = time.perf_counter() - t_start
    (out / "ecr.json").write_text(json.dumps(res, indent=1, default=str))
    try:
        write_markdown(res, out)
    except Exception as exc:  # noqa: BLE001
        res["errors"]["markdown"] = error_record(exc)
        log(res["errors"]["markdown"]["traceback"])
    short_table(res)


if __name__ == "__main__":
    sys.exit(main())
