"""Every command fails well on untrusted files, outputs, data and flags (DESIGN contract 5).

Each bad-input case asserts: exit status 2, exactly one error line on stderr (progress lines
such as 'loading x ... failed' may precede it; no traceback), no file left behind and every
input byte-for-byte untouched (a hash of the whole working folder before and after).
"""
import errno
import gzip
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sparsecnn.common.errors import UserError
from sparsecnn.converter.cli import main


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, tmp_path_factory):
    """Each case runs in its own empty folder (the one the snapshot covers); caches live elsewhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSECNN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def cli(*argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors exit from inside the parser
        return exc.code


def fails(capsys, root, *argv, match: str | None = None) -> str:
    """Run the CLI expecting a one-line user error; return that line."""
    before = snapshot(root)
    code = cli(*argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0], err
    if match:
        assert re.search(match, errors[0], re.I), errors[0]
    assert snapshot(root) == before, "a file was left behind or an input changed"
    return errors[0]


# ---- shared small files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx_bytes(tmp_path_factory) -> bytes:
    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models import load_model

    module, spec, entry = load_model("tinynet")
    return export_onnx(module, spec, entry.exclude).SerializeToString()


@pytest.fixture(scope="module")
def engine_members(tmp_path_factory) -> dict:
    """The members of a valid CPU engine file of tinynet (torch runtime)."""
    d = tmp_path_factory.mktemp("engine")
    assert cli("convert", "tinynet", "-o", d / "t.onnx", "--runtime", "torch", "--engine", d / "t.engine",
               "--device", "cpu") == 0
    with zipfile.ZipFile(d / "t.engine") as z:
        return {n: z.read(n) for n in z.namelist()}


def tiny_model(tiny_onnx_bytes) -> onnx.ModelProto:
    return onnx.load_model_from_string(tiny_onnx_bytes)


def write_model(path, model: onnx.ModelProto):
    path.write_bytes(model.SerializeToString())
    return path


def set_meta(model, key, value):
    for p in list(model.metadata_props):
        if p.key == key:
            model.metadata_props.remove(p)
    model.metadata_props.add(key=key, value=value)
    return model


def write_engine(path, members: dict, manifest: dict | None = None, **replace):
    """A zip from `members`, with engine.json from `manifest` and any member replaced (None drops it)."""
    members = dict(members)
    if manifest is not None:
        members["engine.json"] = json.dumps(manifest).encode()
    for k, v in replace.items():
        members[k.replace("__", "/").replace("_DOT_", ".")] = v
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in members.items():
            if data is not None:
                z.writestr(n, data)
    return path


def manifest_of(members) -> dict:
    return json.loads(members["engine.json"])


def save_state(path, state: dict, **extra):
    torch.save({**extra, "state_dict": state} if extra else state, path)
    return path


def tinynet_state() -> dict:
    from sparsecnn.models import load_model

    return {k: v.clone() for k, v in load_model("tinynet")[0].state_dict().items()}


# ---- 1. silently wrong data ------------------------------------------------------------------------

def write_idx(folder, images: np.ndarray, labels: np.ndarray, gz: bool = False):
    """The four Fashion-MNIST idx files (the same small set as train and test)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    img = struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes()
    lab = struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()
    for prefix in ("train", "t10k"):
        for name, data in ((f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)):
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def test_idx_cache_is_keyed_by_content_not_file_names(tmp_path):
    from sparsecnn.converter.data import load_data

    rng = np.random.default_rng(0)
    a = write_idx(tmp_path / "a", rng.integers(0, 255, (20, 28, 28)), np.arange(20) % 10)
    b = write_idx(tmp_path / "b", rng.integers(0, 255, (20, 28, 28)), (np.arange(20) + 3) % 10)
    da, db = load_data(a, "test"), load_data(b, "test")
    assert not torch.equal(da.images, db.images) and not torch.equal(da.targets, db.targets)
    assert torch.equal(load_data(a, "test").images, da.images)  # the cache still serves A as A


@pytest.mark.parametrize("labels,match", [
    (np.full(20, 12), "outside 0-9"),
    (np.zeros(20), "single class"),
    (np.arange(19) % 10, "disagree"),
], ids=["label out of range", "one class", "count mismatch"])
def test_bad_idx_labels(capsys, tmp_path, labels, match):
    write_idx(tmp_path / "d", np.zeros((20, 28, 28)), labels)
    fails(capsys, tmp_path, "compare", "tinynet", "--data", tmp_path / "d", "--device", "cpu", "--methods", "0.5",
          "--finetune-epochs", "0", match=match)


def one_class_folder(root):
    from PIL import Image

    (root / "only").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "only" / f"{i}.png")
    return root


def test_train_refuses_a_one_class_folder(capsys, tmp_path):
    fails(capsys, tmp_path, "train", "tinynet", "--data", one_class_folder(tmp_path / "d"), "-o", "t.pt",
          "--device", "cpu", match="at least 2")


