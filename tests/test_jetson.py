"""The Jetson path: TensorRT 8.2 compatibility check, roofline estimate, the Python-3.6 deploy script."""
import ast
import functools
import glob
import io
import json
import os
import shutil
import subprocess
import tokenize
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsecnn.converter.cli import main
from sparsecnn.passes.jetson import check_trt82
from sparsecnn.passes.prune import prune_2to4
from sparsecnn.common.peaks import BOARDS
from sparsecnn.passes.roofline import estimate
from sparsecnn.passes.two_four.layout import rewrite_2to4

ROOT = Path(__file__).resolve().parents[1]
PY36_FILES = [ROOT / "scripts" / "jetson_deploy.py", ROOT / "runtimes" / "tensorrt" / "trt_compat.py"]


@functools.lru_cache(maxsize=None)
def _export13(name: str) -> bytes:
    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models import load_model

    module, spec, entry = load_model(name)
    return export_onnx(module, spec, entry.exclude, opset=13).SerializeToString()


def test_check_flags_an_opset17_model(exported):
    report = check_trt82(exported("resnet18"))
    assert not report.ok
    errors = [f.what for f in report.findings if f.level == "error"]
    assert len(errors) == 1 and "opset 17" in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg19", "trafficcamnet"])
def test_check_passes_the_opset13_exports(name):
    model = onnx.load_model_from_string(_export13(name))
    report = check_trt82(model)
    assert report.ok, report.format()
    assert report.opset == 13 and report.ir_version == 7
    assert not report.findings
    if name != "vgg19":  # pruning changes values only; the op list stays what TensorRT 8.2 reads
        assert check_trt82(prune_2to4(model).model).ok


def test_check_flags_custom_ops_unknown_ops_and_maxpool_indices():
    model = prune_2to4(onnx.load_model_from_string(_export13("resnet18"))).model
    report = check_trt82(rewrite_2to4(model).model)
    assert not report.ok and any("sparsecnn::Conv2to4" in f.what for f in report.findings)
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["nz"]),
         helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1, 3, 3]),
         helper.make_tensor_value_info("nz", TensorProto.INT64, [4, None])])
    report = check_trt82(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10))
    whats = " | ".join(f.what for f in report.findings if f.level == "error")
    assert "NonZero" in whats and "Indices" in whats


