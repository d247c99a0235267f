#!/usr/bin/env bash
# The README's demo: the whole job on real data, a few minutes on 2 CPU cores.
#   1. train a small net (tinyresnet) on a subset of Fashion-MNIST: for trying the flow, not for accuracy claims
#   2. prune it (80 % of each pruned layer's weights) and compare top-1 on test images: dense, pruned
#      one-shot, pruned gradually while fine-tuning (masks kept)
#   3. write a handful of real test images as PNG files named by their class
#   4. build an engine of the fine-tuned pruned model for the fastest runtime here: torch on a CPU (every
#      sparse runtime runs only its slow reference ops there), hybrid on a GPU (calibrated on real images;
#      not yet run on a GPU: on a CPU with SPARSECNN_DEMO_RUNTIME=hybrid its commands run and verify PASSED)
#   5. classify the PNG files on the engine, by class name
#   6. verify the engine against ONNX Runtime on those same images
# and end with a short table. Fashion-MNIST comes from Debian (apt-get install -y dataset-fashion-mnist)
# or SPARSECNN_FASHION_MNIST=DIR; without it the demo says so and shows the random-weight flow instead
# (ResNet-18, nothing to download, meaningless classes).
#
# usage: scripts/demo.sh [OUT]   files go to OUT (default demo-out); a failed step stops it, exit status 1
#   SPARSECNN_DEMO_QUICK=1       tiny sizes: seconds instead of minutes (tests/test_demo.py runs it so)
#   SPARSECNN_DEMO_RUNTIME=NAME  build the engine for another runtime (`sparsecnn doctor` lists them)
set -Eeuo pipefail
out=${1:-demo-out}
mkdir -p "$out"

step="start"
# once, from the main shell: with -E a failing $(...) would report too
trap 'rc=$?; [[ $BASHPID != "$$" ]] || echo "demo FAILED at step: $step (exit $rc); what it wrote is in $out/" >&2' ERR
say() { step=$1; printf '\n==> %s\n' "$1"; }

if [[ ${SPARSECNN_DEMO_QUICK:-0} == 1 ]]; then
    model=tinynet train_images=300 epochs=1 test_images=200 finetune_epochs=1 n_images=4 random_model=tinynet
else
    model=tinyresnet train_images=15000 epochs=5 test_images=1000 finetune_epochs=2 n_images=10 random_model=resnet18
fi
sparsity=0.8  # of each pruned layer's weights; the stem and the classifier stay dense

random_weight_flow() {  # what the demo showed before it had data: the tools, on meaningless numbers
    say "random weights: prune $random_model two ways, inspect and run it"
    sparsecnn convert "$random_model" --prune 2:4 -o "$out/$random_model-2to4.onnx"
    sparsecnn inspect "$out/$random_model-2to4.onnx" | tail -n 4
    sparsecnn convert "$random_model" --prune 0.9 -o "$out/$random_model-0.9.onnx" --runtime torch \
        --engine "$out/$random_model-0.9.engine"
    sparsecnn run "$out/$random_model-0.9.engine" --random --batch 2 --topk 3
    echo "demo outputs are in $out/ (random weights: the classes above mean nothing)"
}

say "check the machine"
sparsecnn doctor
found=$(python -c '
from sparsecnn.common.errors import UserError
from sparsecnn.converter.data import find_fashion_mnist
try:
    print("yes", find_fashion_mnist())
except UserError as exc:
    print("no", str(exc).split(";")[0])')
if [[ $found != yes* ]]; then
    echo "${found#no }: apt-get install -y dataset-fashion-mnist (or SPARSECNN_FASHION_MNIST=DIR holding its" \
         "four idx files) runs this demo on real data; showing the random-weight flow instead" >&2
    random_weight_flow
    exit 0
fi
# The fastest engine this machine can build: on a CPU every sparse runtime runs reference ops, slower
# than PyTorch's dense convolutions; on a GPU hybrid picks per group of layers the fastest library.
machine=$(python - "${SPARSECNN_DEMO_RUNTIME:-}" <<'EOF'
import sys

import torch

from sparsecnn.common.errors import UserError
from sparsecnn.runtimes import get_runtime, require_runtime, takes_calibration

gpu = torch.cuda.is_available()
name = sys.argv[1] or ("hybrid" if gpu and get_runtime("hybrid").available()[0] else "torch")
try:
    require_runtime(name)
except UserError as exc:
    sys.exit(f"SPARSECNN_DEMO_RUNTIME: {exc}")
print("cuda" if gpu else "cpu", name, "yes" if takes_calibration(name) else "no")
EOF
)
read -r device runtime calibrates <<<"$machine"

say "1/6 train $model on $train_images Fashion-MNIST images, $epochs epoch(s) ($device)"
sparsecnn train "$model" -o "$out/$model.pt" --device "$device" --subset "$train_images" --epochs "$epochs" \
    --eval-subset "$test_images" --no-progress

say "2/6 prune to sparsity $sparsity and compare on $test_images test images: dense, one-shot, fine-tuned"
sparsecnn compare "$out/$model.pt" --methods "$sparsity" --device "$device" --subset "$test_images" \
    --finetune-epochs "$finetune_epochs" --train-subset "$train_images" --save-dir "$out/variants" \
    --json "$out/compare.json" --no-progress
finetuned=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["results"][0]["rows"][-1]["file"])' \
    "$out/compare.json")

