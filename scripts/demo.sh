#!/usr/bin/env bash
# The README's demo on built-in defaults: check the machine, prune ResNet-18 two ways,
# inspect the result and run it. Random weights (seed 0): no download needed.
set -euo pipefail
out=${1:-demo-out}
mkdir -p "$out"
sparsecnn doctor
sparsecnn convert resnet18 --prune 2:4 -o "$out/resnet18-2to4.onnx"
sparsecnn inspect "$out/resnet18-2to4.onnx" | tail -n 4
sparsecnn convert resnet18 --prune 0.9 -o "$out/resnet18-0.9.onnx" --runtime torch --engine "$out/resnet18-0.9.engine"
sparsecnn run "$out/resnet18-0.9.engine" --random --batch 2 --topk 3
echo "demo outputs are in $out/"
