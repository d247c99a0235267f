"""`sparsecnn verify`: engines against ONNX Runtime, per output; a wrong engine exits 1.

Engines are broken on purpose by patching one op of their CPU path: the errors the verb reports
are then compared with what the patch must cause (computed here, not by the code under test).
"""
import json

import numpy as np
import pytest

from helpers import ort_run
from sparsecnn.converter.cli import main


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """tinyresnet pruned to 0.9 (its convs become CsrConv for the csr runtime), and a csr engine of it."""
    d = tmp_path_factory.mktemp("verify")
    assert main(["convert", "tinyresnet", "--prune", "0.9", "-o", str(d / "t.onnx"), "--runtime", "csr",
                 "--engine", str(d / "csr.engine"), "--device", "cpu"]) == 0
    assert main(["convert", str(d / "t.onnx"), "-o", str(d / "same.onnx"), "--runtime", "torch",
                 "--engine", str(d / "torch.engine"), "--device", "cpu"]) == 0
    return d


def verify(capsys, *argv):
    code = main(["verify", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_two_runtimes_pass_and_the_reported_errors_are_the_outputs(capsys, tmp_path, pruned):
    code, out, err = verify(capsys, pruned / "t.onnx", "--runtimes", "torch,csr", "--device", "cpu", "--batch", "3",
                            "--json", tmp_path / "r.json", "--save-outputs", tmp_path / "o.npz")
    assert code == 0, err
    assert out.count("PASSED") == 3 and "FAILED" not in out  # two rows and the verdict
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and [c["subject"] for c in report["checks"]] == ["torch", "csr"]
    saved = np.load(tmp_path / "o.npz")
    assert sorted(saved.files) == ["csr:logits", "input", "onnxruntime:logits", "torch:logits"]
    x = saved["input"]
    assert x.shape == (3, 3, 32, 32)
    import onnx

    ref = ort_run(onnx.load(str(pruned / "t.onnx")), x)[0]
    np.testing.assert_array_equal(saved["onnxruntime:logits"], ref)
    for check in report["checks"]:
        got = saved[f"{check['subject']}:logits"].astype(np.float64)
        diff = np.abs(got - ref)
        assert check["max_abs"] == pytest.approx(diff.max(), rel=1e-6, abs=1e-12)
        assert check["mean_abs"] == pytest.approx(diff.mean(), rel=1e-6, abs=1e-12)
        assert check["max_rel"] == pytest.approx(diff.max() / np.abs(ref).max(), rel=1e-6, abs=1e-12)
        assert check["rtol"] == 1e-4 and check["atol"] == 0 and check["max_rel"] < 1e-4
    # the saved file feeds --inputs again: the same inputs, the same numbers
    code, out, _ = verify(capsys, pruned / "t.onnx", "--runtimes", "csr", "--device", "cpu", "--inputs",
                          tmp_path / "o.npz", "--json", "-")
    again = json.loads(out)
    assert code == 0 and again["input_source"].endswith("o.npz")
    assert again["checks"][0]["max_abs"] == report["checks"][1]["max_abs"]


def _break_gemm(monkeypatch, offset: float):
    """Every Gemm of the shared executor adds `offset` to its output: tinyresnet's logits all move by it."""
    from sparsecnn.runtimes.ops import STANDARD_OPS

    good = STANDARD_OPS[("", "Gemm")]

    def broken(ctx):
        fn = good(ctx)
        return lambda *a: fn(*a) + offset

    monkeypatch.setitem(STANDARD_OPS, ("", "Gemm"), broken)


def test_a_wrong_engine_fails_with_exit_1_and_the_error_it_has(capsys, tmp_path, pruned, monkeypatch):
    _break_gemm(monkeypatch, 0.5)
    code, out, err = verify(capsys, pruned / "t.onnx", "--device", "cpu", "--json", tmp_path / "r.json")
    assert code == 1, err
    assert "FAILED: torch logits: max abs 5.00e-01" in out
    check = json.loads((tmp_path / "r.json").read_text())["checks"][0]
    assert not check["passed"]
    assert check["max_abs"] == pytest.approx(0.5, abs=1e-5) and check["mean_abs"] == pytest.approx(0.5, abs=1e-5)


def test_a_tolerance_wide_enough_passes_the_same_error(capsys, pruned, monkeypatch):
    _break_gemm(monkeypatch, 1e-3)
    code, out, _ = verify(capsys, pruned / "t.onnx", "--device", "cpu", "--json", "-")
    assert code == 1
    ref_max = json.loads(out)["checks"][0]["ref_max"]
    assert verify(capsys, pruned / "t.onnx", "--device", "cpu", "--atol", "0.0011")[0] == 0
    assert verify(capsys, pruned / "t.onnx", "--device", "cpu", "--rtol", str(1.1e-3 / ref_max))[0] == 0
    assert verify(capsys, pruned / "t.onnx", "--device", "cpu", "--rtol", str(0.9e-3 / ref_max))[0] == 1


def test_only_the_broken_runtime_fails(capsys, pruned, monkeypatch):
    """csr's CPU path (the CSR reference conv) doubles its output; torch, on standard ops, still passes."""
    import sparsecnn.passes.csr.reference as csr_reference

    good = csr_reference.reference_csr_conv
    monkeypatch.setattr(csr_reference, "reference_csr_conv", lambda *a, **k: 2 * good(*a, **k))
    code, out, _ = verify(capsys, pruned / "t.onnx", "--runtimes", "torch,csr", "--device", "cpu")
    assert code == 1
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("torch ", "csr "))}
    assert rows["torch"].endswith("PASSED") and rows["csr"].endswith("FAILED")
    assert out.strip().splitlines()[-1].startswith("FAILED: csr logits")