def test_compare_refuses_a_one_class_folder(capsys, tmp_path):
    fails(capsys, tmp_path, "compare", "tinynet", "--data", one_class_folder(tmp_path / "d"), "--device", "cpu",
          match="at least 2")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_checkpoint_with_nonfinite_weights(capsys, tmp_path, value):
    state = tinynet_state()
    state["features.4.weight"][0, 0, 0, 0] = value
    save_state(tmp_path / "w.pt", state)
    fails(capsys, tmp_path, "convert", "tinynet", "--weights", "w.pt", "-o", "x.onnx",
          match=r"features\.4\.weight.*(NaN|Inf)")


def test_sparsecnn_checkpoint_with_nan_weights(capsys, tmp_path):
    state = tinynet_state()
    state["classifier.weight"][1, 1] = float("nan")
    torch.save({"arch": "tinynet", "num_classes": 10, "state_dict": state}, tmp_path / "c.pt")
    fails(capsys, tmp_path, "inspect", "c.pt", match="classifier.weight.*NaN")


@pytest.mark.parametrize("verb", ["convert", "inspect", "run"])
def test_onnx_with_nan_weight(capsys, tmp_path, tiny_onnx_bytes, verb):
    m = tiny_model(tiny_onnx_bytes)
    name = [n for n in m.graph.node if n.op_type == "Conv"][1].input[1]
    t = next(t for t in m.graph.initializer if t.name == name)
    arr = numpy_helper.to_array(t).copy()
    arr.flat[0] = np.nan
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    write_model(tmp_path / "m.onnx", m)
    extra = {"convert": ["-o", "o.onnx"], "inspect": [], "run": ["--device", "cpu"]}[verb]
    fails(capsys, tmp_path, verb, "m.onnx", *extra, match=re.escape(name) + ".*NaN")


@pytest.mark.parametrize("verb,value", [("train", "nan"), ("train", "inf"), ("train", "-0.1"), ("train", "0"),
                                        ("compare", "nan"), ("compare", "-1")])
def test_non_finite_or_negative_learning_rate(capsys, tmp_path, verb, value):
    extra = ["-o", "t.pt"] if verb == "train" else []
    fails(capsys, tmp_path, verb, "tinynet", *extra, f"--lr={value}", match="--lr")


@pytest.mark.parametrize("channels", [3, 1])
def test_16bit_png_is_scaled_not_clipped(tmp_path, monkeypatch, channels):
    from PIL import Image

    from sparsecnn.converter.images import preprocess
    from sparsecnn.models.registry import InputSpec

    from_numpy = torch.from_numpy

    def writable_only(arr):  # a read-only array made torch print a UserWarning to the user (1-channel models)
        assert arr.flags.writeable
        return from_numpy(arr)

    monkeypatch.setattr(torch, "from_numpy", writable_only)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        x = preprocess(im, InputSpec(channels, 8, 8, scale=1 / 255))
    assert x.shape == (channels, 8, 8) and abs(float(x.mean()) - 32768 / 65535) < 1e-3  # clipped would read 1.0


# ---- 2. engine files are untrusted ------------------------------------------------------------------

ENGINE_CASES = {
    "not a zip": lambda m: b"PK\x03\x04 definitely not a zip",
    "no manifest": lambda m: {"engine_DOT_json": None},
    "no model": lambda m: {"model_DOT_onnx": None},
    "manifest not json": lambda m: {"engine_DOT_json": b"{nope"},
    "manifest a list": lambda m: {"engine_DOT_json": b"[1, 2]"},
    "wrong format": lambda m: {**manifest_of(m), "format": "other"},
    "wrong version": lambda m: {**manifest_of(m), "version": 99},
    "unknown runtime": lambda m: {**manifest_of(m), "runtime": "evil"},
    "runtime not a string": lambda m: {**manifest_of(m), "runtime": 5},
    "options not a dict": lambda m: {**manifest_of(m), "options": "fast"},
    "options dtype unknown": lambda m: {**manifest_of(m), "options": {**manifest_of(m)["options"], "dtype": "fp8"}},
    "options bool a string": lambda m: {**manifest_of(m), "options": {**manifest_of(m)["options"], "tf32": "yes"}},
    "options extra a list": lambda m: {**manifest_of(m), "options": {**manifest_of(m)["options"], "extra": [1]}},
    "state a list": lambda m: {**manifest_of(m), "state": [1]},
    "state choices a list": lambda m: {**manifest_of(m), "state": {"choices": [1]}},
    "model not protobuf": lambda m: {"model_DOT_onnx": b"\xff\xfe this is not protobuf \x00" * 10},
    "member outside files/": lambda m: {"files__..__evil": b"x"},
    "unexpected member": lambda m: {"other_DOT_bin": b"x"},
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_crafted_engine(capsys, tmp_path, engine_members, case):
    spec = ENGINE_CASES[case](engine_members)
    path = tmp_path / "e.engine"
    if isinstance(spec, bytes):
        path.write_bytes(spec)
    elif "format" in spec or "runtime" in spec or "state" in spec:
        write_engine(path, engine_members, manifest=spec)
    else:
        write_engine(path, engine_members, **spec)
    fails(capsys, tmp_path, "run", "e.engine", "--device", "cpu", match="e.engine")


def test_engine_zip_bomb_is_refused_before_inflating(capsys, tmp_path, engine_members):
    write_engine(tmp_path / "e.engine", engine_members, files__pad=bytes(64 * 2**20))
    assert (tmp_path / "e.engine").stat().st_size < 2**20
    fails(capsys, tmp_path, "run", "e.engine", "--device", "cpu", match="zip bomb")


def test_engine_model_naming_external_data_reads_nothing(capsys, tmp_path, engine_members):
    m = onnx.load_model_from_string(engine_members["model.onnx"])
    t = next(t for t in m.graph.initializer if t.name.endswith("weight"))
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="secret.bin")
    (tmp_path / "secret.bin").write_bytes(bytes(1 << 16))
    write_engine(tmp_path / "e.engine", engine_members, model_DOT_onnx=m.SerializeToString())
    fails(capsys, tmp_path, "run", "e.engine", "--device", "cpu", match="external")


