"""torch.nn.Module -> dense ONNX with BatchNorm folded and module names kept as weight names."""
from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter

import onnx
import torch
from torch import nn

from ..common.errors import UserError
from ..common.memory import trim_heap
from ..common.onnxio import set_input_spec
from ..models.registry import InputSpec
from ..passes.fold_bn import fold_bn, inline_constant_identities
from ..passes.graph import default_exclusions, run_pipeline, set_prune_exclusions, weight_nodes

SUPPORTED_OPSETS = range(11, 21)

# The passes that turn the exporter's output into the hand-off form, in order.
EXPORT_PIPELINE = [(inline_constant_identities, {}), (fold_bn, {})]


def export_onnx(module: nn.Module, spec: InputSpec, exclude: tuple[str, ...] | None = (), opset: int = 17,
                batch_size: int = 1, release: bool = False) -> onnx.ModelProto:
    """Export `module` (eval mode) with a dynamic batch axis, then fold BatchNorm.

    BatchNorm is exported as-is and folded by the ONNX pass, so the folded Conv keeps its
    module's weight name (`layer1.0.conv1.weight`) instead of an exporter-made one.
    `exclude` (module names) is stored as the layers prune passes leave dense; None stores the
    rule a foreign ONNX file gets, its stems and heads (`passes.graph.default_exclusions`): a
    module from outside the registry is pruned as the same network given as an ONNX file.
    `release`: the caller is done with `module`: each weight moves into the ONNX model (the module
    keeps empty tensors), so the weights are in memory once, not twice, while the passes run.
    """
    if opset not in SUPPORTED_OPSETS:
        raise UserError(f"opset {opset} is not supported; use 13 (TensorRT 8.2 / Jetson Nano) to 20")
    module = module.eval()
    x = torch.zeros(batch_size, *spec.shape)
    names_out = list(spec.output_names)
    dynamic = {spec.input_name: {0: "N"}, **{n: {0: "N"} for n in names_out}}
    with warnings.catch_warnings(), torch.no_grad(), _exportable_pools(module, x):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        settings = dict(dynamo=False, opset_version=opset, input_names=[spec.input_name], output_names=names_out,
                        dynamic_axes=dynamic, do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
        model = _export_then_weights(module, x, spec.input_name, settings, release)
        if model is None:  # a weight the exporter names differently: the exporter's own (costlier) way
            buf = io.BytesIO()
            torch.onnx.export(module, (x,), buf, **settings)
            model = onnx.ModelProto()
            # upb copies a memoryview once (only a bytearray parses in place): small, the weights are not in it
            model.ParseFromString(buf.getbuffer())
            del buf
    model, _ = run_pipeline(model, EXPORT_PIPELINE)
    trim_heap()  # the exporter's scratch and the model before the pipeline were freed into the heap
    set_input_spec(model, spec.to_dict())
    if exclude is None:
        set_prune_exclusions(model, default_exclusions(model))
    else:
        weights = {w for _, w, _ in weight_nodes(model)}
        set_prune_exclusions(model, [f"{m}.weight" for m in exclude if f"{m}.weight" in weights])
    return model


def _export_then_weights(module: nn.Module, x: torch.Tensor, input_name: str, settings: dict,
                         release: bool = False) -> onnx.ModelProto | None:
    """The exported graph without its weights (`export_params=False`: they become graph inputs named as
    the module names them), then each weight added as an initializer of that name, in the exporter's order.

    The same model as the exporter's own weights would give, built with one copy of each weight at a
    time: exporting VGG-19 with its weights peaked at three copies of its 548 MiB on top of the module.
    None when a weight input names no parameter or buffer (the caller then exports with the weights).
    """
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, export_params=False, **settings)
    model = onnx.ModelProto()
    model.ParseFromString(buf.getbuffer())
    del buf
    tensors = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    weights = [vi for vi in model.graph.input if vi.name != input_name]
    for vi in weights:
        t = tensors.get(vi.name)
        if t is None or _onnx_type(t.dtype) != vi.type.tensor_type.elem_type:
            return None
    uses = Counter(id(tensors[vi.name]) for vi in weights)  # a tensor under two names is released after both
    for vi in weights:
        t = tensors[vi.name]
        shape, raw = tuple(t.shape), t.detach().cpu().contiguous().numpy().tobytes()
        uses[id(t)] -= 1
        if release and not uses[id(t)]:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)  # freed before the copy below is made
        init = model.graph.initializer.add()
        init.name, init.data_type = vi.name, vi.type.tensor_type.elem_type
        init.dims.extend(shape)
        init.raw_data = raw
        del raw
    inputs = [vi for vi in model.graph.input if vi.name == input_name]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return model


def _onnx_type(dtype: torch.dtype) -> int | None:
    """The ONNX element type of a torch dtype numpy can hold (None for others: bfloat16...)."""
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    except (TypeError, KeyError, ValueError, RuntimeError):
        return None


class _Replicate(nn.Module):
    """AdaptiveAvgPool2d applied to a 1x1 map: every output cell is the input value (exports as Mul)."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.register_buffer("ones", torch.ones(1, 1, *size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ones


@contextlib.contextmanager
def _exportable_pools(module: nn.Module, x: torch.Tensor):
    """Swap, for the export only, adaptive average pools that upsample a 1x1 map into an equivalent Mul.

    torchvision's VGG pools to 7x7 before its classifier; at small inputs (32x32: a 1x1 map)
    the ONNX exporter refuses that pool, although it only replicates the value.
    """
    pools = {n: m for n, m in module.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d) and n}
    sizes: dict[str, tuple] = {}
    if pools:
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: sizes.__setitem__(
            n, (tuple(inp[0].shape[-2:]), tuple(out.shape[-2:])))) for n, m in pools.items()]
        try:
            module(x[:1])
        finally:
            for h in hooks:
                h.remove()
    swapped = []
    try:
        for name, (size_in, size_out) in sizes.items():
            if size_in == (1, 1) and size_out != (1, 1):
                parent_name, _, attr = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                swapped.append((parent, attr, getattr(parent, attr)))
                setattr(parent, attr, _Replicate(size_out))
        yield
    finally:
        for parent, attr, original in swapped:
            setattr(parent, attr, original)
