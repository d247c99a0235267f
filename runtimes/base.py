"""The runtime contract (DESIGN contract 3): Engine, its options, CUDA-graph replay, save/load.

A runtime module has `name`, `available() -> (bool, reason)` that never raises,
`rewrite(model, options) -> model` (its explicit list of passes) and
`compile(model, device, options) -> Engine`.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch

from ..common.errors import UserError
from ..common.fileio import atomic_path
from .executor import Executor

ENGINE_FORMAT = "sparsecnn-engine"
ENGINE_VERSION = 1


@dataclass
class CompileOptions:
    dtype: str = "fp32"          # fp32 | fp16
    cuda_graph: bool = True      # capture the whole network in one CUDA graph (GPU only)
    channels_last: bool = False  # NHWC activations and weights for cuDNN
    tf32: bool = False           # allow TF32 tensor cores for fp32 (off: the CUDA-core regime)
    extra: dict = field(default_factory=dict)  # runtime-specific settings

    @classmethod
    def from_dict(cls, d: dict | None) -> "CompileOptions":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known}
        kw = {k: v for k, v in d.items() if k in known}
        kw["extra"] = {**kw.get("extra", {}), **extra}
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class GraphReplay:
    """One CUDA graph of `fn` over static input buffers, for a fixed set of input shapes."""

    def __init__(self, fn: Callable, example_inputs: tuple[torch.Tensor, ...], warmup: int = 3,
                 first_call: bool = True):
        self.static_inputs = tuple(x.clone() for x in example_inputs)
        # One call on the current stream first: runtimes that choose kernels per layer by
        # timing them (dense_conv=best, cusparselt, csr, ecr, sparsert) do it on their first
        # call, and their own timing graphs must not be nested in a side stream or a capture
        # (cuDNN then failed with STREAM_MISMATCH on the H100). `first_call=False, warmup=0`
        # captures straight away, for a `fn` whose calls have all run before (their eager
        # form can be slow: an eager cuSPARSELt call on small shapes took 0.3 s on the H100).
        if first_call:
            fn(*self.static_inputs)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up loads kernels and picks cuDNN algorithms
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            # a graph of only host-side work (e.g. a runtime's dense fallback already cached) is
            # empty and correct; PyTorch warns on every build, which users read as a fault
            warnings.filterwarnings("ignore", message=".*CUDA Graph is empty.*", category=UserWarning)
            with torch.cuda.graph(self.graph):
                self.static_outputs = fn(*self.static_inputs)

    def replay(self) -> tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.static_outputs

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for buf, x in zip(self.static_inputs, inputs):
            buf.copy_(x)
        return self.replay()


class Engine:
    """A compiled model: callable on torch tensors, reports per layer what ran, saves and loads."""

    runtime = "base"
    # a reload whose layers were measured again (e.g. saved on another compute capability): the saved
    # whole-graph plans were for the saved choices, and load_engine does not replay them
    measured_again = False

    def __init__(self, model: onnx.ModelProto, device: str | torch.device, options: CompileOptions,
                 executor: Executor):
        self.model = model
        self.device = torch.device(device)
        self.options = options
        self.executor = executor
        self._graphs: dict[tuple, GraphReplay] = {}
        self._as_chosen: dict[tuple, GraphReplay] = {}  # before the whole-graph guard (bench: "as is")
        self.plans: dict[str, dict] = {}  # input shape -> whole-graph plan: times, winner, why (saved)

    @property
    def input_names(self) -> list[str]:
        return self.executor.input_names

    @property
    def output_names(self) -> list[str]:
        return self.executor.output_names

    def _precision_context(self):
        return _MatmulPrecision(self.device, self.options.tf32)

    def runner(self, *inputs: torch.Tensor) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The function that runs this engine on inputs of these shapes (a graph replay on GPU).

        Inputs must already be prepared (`prepare`). Benchmarks time the returned callable.
        On GPU the first call at a shape is the engine's plan (`_plan_graph`): the layers decide
        on these inputs, then the whole-graph guard may choose a dense plan instead.
        """
        if self.device.type != "cuda" or not self.options.cuda_graph:
            return self.executor
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self._graphs:
            with self._precision_context(), torch.no_grad():
                self._graphs[key] = self._plan_graph(key, inputs)
        return self._graphs[key]

    def unguarded_runner(self, *inputs: torch.Tensor) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The engine as its layers chose, before the whole-graph guard (what `bench` reports as
        the library "as it is"); the same as `runner` where the guard kept it."""
        runner = self.runner(*inputs)
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        return self._as_chosen.get(key, runner)

    # --- whole-graph plans and the guard (runtimes/chooser.py) ------------------------------
    def switches(self) -> list:
        """Steps whose implementation a chooser picked and the guard may switch (chooser.Switch)."""
        from .chooser import Switch

        return [s.fn for s in self.executor.steps if isinstance(s.fn, Switch)]

    def best_dense_convs(self) -> list:
        """Dense convs choosing per layer (dense_conv=best): the uniform NCHW / NHWC plans apply."""
        from .torch.dense_conv import DenseConv

        return [s.fn for s in self.executor.steps if isinstance(s.fn, DenseConv) and s.fn.mode == "best"]

    def guard_on(self) -> bool:
        return bool(self.options.extra.get("guard", True))

    def _apply_plan(self, plan: str, reverted: list[str] | None = None, why: str | None = None) -> dict:
        """Put the layers in `plan`'s state; returns what to undo it with (`_restore`)."""
        undo = {"switches": {id(sw): (sw, sw.active) for sw in self.switches()},
                "convs": {id(c): (c, c.override) for c in self.best_dense_convs()}}
        for sw in self.switches():
            if plan == "dense" or (plan == "partial" and sw.name in (reverted or [])):
                target = sw.best_dense()
            elif plan in ("cudnn", "cudnn_nhwc"):
                target = f"dense:{plan}" if f"dense:{plan}" in sw.candidates else sw.best_dense()
            else:
                continue
            if target is not None and target != sw.active:
                sw.use(target, why)
        if plan in ("cudnn", "cudnn_nhwc"):
            for c in self.best_dense_convs():
                c.override = plan
        return undo

    @staticmethod
    def _restore(undo: dict) -> None:
        for sw, active in undo["switches"].values():
            sw.use(active)
        for c, override in undo["convs"].values():
            c.override = override

    def _plan_graph(self, key, inputs) -> GraphReplay:
        """Capture the network as its layers choose, then (guard on, or a dense engine with per-layer
        dense convs) the same network all dense and uniformly on cuDNN NCHW / NHWC; keep the fastest,
        timed interleaved. A sparse engine that loses first tries reverting its least profitable half
        of sparse layers, then falls back whole; `self.plans` says what happened and why."""
        from .chooser import guard_graphs

        label = "x".join(str(d) for d in inputs[0].shape)
        chosen = GraphReplay(self.executor, inputs)  # its first call decides every undecided layer
        self._as_chosen[key] = chosen
        sparse = [sw for sw in self.switches() if not sw.is_dense]
        uniform = bool(self.best_dense_convs()) or any("dense:cudnn" in sw.candidates for sw in self.switches())
        plans = []
        if sparse and self.guard_on():
            plans.append("dense")
        if uniform and (not sparse or self.guard_on()):
            plans += ["cudnn", "cudnn_nhwc"]
        saved = self.plans.get(label)
        if not plans:
            self.plans[label] = {"chosen": "as chosen", "reason": "no sparse layer" if not sparse else "guard off"}
            return chosen
        if saved and saved.get("chosen") in ("as chosen", "partial", *plans):
            if saved["chosen"] == "as chosen":
                return chosen
            self._apply_plan(saved["chosen"], saved.get("reverted"), saved.get("reason"))
            return GraphReplay(self.executor, inputs)
        graphs = {"as chosen": chosen}
        for plan in plans:
            undo = self._apply_plan(plan)
            try:
                graphs[plan] = GraphReplay(self.executor, inputs)
            finally:
                self._restore(undo)
        winner, times = guard_graphs({k: g.replay for k, g in graphs.items()}, self.device)
        record = {"chosen": winner, "ms": {k: round(v, 5) for k, v in times.items()},
                  "sparse_layers": [sw.name for sw in sparse]}
        if sparse and winner != "as chosen" and len(sparse) > 1:
            order = sorted(sparse, key=lambda sw: sw.decision.saving_ms)  # least profitable first
            reverted = [sw.name for sw in order[:len(order) // 2]]
            undo = self._apply_plan("partial", reverted)
            try:
                graphs["partial"] = GraphReplay(self.executor, inputs)
            finally:
                self._restore(undo)
            w2, t2 = guard_graphs({"partial": graphs["partial"].replay, winner: graphs[winner].replay}, self.device)
            record["ms"]["partial"] = round(t2["partial"], 5)
            if w2 == "partial":
                winner = "partial"
                record.update(chosen="partial", reverted=reverted)
        if winner != "as chosen":
            lost = times["as chosen"] / min(record["ms"].values())
            why = (f"whole-graph guard: plan '{winner}' ran {lost:.2f}x faster than the layers' own choices"
                   if sparse else f"whole-network plan '{winner}' beat the per-layer choices")
            record["reason"] = why
            self._apply_plan(winner, record.get("reverted"), why)
            for c in self.best_dense_convs():  # a uniform plan wins: keep it per shape, not as an override
                if c.override is not None and c.last_key is not None:
                    c.set_choice(c.last_key, c.override, why)
                c.override = None
        self.plans[label] = record
        # a graph keeps the kernels it captured: the winner's, captured in the state now applied, is the engine
        return graphs[winner]

    def walk_to_choose(self, inputs: tuple, before: Callable, replaying: bool) -> None:
        """Run `inputs` through the network with `before(step, args)` ahead of each step: layers that
        choose on real activations (calibration) decide on what their predecessors produce. Graphs
        captured before are stale; a fresh choice (not `replaying` saved ones) drops the plans too."""
        prepared = self.prepare(*inputs)
        with torch.no_grad(), self._precision_context():
            self.executor.walk(*prepared, before=before)
        self._graphs.clear()
        self._as_chosen.clear()
        if not replaying:
            self.plans.clear()

    def prepare(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The inputs on the engine's device, dtype and layout; a wrong count, type, rank or channel
        count is a UserError naming the input (a graph replay took extra inputs silently, a wrong shape
        failed deep inside a layer with torch's message). Batch and spatial sizes may differ from the
        declared ones: a convolutional engine runs any (bench and the tests run smaller inputs)."""
        names, dims_of = self.executor.input_names, self.executor.input_dims
        if len(inputs) != len(names):
            raise UserError(f"model takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
        for name, dims, x in zip(names, dims_of, inputs):
            if not isinstance(x, torch.Tensor):
                raise UserError(f"input '{name}' must be a torch tensor, got {type(x).__name__}"
                                + (" (torch.from_numpy(x) makes one)" if type(x).__module__ == "numpy" else ""))
            if dims is not None and (x.dim() != len(dims) or (len(dims) > 1 and dims[1] not in (None, x.shape[1]))):
                want = ", ".join("N" if i == 0 else "?" if d is None else str(d) for i, d in enumerate(dims))
                raise UserError(f"input '{name}' has shape {list(x.shape)}; the model takes [{want}]")
        return tuple(self.executor.prepare_input(x) for x in inputs)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run on `inputs` (any device/dtype); returns fp32 outputs the caller owns."""
        prepared = self.prepare(*inputs)
        with torch.no_grad(), self._precision_context():
            outs = self.runner(*prepared)(*prepared)
        return tuple(o.float().clone() for o in outs)

    def profile(self, *inputs: torch.Tensor, reps: int = 20, warmup: int = 3, flush_l2: bool = False) -> list[dict]:
        """Per-step times on `inputs` (any device/dtype) in this engine's precision (Executor.profile)."""
        prepared = self.prepare(*inputs)
        with torch.no_grad(), self._precision_context():
            return self.executor.profile(*prepared, reps=reps, warmup=warmup, flush_l2=flush_l2)

    def report(self) -> list[dict]:
        """Per layer (step): name, op and what the runtime ran for it.

        Builders fill `NodeContext.info` with these keys where they apply: `kernel` (what
        ran), `format` (csr, 2:4, ecr, dense...), `nnz`, `sparsity`, `config` (tile sizes
        etc.), `reason` (why a layer stayed dense), `buffers` (device tensors the op keeps,
        counted in `weight_bytes`, not reported).
        """
        return [{"name": s.name, "op": s.op_type, **{k: v for k, v in s.info.items() if k != "buffers"}}
                for s in self.executor.steps]

    def weight_bytes(self) -> int:
        return self.executor.weight_bytes()

    def save(self, path: str | Path) -> Path:
        """A zip holding the (rewritten) ONNX model and the compile options; loading recompiles."""
        manifest = {"format": ENGINE_FORMAT, "version": ENGINE_VERSION, "runtime": self.runtime,
                    "options": self.options.to_dict(), "state": self.full_state(),
                    # what ran per layer, for `sparsecnn inspect ENGINE` (a reload recompiles, never reads it)
                    "device": str(self.device), "card": card_properties(self.device),
                    "report": json.loads(json.dumps(self.report(), default=str))}
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("engine.json", json.dumps(manifest, indent=2))
                z.writestr("model.onnx", self.model.SerializeToString())
                for name, data in self.saved_files().items():
                    z.writestr(f"files/{name}", data)
        return Path(path)

    def saved_state(self) -> dict:
        """Runtime decisions worth keeping across a reload (e.g. per-layer kernel choices)."""
        return {}

    def full_state(self) -> dict:
        """What the engine file keeps: the runtime's own state, every chosen layer's decision
        (`choices`, read back by the runtime's builders) and the whole-graph plans (`plans`)."""
        state = dict(self.saved_state())
        decided = {c.name: dict(c.decided) for c in self.best_dense_convs() if c.decided}
        if decided:  # the dense convs' measured choices (dense_conv=best), replayed by `with_saved_decisions`
            state["dense_conv_decisions"] = decided
        switches = self.switches()
        if switches:
            state["choices"] = {sw.name: {**sw.decision.to_dict(), "active": sw.active} for sw in switches}
        if self.plans:
            state["plans"] = self.plans
        return state

    def saved_files(self) -> dict[str, bytes]:
        """Binary artefacts to keep in the engine file (e.g. a TensorRT plan); on load they
        come back to `compile` as `state["files"]`."""
        return {}


class _MatmulPrecision:
    """Sets TF32 for cuBLAS and cuDNN for the duration of a run, then restores it."""

    def __init__(self, device: torch.device, tf32: bool):
        self.active = device.type == "cuda"
        self.tf32 = tf32

    def __enter__(self):
        if self.active:
            self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    def __exit__(self, *exc):
        if self.active:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# An engine file is someone else's file: every size is bounded before anything is read.
ENGINE_MAX_MEMBERS = 4096
ENGINE_MAX_MEMBER_BYTES = 2**31          # one member inflated (protobuf's own limit is 2 GiB)
ENGINE_MAX_TOTAL_BYTES = 3 * 2**30       # all members inflated
ENGINE_MAX_MANIFEST_BYTES = 64 * 2**20
# inflated / compressed, members over 1 MiB: deflate tops out near 1030x (all zeros);
# real weights, even 99 % pruned, stay far below
ENGINE_MAX_RATIO = 500
_ENGINE_MEMBER_NAME = re.compile(r"^(engine\.json|model\.onnx|files/[A-Za-z0-9_.\-][A-Za-z0-9_.\-/]*)$")


def card_properties(device: torch.device | str) -> dict | None:
    """The GPU behind `device` as the per-layer report's roofline needs it (torch's name, capability, SMs,
    clocks in kHz, memory bus in bits; a field torch does not report is None); None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": [props.major, props.minor], "sms": props.multi_processor_count,
            # clocks and bus width: torch 2.6 and newer
            "clock_khz": getattr(props, "clock_rate", None), "mem_clock_khz": getattr(props, "memory_clock_rate", None),
            "bus_bits": getattr(props, "memory_bus_width", None)}


def with_saved_decisions(extra: dict, state: dict | None) -> dict:
    """The executor's options for a reload: `extra` plus the dense convs' saved choices (full_state's
    `dense_conv_decisions`), so a reloaded engine keeps them instead of measuring again."""
    out = dict(extra)
    if state and state.get("dense_conv_decisions"):
        out["dense_conv_decisions"] = state["dense_conv_decisions"]
    return out


def calibration_input(model: onnx.ModelProto, batch: int) -> torch.Tensor:
    """A seeded random input batch of the model's size (input spec, else the ONNX input's fixed dims), for
    runtimes that choose on activations when no calibration images are given."""
    from ..common.onnxio import get_input_spec

    spec = get_input_spec(model)
    if spec:
        shape = (spec["channels"], spec["height"], spec["width"])
    else:
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
        if not dims or any(d <= 0 for d in dims):
            raise UserError("the model's input size is unknown; pass calibration images to compile")
        shape = tuple(dims)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))


def read_engine(path: str | Path) -> tuple[dict, onnx.ModelProto, dict[str, bytes]]:
    """The manifest, model and `saved_files` of an engine file, all validated in one read (one
    UserError line for each fault); what `load_engine` rebuilds from. The one engine-file
    validator: zip members bounded, manifest schema, model as checked ONNX."""
    from ..common.onnxio import parse_model

    p = Path(path)
    if not p.is_file():
        raise UserError(f"engine file not found: {p}")

    def bad(why: str) -> UserError:
        return UserError(f"{p} is not a sparsecnn engine file that can be trusted: {why}; rebuild it with "
                         "`sparsecnn convert ... --runtime NAME --engine FILE`")

    try:
        with zipfile.ZipFile(p) as z:
            members = z.infolist()
            if len(members) > ENGINE_MAX_MEMBERS:
                raise bad(f"{len(members)} members (at most {ENGINE_MAX_MEMBERS})")
            total = 0
            for m in members:
                if m.is_dir():
                    continue
                if not _ENGINE_MEMBER_NAME.match(m.filename) or ".." in m.filename.split("/"):
                    raise bad(f"unexpected member name {m.filename!r}")
                if m.file_size > ENGINE_MAX_MEMBER_BYTES:
                    raise bad(f"member {m.filename} inflates to {m.file_size} bytes (at most {ENGINE_MAX_MEMBER_BYTES})")
                if m.file_size > 2**20 and m.file_size > ENGINE_MAX_RATIO * max(m.compress_size, 1):
                    raise bad(f"member {m.filename} inflates {m.file_size // max(m.compress_size, 1)}x "
                              f"(a zip bomb; at most {ENGINE_MAX_RATIO}x)")
                total += m.file_size
            if total > ENGINE_MAX_TOTAL_BYTES:
                raise bad(f"members inflate to {total} bytes in all (at most {ENGINE_MAX_TOTAL_BYTES})")
            names = {m.filename for m in members}
            for required in ("engine.json", "model.onnx"):
                if required not in names:
                    raise bad(f"no {required} inside")
            if z.getinfo("engine.json").file_size > ENGINE_MAX_MANIFEST_BYTES:
                raise bad("engine.json is too large")

            def read(info: zipfile.ZipInfo) -> bytes:
                # the declared size may lie: never read past it
                with z.open(info) as f:
                    data = f.read(info.file_size + 1)
                if len(data) != info.file_size:
                    raise bad(f"member {info.filename} is not the size its header declares")
                return data

            raw_manifest = read(z.getinfo("engine.json"))
            raw_model = read(z.getinfo("model.onnx"))
            files = {m.filename[len("files/"):]: read(m) for m in members
                     if m.filename.startswith("files/") and not m.is_dir()}
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError,
            RuntimeError) as exc:  # RuntimeError: encrypted members
        raise bad(f"not a readable zip ({type(exc).__name__})") from None
    manifest = _check_manifest(raw_manifest, bad)
    model = parse_model(raw_model, f"{p} (its model.onnx)")
    return manifest, model, files


def _check_manifest(raw: bytes, bad: Callable[[str], UserError]) -> dict:
    """engine.json: format, version, a known runtime, options and state of the right types."""
    from . import runtime_names

    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise bad(f"engine.json is not JSON ({type(exc).__name__})") from None
    if not isinstance(manifest, dict):
        raise bad("engine.json is not a JSON object")
    if manifest.get("format") != ENGINE_FORMAT or manifest.get("version") != ENGINE_VERSION:
        raise bad(f"format/version {manifest.get('format')!r} v{manifest.get('version')!r}, expected "
                  f"{ENGINE_FORMAT} v{ENGINE_VERSION}")
    runtime = manifest.get("runtime")
    if not isinstance(runtime, str) or runtime not in runtime_names():
        raise bad(f"runtime {runtime!r} is not one of {', '.join(runtime_names())}")
    options = manifest.get("options")
    if not isinstance(options, dict):
        raise bad("'options' is not an object")
    kinds = {"dtype": str, "cuda_graph": bool, "channels_last": bool, "tf32": bool, "extra": dict, "device": str}
    for key, kind in kinds.items():
        if key in options and options[key] is not None and not isinstance(options[key], kind):
            raise bad(f"option '{key}' is {type(options[key]).__name__}, not {kind.__name__}")
    if options.get("dtype", "fp32") not in ("fp32", "fp16"):
        raise bad(f"option dtype {options['dtype']!r} is not fp32 or fp16")
    state = manifest.get("state", {})
    if state is not None and not isinstance(state, dict):
        raise bad("'state' is not an object")
    for key in ("choices", "plans"):
        if isinstance(state, dict) and state.get(key) is not None and not isinstance(state[key], dict):
            raise bad(f"state '{key}' is not an object")
    report = manifest.get("report")
    if report is not None and not (isinstance(report, list) and all(isinstance(r, dict) for r in report)):
        raise bad("'report' is not a list of objects")
    return manifest
