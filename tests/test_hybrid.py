"""The hybrid runtime on CPU: grouping (rewrite), per-layer choice over libraries (csr kernels
through the CPU emulator, ecr through a stand-in that computes each plan with the dense oracle,
cuSPARSELt's lowering with F.linear for its GEMM, sparsert's generated programs through its IR
interpreter), the whole-graph guard and save/reload.
Timing is faked where a test needs a given winner; outputs are checked against ONNX Runtime."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import cuda_emu
from ecr_emulator import ReferenceEcrKernels
from sparsecnn.passes.prune import prune_2to4, prune_unstructured
from sparsecnn.runtimes import base, chooser, get_runtime
from sparsecnn.runtimes.chooser import Chooser
from sparsecnn.runtimes.hybrid import runtime as hybrid

emu = pytest.mark.skipif(not cuda_emu.available(), reason="g++ not installed (the CPU kernel emulator needs it)")


def _oracle(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {model.graph.input[0].name: x.numpy()})[0])


def _pruned(exported, name, prune="0.9"):
    dense = exported(name)
    return prune_2to4(dense).model if prune == "2:4" else prune_unstructured(dense, float(prune)).model


def _clock(prefer: dict):
    """A Chooser.time stand-in: each candidate's time by its library (dense forms 1.0 ms)."""
    def time(self, candidates, args):
        return {c.name: (1.0 if c.dense else prefer.get(c.library, 2.0)) + 0.001 * i for i, c in enumerate(candidates)}
    return time


def _no_timing(*a, **k):
    raise AssertionError("a reloaded engine must not time anything")


def _backends(two_four=None, wrong=lambda name: False, sparsert=False):
    from sparsecnn.runtimes.sparsert.runtime import KernelLoader

    return hybrid.Backends(torch.device("cpu"), csr=cuda_emu.EmuBackend(), ecr=ReferenceEcrKernels(wrong),
                           two_four=two_four, sparsert=KernelLoader("cpu", emulate=True) if sparsert else None)


def test_rewrite_groups_conv_relu_pool_and_conv_add_relu(exported):
    rt = get_runtime("hybrid")
    vgg, reports = rt.rewrite_with_report(_pruned(exported, "tinynet"), {})
    ops = [n.op_type for n in vgg.graph.node]
    assert "CsrConvPool" in ops and "MaxPool" not in ops[ops.index("CsrConvPool"):]
    assert reports[1].counters["conv_pool_fused"] == ops.count("CsrConvPool") >= 1
    res, _ = rt.rewrite_with_report(_pruned(exported, "tinyresnet"), {})
    residual = [n for n in res.graph.node if n.op_type == "CsrConv" and len(n.input) > 6 and n.input[6]]
    assert residual and all(not any(a.name == "pool_kernel_shape" for a in n.attribute) for n in residual)
    # a 2:4 model's layers (density 0.5) are grouped too: cuSPARSELt is one of their candidates
    two, _ = rt.rewrite_with_report(_pruned(exported, "tinyresnet", "2:4"), {})
    assert sum(n.op_type == "CsrConv" for n in two.graph.node) >= 4


@pytest.mark.parametrize("name", ["tinynet", "tinyresnet"])
def test_reference_path_matches_onnxruntime(exported, name):
    model = _pruned(exported, name)
    rt = get_runtime("hybrid")
    x = torch.randn(2, 3, 32, 32)
    y = rt.compile(rt.rewrite(model), "cpu")(x)[0]
    torch.testing.assert_close(y, _oracle(model, x), rtol=1e-4, atol=1e-4)


