"""Your own model, first-class: an ONNX file from plain torch.onnx.export runs on images with the
input-spec flags, `convert` stores the spec (ONNX metadata and engine) so later commands need none,
class names print, and every conflicting or missing flag is one line and exit 2 (converter/source.py)."""
import json
import re
import warnings

import numpy as np
import onnx
import pytest
import torch

from sparsecnn.common.onnxio import get_input_spec
from helpers import cli, fails
from sparsecnn.converter.cli import main

SIZE = 32  # mobilenet_v2 at 32x32: its last feature map is 1x1, a run takes a fraction of a second


def _export(path, dynamic_axes=None, batch=1, module=None):
    """torch.onnx.export as a user writes it (the TorchScript exporter: the dynamo one needs onnxscript)."""
    import torchvision

    module = module or torchvision.models.mobilenet_v2(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"input_names": ["x"], "output_names": ["y"], "dynamic_axes": dynamic_axes} if dynamic_axes else {}
        torch.onnx.export(module, (torch.randn(batch, 3, SIZE, SIZE),), str(path), dynamo=False, **kw)
    return path


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """mobilenet_v2 (random weights) exported three ways, and a folder of 3 images of other sizes."""
    from PIL import Image

    d = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    import torchvision

    module = torchvision.models.mobilenet_v2(weights=None).eval()
    files = {"static": _export(d / "mnv2.onnx", module=module),  # fixed 1x3x32x32, the exporter's default
             "dynamic": _export(d / "mnv2_dyn.onnx", {"x": {0: "N", 2: "H", 3: "W"}, "y": {0: "N"}}, module=module)}
    photos = d / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (64, 64), (20, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (d / "labels.txt").write_text("".join(f"class {i}\n" for i in range(1000)) + "\n", encoding="utf-8")
    return {**files, "photos": photos, "labels": d / "labels.txt"}


def _picks(out: str) -> dict[str, str]:
    return {line.split(":")[0]: line for line in out.splitlines() if re.match(r"p\d\.png:", line)}


def test_own_onnx_runs_with_flags_then_convert_stores_the_spec(capsys, tmp_path, own):
    code, out, err = cli(capsys, "run", own["static"], "--input", own["photos"], "--input-shape", f"3x{SIZE}x{SIZE}",
                         "--mean", "imagenet", "--std", "0.229,0.224,0.225", "--device", "cpu", "-o", tmp_path / "a.npz")
    assert code == 0, err
    assert set(_picks(out)) == {"p0.png", "p1.png", "p2.png"}
    assert "3 images in 3 batches of 1" in out  # the exporter's fixed batch of 1 is honoured

    onnx_file, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    code, _, err = cli(capsys, "convert", own["static"], "--mean", "0.485,0.456,0.406", "--std", "imagenet",
                       "--labels", own["labels"], "-o", onnx_file, "--runtime", "torch", "--engine", engine,
                       "--device", "cpu")
    assert code == 0, err
    spec = get_input_spec(onnx.load(str(onnx_file)))
    assert (spec["channels"], spec["height"], spec["width"]) == (3, SIZE, SIZE)
    assert spec["mean"] == [0.485, 0.456, 0.406] and spec["std"] == [0.229, 0.224, 0.225]
    assert spec["input_name"] == "input.1" and spec["num_classes"] == 1000 and spec["labels"][7] == "class 7"

    for model in (onnx_file, engine):  # the next command needs no flags
        code, out, err = cli(capsys, "run", model, "--input", own["photos"], "--device", "cpu", "-o",
                             tmp_path / f"{model.suffix[1:]}.npz")
        assert code == 0, err
        assert all(re.search(r": class \d+ 0\.\d{3}", line) for line in _picks(out).values()), out
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "onnx.npz") as b, np.load(tmp_path / "engine.npz") as c:
        assert list(a.files) == ["536"] and a["536"].shape == (3, 1000)  # the exporter's output name
        np.testing.assert_array_equal(a["536"], b["536"])
        np.testing.assert_array_equal(a["536"], c["536"])


