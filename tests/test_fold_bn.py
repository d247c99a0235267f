import io
import warnings

import numpy as np
import onnx
import torch

from helpers import ort_run, rel_err
from sparsecnn.models import load_model
from sparsecnn.passes.fold_bn import fold_bn, inline_constant_identities
from sparsecnn.passes.graph import check_model, run_pipeline


def _export_with_bn(module, shape):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(*shape),), buf, dynamo=False, opset_version=17,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_model_from_string(buf.getvalue())


def test_fold_bn_keeps_outputs_and_weight_names():
    module, _, _ = load_model("tinyresnet")
    torch.manual_seed(1)
    for m in module.modules():  # non-trivial statistics so folding has something to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model = _export_with_bn(module, (1, 3, 32, 32))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 9
    folded, results = run_pipeline(model, [(inline_constant_identities, {}), (fold_bn, {})])
    check_model(folded)
    assert results[1].counters["folded"] == 9
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    names = {t.name for t in folded.graph.initializer}
    assert {"layer1.conv1.weight", "layer1.conv1.bias", "layer2.downsample.0.weight"} <= names
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert rel_err(ort_run(folded, x)[0], ort_run(model, x)[0]) < 1e-5
    with torch.no_grad():
        assert rel_err(ort_run(folded, x)[0], module(torch.from_numpy(x)).numpy()) < 1e-5


def test_fold_bn_leaves_batchnorm_without_a_conv_before_it():
    bn = torch.nn.BatchNorm2d(4)
    model = _export_with_bn(torch.nn.Sequential(torch.nn.ReLU(), bn), (1, 4, 5, 5))
    res = fold_bn(inline_constant_identities(model).model)
    assert res.counters["skipped_not_after_conv"] == 1
    assert any(n.op_type == "BatchNormalization" for n in res.model.graph.node)