@emu
def test_each_group_takes_the_fastest_library_and_the_output_stays_right(exported, monkeypatch):
    model = _pruned(exported, "tinynet")
    monkeypatch.setattr(Chooser, "time", _clock({"ecr": 0.5, "csr": 0.7}))
    x = torch.rand(1, 3, 32, 32)
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(model), "cpu", {}, calibration=x,
                                       backends=_backends())
    rows = {r["name"]: r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")}
    assert rows and all(r["library"] == "ecr" for r in rows.values())
    pooled = [r for r in rows.values() if r["op"] == "sparsecnn::CsrConvPool"]
    assert pooled and all(r["format"] == "pecr" for r in pooled)  # the pool went into the kernel
    for r in rows.values():  # every library spoke: measured, or said why it could not
        assert set(r["libraries_ms"]) == {"dense", "csr", "ecr"}
        assert r["libraries_ms"]["ecr"] < r["libraries_ms"]["csr"] < r["libraries_ms"]["dense"]
        assert r["unsupported"]["cusparselt"]
        assert "calibration" not in r  # real calibration input was given
    torch.testing.assert_close(eng(x)[0], _oracle(model, x), rtol=1e-4, atol=1e-4)

    monkeypatch.setattr(Chooser, "time", _clock({"ecr": 3.0, "csr": 0.5}))
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(model), "cpu", {}, backends=_backends())
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]
    assert all(r["library"] == "csr" for r in rows)
    assert all("random input" in r["calibration"] for r in rows)  # no calibration: the report says so
    torch.testing.assert_close(eng(x)[0], _oracle(model, x), rtol=1e-4, atol=1e-4)


@emu
def test_a_wrong_library_is_never_chosen_and_the_report_says_why(exported, monkeypatch):
    model = _pruned(exported, "tinynet")
    monkeypatch.setattr(Chooser, "time", _clock({"ecr": 0.1, "csr": 0.9}))
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(model), "cpu", {},
                                       backends=_backends(wrong=lambda name: True))
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]
    assert all(r["library"] == "csr" for r in rows)
    assert all(any("wrong result" in why for why in r["choice"]["rejected"].values()) for r in rows)


@emu
def test_two_four_layers_get_cusparselt_as_a_candidate(exported, monkeypatch):
    model = _pruned(exported, "tinyresnet", "2:4")
    monkeypatch.setattr(Chooser, "time", _clock({"cusparselt": 0.4, "csr": 0.9, "ecr": 0.9}))
    x = torch.rand(1, 3, 32, 32)
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(model), "cpu", {}, calibration=x,
                                       backends=_backends(two_four="dense"))
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]
    two_four = [r for r in rows if "cusparselt" not in r.get("unsupported", {})]
    assert two_four and all(r["library"] == "cusparselt" for r in two_four)
    torch.testing.assert_close(eng(x)[0], _oracle(model, x), rtol=1e-4, atol=1e-4)


class _FakeReplay:
    def __init__(self, fn, example_inputs, warmup=3, first_call=True):
        self.fn, self.inputs = fn, tuple(example_inputs)
        self.static_outputs = fn(*self.inputs)

    def replay(self):
        return self.fn(*self.inputs)


@emu
def test_guard_reverts_a_slower_hybrid_and_a_reload_replays_everything(exported, monkeypatch, tmp_path):
    model = get_runtime("hybrid").rewrite(_pruned(exported, "tinyresnet"))
    monkeypatch.setattr(Chooser, "time", _clock({"csr": 0.5, "ecr": 0.8}))
    backends = _backends()
    x = torch.rand(1, 3, 32, 32)
    eng = hybrid.compile_with_backends(model, "cpu", {}, calibration=x, backends=backends)
    sparse = [sw.name for sw in eng.switches() if not sw.is_dense]
    assert len(sparse) >= 2
    monkeypatch.setattr(base, "GraphReplay", _FakeReplay)
    fake = {"as chosen": 3.0, "dense": 2.0, "cudnn": 2.5, "cudnn_nhwc": 2.6, "partial": 1.0}
    monkeypatch.setattr(chooser, "guard_graphs", lambda graphs, device, **k: (
        min(graphs, key=fake.get), {g: fake[g] for g in graphs}))
    eng._plan_graph("key", eng.prepare(x))
    plan = eng.plans["1x3x32x32"]
    assert plan["chosen"] == "partial" and plan["reverted"] and "whole-graph guard" in plan["reason"]
    reverted = [sw.name for sw in eng.switches() if sw.name in plan["reverted"]]
    assert all(sw.is_dense for sw in eng.switches() if sw.name in reverted)

    state = eng.full_state()
    state["card"] = {"name": "Some Other Card", "capability": "cpu"}
    monkeypatch.setattr(Chooser, "time", _no_timing)
    monkeypatch.setattr(chooser, "guard_graphs", _no_timing)
    again = hybrid.compile_with_backends(model, "cpu", {}, state=state, backends=backends)
    assert [sw.decision.how for sw in again.switches()] == ["saved"] * len(again.switches())
    assert {sw.name: sw.decision.chosen for sw in again.switches()} == \
        {sw.name: sw.decision.chosen for sw in eng.switches()}
    rows = [r for r in again.report() if r["op"].startswith("sparsecnn::CsrConv")]
    assert all("Some Other Card" in r["measured_on"] for r in rows)  # choices made elsewhere: said
    again.plans.update(state["plans"])
    again._plan_graph("key", again.prepare(x))  # the saved plan is replayed, nothing timed
    assert sorted(sw.name for sw in again.switches() if sw.is_dense and sw.name in plan["reverted"]) == \
        sorted(plan["reverted"])
    np.testing.assert_allclose(again(x)[0].numpy(), eng(x)[0].numpy(), rtol=1e-5, atol=1e-5)


