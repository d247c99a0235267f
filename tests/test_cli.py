import os
import pickle
import subprocess
import sys

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sparsecnn.converter.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for verb in ("convert", "run", "inspect", "doctor"):
        assert verb in text


def test_doctor_on_a_machine_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 0
    assert "gpu           none" in out
    assert "torch        available" in out


def test_convert_2to4_then_inspect_then_run(capsys, tmp_path):
    out_file = tmp_path / "t.onnx"
    code, out, err = run_cli(capsys, "convert", "tinyresnet", "--prune", "2:4", "-o", str(out_file))
    assert code == 0 and out_file.is_file()
    assert "8 prunable layers at sparsity 0.5000, 8 layers 2:4" in out
    code, out, _ = run_cli(capsys, "inspect", str(out_file), "--json")
    assert code == 0 and '"two_four_layers"' in out
    code, out, _ = run_cli(capsys, "run", str(out_file), "--batch", "2", "-o", str(tmp_path / "o.npz"))
    assert code == 0 and (tmp_path / "o.npz").is_file()
    assert out.count("input ") == 2


def test_convert_writes_an_engine_that_run_loads(capsys, tmp_path):
    onnx_file, engine_file = tmp_path / "t.onnx", tmp_path / "t.engine"
    code, _, _ = run_cli(capsys, "convert", "tinynet", "--prune", "0.8", "-o", str(onnx_file),
                         "--runtime", "torch", "--engine", str(engine_file), "--device", "cpu")
    assert code == 0 and engine_file.is_file()
    code, out, _ = run_cli(capsys, "run", str(engine_file), "--device", "cpu")
    assert code == 0 and "ran torch on cpu" in out


def test_run_classifies_an_image_file(capsys, tmp_path):
    from PIL import Image

    img = tmp_path / "pic.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    code, out, _ = run_cli(capsys, "run", "tinynet", "--input", str(img), "--topk", "3", "--device", "cpu")
    assert code == 0
    picks = [line for line in out.splitlines() if line.startswith("pic.png:")]
    assert len(picks) == 1 and picks[0].count(",") == 2  # its top 3 classes


def _unsupported_op_onnx(path):
    node = helper.make_node("Hardmax", ["x"], ["y"], name="odd_node")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _bad_inputs(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.zeros(2)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    pickled = tmp_path / "object.pt"
    with open(pickled, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    unsupported = tmp_path / "unsupported.onnx"
    _unsupported_op_onnx(unsupported)
    return {
        "unknown model": (["convert", "resnet99"], "unknown model 'resnet99'"),
        "truncated checkpoint": (["convert", "resnet18", "--weights", str(truncated)], "corrupt or truncated"),
        "pickle not a state dict": (["convert", "resnet18", "--weights", str(pickled)], "not a plain state dict"),
        "unsupported op": (["run", str(unsupported), "--device", "cpu"], "odd_node"),
        "sparsity 1.0": (["convert", "tinynet", "--prune", "1.0"], "[0, 1)"),
        "sparsity negative": (["convert", "tinynet", "--prune", "-0.5"], "[0, 1)"),
        "missing input file": (["run", "tinynet", "--input", str(tmp_path / "nope.png")], "input not found"),
        "missing onnx": (["inspect", str(tmp_path / "nope.onnx")], "not found"),
        "missing checkpoint": (["convert", "resnet18", "--weights", str(tmp_path / "nope.pt")], "not found"),
        "option not key=value": (["run", "tinynet", "--device", "cpu", "--option", "csr_weight_budget"],
                                 "not KEY=VALUE"),
    }


@pytest.mark.parametrize("case", [
    "unknown model", "truncated checkpoint", "pickle not a state dict", "unsupported op", "sparsity 1.0",
    "sparsity negative", "missing input file", "missing onnx", "missing checkpoint", "option not key=value"])
def test_bad_input_gets_one_line_nonzero_exit_no_output(capsys, tmp_path, case):
    argv, expected = _bad_inputs(tmp_path)[case]
    out_file = tmp_path / "out.onnx"
    if argv[0] == "convert":
        argv = argv + ["-o", str(out_file)]
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err and "this must never run" not in out
    assert not out_file.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_report_with_non_ascii_characters_prints_on_an_ascii_terminal(tmp_path):
    # an ASCII stdout (LC_ALL=C without UTF-8 mode does the same): the layer table's en dash must not end
    # the command with a UnicodeEncodeError once the engine is written
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    proc = subprocess.run([sys.executable, "-m", "sparsecnn.converter.cli", "convert", "tinynet", "--prune", "0.5",
                           "-o", "t.onnx", "--runtime", "torch", "--engine", "t.engine"],
                          capture_output=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode("ascii", "replace")[-2000:]
    proc.stdout.decode("ascii")  # escaped, not raw UTF-8
    assert b"\\u2013" in proc.stdout and (tmp_path / "t.engine").exists()


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsecnn.converter.cli", "convert", "nosuchnet"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
