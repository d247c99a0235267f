"""Probe single CSR conv layers on a GPU: every candidate config plus a wider grid, and
(with --ncu-config) one config run eagerly for Nsight Compute.

    source scripts/gpu_env.sh && python3 scripts/gpu_probe_layers.py --out $OUT
    ncu --section SpeedOfLight ... python3 scripts/gpu_probe_layers.py --layer tcn.layer1 --ncu-config 'LABEL'

Layers are TrafficCamNet's (ResNet-18 backbone at 544x960, layer4 at stride 1), 90 %
magnitude-pruned random weights. Each is timed dense (cuDNN NCHW / channels-last, im2col +
cuBLAS) and with every csr candidate (runtimes/csr_kernels.candidate_configs) plus the
`wide` grid below, all as CUDA-graph replays (time_in_graph_us); the table is sorted.
Writes <out>/probe_layers.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYERS = {  # name: (cout, cin, h, w)   3x3, stride 1, pad 1
    "tcn.layer1": (64, 64, 136, 240),
    "tcn.layer2": (128, 128, 68, 120),
    "tcn.layer4": (512, 512, 34, 60),
}
EXTRA_WINDOW_VARIANTS = [(p, rpt, nt, False, ss) for ss in (False, True) for p in (2, 4, 8) for rpt in (2, 4, 8)
                         for nt in (256, 512) if not (p * rpt > 32 or (nt == 512 and p * rpt > 16))]


def setup():
    from sparsecnn.runtimes import csr_kernels as ck

    for v in EXTRA_WINDOW_VARIANTS:
        if v not in ck.CONV_VARIANTS:
            ck.CONV_VARIANTS.append(v)
    return ck


def layer(name: str, dev, sparsity: float = 0.9, seed: int = 0):
    from sparsecnn.passes.csr import csr_from_dense, gemm_view

    ck = setup()
    m, c, h, w = LAYERS[name]
    gen = torch.Generator().manual_seed(seed)
    wt = torch.randn(m, c, 3, 3, generator=gen)
    thr = wt.abs().flatten().kthvalue(int(sparsity * wt.numel())).values
    wt = wt * (wt.abs() > thr)
    x = torch.randn(1, c, h, w, generator=gen).relu_().to(dev)
    g = ck.ConvGeometry(m, c, h, w, 3, 3, 1, 1, 1, 1, 1, 1)
    return ck, g, csr_from_dense(gemm_view(wt)), wt.to(dev), x


def wide_grid(ck, g):
    out = []
    for p in (2, 4, 8):
        for rpt in (2, 4, 8):
            for nt in (256, 512):
                if (p, rpt, nt, False, False) not in ck.CONV_VARIANTS or nt // 32 * rpt > max(16, g.m):
                    continue
                for tw in (32, 64, 120, 240):
                    for budget in (8192, 16384):
                        cfg = ck.window_config(g, p, rpt, threads=nt, tile_w=min(tw, g.wo), budget=budget)
                        out += [cfg, ck.replace(cfg, ss=True)]
    return list(dict.fromkeys(out))


def probe(name: str, dev, sms: int) -> dict:
    ck, g, csr, wt, x = layer(name, dev)
    backend = ck.NvrtcBackend(dev)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = F.conv2d(x.double(), wt.double(), padding=1)
    res = {"layer": name, "shape": LAYERS[name], "nnz": csr.nnz}
    xcl = x.contiguous(memory_format=torch.channels_last)
    wcl = wt.contiguous(memory_format=torch.channels_last)
    w2 = wt.reshape(wt.shape[0], -1)
    res["dense_us"] = {
        "cudnn_nchw": ck.time_in_graph_us(lambda a: F.conv2d(a, wt, padding=1), x, dev),
        "cudnn_nhwc": ck.time_in_graph_us(lambda a: F.conv2d(a, wcl, padding=1), xcl, dev),
        "im2col_cublas": ck.time_in_graph_us(lambda a: w2 @ F.unfold(a, 3, padding=1)[0], x, dev),
    }
    res["floor_us"] = ck.expected_floor_us(csr.nnz, g.ho * g.wo, 0, sms=sms)
    cands = ck.candidate_configs(g, sms) + wide_grid(ck, g)
    cands = list(dict.fromkeys(cands))
    rows = []
    for cfg in cands:
        t0 = time.time()
        try:
            plan = ck.make_plan(csr, g, cfg, torch.float32, dev, backend)
            y = plan.conv(x)
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            us = ck.time_in_graph_us(lambda a, p=plan: p.conv(a), x, dev)
            rows.append({"config": cfg.label(), "us": round(us, 2), "err": err, "s": round(time.time() - t0, 2)})
        except Exception as exc:  # a config that does not plan/launch is recorded, not fatal
            rows.append({"config": cfg.label(), "error": f"{type(exc).__name__}: {exc}"})
        del plan
    rows.sort(key=lambda r: r.get("us", 1e9))
    res["candidates"] = rows
    best_dense = min(res["dense_us"].values())
    print(f"\n== {name} {LAYERS[name]} nnz {csr.nnz}: dense {res['dense_us']} floor {res['floor_us']:.1f} us", flush=True)
    for r in rows[:25]:
        print(f"  {r.get('us', float('nan')):8.2f} us  x{best_dense / r['us'] if 'us' in r else 0:5.2f}  "
              f"err {r.get('err', 0):.1e}  {r['config']}", flush=True)
    return res


def ncu_one(name: str, label: str, dev) -> None:
    """Run one config eagerly 5 times (ncu: --launch-skip 3 --launch-count 1)."""
    ck, g, csr, wt, x = layer(name, dev)
    backend = ck.NvrtcBackend(dev)
    for cfg in ck.candidate_configs(g) + wide_grid(ck, g):
        if cfg.label() == label:
            plan = ck.make_plan(csr, g, cfg, torch.float32, dev, backend)
            for _ in range(5):
                plan.conv(x)
            torch.cuda.synchronize()
            print("ran", label)
            return
    raise SystemExit(f"no config {label!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/probe")
    ap.add_argument("--layers", default="tcn.layer1,tcn.layer4")
    ap.add_argument("--layer", help="with --ncu-config: the layer")
    ap.add_argument("--ncu-config", help="run only this config label, eagerly (for ncu)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.ncu_config:
        ncu_one(args.layer, args.ncu_config, dev)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": []}
    for name in args.layers.split(","):
        results["layers"].append(probe(name, dev, sms))
        (out / "probe_layers.json").write_text(json.dumps(results, indent=1))
    # the best window config of each layer, for ncu
    for r in results["layers"]:
        for tag, prefix in (("BEST_WINDOW", "window p"), ("BEST_SS", "window ss")):
            best = next((c for c in r["candidates"] if c["config"].startswith(prefix) and "us" in c), None)
            if best:
                print(f"{tag} {r['layer']} {best['config']}")


if __name__ == "__main__":
    sys.exit(main())