def test_saved_engines(capsys, pruned, monkeypatch):
    # a torch engine keeps the pruned ONNX as it is: it is its own reference
    code, out, _ = verify(capsys, pruned / "torch.engine")
    assert code == 0 and "on torch.engine's model" in out
    # a csr engine holds custom ops: its reference is the file it was built from
    code, out, _ = verify(capsys, pruned / "csr.engine", "--onnx", pruned / "t.onnx")
    assert code == 0 and "csr " in out
    _break_gemm(monkeypatch, 0.5)  # the engine is rebuilt on load: the broken op is in it
    assert verify(capsys, pruned / "torch.engine")[0] == 1


@pytest.mark.parametrize("argv,match", [
    (["csr.engine"], "give --onnx FILE"),
    (["csr.engine", "--onnx", "t.onnx", "--runtimes", "csr"], "saved engine: it runs as it was built, so --runtimes"),
    (["t.onnx", "--onnx", "t.onnx"], "drop --onnx"),
    (["t.onnx", "--runtimes", "torch,nosuch"], "unknown runtime 'nosuch'"),
    (["t.onnx", "--runtimes", ","], "names no runtime"),
    (["t.onnx", "--option", "no_such_option=1"], "no_such_option"),
    (["t.onnx", "--inputs", "missing.npz"], "inputs file not found"),
    (["t.onnx", "--inputs", "t.onnx"], "must name an .npz"),
    (["t.onnx", "--save-outputs", "o.txt"], "must name an .npz"),
    (["t.onnx", "--atol", "-1"], "must be a finite number >= 0"),
    (["t.onnx", "--rtol", "nan"], "must be a finite number >= 0"),
])
def test_user_errors_are_one_line_exit_2(capsys, pruned, monkeypatch, argv, match):
    monkeypatch.chdir(pruned)
    try:
        code = main(["verify", *argv, "--device", "cpu"] if "engine" not in argv[0] else ["verify", *argv])
    except SystemExit as exc:  # argparse's type errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err