def test_engine_model_with_nan_weight(capsys, tmp_path, engine_members):
    m = onnx.load_model_from_string(engine_members["model.onnx"])
    t = next(t for t in m.graph.initializer if t.name.endswith("weight"))
    arr = numpy_helper.to_array(t).copy()
    arr.flat[0] = np.inf
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    write_engine(tmp_path / "e.engine", engine_members, model_DOT_onnx=m.SerializeToString())
    fails(capsys, tmp_path, "run", "e.engine", "--device", "cpu", match="Inf")


def test_engine_with_old_opset_model(capsys, tmp_path, engine_members):
    m = onnx.load_model_from_string(engine_members["model.onnx"])
    next(o for o in m.opset_import if o.domain in ("", "ai.onnx")).version = 6
    write_engine(tmp_path / "e.engine", engine_members, model_DOT_onnx=m.SerializeToString())
    fails(capsys, tmp_path, "run", "e.engine", "--device", "cpu", match="opset 6")


def test_valid_engine_still_runs(capsys, tmp_path, engine_members):
    write_engine(tmp_path / "e.engine", engine_members)
    assert cli("run", "e.engine", "--device", "cpu") == 0


# ---- 3. ONNX files and their metadata ----------------------------------------------------------------

META_CASES = {
    "spec not json": ("sparsecnn.input_spec", "{broken", "not valid JSON"),
    "spec a list": ("sparsecnn.input_spec", "[3, 32, 32]", "JSON dict"),
    "spec channels a string": ("sparsecnn.input_spec", json.dumps({"channels": "three", "height": 32, "width": 32}),
                               "channels"),
    "spec std zero": ("sparsecnn.input_spec", json.dumps({"channels": 3, "height": 32, "width": 32, "mean": [0, 0, 0],
                                                          "std": [0, 1, 1]}), "std"),
    "spec height negative": ("sparsecnn.input_spec", json.dumps({"channels": 3, "height": -32, "width": 32}),
                             "height"),
    "spec channels disagree with input": ("sparsecnn.input_spec",
                                          json.dumps({"channels": 1, "height": 32, "width": 32}), "channels"),
    "exclusions not a list": ("sparsecnn.prune_exclude", json.dumps({"a": 1}), "prune_exclude"),
    "exclusions not json": ("sparsecnn.prune_exclude", "[oops", "prune_exclude"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_bad_onnx_metadata(capsys, tmp_path, tiny_onnx_bytes, case):
    key, value, match = META_CASES[case]
    write_model(tmp_path / "m.onnx", set_meta(tiny_model(tiny_onnx_bytes), key, value))
    fails(capsys, tmp_path, "convert", "m.onnx", "--prune", "0.5", "-o", "o.onnx", match=match)


@pytest.mark.parametrize("version", [7, 99])
def test_onnx_opset_outside_floor_and_ceiling(capsys, tmp_path, tiny_onnx_bytes, version):
    m = tiny_model(tiny_onnx_bytes)
    next(o for o in m.opset_import if o.domain in ("", "ai.onnx")).version = version
    write_model(tmp_path / "m.onnx", m)
    fails(capsys, tmp_path, "inspect", "m.onnx", match=f"opset {version}")


@pytest.mark.parametrize("verb", ["convert", "run"])
def test_onnx_input_that_cannot_feed_the_first_conv(capsys, tmp_path, tiny_onnx_bytes, verb):
    m = tiny_model(tiny_onnx_bytes)
    set_meta(m, "sparsecnn.input_spec", json.dumps({"channels": 5, "height": 32, "width": 32}))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
    write_model(tmp_path / "m.onnx", m)
    extra = ["-o", "o.onnx", "--prune", "0.5"] if verb == "convert" else ["--device", "cpu"]
    fails(capsys, tmp_path, verb, "m.onnx", *extra, match="5 channels")


def test_onnx_weight_shorter_than_its_shape(capsys, tmp_path, tiny_onnx_bytes):
    """The largest weight (past the checker's skeleton, which sees only its type and shape) cut short."""
    from sparsecnn.passes.graph import tensor_nbytes

    m = tiny_model(tiny_onnx_bytes)
    t = max(m.graph.initializer, key=tensor_nbytes)
    assert tensor_nbytes(t) > 4096 and t.HasField("raw_data")
    t.raw_data = t.raw_data[:-4]
    write_model(tmp_path / "m.onnx", m)
    fails(capsys, tmp_path, "inspect", "m.onnx", match=f"'{t.name}' holds data that does not fit its shape")


def test_onnx_with_external_data_outside_its_folder_reads_nothing(capsys, tmp_path, tiny_onnx_bytes):
    m = tiny_model(tiny_onnx_bytes)
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../etc/passwd")
    write_model(tmp_path / "m.onnx", m)
    fails(capsys, tmp_path, "inspect", "m.onnx", match="not a file beside the model")


def _external(tiny_onnx_bytes, folder):
    """tinynet saved as torch.onnx.export saves by default since torch 2.9: m.onnx + m.onnx.data."""
    onnx.save_model(tiny_model(tiny_onnx_bytes), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)


def test_onnx_with_external_data_beside_it_is_read(capsys, tmp_path, tiny_onnx_bytes):
    """Such files were refused whole ('sparsecnn reads only self-contained models')."""
    _external(tiny_onnx_bytes, tmp_path)
    assert cli("convert", "m.onnx", "--prune", "0.5", "-o", "p.onnx") == 0
    dense = {t.name: numpy_helper.to_array(t) for t in tiny_model(tiny_onnx_bytes).graph.initializer}
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    assert dense.keys() == pruned.keys()
    assert all(np.array_equal(np.where(pruned[k] == 0, 0, dense[k]), pruned[k]) for k in dense)  # values, masked


@pytest.mark.parametrize("case,match", [("missing", "m.onnx.data, which is missing"),
                                        ("cut short", "the file is cut short"),
                                        ("a link out of the folder", "not a file beside the model")])
def test_onnx_with_bad_external_data(capsys, tmp_path, tiny_onnx_bytes, case, match):
    _external(tiny_onnx_bytes, tmp_path)
    data = tmp_path / "m.onnx.data"
    if case == "missing":
        data.unlink()
    elif case == "cut short":
        data.write_bytes(data.read_bytes()[:100])
    else:
        (tmp_path.parent / "outside.bin").write_bytes(data.read_bytes())
        data.unlink()
        data.symlink_to(tmp_path.parent / "outside.bin")
    fails(capsys, tmp_path, "convert", "m.onnx", "-o", "p.onnx", match=match)


def test_onnx_not_protobuf(capsys, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\x0a\xff\xff\xff garbage")
    fails(capsys, tmp_path, "inspect", "m.onnx", match="not a readable ONNX")


@pytest.mark.parametrize("stored,match", [
    ({"num_classes": -3}, "num_classes"),
    ({"num_classes": "ten"}, "num_classes"),
    ({"input": {"channels": 3, "height": 0, "width": 32}}, "height"),
    ({"input": {"channels": 3, "height": 32, "width": 32, "num_classes": 7}}, "7 classes"),
    ({"input": {"channels": 1, "height": 32, "width": 32, "num_classes": 10}}, "1 channels"),
    ({"input": [3, 32, 32]}, "not a dict"),
], ids=["negative classes", "classes a string", "zero height", "spec classes disagree", "spec channels disagree",
        "spec a list"])
def test_checkpoint_with_bad_stored_spec(capsys, tmp_path, stored, match):
    torch.save({"arch": "tinynet", "state_dict": tinynet_state(), **stored}, tmp_path / "c.pt")
    fails(capsys, tmp_path, "convert", "c.pt", "-o", "o.onnx", match=match)


def test_text_file_that_is_no_checkpoint(capsys, tmp_path):
    """torch.load's weights-only unpickler failed on it with a KeyError: a traceback."""
    (tmp_path / "c.pt").write_text("hello\n")
    fails(capsys, tmp_path, "convert", "c.pt", "-o", "o.onnx", match=r"c\.pt is not a PyTorch checkpoint")
    fails(capsys, tmp_path, "convert", "tinynet", "--weights", "c.pt", "-o", "o.onnx", match="not a PyTorch checkpoint")


def test_folder_given_as_the_model(capsys, tmp_path):
    (tmp_path / "models").mkdir()
    fails(capsys, tmp_path, "convert", "models", "-o", "o.onnx", match="models is a folder; give a checkpoint file")


@pytest.mark.parametrize("flags,match", [(["--weights", "w.pt"], "so --weights does not apply"),
                                         (["--num-classes", "5"], "so --num-classes does not apply")])
def test_weights_or_classes_for_an_onnx_file_are_refused_not_ignored(capsys, tmp_path, tiny_onnx_bytes, flags, match):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx_bytes)
    save_state(tmp_path / "w.pt", tinynet_state())
    fails(capsys, tmp_path, "convert", "m.onnx", *flags, "-o", "o.onnx", match=match)


def test_weights_for_a_checkpoint_are_refused_not_ignored(capsys, tmp_path):
    save_state(tmp_path / "c.pt", tinynet_state(), arch="tinynet")
    save_state(tmp_path / "w.pt", tinynet_state())
    fails(capsys, tmp_path, "convert", "c.pt", "--weights", "w.pt", "-o", "o.onnx",
          match=r"c\.pt is a checkpoint: it holds the weights, so --weights w\.pt does not apply")


def test_checkpoint_classes_disagree_with_flag(capsys, tmp_path):
    torch.save({"arch": "tinynet", "num_classes": 10, "state_dict": tinynet_state()}, tmp_path / "c.pt")
    fails(capsys, tmp_path, "convert", "c.pt", "--num-classes", "5", "-o", "o.onnx", match="10 classes")


# ---- 4. outputs ------------------------------------------------------------------------------------

def test_output_is_a_folder(capsys, tmp_path):
    (tmp_path / "out.onnx").mkdir()
    fails(capsys, tmp_path, "convert", "tinynet", "-o", "out.onnx", match="is a folder")


def test_output_folder_missing(capsys, tmp_path):
    fails(capsys, tmp_path, "convert", "tinynet", "-o", "nope/x.onnx", match="does not exist")


def test_output_name_too_long(capsys, tmp_path):
    fails(capsys, tmp_path, "convert", "tinynet", "-o", "x" * 300 + ".onnx", match="characters")


def test_output_equal_to_input_onnx(capsys, tmp_path, tiny_onnx_bytes):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx_bytes)
    fails(capsys, tmp_path, "convert", "m.onnx", "--prune", "0.5", "-o", "m.onnx", match="also an input")


def test_output_equal_to_input_through_another_spelling(capsys, tmp_path, tiny_onnx_bytes):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx_bytes)
    (tmp_path / "sub").mkdir()
    fails(capsys, tmp_path, "convert", "m.onnx", "-o", "sub/../m.onnx", match="also an input")


