"""Does the spine work on this card, and what does one CUDA graph buy over eager PyTorch?
Environment, torch runtime (whole network in one CUDA graph) vs eager and vs ONNX Runtime.

Run on the lent H100:
    source scripts/gpu_env.sh && python3 scripts/studies/torch_graph_vs_eager.py --out results/torch-graph-vs-eager/DATE-CARD
Prints a short table last; writes every number to <out>/spine.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import torch

from sparsecnn.common.numerics import rel_err
from sparsecnn.converter.export import export_onnx
from sparsecnn.converter.study import environment, study_parser
from sparsecnn.runtimes.timing import time_fn
from sparsecnn.models import load_model
from sparsecnn.passes.prune import prune_unstructured
from sparsecnn.runtimes import get_runtime

# the libraries the spine depends on, reported beside the numbers
SPINE_MODULES = ("cuda.bindings", "cuda.core", "onnx_graphsurgeon", "torch_pruning", "triton", "cupy")


def env() -> dict:
    info = environment(torch.device("cuda"), modules=SPINE_MODULES)
    info["cslt"] = hasattr(torch, "_cslt_compress")
    return info


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    info = env()
    print(json.dumps(info, indent=1))
    rows = []
    rt = get_runtime("torch")
    for name in ("resnet18", "vgg19", "trafficcamnet"):
        module, spec, entry = load_model(name)
        model = prune_unstructured(export_onnx(module, spec, entry.exclude), 0.9).model
        x = torch.randn(1, *spec.shape, generator=torch.Generator().manual_seed(0))
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {spec.input_name: x.numpy()})
        for dtype in ("fp32", "fp16"):
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            eng = rt.compile(model, "cuda", {"dtype": dtype, "tf32": False})
            outs = eng(x)
            err = max(rel_err(o, r) for o, r in zip(outs, ref))
            xs = eng.prepare(x)
            replay = eng.runner(*xs)
            graph_t = time_fn(lambda i: replay.replay(), "cuda", reps=args.reps)
            graph_t2 = time_fn(lambda i: replay.replay(), "cuda", reps=args.reps)
            executor_eager = time_fn(lambda i: eng.executor(*xs), "cuda", reps=50)
            tdt = torch.float16 if dtype == "fp16" else torch.float32
            m = module.to("cuda", tdt).eval()
            xe = x.to("cuda", tdt)
            with torch.no_grad():
                eager_t = time_fn(lambda i: m(xe), "cuda", reps=50)
            module.float().cpu()
            rows.append({"model": name, "dtype": dtype, "rel_err_vs_ort": err, "graph_ms": graph_t.median_ms,
                         "graph_p90_ms": graph_t.p90_ms, "graph_again_ms": graph_t2.median_ms,
                         "executor_eager_ms": executor_eager.median_ms, "torch_eager_ms": eager_t.median_ms})
            print(rows[-1], flush=True)
    (Path(args.out) / "spine.json").write_text(json.dumps({"env": info, "rows": rows}, indent=1))
    print(f"\n{'model':<14}{'dtype':<6}{'err vs ORT':>11}{'graph ms':>10}{'again':>8}{'eager ms':>10}{'speedup':>9}")
    for r in rows:
        print(f"{r['model']:<14}{r['dtype']:<6}{r['rel_err_vs_ort']:>11.2e}{r['graph_ms']:>10.3f}{r['graph_again_ms']:>8.3f}"
              f"{r['torch_eager_ms']:>10.3f}{r['torch_eager_ms'] / r['graph_ms']:>8.2f}x")


if __name__ == "__main__":
    main()
