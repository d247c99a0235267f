"""The one chooser: measure candidates, keep the fastest correct one — per layer and per graph.

Every "which implementation runs this layer" decision in every runtime goes through
`Chooser.choose` (dense_conv=best's cuDNN NCHW/NHWC/im2col, csr's kernel configs, ecr's
variants, sparsert's generated kernels, cusparselt's 2:4 GEMMs), and every "is the whole
engine faster than dense" decision through `guard_graphs`. The rules, once:

1. Each candidate runs the layer on the layer's *real* input (the first input the engine
   sees, or calibration images) and is checked against a reference output (a trusted dense
   form); `rel_err` above `layer_tolerance(dtype)` rejects it, and the report says so.
   A candidate that raises is rejected too (out of memory, a plan that does not fit).
2. The correct candidates are timed the same way: CUDA-graph replays (several calls per
   replay when one call is shorter than a launch), interleaved in rounds so clock drift hits
   all alike (`time_interleaved_calls`). A first short screening pass drops the clearly slow
   ones when there are many.
3. The dense candidates of a layer are its best dense forms (the same everywhere:
   `runtimes/torch/dense_conv.py`'s engines); a sparse candidate wins only if it beats the
   fastest dense one by `margin` (default MARGIN). Among dense forms the fastest wins.
4. A decision is a plain dict (`Decision.to_dict`) saved in the engine file and replayed on
   reload without timing anything.

`guard_graphs` is the whole-graph check: the engine as chosen against its all-dense form
(and any other dense plans the runtime offers), timed interleaved; it returns the winner
and the engine falls back and says so (base.Engine.runner).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..common.numerics import layer_tolerance, rel_err

MARGIN = 0.03          # a sparse candidate must be this much faster than the best dense one
SCREEN_ABOVE = 4       # more correct candidates than this: screen briefly, keep the fastest FINALISTS
FINALISTS = 3


@dataclass
class Candidate:
    """One way to run a layer: `fn(*args)` computes it (args: the layer's inputs, e.g. x and the
    residual of a fused Add); `dense` marks the baseline forms every sparse one must beat."""
    name: str
    fn: Callable[..., Any]
    dense: bool
    library: str = ""
    detail: dict = field(default_factory=dict)  # what the report and a reload need (a kernel config...): JSON
    buffers: list = field(default_factory=list)  # device tensors it keeps (weight_bytes counts them)
    as_tensor: Callable[[Any], Any] | None = None  # its output as a dense tensor, for the check (ME's sparse maps)


@dataclass
class Decision:
    layer: str
    chosen: str
    dense: bool
    library: str = ""
    how: str = "measured"          # measured | saved | forced | only candidate
    times_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    best_dense: str | None = None
    best_dense_ms: float | None = None
    margin: float = MARGIN
    reason: str = ""
    detail: dict = field(default_factory=dict)  # the chosen candidate's detail

    @property
    def time_ms(self) -> float | None:
        return self.times_ms.get(self.chosen)

    @property
    def saving_ms(self) -> float:
        """How much the choice saves against the best dense form (0 when dense or unmeasured)."""
        if self.dense or self.best_dense_ms is None or self.time_ms is None:
            return 0.0
        return self.best_dense_ms - self.time_ms

    def to_dict(self) -> dict:
        d = asdict(self)
        d["times_ms"] = {k: round(v, 5) for k, v in self.times_ms.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def report(self) -> dict:
        """The per-layer report's view: what ran, by how much it won, why others lost."""
        out = {"chosen": self.chosen, "library": self.library, "how": self.how, "reason": self.reason}
        if self.times_ms:
            out["candidates_ms"] = {k: round(v, 4) for k, v in sorted(self.times_ms.items(), key=lambda kv: kv[1])}
        if self.best_dense_ms is not None and self.time_ms:
            out["vs_best_dense"] = round(self.best_dense_ms / self.time_ms, 3)
        if self.rejected:
            out["rejected"] = dict(self.rejected)
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class Chooser:
    """Per-layer decisions with one set of rules (module docstring)."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype = torch.float32, tf32: bool = False,
                 margin: float = MARGIN, reps: int = 30, policy: str = "measure"):
        self.device = torch.device(device)
        self.dtype = dtype
        self.tolerance = layer_tolerance(dtype, tf32)
        self.margin = float(margin)
        self.reps = int(reps)
        if policy not in ("measure", "sparse", "dense"):
            raise ValueError(f"policy must be measure, sparse or dense, not {policy!r}")
        self.policy = policy

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check(self, candidates: list[Candidate], args: tuple, reference) -> tuple[list[Candidate], dict[str, str]]:
        """The candidates whose output on `args` matches `reference` (a tensor, or the name of the
        candidate whose output is trusted), and why the others were rejected."""
        ok, rejected = [], {}
        ref = reference
        if isinstance(reference, str):
            ref = next(c for c in candidates if c.name == reference).fn(*args)
            if isinstance(ref, (tuple, list)):
                ref = ref[0]
        for c in candidates:
            if c.name == reference:  # the trusted form itself: its output is the reference
                ok.append(c)
                continue
            try:
                out = c.fn(*args)
                self._sync()
            except Exception as exc:
                self._sync()
                rejected[c.name] = "failed: " + _first_line(exc)
                continue
            if isinstance(out, (tuple, list)):
                out = out[0]
            if c.as_tensor is not None:
                out = c.as_tensor(out)
            err = rel_err(out, ref)
            if err > self.tolerance:  # a wrong candidate is never chosen, whatever its speed
                rejected[c.name] = f"wrong result: rel err {err:.2e} > {self.tolerance:g}"
            else:
                ok.append(c)
        return ok, rejected

    def time(self, candidates: list[Candidate], args: tuple) -> dict[str, float]:
        """Median ms per call of each candidate on `args`, timed interleaved (graph replays on CUDA)."""
        from .timing import time_interleaved_calls

        calls = {c.name: (lambda j, c=c: c.fn(*args)) for c in candidates}
        times = {}
        if len(calls) > SCREEN_ABOVE:  # screen: a short pass, then the fastest few again, fully
            quick = time_interleaved_calls(calls, self.device, reps=max(6, self.reps // 5), rounds=2)
            times = {k: t.median_ms for k, t in quick.items()}
            dense = [c.name for c in candidates if c.dense]
            keep = set(sorted(times, key=times.get)[:FINALISTS]) | set(sorted(dense, key=times.get)[:1])
            calls = {k: v for k, v in calls.items() if k in keep}
        full = time_interleaved_calls(calls, self.device, reps=self.reps, rounds=3)
        times.update({k: t.median_ms for k, t in full.items()})
        return times

    def choose(self, layer: str, candidates: list[Candidate], args: tuple, reference=None, saved: dict | None = None,
               forced: str | None = None) -> Decision:
        """Pick one of `candidates` for `layer` on its inputs `args`. `reference`: the expected output (tensor) or the
        name of the candidate whose output is trusted (default: the first dense candidate).
        `saved`: a Decision dict from an engine file — replayed without timing when its choice
        is still a candidate. `forced`: a candidate name to take as is (an option asked for it)."""
        by_name = {c.name: c for c in candidates}
        if not candidates:
            raise ValueError(f"{layer}: no candidates")
        if saved and saved.get("chosen") in by_name:
            d = Decision.from_dict(saved)
            d.how = "saved"
            return d
        if forced is not None and forced in by_name:
            c = by_name[forced]
            return Decision(layer, c.name, c.dense, c.library, how="forced", margin=self.margin, reason="forced",
                            detail=c.detail)
        if len(candidates) == 1:
            c = candidates[0]
            return Decision(layer, c.name, c.dense, c.library, how="only candidate", margin=self.margin,
                            reason="the only candidate", detail=c.detail)
        if reference is None:
            reference = next((c.name for c in candidates if c.dense), candidates[0].name)
        ok, rejected = self.check(candidates, args, reference)
        if not ok:
            fallback = next((c for c in candidates if c.dense), candidates[0])
            return Decision(layer, fallback.name, fallback.dense, fallback.library, how="measured",
                            rejected=rejected, margin=self.margin, reason="every candidate failed its check",
                            detail=fallback.detail)
        if self.policy == "dense":
            ok = [c for c in ok if c.dense] or ok
        elif self.policy == "sparse":
            ok = [c for c in ok if not c.dense] or ok
        times = self.time(ok, args) if len(ok) > 1 else {}
        dense = [c for c in ok if c.dense and c.name in times]
        sparse = [c for c in ok if not c.dense and c.name in times]
        best_dense = min(dense, key=lambda c: times[c.name]) if dense else None
        best_sparse = min(sparse, key=lambda c: times[c.name]) if sparse else None
        d = Decision(layer, "", True, times_ms=times, rejected=rejected, margin=self.margin,
                     best_dense=best_dense.name if best_dense else None,
                     best_dense_ms=times[best_dense.name] if best_dense else None)
        if len(ok) == 1:
            winner, d.how, d.reason = ok[0], "only candidate", "the only correct candidate"
        elif best_sparse is None:
            winner, d.reason = best_dense, "fastest dense form"
        elif best_dense is None:
            winner, d.reason = best_sparse, "no dense form passed"
        elif times[best_sparse.name] < times[best_dense.name] * (1.0 - self.margin):
            winner = best_sparse
            d.reason = (f"{times[best_dense.name] / times[best_sparse.name]:.2f}x the best dense form "
                        f"({best_dense.name})")
        else:
            winner = best_dense
            ratio = times[best_dense.name] / times[best_sparse.name]
            d.reason = (f"sparse does not win by the {self.margin:.0%} margin (best sparse {best_sparse.name} "
                        f"at {ratio:.2f}x)" if ratio > 1 else
                        f"dense measured faster (best sparse {best_sparse.name} at {ratio:.2f}x)")
        d.chosen, d.dense, d.library, d.detail = winner.name, winner.dense, winner.library, winner.detail
        return d


class Switch:
    """An executor step whose implementation was chosen (a `Decision`) and can still be switched:
    the whole-graph guard sends it back to its best dense form, a weight budget back to sparse.

    Keeps the chosen candidate's function, every dense form (cheap: they share one dense
    weight) and the best sparse one, nothing else."""

    def __init__(self, decision: Decision, candidates: list[Candidate], info: dict | None = None,
                 describe: Callable[["Switch"], None] | None = None):
        self.decision = decision
        self.info = info if info is not None else {}
        self.describe = describe  # refreshes the runtime's report keys (format, kernel, ...) after a switch
        times = decision.times_ms
        sparse = sorted((c for c in candidates if not c.dense and (c.name in times or c.name == decision.chosen)),
                        key=lambda c: times.get(c.name, float("inf")))
        keep = {c.name for c in candidates if c.dense} | {decision.chosen} | ({sparse[0].name} if sparse else set())
        self.candidates = {c.name: c for c in candidates if c.name in keep}
        self.active = decision.chosen
        self.fn = self.candidates[self.active].fn
        self.info["choice"] = decision.report()

    @property
    def name(self) -> str:
        return self.decision.layer

    @property
    def is_dense(self) -> bool:
        return self.candidates[self.active].dense

    def best_dense(self) -> str | None:
        if self.decision.best_dense in self.candidates:
            return self.decision.best_dense
        return next((n for n, c in self.candidates.items() if c.dense), None)

    def best_sparse(self) -> str | None:
        return next((n for n, c in self.candidates.items() if not c.dense), None)

    def use(self, name: str, why: str | None = None) -> None:
        self.active = name
        self.fn = self.candidates[name].fn
        if why:
            self.info["choice"] = {**self.decision.report(), "now": name, "why": why}
        elif name == self.decision.chosen:
            self.info["choice"] = self.decision.report()
        if self.describe is not None:
            self.describe(self)
        else:  # the generic report: what runs now
            cand = self.candidates[name]
            self.info.update(format="dense" if cand.dense else (cand.library or "sparse"),
                             kernel=cand.detail.get("kernel", cand.name))
            if why:
                self.info["reason"] = why

    def __call__(self, *args):
        return self.fn(*args)


def guard_graphs(graphs: dict[str, Callable[[], Any]], device: torch.device | str, reps: int = 60,
                 prefer: str | None = None, margin: float = 0.0) -> tuple[str, dict[str, float]]:
    """The fastest of several whole-network graphs (replay callables), timed interleaved.

    `prefer`: the graph kept on a near-tie (within `margin`), e.g. the all-dense one when a
    sparse engine must not ship slower. Returns (winner, median ms per graph)."""
    from .timing import time_interleaved

    timed = time_interleaved({k: (lambda i, g=g: g()) for k, g in graphs.items()}, device, reps=reps, rounds=4)
    times = {k: t.median_ms for k, t in timed.items()}
    winner = min(times, key=times.get)
    if prefer is not None and prefer in times and winner != prefer and times[prefer] <= times[winner] * (1 + margin):
        winner = prefer
    return winner, times