def test_options_are_declared_and_a_bad_library_is_refused(exported):
    from sparsecnn.common.errors import UserError
    from sparsecnn.runtimes.options import validate

    with pytest.raises(UserError, match="hybrid_libraries"):
        validate("hybrid", {"hybrid_libraries": "csr,tensorrt"})
    model = get_runtime("hybrid").rewrite(_pruned(exported, "tinynet"))
    with pytest.raises(UserError, match="channels-last"):
        hybrid.compile_with_backends(model, "cpu", {"channels_last": True}, backends=hybrid.Backends(torch.device("cpu")))


# --- sparsert's generated kernels as candidates (the IR interpreter stands in for the GPU) ----

def _groups(eng):
    return [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]


@emu
def test_a_group_whose_fastest_candidate_is_a_generated_kernel_runs_sparsert_and_a_reload_replays_it(
        exported, monkeypatch, tmp_path):
    from sparsecnn.runtimes import load_engine
    from sparsecnn.runtimes.sparsert import runtime as sparsert

    model = _pruned(exported, "tinyresnet")  # residual groups: the kernel adds the residual at its store
    sparse = get_runtime("hybrid").rewrite(model)
    monkeypatch.setattr(Chooser, "time", _clock({"sparsert": 0.4, "ecr": 0.9}))
    backends = _backends(sparsert=True)
    x = torch.rand(1, 3, 32, 32)
    # csr's emulator is left out here (the slowest on the CPU; the tests above cover it)
    eng = hybrid.compile_with_backends(sparse, "cpu", _opts(hybrid_libraries="ecr,cusparselt,sparsert",
                                                            sparsert_max_configs=2), calibration=x, backends=backends)
    rows = _groups(eng)
    assert rows and all(r["library"] == "sparsert" for r in rows)
    assert any("residual" in r["group"] for r in rows)
    for r in rows:  # every library spoke, and sparsert won on the stand-in clock
        assert set(r["libraries_ms"]) == {"dense", "ecr", "sparsert"} and r["unsupported"]["cusparselt"]
        assert min(r["libraries_ms"], key=r["libraries_ms"].get) == "sparsert"
        assert r["choice"]["chosen"].startswith("generated:") and r["kernel"].startswith("sparsert_")
        assert r["sparsert_build_s"]["configs"] == 2
    torch.testing.assert_close(eng(x)[0], _oracle(model, x), rtol=1e-4, atol=1e-4)

    path = eng.save(tmp_path / "h.engine")
    monkeypatch.setattr(hybrid, "compile", lambda m, d, o, state=None: hybrid.compile_with_backends(
        m, d, o, state=state, backends=backends))
    monkeypatch.setattr(Chooser, "time", _no_timing)
    generated = []
    real_generate = sparsert.LayerPrograms.generate

    def spy(self, *a, **k):
        ok = real_generate(self, *a, **k)
        generated.append(len(self.programs))
        return ok

    monkeypatch.setattr(sparsert.LayerPrograms, "generate", spy)
    again = load_engine(path, "cpu")
    assert [sw.decision.how for sw in again.switches()] == ["saved"] * len(again.switches())
    assert {sw.name: sw.active for sw in again.switches()} == {sw.name: sw.active for sw in eng.switches()}
    assert generated == [1] * len(rows)  # the saved config alone is generated again
    assert all(r["library"] == "sparsert" for r in _groups(again))
    torch.testing.assert_close(again(x)[0], _oracle(model, x), rtol=1e-4, atol=1e-4)


