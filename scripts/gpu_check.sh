#!/usr/bin/env bash
# One call on the lent GPU: the GPU suite and/or the whole-network bench, every part under its own
# time limit so a slow part cannot take the others' results with it; logs and reports are tarred
# into ${OUT:-out}/gpu-check.tgz (the device returns few files), a short table is printed last.
#
#   source scripts/gpu_env.sh && scripts/gpu_check.sh tests              # pytest -m gpu, file by file
#   source scripts/gpu_env.sh && scripts/gpu_check.sh bench fp32-cuda-core csr,ecr 0.9 [MODELS...]
#   source scripts/gpu_env.sh && scripts/gpu_check.sh bench fp16 cusparselt 2:4 [MODELS...]
#   source scripts/gpu_env.sh && scripts/gpu_check.sh train-ab [EPOCHS]   # one process vs torchrun, A B B A
set -u
out=${OUT:-out}
work=$out/gpu-check
mkdir -p "$work"
part=${1:-tests}
shift || true
# every kernel family into the cache first, in parallel (16 cores): a part's time limit then times
# the part, not NVRTC (a fresh card spent over 85 s compiling inside the first bench)
timeout 600 python3 -m sparsecnn.converter.cli doctor --compile-kernels > "$work/compile-kernels.log" 2>&1
echo "compile-kernels: exit $? ($(tail -n 1 "$work/compile-kernels.log"))"
case "$part" in
  tests)
    OUT=$work scripts/gpu_tests.sh "$@" | tee "$work/tests-summary.txt"
    ;;
  bench)
    regimes=${1:-fp32-cuda-core}; runtimes=${2:-csr,ecr}; prune=${3:-0.9}
    shift 3 || true
    models=("$@"); [ ${#models[@]} -gt 0 ] || models=(resnet18 vgg19 trafficcamnet)
    # BENCH_LIMIT_S per model (default 170), BENCH_BATCH (default 1; e.g. 1,8,32), BENCH_PER_LAYER=1: per-layer tables
    limit=${BENCH_LIMIT_S:-170}
    for m in "${models[@]}"; do
      dir="$work/bench-$m-${regimes//,/_}-${runtimes//,/_}"
      per_layer=(--no-per-layer); [ "${BENCH_PER_LAYER:-0}" = 1 ] && per_layer=()
      timeout "$limit" python3 -m sparsecnn.converter.cli bench "$m" --runtimes "$runtimes" --prune "$prune" \
        --regimes "$regimes" --batch "${BENCH_BATCH:-1}" "${per_layer[@]}" --no-progress -o "$dir" > "$dir.log" 2>&1
      echo "bench $m $regimes $runtimes @ $prune: exit $?"
      # the rows a person reads: engine, regime, median ms and the ratio to the best dense engine
      python3 - "$dir/bench.json" <<'EOF' 2>/dev/null || tail -n 2 "$dir.log"
import json, sys
r = json.load(open(sys.argv[1]))
for n in r["networks"]:
    if n.get("median_ms") and n["kind"] != "eager":
        print(f"  {n['model'][:14]:<14} b{n.get('batch', 1):<3} {n['regime']:<15} {n['engine'][:26]:<26} {n['median_ms']:8.4f} ms "
              f"{(n.get('speedup_vs_best_dense') or 0):6.3f}x  guard={n.get('guard', '-')}  err={n.get('rel_err', 0):.1e}")
EOF
      # a run cut short wrote no bench.json: its log's per-engine lines say what was built and timed
      [ -f "$dir/bench.json" ] || grep -E "built in|the best dense engine" "$dir.log" | tail -n 14
      # per engine, how far its layers run from their roofline (bench.md's "roof gap" lines)
      awk '/^### /{h=substr($0,5)} /^roof gap/{print "  " h ": " $0}' "$dir/bench.md" 2>/dev/null
    done
    ;;
  train-ab)
    # `train` alone and under `torchrun --nproc-per-node 1`, alternating (one, ddp, ddp, one) so a fresh
    # card's first run and clock drift fall on both; needs SPARSECNN_FASHION_MNIST
    epochs=${1:-18}
    for run in one-1 ddp-1 ddp-2 one-2; do
      launch=(python3 -m sparsecnn.converter.cli)
      [ "${run%-*}" = ddp ] && launch=(torchrun --standalone --nproc-per-node 1 -m sparsecnn.converter.cli)
      start=$SECONDS
      "${launch[@]}" train resnet18 --prune 0.9 --epochs "$epochs" --no-progress -o "$work/$run.pt" \
        > "$work/train-$run.log" 2>&1
      echo "train $run: exit $?, wall $((SECONDS - start)) s"
    done
    python3 - "$work" <<'EOF2'
import sys, torch
from pathlib import Path
for run in ("one-1", "ddp-1", "ddp-2", "one-2"):
    p = Path(sys.argv[1]) / f"{run}.pt"
    if not p.exists():
        print(f"  {run}: no checkpoint"); continue
    t = torch.load(p, weights_only=True)["train"]
    h = t["history"]
    later = (h[-1]["seconds"] - h[0]["seconds"]) / max(1, len(h) - 1)
    print(f"  {run:<6} processes {t.get('processes')}  test top-1 {t['test_top1']:.2f} %  "
          f"training {h[-1]['seconds']:.2f} s  epochs 2-{len(h)} {later:.3f} s/epoch")
EOF2
    ;;
esac
tar czf "$out/gpu-check-$part.tgz" -C "$work" . 2>/dev/null