def test_check_jetson_cli_exit_status_and_fp16_copy(capsys, tmp_path):
    assert main(["check-jetson", "tinyresnet"]) == 1
    assert "FAIL" in capsys.readouterr().out
    out = tmp_path / "h.onnx"
    assert main(["check-jetson", "tinyresnet", "--opset", "13", "--roofline", "--summary",
                 "--write-fp16", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and text.count("ROOFLINE ESTIMATE, not a measurement") == 2
    half = onnx.load(str(out))
    assert {t.data_type for t in half.graph.initializer if len(t.dims) == 4} == {TensorProto.FLOAT16}


# --- roofline ----------------------------------------------------------------------------------

def _one_conv(cout=64, cin=64, hw=28, sparse=True):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    if sparse:
        w.reshape(cout, cin // 4, 4, 9)[:, :, :2, :] = 0  # zero 2 of every 4 input channels
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, hw, hw])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def test_roofline_of_one_conv_by_hand():
    model = _one_conv()
    flops = 2 * 64 * 64 * 9 * 28 * 28 * 4  # batch 4
    act = 2 * (4 * 64 * 28 * 28) * 2  # fp16 in + out
    w_dense, w_sparse = 2 * 64 * 64 * 9, 64 * 64 * 9 + 64 * 64 * 9 // 8
    orin, nano = BOARDS["orin-nano"], BOARDS["nano"]
    est = estimate(model, orin, batch=4)
    row = est["layers"][0]
    assert row["flops"] == flops and row["dense_bytes"] == act + w_dense and row["sparse_bytes"] == act + w_sparse
    want_dense = max(flops / 10e12, (act + w_dense) / 68e9) * 1e3
    want_sparse = max(flops / 20e12, (act + w_sparse) / 68e9) * 1e3
    assert row["dense_ms"] == pytest.approx(want_dense) and row["sparse_ms"] == pytest.approx(want_sparse)
    assert est["label"].startswith("ESTIMATE")
    on_nano = estimate(model, nano, batch=4)
    assert on_nano["sparse_ms"] == on_nano["dense_ms"]  # no sparse tensor cores on sm_53
    assert on_nano["dense_ms"] == pytest.approx(max(flops / 0.472e12, (act + w_dense) / 25.6e9) * 1e3)
    dense_model = estimate(_one_conv(sparse=False), orin, batch=4)
    assert dense_model["sparse_ms"] == dense_model["dense_ms"]


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_every_board_has_sourced_peaks_and_says_where_sparsity_applies(board):
    from sparsecnn.passes.jetson import board_runtimes, toolkit_runs_on

    b = BOARDS[board]
    assert b.source and b.jetpack and b.python and b.fp16_dense_tflops > 0 and b.dram_gbs > 0
    orin = b.sm == "sm_87"
    # 2:4 sparse tensor cores and the toolkit itself (JetPack 6, Python 3.10): Orin only
    assert (b.fp16_sparse_tflops is not None) == orin and toolkit_runs_on(b) == orin
    assert b.tensor_cores == (b.sm in ("sm_72", "sm_87"))
    fits = {f.runtime: f for f in board_runtimes(b)}
    assert fits["tensorrt"].applies and ("sparse tensor cores (SPARSE" in fits["tensorrt"].why) == orin
    assert fits["cusparselt"].applies == orin and fits["csr"].applies == orin and not fits["minkowski"].applies
    assert b.sm in fits["csr"].why


def test_check_jetson_board_prints_runtimes_kernels_estimate_and_limits(capsys):
    assert main(["check-jetson", "tinynet", "--opset", "13", "--board", "xavier-nx", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "Jetson Xavier NX 8GB (sm_72" in out and "ROOFLINE ESTIMATE" in out
    assert "sm_72: CSR kernels with staging by plain loads" in out  # no cp.async before sm_80
    assert "what the estimate cannot predict:" in out and "Jetson Orin" not in out
    assert main(["check-jetson", "tinynet", "--opset", "13", "--board", "all", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["board"]["name"] for e in data["roofline"]] == [b.name for b in BOARDS.values()]
    assert data["boards"]["orin-nano"]["kernels"]["csr"].startswith("sm_87: CSR kernels with cp.async staging")
    assert data["cannot_predict"]


# --- the deploy script under Python 3.6 ----------------------------------------------------------

NEWER_THAN_36 = {  # names whose use needs Python 3.7+
    "dataclasses", "nullcontext", "cached_property", "removeprefix", "removesuffix", "capture_output", "prod",
    "isqrt", "Literal", "Protocol", "TypedDict", "Final", "breakpoint", "perf_counter_ns", "time_ns",
    "monotonic_ns", "resources", "metadata", "get_running_loop", "to_thread", "zip_longest_strict",
}


def py36_problems(src: str) -> list[str]:
    """Python >= 3.7 features that `ast.parse(feature_version=(3, 6))` does not catch by itself."""
    problems = []
    try:
        tree = ast.parse(src, feature_version=(3, 6))
    except SyntaxError as exc:  # walrus, positional-only, f"{x=}" (on this Python's parser)
        return [f"line {exc.lineno}: {exc.msg}"]
    for node in ast.walk(tree):
        if isinstance(node, ast.NamedExpr):
            problems.append(f"line {node.lineno}: walrus")
        if isinstance(node, ast.arguments) and node.posonlyargs:
            problems.append("positional-only parameters")
        if isinstance(node, ast.ImportFrom) and node.module == "__future__" and any(a.name == "annotations" for a in node.names):
            problems.append("from __future__ import annotations (3.7+)")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(m.split(".")[0] == "dataclasses" or m in ("importlib.resources", "importlib.metadata") for m in mods) \
                    or (isinstance(node, ast.ImportFrom) and any(a.name in NEWER_THAN_36 for a in node.names)):
                problems.append(f"line {node.lineno}: imports {mods}")
        if isinstance(node, ast.Attribute) and node.attr in NEWER_THAN_36:
            problems.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.Name) and node.id in NEWER_THAN_36:
            problems.append(f"line {node.lineno}: {node.id}")
        if isinstance(node, ast.keyword) and node.arg in ("capture_output", "text"):
            problems.append(f"line {node.lineno}: {node.arg}= (3.7+)")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.arg, ast.AnnAssign)):
            ann = node.returns if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else node.annotation
            if ann is not None:
                for sub in ast.walk(ann):
                    if isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name) and sub.value.id in (
                            "list", "dict", "tuple", "set", "type", "frozenset"):
                        problems.append(f"line {node.lineno}: builtin generic {sub.value.id}[...] in an annotation")
                    if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                        problems.append(f"line {node.lineno}: X | Y in an annotation")
    # f"{x=}" (3.8) survives in the token stream only.
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.STRING and tok.string.lstrip("rRbB").lower().startswith(("f", "rf", "fr")):
            body = tok.string
            depth, i = 0, 0
            while i < len(body):
                ch = body[i]
                if ch == "{":
                    if body[i + 1:i + 2] == "{":
                        i += 2
                        continue
                    depth += 1
                elif ch == "}" and depth:
                    depth -= 1
                elif ch == "=" and depth and body[i + 1:i + 2] in ("}", "!", ":") and body[i - 1] not in "=!<>":
                    problems.append(f"line {tok.start[0]}: f-string '=' specifier")
                i += 1
    return problems