def test_default_output_name_equal_to_input(capsys, tmp_path, tiny_onnx_bytes):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx_bytes)
    fails(capsys, tmp_path, "convert", "m.onnx", match="also an input")  # no --prune: default name m.onnx


def test_output_equal_to_weights(capsys, tmp_path):
    save_state(tmp_path / "w.pt", tinynet_state())
    fails(capsys, tmp_path, "convert", "tinynet", "--weights", "w.pt", "-o", "w.pt", match="also an input")


def test_output_equal_to_engine(capsys, tmp_path):
    fails(capsys, tmp_path, "convert", "tinynet", "-o", "a.onnx", "--engine", "a.onnx", "--device", "cpu",
          match="same file")


def test_engine_equal_to_input(capsys, tmp_path, tiny_onnx_bytes):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx_bytes)
    fails(capsys, tmp_path, "convert", "m.onnx", "-o", "o.onnx", "--engine", "m.onnx", "--device", "cpu",
          match="also an input")


def test_run_output_is_a_folder(capsys, tmp_path):
    (tmp_path / "o.npz").mkdir()
    fails(capsys, tmp_path, "run", "tinynet", "--device", "cpu", "-o", "o.npz", match="is a folder")


def test_run_output_folder_missing(capsys, tmp_path):
    fails(capsys, tmp_path, "run", "tinynet", "--device", "cpu", "-o", "nope/o.npz", match="does not exist")


