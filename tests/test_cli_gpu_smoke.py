"""Every CLI command once, end to end, through the `sparsecnn` entry point on CUDA, for every
runtime available there: the paths the CPU suite never runs (a `run -o` on CUDA once crashed in
the npz writer). Tiny nets and a tiny image folder: a few minutes on an H100 in all."""
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

RUNTIMES = ["torch", "csr", "sparsert", "ecr", "cusparselt", "tensorrt", "minkowski", "hybrid"]
TWO_FOUR_RUNTIMES = {"cusparselt", "tensorrt"}  # they exploit 2:4 weights only


def sparsecnn(*argv, cwd, timeout=240) -> str:
    """Run the installed command; it must exit 0 with no traceback and no CUDA-graph warning."""
    exe = shutil.which("sparsecnn")
    cmd = [exe] if exe else [sys.executable, "-m", "sparsecnn.converter.cli"]
    proc = subprocess.run([*cmd, *map(str, argv)], cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"sparsecnn {' '.join(map(str, argv))} exited {proc.returncode}:\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    assert "CUDA Graph is empty" not in text, text[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two class folders of four small RGB images each (a labelled set for compare, inputs for run)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def available():
    from sparsecnn.runtimes import availability

    return {name: ok for name, (ok, _) in availability().items()}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_convert_run_inspect_on_cuda(tmp_path, images, available, runtime):
    if not available.get(runtime):
        pytest.skip(f"runtime {runtime} is not available here")
    prune = "2:4" if runtime in TWO_FOUR_RUNTIMES else "0.9"
    dtype = ["--dtype", "fp16"] if runtime == "cusparselt" else []  # cuSPARSELt's 2:4 is fp16/bf16 only
    out = sparsecnn("convert", "tinynet", "--prune", prune, "-o", "t.onnx", "--runtime", runtime, *dtype,
                    "--engine", "t.engine", "--sparse-onnx", "t-sparse.onnx", "--device", "cuda", cwd=tmp_path)
    assert (tmp_path / "t.engine").is_file() and "wrote t.engine" in out
    out = sparsecnn("run", "t.engine", "--device", "cuda", "--input", images / "a", "-o", "img.npz", cwd=tmp_path)
    assert f"ran {runtime} on cuda" in out and (tmp_path / "img.npz").is_file()
    with np.load(tmp_path / "img.npz") as z:
        assert z["logits"].shape == (4, 10) and np.isfinite(z["logits"]).all()
    sparsecnn("run", "t.onnx", "--runtime", runtime, *dtype, "--device", "cuda", "--random", "--batch", "2",
              "--save-inputs", "-o", "rand.npz", cwd=tmp_path)
    with np.load(tmp_path / "rand.npz") as z:
        assert z["logits"].shape == (2, 10)
    assert "sparsity" in sparsecnn("inspect", "t.onnx", cwd=tmp_path)


def test_inspect_activations_on_cuda(tmp_path):
    sparsecnn("inspect", "tinynet", "--activations", "random", "--samples", "4", "--device", "cuda", cwd=tmp_path)


def test_bench_quick_on_cuda(tmp_path):
    sparsecnn("bench", "--quick", "--device", "cuda", "--no-progress", "-o", "bench-out", cwd=tmp_path, timeout=300)
    assert (tmp_path / "bench-out" / "bench.json").is_file()


def test_compare_tiny_subset_on_cuda(tmp_path, images):
    sparsecnn("compare", "tinynet", "--data", images, "--subset", "8", "--methods", "2:4", "0.5",
              "--finetune-epochs", "0", "--device", "cuda", "--no-progress", "--json", "c.json", cwd=tmp_path)
    assert (tmp_path / "c.json").is_file()


def test_train_one_epoch_on_cuda(tmp_path, images):
    sparsecnn("train", "tinynet", "--data", images, "--epochs", "1", "--subset", "8", "--eval-subset", "8",
              "--device", "cuda", "--no-progress", "-o", "t.pt", cwd=tmp_path)
    assert (tmp_path / "t.pt").is_file()


def test_check_jetson_and_doctor(tmp_path):
    sparsecnn("check-jetson", "tinynet", "--opset", "13", "--roofline", "--board", "all", "--summary",
              "--write-fp16", "t16.onnx", cwd=tmp_path)
    assert (tmp_path / "t16.onnx").is_file()
    assert "cuda" in sparsecnn("doctor", cwd=tmp_path).lower()
