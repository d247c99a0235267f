"""common/shapes: ONNX padding made explicit (expected pads worked out by hand)."""
from sparsecnn.common.shapes import conv_out_size, explicit_pads


def test_same_upper_puts_the_odd_pad_at_the_end_and_same_lower_at_the_beginning():
    # H 8, k 3, s 2: out 4 needs (4-1)*2 + 3 - 8 = 1 pad; W 7: (4-1)*2 + 3 - 7 = 2 pads
    assert explicit_pads("SAME_UPPER", None, [8, 7], [3, 3], [2, 2]) == [0, 1, 1, 1]
    assert explicit_pads(b"SAME_LOWER", None, [8, 7], [3, 3], [2, 2]) == [1, 1, 0, 1]


def test_same_padding_honours_dilation():
    # k 3 at dilation 2 spans 5: out 8 at stride 1 needs 7 + 5 - 8 = 4 pads
    assert explicit_pads("SAME_UPPER", None, [8], [3], [1], [2]) == [2, 2]
    assert conv_out_size(8, 4, 3, 1, 2) == 8


def test_explicit_valid_and_unknown_sizes():
    assert explicit_pads("NOTSET", [1, 2, 3, 4], [5, 5], [3, 3], [1, 1]) == [1, 2, 3, 4]
    assert explicit_pads(None, None, None, [3, 3], [1, 1]) == [0, 0, 0, 0]
    assert explicit_pads("VALID", [9, 9, 9, 9], None, [3, 3], [1, 1]) == [0, 0, 0, 0]
    assert explicit_pads("SAME_UPPER", None, None, [3, 3], [1, 1]) is None
    assert explicit_pads("SAME_UPPER", None, [None, 7], [3, 3], [1, 1]) is None