def test_compare_json_target_checked_before_the_comparison(capsys, tmp_path, monkeypatch):
    import sparsecnn.converter.compare as compare

    monkeypatch.setattr(compare, "compare_model", lambda *a, **k: pytest.fail("the comparison ran"))
    fails(capsys, tmp_path, "compare", "tinynet", "--json", "nope/r.json", match="does not exist")


def test_compare_plot_is_a_folder(capsys, tmp_path):
    (tmp_path / "p.png").mkdir()
    fails(capsys, tmp_path, "compare", "tinynet", "--plot", "p.png", match="is a folder")


def test_compare_save_dir_is_a_file(capsys, tmp_path):
    (tmp_path / "variants").write_text("a file")
    fails(capsys, tmp_path, "compare", "tinynet", "--save-dir", "variants", match="is a file")


def test_train_output_folder_missing(capsys, tmp_path):
    fails(capsys, tmp_path, "train", "tinynet", "-o", "nope/t.pt", match="does not exist")


def test_check_jetson_fp16_copy_over_its_input(capsys, tmp_path, tiny_onnx_bytes):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx_bytes)
    fails(capsys, tmp_path, "check-jetson", "m.onnx", "--write-fp16", "m.onnx", match="also an input")


def test_bench_output_folder_is_a_file(capsys, tmp_path):
    (tmp_path / "out").write_text("a file")
    fails(capsys, tmp_path, "bench", "--quick", "-o", "out", match="is a file")