def test_random_inputs_take_a_fixed_batch_and_another_batch_is_one_line(capsys, tmp_path, pruned):
    """A file exported with a fixed batch: random inputs are drawn at it; --batch 3 was drawn anyway,
    the engines ran it and ONNX Runtime's cut-off 'invalid dimensions' message ended the run."""
    import onnx

    model = onnx.load(str(pruned / "t.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(tmp_path / "b2.onnx"))
    code, out, _ = verify(capsys, tmp_path / "b2.onnx", "--device", "cpu")
    assert code == 0 and "'input' [2, 3, 32, 32]" in out
    code, _, err = verify(capsys, tmp_path / "b2.onnx", "--device", "cpu", "--batch", "3")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "sparsecnn verify: error: b2.onnx: input 'input' has a fixed batch of 2; drop --batch 3, or export "
        "the model with a dynamic batch axis") and "Traceback" not in err


def test_input_shape_sizes_random_inputs_of_a_file_with_open_height_and_width(capsys, tmp_path, pruned):
    """An ONNX file from elsewhere with dynamic H and W and no stored spec: verify could only ask for an .npz."""
    import onnx

    model = onnx.load(str(pruned / "t.onnx"))
    del model.metadata_props[:]  # no stored input spec, as a file from torch.onnx.export
    for i, name in ((2, "h"), (3, "w")):
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = name
    onnx.save(model, str(tmp_path / "hw.onnx"))
    code, _, err = verify(capsys, tmp_path / "hw.onnx", "--device", "cpu")
    assert code == 2 and "has no fixed size" in err and "--input-shape CxHxW" in err
    code, out, _ = verify(capsys, tmp_path / "hw.onnx", "--device", "cpu", "--input-shape", "3x24x40")
    assert code == 0 and "'input' [1, 3, 24, 40]" in out
    code, out, _ = verify(capsys, tmp_path / "hw.onnx", "--device", "cpu", "--input-shape", "2x3x16x16")
    assert code == 0 and "'input' [2, 3, 16, 16]" in out
    code, _, err = verify(capsys, tmp_path / "hw.onnx", "--device", "cpu", "--input-shape", "1x24x24")
    assert code == 2 and "differs from its fixed sizes" in err and "Traceback" not in err
    np.savez(tmp_path / "x.npz", input=np.zeros((1, 3, 16, 16), np.float32))
    code, _, err = verify(capsys, tmp_path / "hw.onnx", "--device", "cpu", "--input-shape", "3x16x16",
                          "--inputs", tmp_path / "x.npz")
    assert code == 2 and "drop one" in err


def test_opset_given_with_an_onnx_file_converts_it_as_convert_does(capsys, tmp_path, pruned):
    """verify and inspect took --opset and ignored it for an ONNX file; convert converted it."""
    assert main(["convert", "tinynet", "--opset", "13", "--prune", "0.5", "-o", str(tmp_path / "t13.onnx")]) == 0
    code, out, err = verify(capsys, tmp_path / "t13.onnx", "--device", "cpu", "--opset", "17")
    assert code == 0 and "converting t13.onnx to opset 17" in err and "PASSED" in out
    assert main(["check-jetson", str(tmp_path / "t13.onnx"), "--opset", "13"]) == 2  # checks the file as it is
    assert "convert it first" in capsys.readouterr().err


def test_a_runtime_not_available_here_fails_before_the_model_is_built(capsys, monkeypatch):
    import sparsecnn.converter.source as source
    import sparsecnn.runtimes.csr.runtime as csr

    monkeypatch.setattr(csr, "available", lambda: (False, "switched off by the test"))
    monkeypatch.setattr(source, "load_source", lambda *a, **k: pytest.fail("the model was built"))
    code, _, err = verify(capsys, "tinynet", "--runtimes", "torch,csr", "--device", "cpu")
    assert code == 2 and err.strip() == ("sparsecnn verify: error: runtime 'csr' is not available here: "
                                         "switched off by the test")


def test_library_reports_nan_and_shape_mismatch_as_failures():
    from sparsecnn.converter.verify import compare_output

    ref = np.array([[1.0, -2.0, 4.0]])  # float64: the additions below are exact enough to test bounds
    ok = compare_output("x", "y", ref + 1e-5, ref, 0.0, 1e-4)
    assert ok.passed and ok.max_rel == pytest.approx(1e-5 / 4, rel=1e-6) and ok.max_abs == pytest.approx(1e-5)
    assert not compare_output("x", "y", ref + 1e-3, ref, 0.0, 1e-4).passed  # 2.5e-4 > 1e-4
    assert compare_output("x", "y", ref + 1e-3, ref, 1e-3 + 1e-9, 0.0).passed  # atol alone
    assert not compare_output("x", "y", ref + 1e-3, ref, 1e-3 - 1e-9, 0.0).passed
    nan = ref.copy()
    nan[0, 1] = np.nan
    assert not compare_output("x", "y", nan, ref, 1.0, 1.0).passed
    wrong = compare_output("x", "y", ref[:, :2], ref, 1.0, 1.0)
    assert not wrong.passed and "shape [1, 2], reference [1, 3]" in wrong.note
    assert not compare_output("x", "y", None, ref, 1.0, 1.0).passed
    zeros = np.zeros((2, 2), np.float32)
    assert compare_output("x", "y", zeros, zeros, 0.0, 1e-4).passed  # exact zeros match at atol 0