say "3/6 export $n_images real test images as PNG files$([[ $calibrates == yes ]] && echo ", 16 training images to calibrate $runtime")"
python - "$out" "$n_images" "$calibrates" <<'EOF'
# The first test image of each class (then the next ones) as <index>-<class>.png: the name carries the truth.
import sys
from pathlib import Path

from PIL import Image

from sparsecnn.converter.data import FASHION_MNIST_LABELS, fashion_mnist

out, n, calibrates = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "yes"


def save(data, indices, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        name = FASHION_MNIST_LABELS[int(data.targets[i])].replace("/", "-").replace(" ", "-")
        Image.fromarray(data.images[i, 0].numpy()).save(folder / f"{i:05d}-{name}.png")


test = fashion_mnist("test")
firsts = {}
for i, c in enumerate(test.targets.tolist()):
    firsts.setdefault(c, i)
picks = sorted(firsts.values())[:n]
picks += [i for i in range(len(test)) if i not in picks][:n - len(picks)]
save(test, sorted(picks), out / "images")
if calibrates:  # the runtime chooses its kernels on real inputs: images like the data, not the ones classified
    save(fashion_mnist("train"), range(16), out / "calibration")
print(f"wrote {len(picks)} test images to {out / 'images'}")
EOF

say "4/6 build the $runtime engine of the fine-tuned pruned model ($device)"
calibration=()
if [[ $calibrates == yes ]]; then calibration=(--calibration "$out/calibration"); fi
sparsecnn convert "$finetuned" -o "$out/$model-pruned.onnx" --runtime "$runtime" --device "$device" \
    --engine "$out/$model.engine" "${calibration[@]}"

say "5/6 classify the test images on the engine"
sparsecnn run "$out/$model.engine" --input "$out/images" --topk 1 --save-inputs -o "$out/predictions.npz" \
    --no-progress | tee "$out/predictions.txt"

say "6/6 verify the engine against ONNX Runtime on the same images"
sparsecnn verify "$out/$model.engine" --onnx "$out/$model-pruned.onnx" --inputs "$out/predictions.npz" \
    --json "$out/verify.json"

step="summary"
python - "$out" "$model" "$runtime" "$device" "$train_images" "$epochs" "$SECONDS" <<'EOF' | tee "$out/summary.txt"
import json, re, sys
from pathlib import Path

out, model, runtime, device, train_images, epochs, seconds = sys.argv[1:]
out = Path(out)
res = json.loads((out / "compare.json").read_text())["results"][0]
dense, oneshot, tuned = res["rows"]
verify = json.loads((out / "verify.json").read_text())
picks = re.findall(r"^\d+-(\S+)\.png: (.+?) [\d.]+$", (out / "predictions.txt").read_text(), re.M)
right = sum(truth == got.replace("/", "-").replace(" ", "-") for truth, got in picks)
worst = max(c["max_rel"] for c in verify["checks"])
rows = [
    ("model", f"{model}, trained on {train_images} Fashion-MNIST images, {epochs} epoch{'s' * (epochs != '1')} ({device})"),
    ("top-1 dense", f"{dense['top1']:.1f} %"),
    ("top-1 pruned one-shot", f"{oneshot['top1']:.1f} %"),
    ("top-1 pruned, fine-tuned", f"{tuned['top1']:.1f} %"),
    ("sparsity", f"{tuned['prunable_sparsity']:.0%} of the pruned layers' weights, {tuned['sparsity']:.0%} of all"),
    ("engine", f"{runtime} runtime on {device} ({out / (model + '.engine')})"),
    ("verify", f"{'PASSED' if verify['passed'] else 'FAILED'} vs ONNX Runtime (max rel. error {worst:.1e})"),
    ("images classified", f"{right}/{len(picks)} correct"),
    ("time", f"{int(seconds) // 60} min {int(seconds) % 60} s, the whole demo"),
]
width = max(len(k) for k, _ in rows)
print(f"\ndemo summary: top-1 on the first {res['images']} Fashion-MNIST test images")
for k, v in rows:
    print(f"  {k:<{width}}  {v}")
EOF
echo "demo outputs are in $out/"