def test_failed_engine_step_leaves_no_onnx(capsys, tmp_path, monkeypatch):
    import sparsecnn.runtimes.torch.runtime as torch_rt

    def broken(*a, **k):
        raise UserError("this engine cannot be built")

    monkeypatch.setattr(torch_rt, "compile", broken)
    fails(capsys, tmp_path, "convert", "tinynet", "-o", "a.onnx", "--engine", "a.engine", "--device", "cpu",
          match="cannot be built")


def test_full_disk_is_one_line(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_open = Path.open

    def open_full(self, mode="r", *args, **kwargs):  # save_onnx streams its parts to an open file
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr(Path, "open", open_full)
    fails(capsys, tmp_path, "convert", "tinynet", "-o", "a.onnx", match="no space left")


def test_full_disk_reported_by_a_library_as_its_own_error(tmp_path, monkeypatch):
    import sparsecnn.common.fileio as fileio

    monkeypatch.setattr(fileio, "_disk_full", lambda folder: True)
    with pytest.raises(UserError, match="no space left"):
        with fileio.atomic_path(tmp_path / "c.pt") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(capsys, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        fails(capsys, tmp_path, "convert", "tinynet", "-o", "ro/a.onnx", match="not writable")
    finally:
        (tmp_path / "ro").chmod(0o700)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, mask):
    from sparsecnn.common.fileio import write_bytes_atomic

    old = os.umask(mask)
    try:
        write_bytes_atomic(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_sigterm_removes_the_temporary_file(tmp_path):
    code = ("import os, signal, sys\n"
            "from sparsecnn.common.fileio import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.bin")], timeout=60)
    assert proc.returncode == -15
    assert list(tmp_path.iterdir()) == []


# ---- 5. flags ----------------------------------------------------------------------------------------

FLAG_CASES = [
    ("run", "tinynet", "--topk", "0"),
    ("run", "tinynet", "--topk", "-1"),
    ("run", "tinynet", "--batch", "0"),
    ("run", "tinynet", "--batch", "100000000"),
    ("run", "tinynet", "--batch", "two"),
    ("train", "tinynet", "-o", "t.pt", "--batch-size", "0"),
    ("train", "tinynet", "-o", "t.pt", "--epochs", "0"),
    ("train", "tinynet", "-o", "t.pt", "--size", "2"),
    ("train", "tinynet", "-o", "t.pt", "--subset", "-5"),
    ("compare", "tinynet", "--eval-batch", "0"),
    ("compare", "tinynet", "--batch-size", "0"),
    ("compare", "tinynet", "--subset", "0"),
    ("compare", "tinynet", "--cov-threshold", "2"),
    ("compare", "tinynet", "--finetune-epochs", "-1"),
    ("bench", "--quick", "--batch", "0"),
    ("bench", "--quick", "--batch", "99999"),
    ("bench", "--quick", "--repeats", "0"),
    ("bench", "--quick", "--budget-ms", "nan"),
    ("inspect", "tinynet", "--activations", "random", "--samples", "0"),
    ("check-jetson", "tinynet", "--batch", "0"),
    ("convert", "tinynet", "--num-classes", "0"),
    ("convert", "tinynet", "--opset", "5"),
    ("convert", "tinynet", "--opset", "99"),
    ("convert", "tinynet", "-o", "x.onnx", "--runtime", "csr"),
    ("convert", "tinynet", "-o", "x.onnx", "--option", "dense_conv=best"),
    # flags the rest of the command makes moot were ignored without a word
    ("convert", "tinynet", "-o", "x.onnx", "--prune", "2:4", "--scope", "global"),
    ("convert", "tinynet", "-o", "x.onnx", "--scope", "layer"),
    ("convert", "tinynet", "-o", "x.onnx", "--exclude", "conv2"),
    ("convert", "tinynet", "-o", "x.onnx", "--prune", "0.5", "--exclude", "no_such_layer"),
    ("convert", "tinynet", "-o", "x.onnx", "--dtype", "fp16"),
    ("convert", "tinynet", "-o", "x.onnx", "--device", "cpu"),
    ("convert", "tinynet", "-o", "x.onnx", "--tf32"),
    ("convert", "tinynet", "-o", "x.onnx", "--no-cuda-graph", "--runtime", "csr", "--sparse-onnx", "s.onnx"),
    ("verify", "tinynet", "--device", "cpu", "--prune", "2:4", "--scope", "global"),
]