def test_a_dynamic_size_needs_input_shape_and_then_runs(capsys, own):
    line = fails(capsys, "run", own["dynamic"], "--input", own["photos"], "--device", "cpu",
                 match=r"add --input-shape CxHxW \(input 'x' is \?x3x\?x\?\) and --mean and --std")
    assert "--scale alone" in line
    code, out, err = cli(capsys, "run", own["dynamic"], "--input", own["photos"], "--input-shape", "3x24x24",
                         "--mean", "0.5", "--std", "0.25", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "3 images in 1 batch of 3" in out  # a dynamic batch: the folder in batches (all 3 at once here)


def test_images_without_normalisation_name_the_flag(capsys, own):
    line = fails(capsys, "run", own["static"], "--input", own["photos"], "--device", "cpu",
                 match="carries no input spec")
    assert "add --mean and --std" in line and "--input-shape" not in line  # its size is fixed: only mean/std
    # random input needs neither
    code, out, _ = cli(capsys, "run", own["static"], "--device", "cpu")
    assert code == 0 and "1 input in 1 batch of 1" in out


def test_scale_alone_is_a_whole_spec(capsys, tmp_path, own):
    code, _, err = cli(capsys, "convert", own["static"], "--scale", "1/255", "-o", tmp_path / "s.onnx")
    assert code == 0, err
    spec = get_input_spec(onnx.load(str(tmp_path / "s.onnx")))
    assert spec["mean"] is None and spec["std"] is None and spec["scale"] == pytest.approx(1 / 255)


CONFLICTS = {
    "shape vs fixed size": (["--input-shape", "3x64x64", "--mean", "0.5", "--std", "0.5"],
                            r"--input-shape 3x64x64 disagrees with .*\(1x3x32x32\); give 1x3x32x32"),
    "batch of the shape vs fixed batch": (["--input-shape", "2x3x32x32", "--mean", "0.5", "--std", "0.5"],
                                          "disagrees"),
    "batch vs fixed batch": (["--batch", "4", "--mean", "0.5", "--std", "0.5"], "fixed batch of 1; drop --batch 4"),
    "mean without std": (["--mean", "0.5"], "--mean and --std go together"),
    "mean of 2 values for 3 channels": (["--mean", "0.5,0.5", "--std", "0.5"], "--mean has 2 values.*3 channels"),
    "std zero": (["--mean", "0.5", "--std", "0"], "value <= 0"),
    "labels of another count": (["--mean", "0.5", "--std", "0.5", "--labels", "LABELS3"], "names 3 classes.*1000"),
    "labels file missing": (["--mean", "0.5", "--std", "0.5", "--labels", "nope.txt"], "--labels file not found"),
}


@pytest.mark.parametrize("verb,case", [(v, c) for v in ("run", "convert") for c in CONFLICTS
                                       if not (v == "convert" and "--batch" in CONFLICTS[c][0])])
def test_conflicting_or_bad_spec_flags(capsys, tmp_path, own, verb, case):
    flags, match = CONFLICTS[case]
    labels3 = tmp_path / "three.txt"
    labels3.write_text("a\nb\nc\n", encoding="utf-8")
    flags = [str(labels3) if f == "LABELS3" else (str(tmp_path / f) if f == "nope.txt" else f) for f in flags]
    extra = ["--input", own["photos"], "--device", "cpu"] if verb == "run" else ["-o", tmp_path / "o.onnx"]
    fails(capsys, verb, own["static"], *flags, *extra, match=match)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flag,value", [("--input-shape", "3x224"), ("--input-shape", "0x3x3"), ("--mean", "a,b"),
                                        ("--std", "nan"), ("--scale", "1/0"), ("--scale", "-2")])
def test_malformed_spec_flag_is_a_usage_error(capsys, flag, value):
    fails(capsys, "run", "tinynet", flag, value, match=re.escape(flag))


def test_convert_with_an_incomplete_spec_stores_nothing_and_says_what_is_missing(capsys, tmp_path, own):
    fails(capsys, "convert", own["dynamic"], "--mean", "0.5", "--std", "0.5", "-o", tmp_path / "o.onnx",
          match="add --input-shape")
    assert not (tmp_path / "o.onnx").exists()
    code, _, err = cli(capsys, "convert", own["static"], "-o", tmp_path / "bare.onnx")  # no flags: allowed, said
    assert code == 0 and "carries no input spec" in err
    assert get_input_spec(onnx.load(str(tmp_path / "bare.onnx"))) is None


