"""`sparsecnn bench`: the whole harness on tiny nets (CPU), its JSON, its tables and its plots."""
import json
import math
import re
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from sparsecnn.converter.cli import main

# The JSON contract, written here independently of the code: key -> type (or a nested schema).
NUMBER = (int, float)
TIMING = {"median_ms": NUMBER, "p90_ms": NUMBER, "min_ms": NUMBER, "reps": int, "inner": int, "how": str}
NETWORK_ROW = {"model": str, "regime": str, "batch": int, "engine": str, "kind": str, "median_ms": NUMBER,
               "p90_ms": NUMBER, "spread": NUMBER, "timings": [TIMING], "speedup_vs_eager": NUMBER,
               "speedup_vs_best_dense": NUMBER, "best_dense_engine": str, "best_dense_ms": NUMBER}
LAYER_ROW = {"name": str, "op": str, "ms": NUMBER, "p90_ms": NUMBER, "timed": str, "matched": list,
             "accelerated": bool}
BOUND = {"share": NUMBER, "dense_sum_ms": NUMBER, "sum_ms": NUMBER, "accelerated_layers": int,
         "predicted_speedup": NUMBER}
GEMM_ROW = {"method": str, "regime": str, "M": int, "K": int, "N": int, "sparsity": NUMBER}
SCHEMA = {"schema": str, "version": int,
          "env": {"card": str, "torch": str, "python": str, "device": str, "time": str},
          "settings": {"models": [str], "regimes": [str], "batches": [int], "prunes": [str], "runtimes": [str]},
          "networks": [NETWORK_ROW],
          "layers": [{"model": str, "engine": str, "reference": str, "rows": [LAYER_ROW], "bound": BOUND}],
          "models": dict, "gemm": {"settings": dict, "rows": [GEMM_ROW], "errors": list},
          "summary": [{"model": str, "engine": str, "median_ms": NUMBER, "speedup_vs_best_dense": NUMBER}],
          "errors": list, "files": [str]}


