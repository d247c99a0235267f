"""The shared ONNX -> PyTorch executor: a model becomes a list of steps over named tensors.

Every runtime compiles through this: the standard op table runs what a runtime does not
take over, and a runtime adds builders for its own `sparsecnn`-domain ops. Constant
sub-graphs (shape arithmetic, Constant nodes) are evaluated once at compile time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import onnx
import torch
from onnx import numpy_helper

from ..common.errors import UserError
from ..common.onnxio import graph_inputs
from ..passes.graph import node_label, static_shapes
from .ops import STANDARD_OPS, Builder, NodeContext, attributes

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Step:
    name: str
    op_type: str
    fn: Callable[..., Any]
    inputs: list[str]
    outputs: list[str]
    info: dict




class Executor:
    """Runs an ONNX graph with PyTorch ops; callable on tensors already on its device/dtype."""

    def __init__(self, model: onnx.ModelProto, device: str | torch.device = "cpu", dtype: str = "fp32",
                 ops: dict[tuple[str, str], Builder] | None = None, channels_last: bool = False,
                 options: dict | None = None):
        self.device = torch.device(device)
        if dtype not in TORCH_DTYPES:
            raise UserError(f"unknown precision '{dtype}'; choose one of {', '.join(TORCH_DTYPES)}")
        self.dtype = TORCH_DTYPES[dtype]
        self.channels_last = channels_last
        table = dict(STANDARD_OPS)
        table.update(ops or {})
        graph = model.graph
        inputs = graph_inputs(model)
        self.input_names = [name for name, _, _ in inputs]
        self.input_dims = [dims for _, dims, _ in inputs]  # declared sizes: what Engine.prepare checks calls against
        self.output_names = [o.name for o in graph.output]
        self.consts: dict[str, torch.Tensor] = {t.name: self._to_device(numpy_helper.to_array(t)) for t in graph.initializer}
        shapes = static_shapes(model)
        for node in graph.node:  # unknown ops fail before any work is done
            if (node.domain, node.op_type) not in table:
                dom = f"{node.domain}::" if node.domain else ""
                raise UserError(f"node '{node_label(node)}' uses op {dom}{node.op_type}, which this runtime "
                                "cannot run (see `sparsecnn inspect --ops` for the supported ops)")
        self.steps: list[Step] = []
        for node in graph.node:
            ctx = NodeContext(node, attributes(node), self.consts, shapes, self.device, self.dtype,
                              channels_last, options or {})
            try:
                fn = table[(node.domain, node.op_type)](ctx)
            except NotImplementedError as exc:
                raise UserError(f"node '{node_label(node)}' ({node.op_type}) uses an unsupported form: {exc}") from None
            ins = list(node.input)
            if ctx.inputs_used is not None:
                ins = [ins[i] if i < len(ins) else "" for i in ctx.inputs_used]
            if all((not n) or n in self.consts for n in ins):  # constant sub-graph: fold now
                outs = fn(*[self.consts.get(n) if n else None for n in ins])
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                for name, value in zip(node.output, outs):
                    self.consts[name] = value
                continue
            self.steps.append(Step(node_label(node), node.op_type if not node.domain else f"{node.domain}::{node.op_type}",
                                   fn, ins, list(node.output), ctx.info))
        # Constants used only to build steps (e.g. weights a sparse op re-encoded) are dropped.
        used = {n for s in self.steps for n in s.inputs} | set(self.output_names)
        self.consts = {k: v for k, v in self.consts.items() if k in used}

    def _to_device(self, array) -> torch.Tensor:
        t = torch.from_numpy(array.copy())
        if t.is_floating_point():
            return t.to(self.device, self.dtype)
        return t  # integer tensors are shapes and indices: they stay on the CPU

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise UserError(f"model takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}")
        env = dict(self.consts)
        env.update(zip(self.input_names, inputs))
        for step in self.steps:
            outs = step.fn(*[env[n] if n else None for n in step.inputs])
            if isinstance(outs, (tuple, list)):
                env.update(zip(step.outputs, outs))
            else:
                env[step.outputs[0]] = outs
        return tuple(env[n] for n in self.output_names)

    def walk(self, *inputs: torch.Tensor, before: Callable[[Step, list], None] | None = None) -> tuple[torch.Tensor, ...]:
        """Run like `__call__`, calling `before(step, args)` ahead of each step (for profilers and
        compile-time calibration; the hot path stays `__call__`)."""
        env = dict(self.consts)
        env.update(zip(self.input_names, inputs))
        for step in self.steps:
            args = [env[n] if n else None for n in step.inputs]
            if before is not None:
                before(step, args)
            outs = step.fn(*args)
            if isinstance(outs, (tuple, list)):
                env.update(zip(step.outputs, outs))
            else:
                env[step.outputs[0]] = outs
        return tuple(env[n] for n in self.output_names)

    def weight_bytes(self) -> int:
        """Bytes of constants the engine keeps on its device (weights, compressed or not)."""
        seen, total = set(), 0
        for v in list(self.consts.values()) + [t for s in self.steps for t in s.info.get("buffers", [])]:
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
        return total

    def profile(self, *inputs: torch.Tensor, reps: int = 20, warmup: int = 3, flush_l2: bool = False,
                graph: bool = True) -> list[dict]:
        """Median (and p90) time of each step run alone, through `time_calls`.

        On CUDA each step is captured in a CUDA graph of its own (several times over when it
        is shorter than a launch) and the replays are timed, so a layer's time is its
        kernels' time, not the Python launch overhead of eager mode (which at batch 1 can
        exceed the kernels); a step that cannot be captured is timed eagerly and says so
        (`timed`). The steps' times add up to about the whole network's graph-replay time;
        they are somewhat optimistic where a layer's weights fit in L2 when run alone (use
        `flush_l2` for the cold-cache bound).
        """
        from .timing import time_calls

        env = dict(self.consts)
        env.update(zip(self.input_names, inputs))
        rows = []
        for step in self.steps:
            args = [env[n] if n else None for n in step.inputs]
            outs = step.fn(*args)  # first run: lazy per-layer decisions happen here, untimed
            t = time_calls(lambda j, step=step, args=args: step.fn(*args), self.device, reps=reps, warmup=warmup,
                           flush_l2=flush_l2, graph=graph)
            if isinstance(outs, (tuple, list)):
                env.update(zip(step.outputs, outs))
            else:
                env[step.outputs[0]] = outs
            timed = "graph" if t.how == "graph" else "eager"
            rows.append({"name": step.name, "op": step.op_type, "ms": t.median_ms, "p90_ms": t.p90_ms,
                         "timed": timed, "inputs": list(step.inputs), "outputs": list(step.outputs),
                         **{k: v for k, v in step.info.items() if k != "buffers"}})
        return rows