@pytest.mark.parametrize("snippet", [
    "(y := 1)", "def f(a, /, b): pass", "x = 1\ns = f'{x=}'", "import dataclasses", "from __future__ import annotations",
    "def g(v: list[int]): pass", "def g(v) -> int | None: pass", "import math\nmath.prod([1])",
    "import subprocess\nsubprocess.run(['ls'], capture_output=True)", "from contextlib import nullcontext",
])
def test_the_py36_checker_catches_each_newer_feature(snippet):
    assert py36_problems(snippet), snippet


def test_the_py36_checker_passes_plain_36_code():
    assert py36_problems("x = 1\ns = f'{x}' + f'{x:>4}' + f'{x!r}' + f'{x == 1}'\nclass A(object): pass\n") == []


@pytest.mark.parametrize("path", PY36_FILES, ids=lambda p: p.name)
def test_deploy_files_are_python36_compatible(path):
    assert py36_problems(path.read_text(encoding="utf-8")) == []


def _python36():
    """A working Python 3.6 interpreter, if this machine has one (pyenv's shims may not run)."""
    cands = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")))
    if shutil.which("python3.6"):
        cands.append(shutil.which("python3.6"))
    for cand in cands:
        try:
            ok = subprocess.run([cand, "-c", "import sys; assert sys.version_info[:2] == (3, 6)"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cand
    return None


@pytest.mark.skipif(_python36() is None, reason="no python3.6 interpreter here; the AST checks above still ran")
def test_deploy_script_compiles_and_shows_help_under_a_real_python36(tmp_path):
    py36 = _python36()
    for path in PY36_FILES:
        res = subprocess.run([py36, "-m", "py_compile", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert res.returncode == 0, res.stderr.decode()
    res = subprocess.run([py36, str(PY36_FILES[0]), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert res.returncode == 0, res.stderr.decode()
    assert b"--ref" in res.stdout
    code = ("import sys; sys.path.insert(0, %r); import trt_compat as t; "
            "assert t.build_settings((8, 2, 1), 'fp16')['exec_api'] == 'execute_async_v2'; "
            "print(t.parse_sparsity_log(['(Sparsity) Layers eligible for sparse math: a, b']))") % str(PY36_FILES[1].parent)
    res = subprocess.run([py36, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert res.returncode == 0, res.stderr.decode()
    assert b"'eligible': ['a', 'b']" in res.stdout


def test_run_save_inputs_writes_the_reference_the_deploy_script_reads(capsys, tmp_path):
    ref = tmp_path / "ref.npz"
    assert main(["run", "tinynet", "--random", "--batch", "2", "--save-inputs", "-o", str(ref)]) == 0
    data = np.load(ref)
    assert set(data.files) == {"input", "logits"}
    assert data["input"].shape == (2, 3, 32, 32) and data["logits"].shape == (2, 10)
