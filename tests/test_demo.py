"""scripts/demo.sh, the README's set-up command 1: the whole flow on real Fashion-MNIST images, run at
the test's size (SPARSECNN_DEMO_QUICK=1: tinynet, 300 training images, 4 test images to classify)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsecnn.common.errors import UserError
from sparsecnn.converter.data import FASHION_MNIST_LABELS, find_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.sh"
ROWS = ["model", "top-1 dense", "top-1 pruned one-shot", "top-1 pruned, fine-tuned", "sparsity", "engine", "verify",
        "images classified", "time"]


def _has_fashion_mnist() -> bool:
    try:
        find_fashion_mnist()
    except UserError:
        return False
    return True


def _run_demo(out: Path, **env_vars: str) -> subprocess.CompletedProcess:
    # `python` and `sparsecnn` in the script must be this interpreter's (CI's second leg runs a venv's)
    env = dict(os.environ, SPARSECNN_DEMO_QUICK="1", **env_vars,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run(["bash", str(DEMO), str(out)], env=env, capture_output=True, encoding="utf-8", timeout=900,
                          cwd=ROOT)


@pytest.mark.slow
@pytest.mark.skipif(not _has_fashion_mnist(), reason="apt-get install -y dataset-fashion-mnist")
def test_demo_trains_prunes_verifies_and_classifies_real_images(tmp_path):
    out = tmp_path / "demo-out"
    proc = _run_demo(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.rindex("demo summary"):]
    rows = dict(re.findall(r"^  (\S.*?)  +(\S.*)$", summary, re.M))
    assert list(rows) == ROWS
    assert (out / "summary.txt").read_text(encoding="utf-8").strip() == summary.split("demo outputs")[0].strip()

    # the table carries compare's numbers: dense, one-shot, fine-tuned, on the fine-tuned file's sparsity
    dense, oneshot, tuned = json.loads((out / "compare.json").read_text(encoding="utf-8"))["results"][0]["rows"]
    assert (dense["variant"], oneshot["variant"], tuned["variant"]) == ("-", "one-shot", "gradual+fine-tuned")
    assert rows["top-1 dense"] == f"{dense['top1']:.1f} %"
    assert rows["top-1 pruned one-shot"] == f"{oneshot['top1']:.1f} %"
    assert rows["top-1 pruned, fine-tuned"] == f"{tuned['top1']:.1f} %"
    assert rows["sparsity"].startswith("80% of the pruned layers' weights") and tuned["masks_survive"]
    assert rows["model"].startswith("tinynet, trained on 300 Fashion-MNIST images")
    assert rows["engine"].startswith("torch runtime on cpu")  # no GPU here: torch is the fastest engine
    assert (out / "tinynet.engine").is_file() and (out / "tinynet-pruned.onnx").is_file()

    # verify ran on the classified images and passed
    assert rows["verify"].startswith("PASSED")
    verify = json.loads((out / "verify.json").read_text(encoding="utf-8"))
    assert verify["passed"] and verify["inputs"]["input"][0] == 4

    # the images are real test images named by their true class; the count of right answers is
    # recomputed here from the engine's saved logits (files in sorted order, as `run` reads them)
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == 4
    names = [label.replace("/", "-").replace(" ", "-") for label in FASHION_MNIST_LABELS]
    truth = [names.index(f.stem.split("-", 1)[1]) for f in files]
    logits = np.load(out / "predictions.npz")["logits"]
    right = int((logits.argmax(1) == np.array(truth)).sum())
    assert rows["images classified"] == f"{right}/4 correct"
    for f in files:  # class names, not class numbers
        assert re.search(rf"^{re.escape(f.name)}: ({'|'.join(map(re.escape, FASHION_MNIST_LABELS))}) ",
                         proc.stdout, re.M)


@pytest.mark.slow
def test_demo_without_fashion_mnist_says_how_to_get_it_and_runs_the_random_weight_flow(tmp_path, monkeypatch):
    # every Python process the script starts (its checks and each `sparsecnn` command) sees no data set:
    # a sitecustomize module, imported at start-up, points the Debian folder elsewhere
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sparsecnn.converter.data as d\n"
                                           f"d.FASHION_MNIST_DIRS = ({str(tmp_path / 'none')!r},)\n", encoding="utf-8")
    monkeypatch.delenv("SPARSECNN_FASHION_MNIST", raising=False)
    proc = _run_demo(tmp_path / "out", PYTHONPATH=os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    missing = [line for line in proc.stderr.splitlines() if line.startswith("Fashion-MNIST not found")]
    assert len(missing) == 1 and "apt-get install -y dataset-fashion-mnist" in missing[0]
    assert "SPARSECNN_FASHION_MNIST=DIR" in missing[0]
    assert "random weights: the classes above mean nothing" in proc.stdout
    assert (tmp_path / "out" / "tinynet-0.9.engine").is_file() and not (tmp_path / "out" / "compare.json").exists()
