"""Typed runtime options (runtimes/options.py): the CLI refuses unknown keys and bad values, and
every declared option changes what its help says it changes (on the CPU where the code path
runs there; GPU-only settings are shown to reach the code that reads them)."""
import contextlib
import json
import zipfile

import numpy as np
import onnx
import pytest
import torch

import cuda_emu
from sparsecnn.common.errors import UserError
from sparsecnn.converter.cli import main
from sparsecnn.passes.prune import prune_2to4, prune_unstructured
from sparsecnn.runtimes import get_runtime, load_engine, runtime_names
from sparsecnn.runtimes.base import CompileOptions
from sparsecnn.runtimes.options import (SHARED_OPTIONS, declared_options, validate, validate_for_runtimes,
                                        validate_saved)

emu = pytest.mark.skipif(not cuda_emu.available(), reason="g++ not installed (the CPU kernel emulator needs it)")


def opts(runtime: str, **pairs) -> dict:
    """CompileOptions dict from CLI-style strings, validated as the CLI does."""
    return {"extra": validate(runtime, {k: str(v) for k, v in pairs.items()})}


def ops_of(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


# --- the boundary: CLI and validation ----------------------------------------------------------

def test_unknown_option_exits_2_with_one_line_naming_the_valid_keys(capsys, tmp_path):
    out_file = tmp_path / "t.onnx"
    code, _, err = run_cli(capsys, "convert", "tinynet", "--prune", "0.9", "-o", str(out_file), "--runtime", "csr",
                           "--sparse-onnx", str(tmp_path / "s.onnx"), "--option", "csr_decid=sparse")
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and "csr_decid" in lines[0] and "csr_decide" in lines[0] and "csr_max_density" in lines[0]
    assert "Traceback" not in err
    assert not out_file.exists()  # refused before any work


@pytest.mark.parametrize("pair, words", [("csr_max_density=abc", ["csr_max_density", "not a number"]),
                                         ("dense_conv=foo", ["dense_conv", "im2col_nhwc"]),
                                         ("csr_fuse=maybe", ["csr_fuse", "boolean"]),
                                         ("csr_tune_reps=0", ["csr_tune_reps", "minimum"])])
def test_bad_option_value_exits_2_with_one_line(capsys, pair, words):
    code, _, err = run_cli(capsys, "run", "tinynet", "--device", "cpu", "--runtime", "csr", "--option", pair)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and all(w in lines[0] for w in words), err


def test_a_choice_list_given_empty_exits_2_with_one_line(capsys):
    code, _, err = run_cli(capsys, "run", "tinynet", "--device", "cpu", "--runtime", "hybrid", "--option",
                           "hybrid_libraries=")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "hybrid_libraries" in lines[0] and "names none of" in lines[0], err


def test_an_option_of_another_runtime_is_refused(capsys):
    code, _, err = run_cli(capsys, "run", "tinynet", "--device", "cpu", "--option", "csr_fuse=false")
    assert code == 2 and "runtime 'torch'" in error_lines(err)[0]


def test_values_are_typed_from_strings_and_nothing_is_filled_in():
    assert validate("csr", {"csr_weight_budget": "0.25", "csr_tune_reps": "5", "csr_autotune": "off",
                            "csr_exclude": "conv1, layer1.*", "dense_conv": "best"}) == \
        {"csr_weight_budget": 0.25, "csr_tune_reps": 5, "csr_autotune": False,
         "csr_exclude": ["conv1", "layer1.*"], "dense_conv": "best"}
    assert validate("csr", {}) == {}
    for text, value in [("true", True), ("1", True), ("yes", True), ("on", True),
                        ("false", False), ("0", False), ("no", False), ("off", False)]:
        assert validate("torch", {"cudnn_benchmark": text}) == {"cudnn_benchmark": value}
    assert validate("tensorrt", {"batch": "1,4,16"}) == {"batch": [1, 4, 16]}


def test_several_runtimes_take_only_the_options_they_declare():
    per = validate_for_runtimes(["csr", "ecr"], {"csr_fuse": "off", "ecr_reps": "3", "dense_conv": "im2col"})
    assert per == {"csr": {"csr_fuse": False, "dense_conv": "im2col"}, "ecr": {"ecr_reps": 3, "dense_conv": "im2col"}}
    with pytest.raises(UserError, match="valid options:.*csr_fuse.*ecr_reps"):
        validate_for_runtimes(["csr", "ecr"], {"ecr_rep": "3"})


def test_doctor_lists_a_runtimes_options(capsys):
    code, out, _ = run_cli(capsys, "doctor", "--options", "sparsert")
    assert code == 0
    for name in declared_options("sparsert"):
        assert f"  {name} " in out


def test_engine_file_with_an_option_this_version_does_not_declare_still_loads(tmp_path, exported):
    path = tmp_path / "t.engine"
    get_runtime("torch").compile(exported("tinynet"), "cpu", opts("torch", dense_conv="im2col")).save(path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(files["engine.json"])
    manifest["options"]["extra"]["retired_setting"] = 3
    files["engine.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    with pytest.warns(UserWarning, match="retired_setting"):
        engine = load_engine(path, "cpu")
    assert engine.options.extra == {"dense_conv": "im2col"}


def test_saved_values_that_do_not_parse_are_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="csr_tune_reps"):
        assert validate_saved("csr", {"csr_fuse": "no", "csr_tune_reps": "x"}) == {"csr_fuse": False}


# --- shared options: dense convs and the chooser -------------------------------------------------

def test_dense_conv_changes_the_kernel_in_the_report(exported):
    model = exported("tinynet")
    kernels = {mode: {r["kernel"] for r in get_runtime("torch").compile(model, "cpu", opts("torch", dense_conv=mode))
                      .report() if r["op"] == "Conv"} for mode in ("cudnn", "im2col")}
    assert kernels["im2col"] == {"im2col (F.unfold) + cuBLAS GEMM, NCHW"}
    assert not kernels["cudnn"] & kernels["im2col"]


def test_cudnn_benchmark_reaches_the_dense_convs(exported):
    rt, model = get_runtime("torch"), exported("tinynet")
    for text, value in [("off", False), ("on", True)]:
        eng = rt.compile(model, "cpu", opts("torch", dense_conv="cudnn_nhwc", cudnn_benchmark=text))
        assert eng.dense_convs and all(c.tune_cudnn is value for c in eng.dense_convs)


def test_im2col_max_bytes_skips_the_im2col_candidates(exported):
    x = torch.randn(1, 3, 32, 32)
    eng = get_runtime("torch").compile(exported("tinynet"), "cpu", opts("torch", dense_conv="best", im2col_max_bytes=0))
    eng(x)
    choices = [c for r in eng.report() if r["op"] == "Conv" for c in r["choices"].values()]
    assert choices and all(set(c["skipped"]) == {"im2col", "im2col_nhwc"} for c in choices)
    assert all("im2col" not in c["ms"] for c in choices)


def test_choose_reps_reaches_the_dense_conv_chooser(exported):
    eng = get_runtime("torch").compile(exported("tinynet"), "cpu", opts("torch", dense_conv="best", choose_reps=7))
    assert eng.dense_convs and all(c.reps == 7 for c in eng.dense_convs)


def test_guard_reaches_the_engine(exported):
    model = prune_unstructured(exported("tinynet"), 0.9).model
    rt = get_runtime("csr")
    assert rt.compile(rt.rewrite(model), "cpu", {}).guard_on()
    assert not rt.compile(rt.rewrite(model), "cpu", opts("csr", guard="off")).guard_on()


@emu
def test_choose_margin_reaches_the_csr_chooser(pruned90):
    assert _csr_engine(pruned90, csr_decide="sparse", csr_autotune="off", choose_margin=0.1)[0].session.margin == 0.1


# --- csr ---------------------------------------------------------------------------------------

@pytest.fixture
def pruned90(exported):
    return prune_unstructured(exported("tinyresnet"), 0.9).model


def test_csr_max_density_changes_which_layers_the_rewrite_converts(pruned90):
    rt = get_runtime("csr")
    assert "CsrConv" in ops_of(rt.rewrite(pruned90, opts("csr")))
    assert "CsrConv" not in ops_of(rt.rewrite(pruned90, opts("csr", csr_max_density=0.05)))


def test_csr_exclude_leaves_a_layer_dense(pruned90):
    rt = get_runtime("csr")
    first = next(n for n in rt.rewrite(pruned90, opts("csr")).graph.node if n.op_type == "CsrConv")
    weight = next(n.input[1] for n in pruned90.graph.node if n.name == first.name)
    excluded = rt.rewrite(pruned90, opts("csr", csr_exclude=f"{weight},no_such_layer"))
    assert first.name not in {n.name for n in excluded.graph.node if n.op_type == "CsrConv"}
    assert ops_of(excluded).count("CsrConv") == ops_of(rt.rewrite(pruned90, opts("csr"))).count("CsrConv") - 1


def test_csr_fuse_false_keeps_the_add(pruned90):
    rt = get_runtime("csr")
    assert "Add" not in ops_of(rt.rewrite(pruned90, opts("csr")))
    assert "Add" in ops_of(rt.rewrite(pruned90, opts("csr", csr_fuse="false")))


def _csr_engine(model, **pairs):
    """The csr kernel path (the GPU's) on the CPU emulator."""
    from sparsecnn.runtimes.csr import runtime as csr_rt

    sparse = csr_rt.rewrite(model, {})
    engine = csr_rt.compile_with_backend(sparse, "cpu", opts("csr", **pairs), backend=cuda_emu.EmuBackend())
    return engine, [r["format"] for r in engine.report() if r["op"].startswith("sparsecnn::Csr")]


@emu
def test_csr_decide_changes_how_layers_are_kept_sparse(pruned90):
    # threshold: density 0.1 is above the cap, every layer dense, nothing timed; sparse: every layer CSR
    assert set(_csr_engine(pruned90, csr_decide="threshold", csr_max_density=0.05)[1]) == {"dense"}
    assert set(_csr_engine(pruned90, csr_decide="sparse", csr_autotune="off")[1]) == {"csr"}


# The settings below act inside the per-layer timing on the GPU: shown to reach the session reading them.
@emu
def test_csr_autotune_reaches_the_kernel_session(pruned90):
    assert _csr_engine(pruned90, csr_decide="sparse", csr_autotune="off")[0].session.autotune is False


@emu
def test_csr_tune_reps_reaches_the_kernel_session(pruned90):
    assert _csr_engine(pruned90, csr_decide="sparse", csr_autotune="off", csr_tune_reps=3)[0].session.reps == 3


@emu
def test_csr_weight_budget_reaches_the_kernel_session(pruned90):
    engine = _csr_engine(pruned90, csr_decide="sparse", csr_autotune="off", csr_weight_budget=0.25)[0]
    assert engine.session.weight_budget == 0.25


# --- ecr ---------------------------------------------------------------------------------------

def test_ecr_plain_conv_false_leaves_convs_without_relu_dense(exported):
    rt, model = get_runtime("ecr"), exported("tinyresnet")
    with_plain = ops_of(rt.rewrite(model, opts("ecr")))
    without = ops_of(rt.rewrite(model, opts("ecr", ecr_plain_conv="false")))  # nested under extra, as the CLI does
    assert with_plain.count("EcrConv") > without.count("EcrConv")
    assert without.count("Conv") > with_plain.count("Conv")


@pytest.mark.parametrize("key, text, value", [("ecr_layers", "dense", "dense"), ("ecr_reps", "4", 4),
                                              ("whole_network_check", "off", False), ("batch", "2", 2)])
def test_ecr_gpu_settings_reach_the_engine_options(exported, key, text, value):
    # read only on the CUDA path (kernel choice, whole-network check, calibration input)
    rt = get_runtime("ecr")
    eng = rt.compile(rt.rewrite(exported("tinynet")), "cpu", opts("ecr", **{key: text}))
    assert eng.options.extra[key] == value


# --- sparsert ----------------------------------------------------------------------------------

@pytest.fixture
def sparsert_model(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECNN_CACHE", str(tmp_path / "cache"))
    model = prune_unstructured(exported("tinynet"), 0.9).model
    return get_runtime("sparsert").rewrite(model, {}), model


def _sparsert_rows(model, **pairs):
    eng = get_runtime("sparsert").compile(model, "cpu", opts("sparsert", **pairs))
    return eng, [r for r in eng.report() if r["op"].startswith("sparsecnn::")]


def test_sparsert_min_sparsity_changes_which_layers_the_rewrite_converts(sparsert_model):
    _, model = sparsert_model
    rt = get_runtime("sparsert")
    assert "CsrConv" in ops_of(rt.rewrite(model, opts("sparsert")))
    assert "CsrConv" not in ops_of(rt.rewrite(model, opts("sparsert", min_sparsity=0.95)))


def test_sparsert_emulate_kernels_runs_the_planner_on_the_cpu(sparsert_model):
    sparse, _ = sparsert_model
    _, reference = _sparsert_rows(sparse)
    _, planned = _sparsert_rows(sparse, emulate_kernels="yes", candidates="dense")
    assert reference and not any("kind" in r for r in reference)
    assert planned and all(r["kind"] == "dense" for r in planned)


def test_sparsert_candidates_limit_what_a_layer_may_run(sparsert_model):
    sparse, _ = sparsert_model
    _, rows = _sparsert_rows(sparse, emulate_kernels="on", candidates="dense,csr", max_configs=1)
    assert rows and all(r["kind"] in ("dense", "csr") for r in rows)
    assert all(not any(k.startswith("generated") for k in r.get("candidates_ms", {})) for r in rows)


def test_sparsert_max_configs_caps_the_generated_configurations(sparsert_model):
    sparse, _ = sparsert_model
    count = {}
    for n in (1, 3):
        _, rows = _sparsert_rows(sparse, emulate_kernels="on", candidates="generated,dense", max_configs=n, retune="on")
        count[n] = max(sum(k.startswith("generated") for k in r["candidates_ms"]) for r in rows)
    assert count[1] == 1 and count[3] > 1


def test_sparsert_max_instructions_rules_out_generated_kernels(sparsert_model):
    sparse, _ = sparsert_model
    _, rows = _sparsert_rows(sparse, emulate_kernels="on", candidates="generated,dense", max_instructions=1)
    assert rows and all(r["kind"] == "dense" and "instructions" in r.get("reason", "") for r in rows)


def test_sparsert_retune_ignores_the_tuning_cache(sparsert_model):
    sparse, _ = sparsert_model
    _sparsert_rows(sparse, emulate_kernels="on", candidates="generated,dense", max_configs=1)
    _, cached = _sparsert_rows(sparse, emulate_kernels="on", candidates="generated,dense", max_configs=1)
    _, retuned = _sparsert_rows(sparse, emulate_kernels="on", candidates="generated,dense", max_configs=1, retune="on")
    assert all(len(r.get("candidates_ms", {})) <= 1 for r in cached)
    assert all(len(r["candidates_ms"]) >= 2 for r in retuned)


def test_sparsert_arch_is_what_the_emulated_engine_generates_for(sparsert_model):
    sparse, _ = sparsert_model
    eng, _ = _sparsert_rows(sparse, emulate_kernels="on", candidates="dense", arch="sm_80")
    assert eng.arch == "sm_80" and eng.saved_state()["arch"] == "sm_80"


def _planner(model, **pairs):
    from sparsecnn.runtimes.sparsert.runtime import Planner

    return Planner(model, torch.device("cpu"), CompileOptions.from_dict(opts("sparsert", **pairs)), {})


def test_sparsert_tune_batch_is_the_planners_batch(sparsert_model):
    sparse, _ = sparsert_model
    assert _planner(sparse).batch == 1 and _planner(sparse, tune_batch=4).batch == 4


class _Stop(Exception):
    pass


def test_sparsert_compile_workers_reach_the_compiler(sparsert_model, monkeypatch):
    from sparsecnn.runtimes.sparsert import codegen

    seen = {}

    def fake_compile(jobs, arch, workers=None, mode="auto", progress=False):
        seen["workers"] = workers
        raise _Stop

    monkeypatch.setattr(codegen, "compile_programs", fake_compile)
    planner = _planner(sparsert_model[0], compile_workers=3, candidates="generated")
    planner.emulate = False  # take the GPU path's compile step
    with pytest.raises(_Stop):
        planner.prepare()
    assert seen["workers"] == 3


# --- cusparselt (its dense backend runs on the CPU) ------------------------------------------------

def _two_four_steps(exported, monkeypatch, reps_seen=None, sparse_ms=1.0, dense_ms=1.5, **pairs):
    from sparsecnn.runtimes.chooser import Chooser
    from sparsecnn.runtimes.cusparselt import runtime as cs

    def fake_time(self, cands, args):
        if reps_seen is not None:
            reps_seen.append(self.reps)
        return {c.name: dense_ms if c.dense else sparse_ms for c in cands}

    monkeypatch.setattr(Chooser, "time", fake_time)
    model = cs.rewrite(prune_2to4(exported("tinynet")).model)
    eng = cs.build_engine(model, torch.device("cpu"), CompileOptions.from_dict(opts("cusparselt", **pairs)), "dense")
    eng(torch.randn(1, 3, 32, 32))
    steps = [s for s in eng.executor.steps if s.info.get("format") == "2:4"]
    assert steps
    return eng, steps, [next(iter(s.info["choices"].values()))["choice"] for s in steps]


def test_cusparselt_force_skips_the_measurement(exported, monkeypatch):
    seen: list[int] = []
    _, _, choices = _two_four_steps(exported, monkeypatch, seen, sparse_ms=1.0, dense_ms=0.5, force="sparse")
    assert set(choices) == {"sparse"} and not seen


def test_cusparselt_margin_decides_how_much_sparse_must_win(exported, monkeypatch):
    assert set(_two_four_steps(exported, monkeypatch, margin=0.02)[2]) == {"sparse"}  # 1.0 vs 1.5 ms
    assert set(_two_four_steps(exported, monkeypatch, margin=0.5)[2]) == {"dense"}  # (older name of choose_margin)
    assert set(_two_four_steps(exported, monkeypatch, choose_margin=0.5)[2]) == {"dense"}


def test_cusparselt_tune_reps_reaches_the_timer(exported, monkeypatch):
    seen: list[int] = []
    _two_four_steps(exported, monkeypatch, seen, tune_reps=4)
    assert seen and set(seen) == {4}


def test_cusparselt_cslt_search_reaches_the_sparse_gemm(exported, monkeypatch):
    assert not any(s.fn.gemm.allow_search for s in _two_four_steps(exported, monkeypatch)[1])
    assert all(s.fn.gemm.allow_search for s in _two_four_steps(exported, monkeypatch, cslt_search="on")[1])


def test_cusparselt_whole_network_check_reaches_the_engine_options(exported, monkeypatch):
    # the older name of guard: read by the base engine's whole-graph guard (GPU only)
    eng = _two_four_steps(exported, monkeypatch, whole_network_check="off")[0]
    assert eng.options.extra["whole_network_check"] is False and not eng.guard_on()
    assert _two_four_steps(exported, monkeypatch)[0].guard_on()


# --- tensorrt (not installable here: its build is faked to see what reaches it) ------------------------

@pytest.fixture
def trt_build(monkeypatch):
    """Runs tensorrt.compile up to the engine with TensorRT faked; returns what reached the build."""
    from sparsecnn.runtimes.tensorrt import runtime as trt_rt

    seen = {}

    class FakeTrt:
        __version__ = "0-fake"

    def fake_build(trt, onnx_bytes, dtype, logger, input_shapes, sparse=True, workspace_bytes=0):
        seen.update(shapes=input_shapes, sparse=sparse, workspace_bytes=workspace_bytes)
        return b"plan-bytes", {}

    monkeypatch.setattr(trt_rt, "available", lambda: (True, "faked"))
    monkeypatch.setattr(trt_rt, "_import_trt", lambda: FakeTrt)
    monkeypatch.setattr(trt_rt.trt_compat, "settings_for", lambda trt, dtype: {"onnx_must_be_fp16": False})
    monkeypatch.setattr(trt_rt.trt_compat, "make_logger", lambda trt, echo=None: type("L", (), {"lines": []})())
    monkeypatch.setattr(trt_rt.trt_compat, "build_plan", fake_build)
    monkeypatch.setattr(trt_rt.torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(trt_rt, "TensorRTEngine", lambda *args: seen.setdefault("engine_args", args))

    def build(model, **pairs):
        seen.clear()
        trt_rt.compile(model, "cuda", opts("tensorrt", **pairs))
        return seen

    return build


def test_tensorrt_batch_sets_the_optimization_profile(trt_build, exported):
    shapes = trt_build(exported("tinynet"), batch="2,4,8")["shapes"]
    assert [s[0] for s in next(iter(shapes.values()))] == [2, 4, 8]


def test_tensorrt_sparse_and_workspace_reach_the_builder(trt_build, exported):
    seen = trt_build(exported("tinynet"))
    assert seen["sparse"] is True and seen["workspace_bytes"] == 1024 << 20
    seen = trt_build(exported("tinynet"), sparse="off", workspace_mb=64)
    assert seen["sparse"] is False and seen["workspace_bytes"] == 64 << 20


def test_tensorrt_plan_writes_the_raw_plan(trt_build, exported, tmp_path):
    trt_build(exported("tinynet"), plan=tmp_path / "raw.plan")
    assert (tmp_path / "raw.plan").read_bytes() == b"plan-bytes"


def test_tensorrt_cuda_graph_wraps_the_enqueue(monkeypatch):
    from types import SimpleNamespace

    from sparsecnn.runtimes.tensorrt import runtime as trt_rt

    monkeypatch.setattr(trt_rt, "GraphReplay", lambda fn, inputs: ("graph of", fn))
    x = torch.zeros(1)
    for text, graphed in [("off", False), ("on", True)]:
        fake = SimpleNamespace(options=CompileOptions.from_dict(opts("tensorrt", trt_cuda_graph=text)),
                               _run="enqueue", _graphs={})
        assert trt_rt.TensorRTEngine.runner(fake, x) == (("graph of", "enqueue") if graphed else "enqueue")


# --- minkowski (MinkowskiEngine may be absent: compile is stopped where the settings are read) -----------

def test_minkowski_sites_and_algorithm_reach_the_engine_state(monkeypatch, exported):
    from sparsecnn.runtimes.minkowski import runtime as mk

    seen = {}

    def fake_state(dev, sites, recorder, algorithm):
        seen.update(sites=sites, algorithm=algorithm)
        raise _Stop

    monkeypatch.setattr(mk, "available", lambda: (True, "faked"))
    monkeypatch.setattr(mk, "_State", fake_state)
    for pairs, expected in [({}, ("relu", "speed")),
                            ({"sites": "generative", "algorithm": "memory"}, ("generative", "memory"))]:
        with pytest.raises(_Stop):
            mk.compile(exported("tinynet"), "cpu", opts("minkowski", **pairs))
        assert (seen["sites"], seen["algorithm"]) == expected


# --- every declared option has a test above ----------------------------------------------------

SHARED_TESTS = {
    "dense_conv": "test_dense_conv_changes_the_kernel_in_the_report",
    "cudnn_benchmark": "test_cudnn_benchmark_reaches_the_dense_convs",
    "im2col_max_bytes": "test_im2col_max_bytes_skips_the_im2col_candidates",
    "guard": "test_guard_reaches_the_engine",
    "choose_margin": "test_choose_margin_reaches_the_csr_chooser",
    "choose_reps": "test_choose_reps_reaches_the_dense_conv_chooser",
}
RUNTIME_TESTS = {
    ("csr", "csr_decide"): "test_csr_decide_changes_how_layers_are_kept_sparse",
    ("csr", "csr_max_density"): "test_csr_max_density_changes_which_layers_the_rewrite_converts",
    ("csr", "csr_autotune"): "test_csr_autotune_reaches_the_kernel_session",
    ("csr", "csr_tune_reps"): "test_csr_tune_reps_reaches_the_kernel_session",
    ("csr", "csr_exclude"): "test_csr_exclude_leaves_a_layer_dense",
    ("csr", "csr_fuse"): "test_csr_fuse_false_keeps_the_add",
    ("csr", "csr_weight_budget"): "test_csr_weight_budget_reaches_the_kernel_session",
    ("ecr", "ecr_plain_conv"): "test_ecr_plain_conv_false_leaves_convs_without_relu_dense",
    ("ecr", "ecr_layers"): "test_ecr_gpu_settings_reach_the_engine_options",
    ("ecr", "ecr_reps"): "test_ecr_gpu_settings_reach_the_engine_options",
    ("ecr", "whole_network_check"): "test_ecr_gpu_settings_reach_the_engine_options",
    ("ecr", "batch"): "test_ecr_gpu_settings_reach_the_engine_options",
    ("sparsert", "min_sparsity"): "test_sparsert_min_sparsity_changes_which_layers_the_rewrite_converts",
    ("sparsert", "candidates"): "test_sparsert_candidates_limit_what_a_layer_may_run",
    ("sparsert", "max_configs"): "test_sparsert_max_configs_caps_the_generated_configurations",
    ("sparsert", "max_instructions"): "test_sparsert_max_instructions_rules_out_generated_kernels",
    ("sparsert", "tune_batch"): "test_sparsert_tune_batch_is_the_planners_batch",
    ("sparsert", "compile_workers"): "test_sparsert_compile_workers_reach_the_compiler",
    ("sparsert", "retune"): "test_sparsert_retune_ignores_the_tuning_cache",
    ("sparsert", "emulate_kernels"): "test_sparsert_emulate_kernels_runs_the_planner_on_the_cpu",
    ("sparsert", "arch"): "test_sparsert_arch_is_what_the_emulated_engine_generates_for",
    ("cusparselt", "force"): "test_cusparselt_force_skips_the_measurement",
    ("cusparselt", "margin"): "test_cusparselt_margin_decides_how_much_sparse_must_win",
    ("cusparselt", "tune_reps"): "test_cusparselt_tune_reps_reaches_the_timer",
    ("cusparselt", "whole_network_check"): "test_cusparselt_whole_network_check_reaches_the_engine_options",
    ("cusparselt", "cslt_search"): "test_cusparselt_cslt_search_reaches_the_sparse_gemm",
    ("tensorrt", "batch"): "test_tensorrt_batch_sets_the_optimization_profile",
    ("tensorrt", "workspace_mb"): "test_tensorrt_sparse_and_workspace_reach_the_builder",
    ("tensorrt", "sparse"): "test_tensorrt_sparse_and_workspace_reach_the_builder",
    ("tensorrt", "plan"): "test_tensorrt_plan_writes_the_raw_plan",
    ("tensorrt", "trt_cuda_graph"): "test_tensorrt_cuda_graph_wraps_the_enqueue",
    ("minkowski", "sites"): "test_minkowski_sites_and_algorithm_reach_the_engine_state",
    ("minkowski", "algorithm"): "test_minkowski_sites_and_algorithm_reach_the_engine_state",
    # the hybrid runtime's option tests live beside its other tests (module:name)
    ("hybrid", "hybrid_max_density"): "test_hybrid:test_hybrid_max_density_and_csr_exclude_change_which_layers_are_grouped",
    ("hybrid", "csr_exclude"): "test_hybrid:test_hybrid_max_density_and_csr_exclude_change_which_layers_are_grouped",
    ("hybrid", "hybrid_libraries"): "test_hybrid:test_hybrid_libraries_limits_the_candidates_and_batch_sets_the_calibration_batch",
    ("hybrid", "batch"): "test_hybrid:test_hybrid_libraries_limits_the_candidates_and_batch_sets_the_calibration_batch",
    ("hybrid", "sparsert_max_configs"):
        "test_hybrid:test_sparsert_max_configs_and_max_instructions_bound_the_generated_candidates",
    ("hybrid", "sparsert_max_instructions"):
        "test_hybrid:test_sparsert_max_configs_and_max_instructions_bound_the_generated_candidates",
}


def _test_function(ref: str | None):
    """The test a mapping names: a function of this module, or `module:name` of another test module."""
    if ref is None:
        return None
    if ":" in ref:
        import importlib

        module, name = ref.split(":", 1)
        return getattr(importlib.import_module(module), name, None)
    return globals().get(ref)


def test_every_declared_option_has_a_test():
    shared = {o.name for o in SHARED_OPTIONS}
    missing = []
    for runtime in runtime_names():
        for name in declared_options(runtime):
            test = SHARED_TESTS.get(name) if name in shared else RUNTIME_TESTS.get((runtime, name))
            if not callable(_test_function(test)):
                missing.append(f"{runtime}:{name}")
    assert not missing, f"declared options without a test: {missing}"
    stale = [k for k in RUNTIME_TESTS if k[1] not in declared_options(k[0])]
    assert not stale, f"tests mapped to options no longer declared: {stale}"
