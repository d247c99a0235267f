"""The Python API (`import sparsecnn`): docs/api.md runs as written, and its claims hold.

Every ```python block of docs/api.md is executed in order, in one namespace, in an empty folder;
then what the page says is checked independently: which layers stayed dense (counted from the
torchvision module itself), the engine against ONNX Runtime (run here, not through verify), the
image preprocessing (computed from the pixel values). The other tests pin the API to the CLI:
the same model pruned through both gives the same weights.
"""
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from helpers import initializers, ort_run

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"
HEAVY = ["torch", "onnx", "numpy", "onnxruntime", "torchvision"]


def doc_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    """The namespace docs/api.md's blocks leave behind, and the warnings they raised."""
    folder = tmp_path_factory.mktemp("doc")
    ns: dict = {"__name__": "docs_api"}
    cwd = Path.cwd()
    t0 = time.perf_counter()
    try:
        import os

        os.chdir(folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, block in enumerate(doc_blocks()):
                exec(compile(block, f"docs/api.md block {i + 1}", "exec"), ns)
    finally:
        os.chdir(cwd)
    ns["_seconds"], ns["_warnings"], ns["_folder"] = time.perf_counter() - t0, caught, folder
    print(f"docs/api.md ran in {ns['_seconds']:.1f} s")
    return ns


def test_doc_has_the_whole_flow():
    text = "\n".join(doc_blocks())
    for call in ("sparsecnn.prune(", "sparsecnn.compile(", "sparsecnn.verify(", "sparsecnn.load_images(",
                 "engine.report()", "sparsecnn.load(", "sparsecnn.compare("):
        assert call in text, call


def test_doc_runs_and_leaves_stem_classifier_and_depthwise_dense(doc):
    model, pruned = doc["model"], doc["pruned"]
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    depthwise = {n for n, m in convs.items() if m.groups > 1 and m.groups == m.in_channels}
    assert len(depthwise) == 17
    after = initializers(pruned.onnx)
    for name in depthwise | {"features.0.0"}:  # the stem conv reads the image
        assert np.count_nonzero(after[f"{name}.weight"]) == after[f"{name}.weight"].size, name
    np.testing.assert_array_equal(after["classifier.1.weight"], model.classifier[1].weight.detach().numpy())
    pruned_convs = set(convs) - depthwise - {"features.0.0"}
    assert len(pruned_convs) == 34
    for name in pruned_convs:
        w = after[f"{name}.weight"]
        assert abs(1 - np.count_nonzero(w) / w.size - 0.9) < 0.01, name
    assert not [w for w in doc["_warnings"] if "depthwise" in str(w.message)]  # they were excluded
    assert model.training  # prune() and verify() left the module's mode as it was


def test_doc_engine_matches_onnx_runtime_checked_here(doc):
    engine, pruned = doc["engine"], doc["pruned"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ref = ort_run(pruned.onnx, x.numpy())[0]
    got = engine(x)[0].numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert doc["result"].passed and doc["result"]["logits"].shape == [2, 1000]
    assert sum(1 for r in engine.report() if r.get("format") == "csr") == 34


def test_doc_images_are_prepared_per_the_spec(doc):
    x, files = doc["x"], doc["files"]
    assert [f.name for f in files] == ["blue.png", "green.png", "red.png"]
    assert tuple(x.shape) == (3, 3, 64, 64)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for i, rgb in enumerate([(20, 40, 190), (30, 160, 40), (200, 30, 30)]):
        want = [(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)]
        np.testing.assert_allclose(x[i].mean(dim=(1, 2)).numpy(), want, rtol=1e-5)


def test_doc_saved_files_and_comparison(doc):
    folder = doc["_folder"]
    assert (folder / "mobilenet_v2-90.onnx").is_file() and (folder / "mobilenet_v2-90.engine").is_file()
    rows = {(r["method"], r["variant"]) for r in doc["table"]["rows"]}
    assert rows == {("dense", "-"), ("2:4", "one-shot"), ("unstructured 90%", "one-shot")}
    assert "label-free" in str(doc["table"])


# ---- the API is the CLI's flow ---------------------------------------------------------------

@pytest.mark.parametrize("sparsity", ["0.9", "2:4"])
def test_prune_a_registry_model_gives_the_clis_weights(capsys, tmp_path, sparsity):
    import sparsecnn
    from sparsecnn.converter.cli import main

    assert main(["convert", "tinyresnet", "--prune", sparsity, "-o", str(tmp_path / "cli.onnx")]) == 0
    cli = initializers(onnx.load(str(tmp_path / "cli.onnx")))
    api = sparsecnn.prune("tinyresnet", sparsity)
    assert api.passes and api.sparsity == sparsity
    got = initializers(api.onnx)
    assert got.keys() == cli.keys()
    for k in cli:
        np.testing.assert_array_equal(got[k], cli[k], err_msg=k)
    # and an ONNX file, pruned by both
    assert main(["convert", "tinyresnet", "-o", str(tmp_path / "dense.onnx")]) == 0
    assert main(["convert", str(tmp_path / "dense.onnx"), "--prune", sparsity, "-o", str(tmp_path / "f.onnx")]) == 0
    from_file = initializers(sparsecnn.prune(tmp_path / "dense.onnx", sparsity).onnx)
    for k, v in initializers(onnx.load(str(tmp_path / "f.onnx"))).items():
        np.testing.assert_array_equal(from_file[k], v, err_msg=k)


def test_a_module_keeps_stem_and_head_dense_like_its_onnx_file(tmp_path):
    """tinyresnet built as a plain module (not through the registry): the stem-and-head rule applies."""
    import sparsecnn
    from sparsecnn.models import load_model

    module = load_model("tinyresnet")[0]
    pruned = sparsecnn.prune(module, 0.9, input_shape=(3, 32, 32))
    dense = {r["weight"] for r in pruned.layers() if not r["prunable"]}
    assert dense == {"conv1.weight", "fc.weight"}  # what the registry lists for it
    assert pruned.spec.input_name == "input" and pruned.spec.output_names == ("logits",)
    assert pruned.spec.num_classes == 10 and pruned.spec.mean is None


def test_depthwise_convs_pruned_with_a_warning_naming_them():
    import torchvision

    import sparsecnn

    model = torchvision.models.mobilenet_v2(weights=None)
    with pytest.warns(UserWarning, match=r"pruned 17 depthwise convs at 0\.5 \(features\.1\.conv\.0\.0, "
                                         r"features\.2\.conv\.1\.0"):
        pruned = sparsecnn.prune(model, 0.5, input_shape=(3, 32, 32))
    w = initializers(pruned.onnx)["features.2.conv.1.0.weight"]
    assert abs(1 - np.count_nonzero(w) / w.size - 0.5) < 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsecnn.prune(model, "2:4", input_shape=(3, 32, 32))  # 2:4 skips them: nothing to warn about


def test_a_wrong_engine_fails_verify_by_the_error_it_has(monkeypatch):
    import sparsecnn
    from sparsecnn.runtimes.ops import STANDARD_OPS

    pruned = sparsecnn.prune("tinynet", "0.8")
    good = STANDARD_OPS[("", "Gemm")]
    monkeypatch.setitem(STANDARD_OPS, ("", "Gemm"), lambda ctx: (lambda f: lambda *a: f(*a) - 0.25)(good(ctx)))
    result = sparsecnn.verify(sparsecnn.compile(pruned, "torch", device="cpu"), inputs=torch.zeros(4, 3, 32, 32))
    assert not result.passed and result.failures[0].output == "logits"
    assert result["logits"].max_abs == pytest.approx(0.25, abs=1e-6)
    assert "FAILED: torch logits" in str(result)


def test_verify_takes_inputs_as_tensor_dict_or_npz(tmp_path):
    import sparsecnn

    pruned = sparsecnn.prune("tinynet", "0.8")
    engine = sparsecnn.compile(pruned, "torch", device="cpu")
    x = torch.randn(2, 3, 32, 32)
    np.savez(tmp_path / "in.npz", input=x.numpy(), logits=np.zeros((2, 10)))  # as `run --save-inputs` writes
    results = [sparsecnn.verify(engine, inputs=x), sparsecnn.verify(engine, inputs={"input": x.numpy()}),
               sparsecnn.verify(engine, inputs=tmp_path / "in.npz")]
    assert all(r.passed for r in results)
    assert len({r["logits"].max_abs for r in results}) == 1
    assert results[0].inputs == {"input": [2, 3, 32, 32]}


@pytest.mark.parametrize("call,match", [
    (lambda s, m: s.prune(m, "half", input_shape=(3, 32, 32)), r"prune\(\)'s sparsity takes '2:4'"),
    (lambda s, m: s.prune(m, "1.0", input_shape=(3, 32, 32)), r"\[0, 1\)"),
    (lambda s, m: s.prune(m, "0.9"), r"give input_shape=\(channels, height, width\)"),
    (lambda s, m: s.prune(m, "0.9", input_shape=(1, 32, 32)), r"fails on an input of shape \[1, 1, 32, 32\]"),
    (lambda s, m: s.prune(m, "0.9", input_shape=(3, 32, 32), exclude=["layer9"]), "'layer9' matches no"),
    (lambda s, m: s.prune(m, "0.9", input_shape=(3, 32, 32), mean="imagenet"), "mean and std go together"),
    (lambda s, m: s.prune(m, "0.9", input_shape=(3, 32, 32), mean=(0.5, 0.5), std=(0.5,)), "mean has 2 values"),
    (lambda s, m: s.prune(m, "0.9", input_shape=(3, 32, 32), mean=(0.5,), std=(0.0,)), "has a value <= 0"),
    (lambda s, m: s.prune(m, "0.9", input_shape=(3, 32, 32), mean=(float("nan"),), std=(1.0,)), "finite numbers"),
    (lambda s, m: s.prune(m, "0.9", input_shape=(3, 32, 32), mean="cifar", std="cifar"), "unknown normalisation"),
    (lambda s, m: s.prune("tinynet", "0.9", output_names=["y"]), "name an nn.Module's ONNX export"),
    (lambda s, m: s.prune("resnet99"), "unknown model 'resnet99'"),
    (lambda s, m: s.prune(42), "takes an nn.Module"),
    (lambda s, m: s.compile("nowhere.onnx"), "ONNX file not found"),
    (lambda s, m: s.compile(m), "must be a PrunedModel"),
    (lambda s, m: s.compile(s.prune("tinynet"), "nosuch"), "unknown runtime 'nosuch'"),
    (lambda s, m: s.compile(s.prune("tinynet"), "csr", options={"csr_weight_budget": "lots"}), "csr_weight_budget"),
    (lambda s, m: s.compile(s.prune("tinynet"), dtype="fp64"), "dtype must be one of"),
    (lambda s, m: s.verify(m), "give onnx="),
    (lambda s, m: s.verify(s.compile(s.prune("tinynet"), device="cpu"), inputs=torch.zeros(1, 3, 8, 8)),
     r"shape \[1, 3, 8, 8\]; input 'input' takes \[N, 3, 32, 32\]"),
    (lambda s, m: s.verify(s.compile(s.prune("tinynet"), device="cpu"), rtol=-1), "rtol must be"),
], ids=["sparsity word", "sparsity 1.0", "no input_shape", "input the module refuses", "exclude typo",
        "mean without std", "mean of 2 channels", "zero std", "nan mean", "unknown normalisation", "output names of a registry model", "unknown model", "not a model", "missing onnx",
        "compile a module", "unknown runtime", "bad option", "bad dtype", "module without onnx",
        "inputs of another size", "negative rtol"])
def test_user_errors_are_one_line(call, match):
    import sparsecnn
    from sparsecnn.models import load_model

    module = load_model("tinynet")[0]
    with pytest.raises(sparsecnn.UserError, match=match) as exc:
        call(sparsecnn, module)
    assert "\n" not in str(exc.value)


def test_a_loaded_engine_needs_its_onnx_and_a_torch_module_is_verified_in_eval_mode(tmp_path):
    import sparsecnn
    from sparsecnn.models import load_model

    module = load_model("tinyresnet")[0].train()
    bn = dict(module.named_buffers())["bn1.running_mean"].clone()
    dense = sparsecnn.prune(module, "none", input_shape=(3, 32, 32))
    assert sparsecnn.verify(module, onnx=dense, batch=4).passed
    assert module.training and torch.equal(dict(module.named_buffers())["bn1.running_mean"], bn)
    sparsecnn.compile(dense, "csr", device="cpu").save(tmp_path / "e.engine")
    with pytest.raises(sparsecnn.UserError, match="give onnx="):
        sparsecnn.verify(sparsecnn.load(tmp_path / "e.engine"))


# ---- the package: cheap to import, versioned, installable -------------------------------------

def test_import_loads_nothing_heavy_and_names_load_on_use():
    code = ("import sys, sparsecnn\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
            "print(sparsecnn.__version__, callable(sparsecnn.prune), 'torch' in sys.modules)\n"
            "print(sorted(n for n in ('prune', 'compile', 'verify', 'compare', 'load') if n in dir(sparsecnn)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", check=True, cwd=ROOT)
    heavy, loaded, names = out.stdout.splitlines()
    assert heavy == ""
    from importlib.metadata import version

    assert loaded == f"{version('sparsecnn')} True True"
    assert names == "['compare', 'compile', 'load', 'prune', 'verify']"
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        import sparsecnn

        sparsecnn.nothing_here


def test_version_without_package_metadata_is_pyprojects(monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    import importlib.metadata

    import sparsecnn

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    want = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert sparsecnn._version() == want


def test_wheel_installs_the_package_and_nothing_else(tmp_path):
    """The package is the repository root: only its __init__.py joins the code folders (no tests/,
    scripts/, docs/); the wheel is built from a copy of the files git tracks or would."""
    setuptools = pytest.importorskip("setuptools", minversion="64")  # what pyproject's build-system asks for
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit()) < (70, 1):
        pytest.importorskip("wheel")  # bdist_wheel lived in the `wheel` package before setuptools 70.1
    git = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, encoding="utf-8", errors="replace")
    if git.returncode:
        pytest.skip("not a git checkout: the files to package are unknown")
    listed = git.stdout.split()
    src = tmp_path / "src"
    for name in listed:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel"), str(src)], capture_output=True, encoding="utf-8", errors="replace")
    assert built.returncode == 0, built.stderr[-3000:]
    import zipfile

    (whl,) = (tmp_path / "wheel").glob("sparsecnn-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert all(n.startswith(("sparsecnn/", "sparsecnn-")) for n in names), names
    top = sorted(n.split("/", 1)[1] for n in names if n.startswith("sparsecnn/") and n.count("/") == 1)
    assert top == ["__init__.py"]
    folders = {n.split("/")[1] for n in names if n.count("/") > 1 and n.startswith("sparsecnn/")}
    assert folders == {"common", "converter", "models", "passes", "runtimes"}
    assert "sparsecnn/converter/api.py" in names and "sparsecnn/runtimes/csr/cuda/csr_conv.cu" in names


def test_prune_and_verify_give_every_submodule_its_mode_back():
    """A training model with a frozen BatchNorm inside: prune() and verify() run it in eval mode
    and leave each submodule as it was (module.train() would unfreeze the BatchNorm)."""
    import sparsecnn
    from sparsecnn.models import load_model

    module = load_model("tinyresnet")[0].train()
    module.bn1.eval()
    pruned = sparsecnn.prune(module, "none", input_shape=np.array([3, 32, 32]))  # numpy ints are sizes too
    assert sparsecnn.verify(module, onnx=pruned).passed
    assert module.training and not module.bn1.training
    assert all(m.training for n, m in module.named_modules() if n != "bn1")


def test_an_onnx_file_or_registry_model_takes_the_input_spec_as_converts_flags(tmp_path):
    import sparsecnn
    from sparsecnn.common.onnxio import INPUT_SPEC_KEY, get_input_spec

    bigger = sparsecnn.prune("tinynet", "0.5", input_shape=(3, 48, 40))  # exported at that size
    dims = [d.dim_value for d in bigger.onnx.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 48, 40] and (bigger.spec.height, bigger.spec.width) == (48, 40)
    foreign = sparsecnn.prune("tinynet", "none").onnx
    del foreign.metadata_props[[p.key for p in foreign.metadata_props].index(INPUT_SPEC_KEY)]
    assert sparsecnn.prune(foreign, "0.5").spec is None  # nothing given: nothing stored, as convert does
    with pytest.raises(sparsecnn.UserError, match="--mean and --std"):
        sparsecnn.prune(foreign, "0.5", labels=[str(i) for i in range(10)])  # a spec is stored whole or not at all
    named = sparsecnn.prune(foreign, "0.5", mean="imagenet", std="imagenet", labels=[f"c{i}" for i in range(10)])
    stored = get_input_spec(named.onnx)
    assert stored["mean"] == [0.485, 0.456, 0.406] and stored["labels"][3] == "c3" and stored["height"] == 32
    assert get_input_spec(foreign) is None  # the caller's model is left as it was
    onnx.save(foreign, str(tmp_path / "f.onnx"))
    scaled = sparsecnn.prune(tmp_path / "f.onnx", "0.5", scale=1.0)
    assert scaled.spec.scale == 1.0 and scaled.spec.mean is None


def test_opset_converts_an_onnx_file_as_convert_does(tmp_path):
    """prune(FILE.onnx, opset=17) kept the file's opset without a word."""
    import sparsecnn
    from sparsecnn.converter.cli import main

    assert main(["convert", "tinynet", "--opset", "13", "-o", str(tmp_path / "t13.onnx")]) == 0

    def opset(pruned):
        return next(o.version for o in pruned.onnx.opset_import if o.domain in ("", "ai.onnx"))

    assert opset(sparsecnn.prune(tmp_path / "t13.onnx", "0.5")) == 13
    assert opset(sparsecnn.prune(tmp_path / "t13.onnx", "0.5", opset=17)) == 17
    assert opset(sparsecnn.prune(onnx.load(str(tmp_path / "t13.onnx")), "0.5", opset=17)) == 17