@emu
def test_every_groups_generated_programs_compile_in_one_batch_before_calibration(exported, monkeypatch):
    from sparsecnn.runtimes.sparsert import runtime as sparsert

    monkeypatch.setattr(Chooser, "time", _clock({"sparsert": 0.4}))
    backends = _backends(sparsert=True)
    batches, generated = [], []
    real_compile, real_generate = backends.sparsert.compile, sparsert.LayerPrograms.generate
    monkeypatch.setattr(backends.sparsert, "compile", lambda sources, progress=False: (
        batches.append([name for _, name in sources]), real_compile(sources, progress))[1])

    def spy(self, *a, **k):
        generated.append(self.name)
        return real_generate(self, *a, **k)

    monkeypatch.setattr(sparsert.LayerPrograms, "generate", spy)
    model = _pruned(exported, "tinyresnet")
    x = torch.rand(2, 3, 32, 32)  # the calibration batch is the batch the programs are generated for
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(model), "cpu",
                                       _opts(hybrid_libraries="sparsert", sparsert_max_configs=2), calibration=x,
                                       backends=backends)
    rows = _groups(eng)
    assert len(batches) == 1 and len(batches[0]) == 2 * len(rows)  # one NVRTC batch, every group's two programs
    assert sorted(generated) == sorted(r["name"] for r in rows)  # each group generated once, ahead
    assert all(r["library"] == "sparsert" and r["sparsert_build_s"]["compiled"].startswith("ahead") for r in rows)
    torch.testing.assert_close(eng(x)[0], _oracle(model, x), rtol=1e-4, atol=1e-4)


@emu
def test_hybrid_libraries_dense_sparsert_narrows_and_a_pooled_group_pools_after_the_kernel(exported, monkeypatch):
    model = _pruned(exported, "tinynet")
    monkeypatch.setattr(Chooser, "time", _clock({"sparsert": 0.5, "csr": 0.1, "ecr": 0.1}))
    x = torch.rand(2, 3, 32, 32)
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(model), "cpu",
                                       _opts(hybrid_libraries="dense,sparsert", sparsert_max_configs=1),
                                       calibration=x, backends=_backends(sparsert=True))
    rows = _groups(eng)
    pooled = [r for r in rows if r["op"] == "sparsecnn::CsrConvPool"]
    assert pooled and all(r["library"] == "sparsert" for r in rows)  # csr and ecr, faster here, were not asked
    assert all(set(r["libraries_ms"]) == {"dense", "sparsert"} and "unsupported" not in r for r in rows)
    torch.testing.assert_close(eng(x)[0], _oracle(model, x), rtol=1e-4, atol=1e-4)


@emu
def test_a_wrong_generated_kernel_is_rejected(exported, monkeypatch):
    from sparsecnn.runtimes.sparsert import codegen

    real_call = codegen.EmulatedKernel.__call__
    monkeypatch.setattr(codegen.EmulatedKernel, "__call__", lambda self, x, **kw: real_call(self, x, **kw) * 1.01)
    monkeypatch.setattr(Chooser, "time", _clock({"sparsert": 0.1}))
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(_pruned(exported, "tinynet")), "cpu",
                                       _opts(hybrid_libraries="sparsert", sparsert_max_configs=1),
                                       backends=_backends(sparsert=True))
    rows = _groups(eng)
    assert rows and all(r["library"] == "dense" for r in rows)
    assert all(any(n.startswith("generated:") and "wrong result" in why for n, why in r["choice"]["rejected"].items())
               for r in rows)


