"""torch.nn.Module -> dense ONNX with BatchNorm folded and module names kept as weight names."""
from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import nn

from ..common.errors import UserError
from ..common.onnxio import set_input_spec
from ..models.registry import InputSpec
from ..passes.fold_bn import fold_bn, inline_constant_identities
from ..passes.graph import run_pipeline, set_prune_exclusions, weight_nodes

SUPPORTED_OPSETS = range(11, 21)

# The passes that turn the exporter's output into the hand-off form, in order.
EXPORT_PIPELINE = [(inline_constant_identities, {}), (fold_bn, {})]


def export_onnx(module: nn.Module, spec: InputSpec, exclude: tuple[str, ...] = (), opset: int = 17,
                batch_size: int = 1) -> onnx.ModelProto:
    """Export `module` (eval mode) with a dynamic batch axis, then fold BatchNorm.

    BatchNorm is exported as-is and folded by the ONNX pass, so the folded Conv keeps its
    module's weight name (`layer1.0.conv1.weight`) instead of an exporter-made one.
    """
    if opset not in SUPPORTED_OPSETS:
        raise UserError(f"opset {opset} is not supported; use 13 (TensorRT 8.2 / Jetson Nano) to 20")
    module = module.eval()
    x = torch.zeros(batch_size, *spec.shape)
    names_out = list(spec.output_names)
    dynamic = {spec.input_name: {0: "N"}, **{n: {0: "N"} for n in names_out}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=opset, input_names=[spec.input_name],
                          output_names=names_out, dynamic_axes=dynamic, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
    model = onnx.load_model_from_string(buf.getvalue())
    model, _ = run_pipeline(model, EXPORT_PIPELINE)
    set_input_spec(model, spec.to_dict())
    weights = {w for _, w, _ in weight_nodes(model)}
    set_prune_exclusions(model, [f"{m}.weight" for m in exclude if f"{m}.weight" in weights])
    return model
