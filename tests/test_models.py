import numpy as np
import pytest
import torch

from helpers import ort_run, rel_err
from sparsecnn.common.errors import UserError
from sparsecnn.common.onnxio import get_input_spec
from sparsecnn.models import load_model


def test_trafficcamnet_outputs_and_onnx_names(exported):
    module, spec, _ = load_model("trafficcamnet")
    with torch.no_grad():
        cov, bbox = module(torch.rand(1, 3, 544, 960))
    assert tuple(cov.shape) == (1, 4, 34, 60) and tuple(bbox.shape) == (1, 16, 34, 60)
    assert 0 <= float(cov.min()) and float(cov.max()) <= 1
    model = exported("trafficcamnet")
    assert [i.name for i in model.graph.input] == ["input_1"]
    assert [o.name for o in model.graph.output] == ["output_cov/Sigmoid", "output_bbox/BiasAdd"]
    assert get_input_spec(model)["scale"] == pytest.approx(1 / 255)


def test_export_matches_the_torch_module_and_keeps_module_names(exported):
    module, spec, _ = load_model("resnet18")
    model = exported("resnet18")
    names = {t.name for t in model.graph.initializer}
    assert {"conv1.weight", "conv1.bias", "layer1.0.conv1.weight", "fc.weight"} <= names
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = module(x).numpy()
    assert rel_err(ort_run(model, x.numpy())[0], ref) < 1e-4


def test_state_dict_file_roundtrip_and_class_count_inferred(tmp_path):
    module, _, _ = load_model("tinyresnet", num_classes=7, seed=3)
    path = tmp_path / "w.pt"
    torch.save(module.state_dict(), path)
    again, spec, _ = load_model("tinyresnet", weights=str(path))
    assert spec.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), module(x))


def test_state_dict_of_another_architecture_is_a_user_error(tmp_path):
    module, _, _ = load_model("tinynet")
    path = tmp_path / "w.pt"
    torch.save(module.state_dict(), path)
    with pytest.raises(UserError, match="does not fit"):
        load_model("tinyresnet", weights=str(path))


def test_unknown_torchvision_weights_name_is_a_user_error():
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        load_model("resnet18", weights="NOT_A_WEIGHTS_NAME")