@emu
def test_sparsert_max_configs_and_max_instructions_bound_the_generated_candidates(exported, monkeypatch):
    monkeypatch.setattr(Chooser, "time", _clock({"sparsert": 0.5}))
    model = get_runtime("hybrid").rewrite(_pruned(exported, "tinynet"))
    x = torch.rand(1, 3, 32, 32)

    def generated(**pairs):
        eng = hybrid.compile_with_backends(model, "cpu", _opts(hybrid_libraries="sparsert", **pairs), calibration=x,
                                           backends=_backends(sparsert=True))
        return eng, [sum(n.startswith("generated:") for n in r["choice"].get("candidates_ms", {}))
                     for r in _groups(eng)]

    _, one = generated(sparsert_max_configs=1)
    _, three = generated(sparsert_max_configs=3)
    assert one and set(one) == {1} and max(three) > 1
    eng, none = generated(sparsert_max_instructions=1)  # fewer instructions than non-zeros: nothing generated
    assert set(none) == {0}
    rows = _groups(eng)
    assert all("code size" in r["unsupported"]["sparsert"] and r["library"] == "dense" for r in rows)
    # and the other limits say why, as every library does
    group = next(iter(eng.groups.values()))
    bf16 = torch.rand(1, group.g["in_channels"], 8, 8, dtype=torch.bfloat16)
    assert group.sparsert_candidates(bf16) == [] and "bfloat16" in group.unsupported["sparsert"]
    no_kernels = hybrid.compile_with_backends(model, "cpu", _opts(hybrid_libraries="sparsert"), calibration=x,
                                              backends=_backends())
    assert all("no generated kernels" in r["unsupported"]["sparsert"] for r in _groups(no_kernels))


# --- on the lent GPU: the real kernels of every library --------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name, prune, dtype", [("tinynet", "0.9", "fp32"), ("tinyresnet", "0.9", "fp16"),
                                                ("tinyresnet", "2:4", "fp16")])
def test_gpu_hybrid_engine_matches_onnxruntime_and_reloads(exported, tmp_path, name, prune, dtype):
    from sparsecnn.common.numerics import rel_err
    from sparsecnn.runtimes import load_engine

    model = _pruned(exported, name, prune)
    rt = get_runtime("hybrid")
    x = torch.rand(2, 3, 32, 32)
    eng = rt.compile(rt.rewrite(model), "cuda", {"dtype": dtype, "extra": {"choose_reps": 5}}, calibration=x)
    y = eng(x.cuda())[0].cpu()
    ref = _oracle(model, x)
    tol = {"fp32": 1e-4, "fp16": 2e-2}[dtype]  # whole network vs ONNX Runtime fp32 (DESIGN.md's runtime bars)
    assert rel_err(y, ref) <= tol
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]
    assert rows and all("libraries_ms" in r or r.get("choice", {}).get("how") == "only candidate" for r in rows)
    if prune == "2:4":
        assert any("cusparselt" in r.get("libraries_ms", {}) for r in rows)
    # sparsert's generated kernels competed and none computed a wrong result
    assert any("sparsert" in r.get("libraries_ms", {}) for r in rows)
    assert not [n for r in rows for n in r.get("choice", {}).get("rejected", {}) if n.startswith("generated:")]
    path = eng.save(tmp_path / "h.engine")
    again = load_engine(path)
    assert [sw.decision.how for sw in again.switches()] == ["saved"] * len(again.switches())
    assert rel_err(again(x.cuda())[0].cpu(), ref) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("name, dtype", [("tinyresnet", "fp32"), ("tinynet", "fp16")])
def test_gpu_hybrid_runs_sparsert_generated_kernels_and_reloads_them(exported, tmp_path, monkeypatch, name, dtype):
    """The generated kernels compiled with NVRTC, checked by the chooser against cuDNN, then made
    the winner by a stand-in clock (guard off: the engine runs them) and replayed from the file."""
    from sparsecnn.common.numerics import rel_err
    from sparsecnn.runtimes import load_engine

    model = _pruned(exported, name)
    rt = get_runtime("hybrid")
    x = torch.rand(2, 3, 32, 32)
    ref = _oracle(model, x)
    tol = {"fp32": 1e-4, "fp16": 2e-2}[dtype]
    monkeypatch.setattr(Chooser, "time", _clock({"sparsert": 0.3}))
    options = {"dtype": dtype, "tf32": False, "extra": {"hybrid_libraries": ["sparsert"], "guard": False,
                                                        "choose_reps": 5}}
    eng = rt.compile(rt.rewrite(model), "cuda", options, calibration=x)
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]
    assert rows and all(r["library"] == "sparsert" and not r["choice"].get("rejected") for r in rows)
    assert rel_err(eng(x.cuda())[0].cpu(), ref) <= tol
    path = eng.save(tmp_path / "h.engine")
    monkeypatch.setattr(Chooser, "time", _no_timing)
    again = load_engine(path)
    assert [sw.decision.how for sw in again.switches()] == ["saved"] * len(again.switches())
    assert all(r["library"] == "sparsert" for r in again.report() if r["op"].startswith("sparsecnn::CsrConv"))
    assert rel_err(again(x.cuda())[0].cpu(), ref) <= tol


