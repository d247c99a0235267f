import numpy as np
import pytest
import torch

from sparsecnn.common.errors import UserError
from sparsecnn.passes.masks import cubic_sparsity, is_2to4, mask_2to4, mask_magnitude, masks_magnitude


def test_2to4_keeps_the_two_largest_of_each_group_along_input_channels():
    w = torch.zeros(1, 8, 1, 1)
    w[0, :, 0, 0] = torch.tensor([0.1, -5.0, 3.0, 0.2, 1.0, 1.5, -2.0, 0.0])
    keep = mask_2to4(w)[0, :, 0, 0].tolist()
    assert keep == [False, True, True, False, False, True, True, False]


def test_2to4_groups_run_along_axis_1_not_the_kernel_axes():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    pruned = w * mask_2to4(w)
    # independent check: every (out, row, col) has 2 zeros in each 4 consecutive input channels
    groups = pruned.permute(0, 2, 3, 1).reshape(16, 3, 3, 2, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    assert not is_2to4(w)


def test_2to4_refuses_input_channels_not_multiple_of_4():
    with pytest.raises(ValueError):
        mask_2to4(torch.randn(4, 6, 3, 3))


def test_magnitude_mask_zeros_exactly_the_smallest():
    w = torch.tensor([3.0, -1.0, 0.5, -4.0, 2.0, 0.1, 6.0, -0.2, 1.5, 5.0])
    keep = mask_magnitude(w, 0.3)
    assert (~keep).sum() == 3
    assert set(torch.nonzero(~keep).flatten().tolist()) == {2, 5, 7}


def test_magnitude_mask_exact_count_with_ties():
    w = torch.ones(100)
    assert int((~mask_magnitude(w, 0.37)).sum()) == 37


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_a_user_error(bad):
    with pytest.raises(UserError):
        mask_magnitude(torch.randn(10), bad)


def test_global_scope_prunes_small_layer_harder_when_its_weights_are_small():
    torch.manual_seed(0)
    weights = {"big": 10 + torch.rand(1000), "small": torch.rand(1000) * 0.01}
    masks = masks_magnitude(weights, 0.5, "global")
    total_zero = sum(int((~m).sum()) for m in masks.values())
    assert total_zero == 1000
    assert int((~masks["small"]).sum()) == 1000 and int((~masks["big"]).sum()) == 0


def test_cubic_schedule_endpoints_and_monotone():
    values = [cubic_sparsity(t, 10, 0.9) for t in range(12)]
    assert values[0] == 0.0 and values[10] == pytest.approx(0.9) and values[11] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert np.isclose(cubic_sparsity(5, 10, 0.8), 0.8 * (1 - 0.5 ** 3))
