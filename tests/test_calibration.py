"""Calibration input reaches the runtimes that choose on activations (ecr, hybrid), from the CLI
(`convert --engine`, `run`, `verify`: --calibration DIR|FILE.npz) and the API (`compile(calibration=)`).

On a CPU ecr and hybrid run their reference ops and choose nothing, so these tests run their GPU
path's choices on CPU tensors, as tests/test_ecr.py and tests/test_hybrid.py do: the kernels are
stand-ins (tests/ecr_emulator.py's ReferenceEcrKernels computes each kernel plan with the dense
oracle) and the chooser's clock is fixed; the CLI, reading the images or the .npz, compile_engine,
the runtime's compile, the chooser's checks and the per-layer report are the real code. What is
checked is what the runtime received (the prepared images, bit for bit) and what its report says
(`info["calibration"]`, "random input ...", only where no calibration was given).
"""
import json
import zipfile

import numpy as np
import pytest
import torch

from ecr_emulator import ReferenceEcrKernels
from sparsecnn.converter.cli import main
from sparsecnn.runtimes.chooser import Chooser


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def images(tmp_path):
    """An ImageFolder (classes a and b, 5 PNGs each, 40x40: resized to the model's 32x32)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "calib"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _clock(self, candidates, args):
    """Dense forms 1 ms, kernel variants 0.5 ms: the chooser keeps a variant where one is correct."""
    return {c.name: 1.0 if c.dense else 0.5 for c in candidates}


@pytest.fixture
def seen(monkeypatch):
    """ecr's and hybrid's compile run their GPU path's choices on CPU (stand-in kernels, fixed clock);
    returns the calibration batch each compile received (None where none was given)."""
    from sparsecnn.runtimes.ecr import runtime as ecr
    from sparsecnn.runtimes.hybrid import runtime as hybrid

    got = []

    def ecr_compile(model, device="cpu", options=None, state=None, calibration=None):
        got.append(calibration)
        return ecr.compile_with_kernels(model, device, options, state, calibration, ReferenceEcrKernels())

    def hybrid_compile(model, device="cpu", options=None, state=None, calibration=None):
        got.append(calibration)
        backends = hybrid.Backends(torch.device("cpu"), ecr=ReferenceEcrKernels())  # dense forms and ecr/pecr
        return hybrid.compile_with_backends(model, device, options, state, calibration, backends)

    monkeypatch.setattr(ecr, "compile", ecr_compile)
    monkeypatch.setattr(hybrid, "compile", hybrid_compile)
    monkeypatch.setattr(Chooser, "time", _clock)
    return got


def _report(engine_file) -> list[dict]:
    """engine.report() as `convert` saved it in the engine file (what `inspect ENGINE` reads)."""
    with zipfile.ZipFile(engine_file) as z:
        return json.loads(z.read("engine.json"))["report"]


def _chosen_rows(rows) -> list[dict]:
    rows = [r for r in rows if "choice" in r]
    assert rows, "no layer was chosen by the chooser"
    return rows


def _prepared(folder, files=None):
    """The images as `run --input` prepares them for tinynet (converter/images.py with its spec)."""
    from sparsecnn.converter.images import image_files, load_images
    from sparsecnn.models import load_model

    spec = load_model("tinynet")[1]
    return load_images(files if files is not None else image_files(folder), spec)


def _convert(capsys, tmp_path, runtime, *extra):
    code, out, err = cli(capsys, "convert", "tinynet", "--prune", "0.9", "-o", tmp_path / "t.onnx", "--runtime",
                         runtime, "--engine", tmp_path / "t.engine", "--device", "cpu", *extra)
    assert code == 0, err
    return out, err


def test_convert_ecr_engine_chooses_on_the_calibration_folder(capsys, tmp_path, images, seen):
    _, err = _convert(capsys, tmp_path, "ecr", "--calibration", images)
    assert len(seen) == 1 and torch.equal(seen[0], _prepared(images))  # all 10 images, prepared per the spec
    assert "calibrated on 10 inputs" in err
    rows = _chosen_rows(_report(tmp_path / "t.engine"))
    assert all("calibration" not in r for r in rows), rows


def test_convert_ecr_engine_without_calibration_says_random_input(capsys, tmp_path, seen):
    _convert(capsys, tmp_path, "ecr")
    assert seen == [None]
    rows = _chosen_rows(_report(tmp_path / "t.engine"))
    assert all(r["calibration"].startswith("random input") for r in rows), rows


def test_calibration_images_caps_a_folder_evenly_over_its_classes(capsys, tmp_path, images, seen):
    from sparsecnn.converter.images import image_files

    _convert(capsys, tmp_path, "ecr", "--calibration", images, "--calibration-images", "4")
    files = image_files(images)  # a/0..4, b/0..4: the first 4 would all be of class a
    picked = [files[i] for i in (0, 2, 5, 7)]
    assert {f.parent.name for f in picked} == {"a", "b"}
    assert torch.equal(seen[0], _prepared(images, picked))


def test_convert_calibrates_on_an_npz_that_run_saved(capsys, tmp_path, seen):
    code, _, err = cli(capsys, "run", "tinynet", "--random", "--batch", "3", "--save-inputs", "-o",
                       tmp_path / "in.npz", "--device", "cpu")
    assert code == 0, err
    with np.load(tmp_path / "in.npz") as z:
        saved = z["input"]
    _convert(capsys, tmp_path, "ecr", "--calibration", tmp_path / "in.npz", "--calibration-images", "2")
    assert np.array_equal(seen[-1].numpy(), saved[:2])  # by input name, its first N rows
    assert all("calibration" not in r for r in _chosen_rows(_report(tmp_path / "t.engine")))


def test_run_and_verify_pass_calibration_when_they_compile(capsys, tmp_path, images, seen):
    code, out, err = cli(capsys, "run", "tinynet", "--runtime", "ecr", "--device", "cpu", "--calibration", images,
                         "--input", images, "--no-progress")
    assert code == 0, err
    assert torch.equal(seen[-1], _prepared(images)) and "ran ecr on cpu" in out
    code, out, err = cli(capsys, "verify", "tinynet", "--prune", "0.9", "--runtimes", "torch,ecr", "--device", "cpu",
                         "--calibration", images)
    assert code == 0, out + err
    assert torch.equal(seen[-1], _prepared(images))  # the engine checked is the one chosen on the images
    assert "warning: runtime torch chooses on weights and shapes only, not on activations; --calibration ignored" \
        in err


def test_a_runtime_that_ignores_calibration_warns_and_reads_nothing(capsys, tmp_path, images, monkeypatch):
    import sparsecnn.converter.calibration as calibration

    monkeypatch.setattr(calibration, "load_images", lambda *a: pytest.fail("images read for a runtime ignoring them"))
    _, err = _convert(capsys, tmp_path, "csr", "--calibration", images)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: runtime csr chooses on weights and shapes only, not on activations; "
                        "--calibration ignored"]


def test_api_compile_hybrid_on_a_folder_and_without(tmp_path, images, seen):
    import sparsecnn

    pruned = sparsecnn.prune("tinyresnet", "0.9")
    eng = sparsecnn.compile(pruned, runtime="hybrid", device="cpu", calibration=images)
    x, _ = sparsecnn.load_images(images, pruned)
    assert torch.equal(seen[-1], x)
    rows = _chosen_rows(eng.report())
    assert all("calibration" not in r for r in rows), rows
    assert any(r["choice"]["library"] == "ecr" for r in rows)  # an ecr/pecr variant won on the images
    assert sparsecnn.verify(eng).passed

    eng = sparsecnn.compile(pruned, runtime="hybrid", device="cpu")
    assert seen[-1] is None
    assert all(r["calibration"].startswith("random input") for r in _chosen_rows(eng.report()))


def test_api_compile_takes_a_tensor_and_says_what_it_ignores(tmp_path, seen):
    import sparsecnn
    from sparsecnn.common.errors import UserError

    pruned = sparsecnn.prune("tinynet", "0.9")
    x = torch.randn(2, 3, 32, 32)
    sparsecnn.compile(pruned, runtime="ecr", device="cpu", calibration=x)
    assert torch.equal(seen[-1], x)
    with pytest.warns(UserWarning, match="runtime csr chooses on weights and shapes only.*calibration= ignored"):
        sparsecnn.compile(pruned, runtime="csr", device="cpu", calibration=x)
    with pytest.raises(UserError, match=r"calibration=: array 'input' has shape \[2, 3, 16, 16\]"):
        sparsecnn.compile(pruned, runtime="ecr", device="cpu", calibration=torch.zeros(2, 3, 16, 16))
    with pytest.raises(UserError, match="calibration= not found"):
        sparsecnn.compile(pruned, runtime="ecr", device="cpu", calibration=tmp_path / "nowhere")
    with pytest.raises(UserError, match="calibration_images must be an integer >= 1"):
        sparsecnn.compile(pruned, runtime="ecr", device="cpu", calibration=x, calibration_images=0)


def test_compile_engine_passes_calibration_only_where_compile_takes_it(monkeypatch):
    from sparsecnn.runtimes import compile_engine, get_runtime, takes_calibration

    assert {n for n in ("torch", "csr", "sparsert", "ecr", "cusparselt", "minkowski", "hybrid")
            if takes_calibration(n)} == {"ecr", "hybrid"}
    torch_rt = get_runtime("torch")
    got = {}
    real = torch_rt.compile

    def spy(model, device="cpu", options=None, state=None):  # the contract's signature: no calibration
        got.update(state=state)
        return real(model, device, options, state)

    monkeypatch.setattr(torch_rt, "compile", spy)
    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models import load_model

    module, spec, entry = load_model("tinynet")
    eng = compile_engine("torch", export_onnx(module, spec, entry.exclude), "cpu", {}, calibration=torch.zeros(1))
    assert eng.runtime == "torch" and got == {"state": None}


def test_bench_passes_the_calibration_images_to_the_runtimes_that_take_them(tmp_path, monkeypatch):
    from PIL import Image

    import sparsecnn.runtimes as runtimes

    folder = tmp_path / "cal"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    seen = {}
    real = runtimes.compile_engine

    def spy(rt, model, device, options=None, state=None, calibration=None):
        name = rt if isinstance(rt, str) else rt.name
        seen[name] = None if calibration is None else tuple(calibration.shape)
        return real(rt, model, device, options, state, calibration)

    monkeypatch.setattr(runtimes, "compile_engine", spy)
    code = main(["bench", "tinynet", "--runtimes", "ecr,csr", "--prune", "0.9", "--regimes", "fp32-cuda-core",
                 "--device", "cpu", "--no-per-layer", "--no-progress", "--budget-ms", "5", "--repeats", "1",
                 "--calibration", str(folder), "-o", str(tmp_path / "out")])
    assert code in (0, 1)  # CPU timings may be flagged; what matters is what reached the compile
    assert seen["ecr"] == (3, 3, 32, 32)  # every image of the folder, prepared with tinynet's spec