@pytest.mark.parametrize("argv", FLAG_CASES, ids=[" ".join(a[2:]) + f" ({a[0]})" for a in FLAG_CASES])
def test_bad_flag(capsys, tmp_path, argv):
    fails(capsys, tmp_path, *argv)


def test_exclude_takes_the_node_names_a_foreign_file_shows(capsys, tmp_path):
    """torch.onnx.export names BatchNorm-folded weights 'onnx::Conv_12': the depthwise warning and
    inspect name the node ('/features/features.1/Conv'), and --exclude with that name was ignored."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 3),
                            torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 4, 1)).eval()
    torch.onnx.export(m, (torch.zeros(1, 3, 16, 16),), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17)
    weights = {n.name: n.input[1] for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Conv"}
    assert weights["/2/Conv"].startswith("onnx::")  # folded: no module name left in the file
    assert cli("convert", "m.onnx", "--prune", "0.9", "--exclude", "/2/Conv", "-o", "p.onnx") == 0
    sparsity = {n: float(np.mean(numpy_helper.to_array(t) == 0)) for t in onnx.load(str(tmp_path / "p.onnx")).graph.initializer
                for n, w in weights.items() if t.name == w}
    assert sparsity["/2/Conv"] == 0 and sparsity["/4/Conv"] > 0.85  # /0 and /5 are the stem and head


def test_library_out_of_memory_is_one_line(capsys, tmp_path, monkeypatch):
    import sparsecnn.converter.source as source

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(source, "load_source", oom)
    fails(capsys, tmp_path, "inspect", "tinynet", match="out of memory.*--debug")


def test_onnx_checker_error_escaping_a_pass_is_one_line(capsys, tmp_path, monkeypatch):
    import sparsecnn.converter.source as source

    def invalid(*a, **k):
        raise onnx.checker.ValidationError("Node () has input size 1 not in range [min=2, max=3].")

    monkeypatch.setattr(source, "load_source", invalid)
    fails(capsys, tmp_path, "inspect", "tinynet", match="ONNX model is invalid")


@pytest.mark.parametrize("argv", [["inspect", "tinynet", "--debug"], ["--debug", "inspect", "tinynet"]],
                         ids=["after the command", "before the command"])
def test_debug_shows_the_traceback(monkeypatch, argv):
    import sparsecnn.converter.source as source

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(source, "load_source", oom)
    with pytest.raises(torch.OutOfMemoryError):
        main(argv)


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    import sparsecnn.converter.source as source

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(source, "load_source", bug)
    with pytest.raises(ZeroDivisionError):
        main(["inspect", "tinynet"])


# ---- 6. GPU paths that have a CPU half ---------------------------------------------------------------

def test_run_writes_npz_from_outputs(capsys, tmp_path):
    assert cli("run", "tinynet", "--device", "cpu", "--save-inputs", "-o", "o.npz") == 0
    with np.load(tmp_path / "o.npz") as z:
        assert set(z.files) == {"logits", "input"}


def test_a_folder_holding_a_file_that_is_no_image_fails_before_any_batch(capsys, tmp_path):
    """run printed the classes of the images sorted before it, then stopped at it."""
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(tmp_path / "photos" / f"a{i}.jpg")
    (tmp_path / "photos" / "b.png").write_text("not a png")
    Image.new("P", (20, 20)).save(tmp_path / "photos" / "c.gif")  # read now, not skipped as a non-image
    code = cli("run", "tinynet", "--device", "cpu", "--input", "photos", "--batch", "1", "-o", "o.npz")
    out = capsys.readouterr()
    assert code == 2 and out.err.strip().splitlines()[-1] == ("sparsecnn run: error: cannot read image photos/b.png: "
                                                               "cannot identify image file 'photos/b.png'")
    assert out.out == "" and not (tmp_path / "o.npz").exists()  # nothing was classified first
    (tmp_path / "photos" / "b.png").unlink()
    assert cli("run", "tinynet", "--device", "cpu", "--input", "photos", "--no-progress") == 0
    assert "c.gif:" in capsys.readouterr().out


def test_bench_text_table_truncates_long_names_visibly():
    from sparsecnn.converter.bench_report import fit_name

    long = "/very/long/path/to/some/model-pruned-0.9-final.onnx"
    assert fit_name(long, 13).startswith("…") and len(fit_name(long, 13)) == 13
    assert fit_name("tinynet", 13) == "tinynet"


# ---- 6. verify: the inputs file ----------------------------------------------------------------------

@pytest.mark.parametrize("arrays,match", [
    ({"image": np.zeros((1, 3, 32, 32), np.float32)}, r"no array 'input' \(it holds 'image'\)"),
    ({"input": np.zeros((1, 3, 16, 16), np.float32)}, r"shape \[1, 3, 16, 16\]; input 'input' takes \[N, 3, 32, 32\]"),
    ({"input": np.zeros((3, 32, 32), np.float32)}, r"shape \[3, 32, 32\]; input 'input' takes"),
    ({"input": np.zeros((1, 3, 32, 32), np.uint8)}, "holds uint8 values"),
    ({"input": np.full((1, 3, 32, 32), np.nan, np.float32)}, "NaN or Inf"),
    ({"input": np.array([{"x": 1}], dtype=object)}, "not a readable NumPy .npz"),
], ids=["wrong name", "wrong size", "no batch axis", "integers", "nan", "pickled objects"])
def test_verify_inputs_npz_that_does_not_fit(capsys, tmp_path, tiny_onnx_bytes, arrays, match):
    write_model(tmp_path / "t.onnx", tiny_model(tiny_onnx_bytes))
    np.savez(tmp_path / "in.npz", **arrays)
    fails(capsys, tmp_path, "verify", "t.onnx", "--inputs", "in.npz", "--device", "cpu", "--save-outputs", "o.npz",
          "--json", "r.json", match=match)


@pytest.mark.parametrize("content", [b"not a zip", None], ids=["garbage", "a .npy array"])
def test_verify_inputs_file_not_npz(capsys, tmp_path, tiny_onnx_bytes, content):
    write_model(tmp_path / "t.onnx", tiny_model(tiny_onnx_bytes))
    if content is None:
        with open(tmp_path / "in.npz", "wb") as f:
            np.save(f, np.zeros((1, 3, 32, 32), np.float32))
    else:
        (tmp_path / "in.npz").write_bytes(content)
    fails(capsys, tmp_path, "verify", "t.onnx", "--inputs", "in.npz", "--device", "cpu", "--json", "r.json",
          match="in.npz is not a readable NumPy .npz file")


def test_verify_missing_inputs_file_fails_before_the_model_loads(capsys, tmp_path):
    fails(capsys, tmp_path, "verify", "no-such-model.onnx", "--inputs", "in.npz", match="inputs file not found: in.npz")


# ---- 7. calibration input (converter/calibration.py) ---------------------------------------------------

CONVERT_ECR = ("convert", "tinynet", "-o", "x.onnx", "--runtime", "ecr", "--engine", "x.engine", "--device", "cpu")
CALIBRATION_CASES = {
    "missing path": ((*CONVERT_ECR, "--calibration", "nowhere"), "--calibration not found: nowhere"),
    "empty folder": ((*CONVERT_ECR, "--calibration", "empty"), "--calibration empty: no images"),
    "a file that is no image": ((*CONVERT_ECR, "--calibration", "photos"), r"cannot read image photos/b\.png"),
    "not a folder or npz": ((*CONVERT_ECR, "--calibration", "notes.txt"), "neither a folder of images nor an .npz"),
    "npz without the input": ((*CONVERT_ECR, "--calibration", "other.npz"), r"no array 'input' \(it holds 'image'\)"),
    "npz of the wrong shape": ((*CONVERT_ECR, "--calibration", "small.npz"),
                               r"array 'input' has shape \[2, 3, 16, 16\]; input 'input' takes \[N, 3, 32, 32\]"),
    "convert without --engine": (("convert", "tinynet", "-o", "x.onnx", "--calibration", "empty"),
                                 "takes effect only with --engine"),
    "run missing path": (("run", "tinynet", "--runtime", "ecr", "--device", "cpu", "--calibration", "nowhere"),
                         "--calibration not found"),
    "run a saved engine": (("run", "e.engine", "--device", "cpu", "--calibration", "other.npz"),
                           "saved engine.*drop --calibration"),
    "verify npz of the wrong shape": (("verify", "tinynet", "--runtimes", "ecr", "--device", "cpu", "--calibration",
                                       "small.npz"), r"has shape \[2, 3, 16, 16\]"),
    "verify a saved engine": (("verify", "e.engine", "--calibration", "other.npz"), "--calibration does not apply"),
}


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_bad_calibration(capsys, tmp_path, engine_members, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "b.png").write_text("not a png")
    (tmp_path / "notes.txt").write_text("not images")
    np.savez(tmp_path / "other.npz", image=np.zeros((1, 3, 32, 32), np.float32))
    np.savez(tmp_path / "small.npz", input=np.zeros((2, 3, 16, 16), np.float32))
    write_engine(tmp_path / "e.engine", engine_members)
    argv, match = CALIBRATION_CASES[case]
    fails(capsys, tmp_path, *argv, match=match)
