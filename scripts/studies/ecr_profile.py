r"""One ECR/PECR kernel candidate on one VGG-19 layer, for Nsight Compute (ncu) on a GPU.

    # the fastest candidate of a kernel family at a sparsity (prints its name, nothing else)
    python3 scripts/studies/ecr_profile.py --layer features.7 --zeros 0.9 --pick row
    # one candidate, launched 3 times: ncu skips the first 2 (warm-up) and profiles the third;
    # leave the clocks alone (--clock-control none), as the lent machines ask
    ncu --clock-control none --kernel-name regex:ecr_ --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section InstructionStats \
        --section SchedulerStats --section Occupancy \
        python3 scripts/studies/ecr_profile.py --layer features.7 --zeros 0.9 --variant NAME

Profile one candidate per ncu call (with --launch-skip 2, a second --variant's launches come
after the profiled one). Random weights, i.i.d. input zeros, batch 1, fp32 unless --fp16.
Profiles kept: results/ecr-pecr/2026-12-07-h100/ncu_features.25.txt and
results/ecr-pecr/2026-12-06-h100/ncu_features.{2,7}.txt (before the integer work was cut).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ecr_pecr import attrs_of, layer_spec, sparse_input, vgg19_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="features.2", help="VGG-19 conv layer (224x224 input), e.g. features.2")
    ap.add_argument("--zeros", type=float, default=0.9, help="fraction of zero inputs (i.i.d.)")
    ap.add_argument("--ecr", action="store_true", help="conv+ReLU only (default: PECR, with the layer's max-pool)")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--variant", action="append", default=[], help="candidate name (repeat for several)")
    ap.add_argument("--pick", metavar="PREFIX", help="print the fastest candidate whose name starts with PREFIX")
    ap.add_argument("--launches", type=int, default=3, help="launches per variant (default 3)")
    args = ap.parse_args()

    from sparsecnn.runtimes.ecr.runtime import CANDIDATE_BY_NAME, EcrLayer, Scratch
    from sparsecnn.runtimes.timing import time_calls

    layer = next((ly for ly in vgg19_layers() if ly["name"] == args.layer), None)
    if layer is None:
        sys.exit(f"unknown layer {args.layer}; one of {', '.join(ly['name'] for ly in vgg19_layers())}")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float16 if args.fp16 else torch.float32
    g, pool = layer_spec(layer)
    if args.ecr:
        pool = None
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(layer["cout"], g.cin, 3, 3, generator=gen) * (2.0 / g.k) ** 0.5).to(dev, dtype)
    b = (torch.randn(layer["cout"], generator=gen) * 0.1).to(dev, dtype)
    x = sparse_input((1, g.cin, g.h, g.w), args.zeros, dtype, dev, seed=1)
    kl = EcrLayer(w, b, attrs_of(g, pool), pool, True, Scratch(dev))
    if args.pick:
        times = {c.name: time_calls(lambda j, c=c: kl.run_candidate(c, x), x.device, reps=10, warmup_ms=5.0).median_ms
                 for c in kl.candidates(x) if c.name.startswith(args.pick)}
        if not times:
            sys.exit(f"no candidate named {args.pick}* plans for {args.layer}")
        print(min(times, key=times.get))
        return
    for name in args.variant:
        if name not in CANDIDATE_BY_NAME:
            sys.exit(f"unknown candidate {name}")
        for _ in range(args.launches):
            kl.run_candidate(CANDIDATE_BY_NAME[name], x)
        torch.cuda.synchronize()
        print(name, kl.plan(CANDIDATE_BY_NAME[name], x).describe(), flush=True)


if __name__ == "__main__":
    main()
