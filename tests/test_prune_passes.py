import numpy as np
import pytest
import torch

from helpers import Separable, initializers
from sparsecnn.passes.graph import check_model, default_exclusions, prune_exclusions, weight_nodes
from sparsecnn.passes.prune import prune_2to4, prune_unstructured, prune_pipeline
from sparsecnn.common.errors import UserError


def satisfies_2to4(w: np.ndarray) -> bool:
    """Written independently of the pass: per (out, kh, kw), <= 2 non-zeros in each 4 input channels."""
    if w.ndim == 2:
        w = w[:, :, None, None]
    cout, cin, kh, kw = w.shape
    for o in range(cout):
        for r in range(kh):
            for c in range(kw):
                col = w[o, :, r, c]
                for g in range(0, cin, 4):
                    if np.count_nonzero(col[g:g + 4]) > 2:
                        return False
    return True


def test_resnet18_2to4_every_prunable_conv_complies(exported):
    dense = exported("resnet18")
    res = prune_2to4(dense)
    check_model(res.model)
    after = initializers(res.model)
    before = initializers(dense)
    excluded = set(prune_exclusions(dense))
    assert excluded == {"conv1.weight", "fc.weight"}
    convs = [w for n, w, _ in weight_nodes(res.model) if n.op_type == "Conv" and w not in excluded]
    assert len(convs) == 19
    for w in convs:
        assert satisfies_2to4(after[w]), w
        assert np.count_nonzero(after[w]) == after[w].size // 2
    for w in excluded:
        np.testing.assert_array_equal(after[w], before[w])
    assert res.counters["pruned"] == 19


def test_channels_not_multiple_of_4_are_skipped_whole_and_reported(exported):
    dense = exported("tinynet_odd")
    res = prune_2to4(dense)
    before, after = initializers(dense), initializers(res.model)
    # features.3: 6 -> 10 channels, features.6: 10 -> 14; neither input count is a multiple of 4
    assert res.counters["skipped_channels_not_multiple_of_4"] == 2
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_reaches_target_over_prunable_layers(exported, scope):
    dense = exported("resnet18")
    res = prune_unstructured(dense, 0.9, scope=scope)
    after, before = initializers(res.model), initializers(dense)
    excluded = set(prune_exclusions(dense))
    prunable = [w for _, w, _ in weight_nodes(dense) if w not in excluded]
    total = sum(after[w].size for w in prunable)
    zeros = sum(after[w].size - np.count_nonzero(after[w]) for w in prunable)
    assert abs(zeros / total - 0.9) <= 0.01
    for w in excluded:
        np.testing.assert_array_equal(after[w], before[w])
    if scope == "layer":
        for w in prunable:
            assert abs(1 - np.count_nonzero(after[w]) / after[w].size - 0.9) < 0.01


def test_extra_exclusions_by_glob_stay_dense(exported):
    dense = exported("resnet18")
    res = prune_unstructured(dense, 0.5, exclude=["layer4.*"])
    before, after = initializers(dense), initializers(res.model)
    for name in before:
        if name.startswith("layer4.") and name.endswith("weight"):
            np.testing.assert_array_equal(after[name], before[name])
    assert np.count_nonzero(after["layer3.0.conv1.weight"]) < before["layer3.0.conv1.weight"].size


@pytest.mark.parametrize("name", ["resnet18", "vgg19", "trafficcamnet", "tinynet", "tinyresnet"])
def test_registry_exclusions_agree_with_the_stem_and_head_rule(exported, name):
    model = exported(name)
    assert set(prune_exclusions(model)) == set(default_exclusions(model))


@pytest.mark.parametrize("spec", ["1.0", "-0.2", "1.5", "half", "3:4"])
def test_bad_prune_spec_is_a_user_error(spec):
    with pytest.raises(UserError):
        prune_pipeline(spec)


def test_depthwise_convs_are_pruned_and_counted_and_a_module_keeps_stem_and_head_dense():
    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models.registry import InputSpec
    from sparsecnn.passes.prune import depthwise_weights

    torch.manual_seed(0)
    dense = export_onnx(Separable().eval(), InputSpec(3, 8, 8), None)  # None: the stem-and-head rule
    assert set(prune_exclusions(dense)) == {"stem.weight", "head.weight"}
    assert depthwise_weights(dense) == ["dw.weight", "dw2.weight"]
    res = prune_unstructured(dense, 0.9)
    assert res.counters["pruned"] == 4 and res.counters["pruned_depthwise"] == 2
    after = initializers(res.model)
    assert np.count_nonzero(after["dw.weight"]) == round(0.1 * 8 * 9)
    assert "pruned_depthwise" not in prune_unstructured(dense, 0.9, exclude=["dw*"]).counters
    assert "pruned_depthwise" not in prune_2to4(dense).counters  # one input channel: 2:4 skips them


def test_extra_exclusions_join_the_files_list_of_dense_layers(exported):
    dense = exported("tinyresnet")
    assert sorted(prune_exclusions(prune_unstructured(dense, 0.5).model)) == ["conv1.weight", "fc.weight"]
    out = prune_2to4(dense, exclude=["layer2.*"]).model
    want = {"conv1.weight", "fc.weight"} | {w for _, w, _ in weight_nodes(dense) if w.startswith("layer2.")}
    assert len(want) > 2 and set(prune_exclusions(out)) == want