def check_schema(value, schema, path="$"):
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{path}: expected an object"
        for key, sub in schema.items():
            assert key in value, f"{path}.{key} missing"
            check_schema(value[key], sub, f"{path}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list) and value, f"{path}: expected a non-empty list"
        for i, item in enumerate(value):
            check_schema(item, schema[0], f"{path}[{i}]")
    elif schema is bool:
        assert isinstance(value, bool), f"{path}: {value!r} is not a bool"
    else:
        assert isinstance(value, schema) and not isinstance(value, bool), f"{path}: {value!r} is not {schema}"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--quick", "spmm", "-o", str(out), "--no-progress"])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text(encoding="utf-8"))


def test_quick_json_follows_the_schema(quick):
    _, result = quick
    check_schema(result, SCHEMA)
    assert result["schema"] == "sparsecnn-bench" and result["version"] == 1


def test_quick_covers_every_configuration_and_both_baselines(quick):
    _, result = quick
    st = result["settings"]
    got = {(r["model"], r["regime"], r["batch"], r["engine"]) for r in result["networks"] if "median_ms" in r}
    for model in st["models"]:
        for regime in st["regimes"]:
            for batch in st["batches"]:
                for engine in ("eager", "torch cuDNN", "best dense", "torch @ 0.9"):
                    assert (model, regime, batch, engine) in got
    for r in result["networks"]:
        assert len(r["timings"]) == 2  # timed twice, for the spread
        a, b = r["timings"][0]["median_ms"], r["timings"][1]["median_ms"]
        assert r["spread"] == pytest.approx(abs(a - b) / min(a, b))
        # the best dense time is the fastest dense engine of the same configuration
        same = [x for x in result["networks"] if (x["model"], x["regime"], x["batch"]) == (r["model"], r["regime"], r["batch"])]
        assert r["best_dense_ms"] == min(x["median_ms"] for x in same if x["kind"] == "dense")
        eager = next(x["median_ms"] for x in same if x["kind"] == "eager")
        assert r["speedup_vs_eager"] == pytest.approx(eager / r["median_ms"])


def test_dense_engines_agree_with_eager(quick):
    _, result = quick
    for r in result["networks"]:
        if r["kind"] == "dense":
            assert r["rel_err"] < (5e-3 if r["regime"] == "fp16" else 1e-5), r


def test_per_layer_rows_sum_to_about_the_layer_table_and_name_the_best_dense_choice(quick):
    _, result = quick
    best = [e for e in result["layers"] if e["engine"] == "best dense"]
    assert best
    for e in best:
        convs = [r for r in e["rows"] if r["op"] == "Conv"]
        assert convs and all(r["speedup"] == pytest.approx(1.0) for r in convs)  # compared with itself
        for r in convs:
            (choice,) = r["choices"].values()
            assert choice["chosen"] in choice["ms"]
        assert e["bound"]["dense_sum_ms"] == pytest.approx(sum(r["ms"] for r in e["rows"]))


def test_gemm_sweep_checks_every_method_against_fp64(quick):
    _, result = quick
    rows = result["gemm"]["rows"]
    shapes = {(r["M"], r["K"], r["N"]) for r in rows}
    assert len(shapes) == 3
    for r in rows:
        if r["method"] in ("cublas", "cusparse") and r["regime"] == "fp32-cuda-core":
            assert r["ok"] and r["rel_err"] < 1e-5
            assert r["median_ms"] > 0
    # cuBLAS is timed once per shape and regime: same number at every sparsity
    cublas = {}
    for r in rows:
        if r["method"] == "cublas" and "median_ms" in r:
            cublas.setdefault((r["M"], r["K"], r["N"], r["regime"]), set()).add(r["median_ms"])
    assert all(len(v) == 1 for v in cublas.values())


def test_markdown_has_every_table(quick):
    out, result = quick
    md = (out / "bench.md").read_text(encoding="utf-8")
    for heading in ("## Whole network", "## Why (no) speedup", "## Per layer", "## GEMM sweep", "## Summary"):
        assert heading in md
    assert result["env"]["card"] in md
    assert md.count("| tinynet |") >= 8


def _axes_with_content(fig):
    out = []
    for ax in fig.axes:
        if not ax.axison:
            continue
        has_data = bool(ax.lines) or any(p.get_height() > 0 for p in ax.patches if hasattr(p, "get_height"))
        out.append((ax, has_data))
    return out


@pytest.mark.parametrize("which", ["gemm", "layers", "summary"])
def test_plots_have_data_and_labelled_units(quick, which):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from sparsecnn.converter import bench_report

    _, result = quick
    fig = {"gemm": lambda: bench_report.plot_gemm_speedup(result["gemm"]),
           "layers": lambda: bench_report.plot_layers(result),
           "summary": lambda: bench_report.plot_summary(result)}[which]()
    axes = _axes_with_content(fig)
    assert axes
    for ax, has_data in axes:
        assert has_data, ax.get_title()
        # x labelled here or on the panel it shares its x axis with
        assert ax.get_xlabel() or any(s.get_xlabel() for s in ax.get_shared_x_axes().get_siblings(ax))
        assert "(" in ax.get_ylabel() and ")" in ax.get_ylabel()  # a unit: (ms), (×)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_png_files_are_real_images_with_content(quick):
    from PIL import Image

    out, result = quick
    pngs = [f for f in result["files"] if f.endswith(".png")]
    assert {"gemm_speedup.png", "summary.png", "layers_tinynet.png"} <= set(pngs)
    for name in pngs:
        img = np.asarray(Image.open(out / name).convert("L"), dtype=np.float32)
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert img.std() > 10  # not a blank canvas
        assert (img < 100).mean() > 0.005  # some dark ink: text, lines, bars


def test_report_only_rerenders_with_an_accuracy_file(quick, tmp_path):
    out, _ = quick
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"rows": [
        {"model": "tinynet", "prune": "none", "top1": 91.5},
        {"model": "tinynet", "sparsity": 0.9, "accuracy": 0.80, "stage": "one-shot"},
        {"model": "tinynet", "sparsity": 0.9, "accuracy": 0.88, "fine_tuned": True},
    ]}))
    again = tmp_path / "again"
    assert main(["bench", "--report-only", str(out / "bench.json"), "--accuracy", str(acc), "-o", str(again)]) == 0
    result = json.loads((again / "bench.json").read_text(encoding="utf-8"))
    by = {(r["model"], r["prune"], r["engine"], r["regime"], r["batch"]): r for r in result["summary"]}
    assert by[("tinynet", "none", "best dense", "fp16", 1)]["top1"] == pytest.approx(0.915)
    assert by[("tinynet", "0.9", "torch @ 0.9", "fp16", 1)]["top1"] == pytest.approx(0.88)  # fine-tuned wins
    assert by[("tinyresnet", "none", "best dense", "fp16", 1)]["top1"] is None
    assert "91.5%" in (again / "bench.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("argv,needle", [
    (["--regimes", "fp8"], "unknown regime"),
    (["--batch", "0"], "positive"),
    (["--runtimes", "nosuch"], "unknown runtime"),
    (["--prune", "1.5"], "sparsity"),
    (["--dense", "winograd"], "unknown dense engine"),
    (["--accuracy", "/nonexistent.json"], "accuracy file not found"),
    (["--gemm-shapes", "resnet50"], "add the word spmm"),  # would be ignored without the sweep
    (["--gemm", "--gemm-shapes", ","], "names no shape set"),
])
def test_bad_options_are_one_line_user_errors(capsys, tmp_path, argv, needle):
    code = main(["bench", "tinynet", "-o", str(tmp_path), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bench.json").exists()


# --- per-layer matching and the Amdahl bound, with a fused sparse op -----------------------------

def test_match_layers_maps_a_fused_op_to_the_chain_it_replaces():
    from sparsecnn.converter.bench import layer_comparison, match_layers

    dense = [{"name": "conv", "op": "Conv", "ms": 3.0, "inputs": ["x", "w"], "outputs": ["c"]},
             {"name": "relu", "op": "Relu", "ms": 1.0, "inputs": ["c"], "outputs": ["r"]},
             {"name": "pool", "op": "MaxPool", "ms": 1.0, "inputs": ["r"], "outputs": ["p"]},
             {"name": "fc", "op": "Gemm", "ms": 5.0, "inputs": ["p", "fw"], "outputs": ["y"]}]
    sparse = [{"name": "fused", "op": "sparsecnn::ConvRelu", "ms": 1.0, "inputs": ["x", "vals"], "outputs": ["r"]},
              {"name": "pool", "op": "MaxPool", "ms": 1.0, "inputs": ["r"], "outputs": ["p"]},
              {"name": "fc", "op": "Gemm", "ms": 5.0, "inputs": ["p", "fw"], "outputs": ["y"]},
              {"name": "new", "op": "Relu", "ms": 1.0, "inputs": ["y"], "outputs": ["z"]}]
    assert match_layers(dense, sparse) == [[0, 1], [2], [3], []]
    rows, bound = layer_comparison(dense, sparse)
    assert rows[0]["dense_ms"] == 4.0 and rows[0]["speedup"] == 4.0 and rows[0]["accelerated"]
    assert not rows[1]["accelerated"] and rows[3]["dense_ms"] is None
    assert bound["share"] == pytest.approx(0.4)               # 4 of 10 ms are in accelerated layers
    assert bound["amdahl_max_speedup"] == pytest.approx(10 / 6)
    assert bound["accelerated_speedup"] == pytest.approx(4.0)
    assert bound["predicted_speedup"] == pytest.approx(10 / 8)  # its steps add up to 8 ms


FUSED_DOMAIN = "sparsecnn"


def _fuse_conv_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Conv whose only consumer is a Relu becomes one sparsecnn::TestConvRelu node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    new_nodes, drop = [], set()
    for n in g.node:
        if id(n) in drop:
            continue
        cons = consumers.get(n.output[0], [])
        if n.op_type == "Conv" and len(cons) == 1 and cons[0].op_type == "Relu":
            fused = helper.make_node("TestConvRelu", list(n.input), list(cons[0].output), name=n.name + "_relu",
                                     domain=FUSED_DOMAIN)
            fused.attribute.extend(n.attribute)
            new_nodes.append(fused)
            drop.add(id(cons[0]))
        else:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    out.opset_import.add(domain=FUSED_DOMAIN, version=1)
    return out


def _fake_runtime_module():
    from sparsecnn.runtimes.base import CompileOptions, Engine
    from sparsecnn.runtimes.executor import Executor
    from sparsecnn.runtimes.ops import STANDARD_OPS

    mod = types.ModuleType("fake_sparse_runtime")
    mod.name = "fakesparse"
    mod.available = lambda: (True, "test double")
    mod.rewrite = lambda model, options=None: _fuse_conv_relu(model)

    def conv_relu(ctx):
        conv = STANDARD_OPS[("", "Conv")](ctx)
        ctx.info.update(kernel="test fused conv+relu", format="csr")
        return lambda *args: torch.relu(conv(*args))

    class FakeEngine(Engine):
        runtime = "fakesparse"

    def compile(model, device="cpu", options=None, state=None):
        opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
        ex = Executor(model, device, opts.dtype, ops={(FUSED_DOMAIN, "TestConvRelu"): conv_relu}, options=opts.extra)
        return FakeEngine(model, device, opts, ex)

    mod.compile = compile
    return mod


def test_a_sparse_runtime_plugs_in_and_gets_layer_matching_and_the_bound(monkeypatch, tmp_path, capsys):
    from sparsecnn import runtimes

    monkeypatch.setitem(sys.modules, "fake_sparse_runtime", _fake_runtime_module())
    monkeypatch.setitem(runtimes.RUNTIME_MODULES, "fakesparse", "fake_sparse_runtime")
    code = main(["bench", "tinynet", "--runtimes", "fakesparse", "--prune", "0.8", "--regimes", "fp32-cuda-core",
                 "--budget-ms", "5", "--repeats", "2", "--device", "cpu", "-o", str(tmp_path), "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    row = next(r for r in result["networks"] if r["engine"] == "fakesparse @ 0.8")
    assert row["rel_err"] < 1e-5  # against the torch runtime on the same pruned model
    entry = next(e for e in result["layers"] if e["engine"] == "fakesparse @ 0.8")
    fused = [r for r in entry["rows"] if r["op"] == "sparsecnn::TestConvRelu"]
    assert len(fused) == 3 and all(r["accelerated"] for r in fused)
    assert all(len(r["matched"]) == 2 for r in fused)  # Conv + Relu of the dense engine
    b = entry["bound"]
    assert 0 < b["share"] < 1 and b["accelerated_layers"] == 3
    assert b["amdahl_max_speedup"] == pytest.approx(1 / (1 - b["share"]))
    assert "fakesparse @ 0.8" in (tmp_path / "bench.md").read_text(encoding="utf-8")
    # without the bar, each engine says when it is built and what it timed (a run cut short still tells)
    log = capsys.readouterr().err
    assert re.search(r"tinynet fp32-cuda-core batch 1: fakesparse @ 0\.8 built in \d+\.\d s", log)
    assert re.search(r"tinynet fp32-cuda-core batch 1: fakesparse @ 0\.8 [\d.]+ ms, [\d.]+x the best dense", log)


# --- timing helpers ------------------------------------------------------------------------------

def test_time_calls_on_cpu_times_each_call():
    import time

    from sparsecnn.runtimes.timing import time_calls

    calls = []
    t = time_calls(lambda j: (calls.append(j), time.sleep(0.002)), "cpu", reps=5, warmup=1)
    assert len(calls) == 6 and t.median_ms >= 2.0 and t.inner == 1 and t.how == "cpu-clock"


@pytest.mark.gpu
def test_time_calls_batches_short_calls_into_one_graph_and_reports_per_call():
    from sparsecnn.runtimes.timing import time_calls, time_fn

    a = torch.randn(64, 64, device="cuda")
    short = time_calls(lambda j: a @ a, "cuda", reps=20)
    assert short.how == "graph" and short.inner > 1
    long = time_calls(lambda j: [a @ a for _ in range(8)], "cuda", reps=20)
    assert long.median_ms == pytest.approx(8 * short.median_ms, rel=0.5)
    assert time_fn(lambda i: a @ a, "cuda", reps=20).how == "cuda-events"


@pytest.mark.gpu
def test_best_dense_engine_on_gpu_keeps_the_fastest_whole_network_plan(exported):
    from sparsecnn.runtimes import get_runtime

    model = exported("tinyresnet")
    eng = get_runtime("torch").compile(model, "cuda", {"dtype": "fp32", "tf32": False, "extra": {"dense_conv": "best"}})
    x = torch.randn(2, 3, 32, 32)
    ref = get_runtime("torch").compile(model, "cpu", {})(x)[0]
    out = eng(x)[0].cpu()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    (plan,) = eng.plans.values()
    assert set(plan["ms"]) == {"per-layer", "cudnn", "cudnn_nhwc"}
    assert plan["chosen"] == min(plan["ms"], key=plan["ms"].get)
    for row in eng.report():
        if row["op"] == "Conv":
            (choice,) = row["choices"].values()
            assert choice["chosen"] in ("cudnn", "cudnn_nhwc", "im2col", "im2col_nhwc")
    assert not math.isnan(sum(plan["ms"].values()))


@pytest.mark.gpu
def test_quick_bench_on_gpu_uses_graphs_everywhere(tmp_path):
    # one sparse runtime and the library GEMMs: every runtime's NVRTC builds would take minutes on a fresh card
    code = main(["bench", "--quick", "spmm", "--device", "cuda", "--runtimes", "cusparselt", "--prune", "2:4",
                 "--gemm-methods", "cublas,cusparse", "-o", str(tmp_path), "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    check_schema(result, SCHEMA)
    assert result["env"]["card"] and result["env"].get("driver")
    for r in result["networks"]:
        if r["kind"] != "eager":
            assert r["cuda_graph"] and r["timings"][0]["how"] == "cuda-events"
    best = [r for r in result["networks"] if r["engine"] == "best dense"]
    assert best and all(r.get("plans") for r in best)
    for e in result["layers"]:
        assert all(r["timed"] == "graph" for r in e["rows"] if r["op"] == "Conv")
    for r in result["gemm"]["rows"]:
        if r["method"] == "cublas" or (r["method"] == "cusparse" and r["regime"] != "fp16"):
            assert r.get("ok"), r


def test_time_calls_graph_path_batches_short_calls_and_reports_per_call(monkeypatch):
    """The CUDA branch of time_calls, driven on CPU with a stand-in graph and clock."""
    from sparsecnn.runtimes import timing
    from sparsecnn.runtimes import base

    eager_calls = []

    class FakeReplay:
        def __init__(self, fn, example_inputs, warmup=3, first_call=True):
            self.fn = fn
            eager_calls.append(int(first_call) + warmup)

        def replay(self):
            return self.fn()

    seen = []

    def fake_time_fn(fn, device, reps=100, warmup=10, flush_l2=False):
        seen.clear()
        fn(0)
        ms = 0.01 * len(seen)  # 10 us per call of the timed function
        return timing.Timing(ms, ms, ms, reps, [ms] * reps)

    monkeypatch.setattr(base, "GraphReplay", FakeReplay)
    monkeypatch.setattr(timing, "time_fn", fake_time_fn)
    t = timing.time_calls(lambda j: seen.append(j), "cuda", reps=7)
    assert t.how == "graph" and t.inner == 25  # 0.25 ms per replay / 10 us per call
    assert seen == list(range(25))             # j runs 0..inner-1 inside one replay: inputs rotate
    # the 25-call capture runs nothing eagerly (an eager cuSPARSELt call cost 0.3 s on the H100)
    assert eager_calls[-1] == 0
    assert t.median_ms == pytest.approx(0.01) and t.reps == 7 and len(t.samples_ms) == 7
    t = timing.time_calls(lambda j: seen.append(j), "cuda", reps=7, flush_l2=True)
    assert t.inner == 1  # cold L2 for every call: no batching
    t = timing.time_calls(lambda j: seen.append(j), "cuda", reps=7, min_inner=40)
    assert t.inner == 40


def test_time_calls_times_eagerly_when_the_call_cannot_be_captured(monkeypatch):
    from sparsecnn.runtimes import timing
    from sparsecnn.runtimes import base

    def refuse(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(base, "GraphReplay", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(timing, "time_fn", lambda fn, device, **kw: timing.Timing(1.0, 1.0, 1.0, 3, [1.0] * 3,
                                                                                  how="cuda-events"))
    t = timing.time_calls(lambda j: None, "cuda", reps=3)
    assert t.how == "cuda-events" and t.inner == 1