# --- each declared option changes what it says ----------------------------------------------

def _opts(**pairs):
    from sparsecnn.runtimes.options import validate

    return {"extra": validate("hybrid", {k: str(v) for k, v in pairs.items()})}


def test_hybrid_max_density_and_csr_exclude_change_which_layers_are_grouped(exported):
    rt = get_runtime("hybrid")
    model = _pruned(exported, "tinyresnet", "2:4")  # density 0.5
    grouped = lambda m: sum(n.domain == "sparsecnn" for n in m.graph.node)  # noqa: E731
    assert grouped(rt.rewrite(model, _opts())) >= 4
    assert grouped(rt.rewrite(model, _opts(hybrid_max_density=0.3))) == 0
    first = next(n for n in rt.rewrite(model, _opts()).graph.node if n.domain == "sparsecnn")
    weight = first.input[1].rsplit(".csr.", 1)[0]
    kept = rt.rewrite(model, _opts(csr_exclude=weight))
    assert grouped(kept) == grouped(rt.rewrite(model, _opts())) - 1 and \
        all(not n.input[1].startswith(weight + ".csr") for n in kept.graph.node if n.domain == "sparsecnn")


@emu
def test_hybrid_libraries_limits_the_candidates_and_batch_sets_the_calibration_batch(exported, monkeypatch):
    seen = []
    monkeypatch.setattr(Chooser, "time", _clock({"ecr": 0.5, "csr": 0.7}))
    real = hybrid.Group.choose

    def spy(self, args, chooser, saved=None):
        seen.append(tuple(args[0].shape))
        return real(self, args, chooser, saved)

    monkeypatch.setattr(hybrid.Group, "choose", spy)
    model = get_runtime("hybrid").rewrite(_pruned(exported, "tinynet"))
    eng = hybrid.compile_with_backends(model, "cpu", _opts(hybrid_libraries="csr", batch=3), backends=_backends())
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]
    assert rows and all(set(r["libraries_ms"]) == {"dense", "csr"} and r["library"] == "csr" for r in rows)
    assert seen and all(shape[0] == 3 for shape in seen)


@emu
def test_an_engine_saved_on_another_compute_capability_is_measured_again_with_fresh_plans(exported, monkeypatch,
                                                                                         tmp_path):
    from sparsecnn.runtimes import load_engine

    model = get_runtime("hybrid").rewrite(_pruned(exported, "tinynet"))
    monkeypatch.setattr(Chooser, "time", _clock({"csr": 0.5, "ecr": 0.8}))
    backends = _backends()
    eng = hybrid.compile_with_backends(model, "cpu", {}, calibration=torch.rand(1, 3, 32, 32), backends=backends)
    eng.plans["1x3x32x32"] = {"chosen": "dense", "reason": "whole-graph guard: measured on the other card"}
    eng.card = {"name": "Other Card", "capability": "sm_00"}
    path = eng.save(tmp_path / "h.engine")
    # the reload goes through load_engine with this test's CPU kernels
    monkeypatch.setattr(hybrid, "compile", lambda m, d, o, state=None: hybrid.compile_with_backends(
        m, d, o, state=state, backends=backends))
    timed = []
    monkeypatch.setattr(Chooser, "time", lambda self, c, a: timed.append(1) or _clock({"csr": 0.5})(self, c, a))
    with pytest.warns(UserWarning, match="measured again"):
        again = load_engine(path, "cpu")
    assert timed and all(sw.decision.how == "measured" for sw in again.switches())
    assert again.plans == {}  # the other card's plan is not replayed over choices made here
