"""bench reports a sparse library as it is (guard off) beside the guarded engine people deploy.

The guard acts on GPU only (CUDA-graph plans); here the engine's two runners are stand-ins, so
the bench's bookkeeping is checked on the CPU."""
import torch

from sparsecnn.converter import bench
from sparsecnn.converter.regimes import parse_regimes
from sparsecnn.passes.prune import prune_unstructured
from sparsecnn.runtimes import base


class _Replay:
    def __init__(self, out):
        self.out = out

    def replay(self):
        return self.out


def _candidates(exported):
    regime = parse_regimes("fp32-cuda-core")[0]
    model = prune_unstructured(exported("tinynet"), 0.9).model
    x = torch.randn(1, 3, 32, 32)
    return bench._engine_candidate("csr @ 0.9", "runtime", "csr", "0.9", "best", model, regime, x, torch.device("cpu"))


def test_a_guard_that_fell_back_gives_two_rows_the_deployed_engine_and_the_library_as_is(exported, monkeypatch):
    guarded, as_is = _Replay(("guarded",)), _Replay(("as is",))
    why = "whole-graph guard: plan 'dense' ran 1.20x faster than the layers' own choices"

    def runner(self, *xs):
        self.plans = {"1x3x32x32": {"chosen": "dense", "reason": why}}
        return guarded

    monkeypatch.setattr(base.Engine, "runner", runner)
    monkeypatch.setattr(base.Engine, "unguarded_runner", lambda self, *xs: as_is)
    deployed, raw = _candidates(exported)
    assert (deployed.label, raw.label) == ("csr @ 0.9", "csr @ 0.9 as is")
    assert deployed.row["guard"] == "dense" and deployed.row["guard_reason"] == why
    assert raw.row["guard"] == "off" and raw.kind == deployed.kind == "runtime"
    assert deployed.run(0) == ("guarded",) and raw.run(0) == ("as is",)  # each times its own graph


def test_a_guard_that_kept_the_layers_choice_gives_one_row(exported, monkeypatch):
    graph = _Replay(("same",))

    def runner(self, *xs):
        self.plans = {"1x3x32x32": {"chosen": "as chosen"}}
        return graph

    monkeypatch.setattr(base.Engine, "runner", runner)
    monkeypatch.setattr(base.Engine, "unguarded_runner", lambda self, *xs: graph)
    c = _candidates(exported)
    assert not isinstance(c, list) and c.row["guard"] == "as chosen"