def test_registry_model_exports_at_input_shape_and_keeps_its_channels(capsys, tmp_path):
    code, _, err = cli(capsys, "convert", "tinynet", "--input-shape", "3x48x40", "-o", tmp_path / "t.onnx")
    assert code == 0, err
    m = onnx.load(str(tmp_path / "t.onnx"))
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 48, 40]
    assert (get_input_spec(m)["height"], get_input_spec(m)["width"]) == (48, 40)
    fails(capsys, "convert", "tinynet", "--input-shape", "1x48x48", "-o", tmp_path / "u.onnx",
          match="has 1 channels; tinynet takes 3")


def _fashion_checkpoint(path):
    """A checkpoint as `sparsecnn train` writes it: arch, classes, the Fashion-MNIST spec with its names."""
    from sparsecnn.converter.data import fashion_mnist_spec
    from sparsecnn.models import load_model

    module, _, _ = load_model("tinynet")
    torch.save({"arch": "tinynet", "num_classes": 10, "input": fashion_mnist_spec(32).to_dict(),
                "state_dict": module.state_dict()}, path)


def test_checkpoint_class_names_print_and_survive_convert(capsys, tmp_path, own):
    ckpt = tmp_path / "fm.pt"
    _fashion_checkpoint(ckpt)
    names = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
    code, out, err = cli(capsys, "run", ckpt, "--input", own["photos"], "--device", "cpu", "--topk", "10")
    assert code == 0, err
    assert all(all(n in line for n in names) for line in _picks(out).values()), out
    code, _, err = cli(capsys, "convert", ckpt, "-o", tmp_path / "fm.onnx")
    assert code == 0, err
    assert tuple(get_input_spec(onnx.load(str(tmp_path / "fm.onnx")))["labels"]) == names
    # --labels replaces the stored names (same count)
    other = tmp_path / "de.txt"
    other.write_text("\n".join(f"Klasse {i}" for i in range(10)), encoding="utf-8")
    code, out, err = cli(capsys, "run", tmp_path / "fm.onnx", "--input", own["photos"], "--device", "cpu",
                         "--labels", other)
    assert code == 0 and "Klasse" in out and "trouser" not in out, err


def test_torchvision_weights_bring_their_class_names(monkeypatch):
    """IMAGENET1K_V1's categories become the spec's labels (the download itself is replaced: no internet here)."""
    from torchvision.models import ResNet18_Weights

    from sparsecnn.models import load_model

    state = load_model("resnet18")[0].state_dict()
    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", lambda self, **kw: state)
    _, spec, _ = load_model("resnet18", "IMAGENET1K_V1")
    assert spec.num_classes == 1000 and spec.labels[:2] == ("tench", "goldfish")


def test_compare_takes_the_flags_for_an_own_onnx(capsys, tmp_path):
    """compare's ONNX path: refused without a spec (one line naming the flags), runs with them."""
    from PIL import Image

    from sparsecnn.models import load_model

    path = _export(tmp_path / "tiny.onnx", module=load_model("tinynet")[0])
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    base = ["compare", path, "--data", data, "--methods", "0.5", "--device", "cpu", "--no-progress"]
    fails(capsys, *base, match="add --mean and --std")
    code, out, err = cli(capsys, *base, "--mean", "0.5", "--std", "0.5", "--json", tmp_path / "r.json")
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert res["input"]["mean"] == [0.5, 0.5, 0.5] and res["input"]["height"] == 32


def test_convert_opset_converts_an_onnx_file_or_says_why_not(capsys, tmp_path, own, monkeypatch):
    have = onnx.load(str(own["static"])).opset_import[0].version
    code, _, err = cli(capsys, "convert", own["static"], "-o", tmp_path / "keep.onnx")
    assert code == 0 and onnx.load(str(tmp_path / "keep.onnx")).opset_import[0].version == have, err
    code, _, err = cli(capsys, "convert", own["static"], "--opset", "17", "-o", tmp_path / "o17.onnx")
    assert code == 0 and "converting mnv2.onnx to opset 17" in err, err
    assert next(o.version for o in onnx.load(str(tmp_path / "o17.onnx")).opset_import if o.domain == "") == 17

    def refuse(model, version):
        raise RuntimeError("adapter_lookup: Assertion `false` failed: No Adapter From Version $16 for Identity")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    fails(capsys, "convert", own["static"], "--opset", "13", "-o", tmp_path / "o13.onnx",
          match=f"cannot convert mnv2.onnx from opset {have} to 13 .*No Adapter From Version .16 for Identity")
    assert not (tmp_path / "o13.onnx").exists()
