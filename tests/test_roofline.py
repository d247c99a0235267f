"""The roofline line of the per-layer report (passes/roofline.py's cost model and card peaks, converter/
layer_report.py's fields and column) and the conv-GEMM shape lister the GEMM sweep uses. Expected numbers
are worked out by hand in the tests; CPU only (the card is named, not present)."""
import json

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sparsecnn.converter.layer_report import build_report, format_report
from sparsecnn.common.peaks import card_peaks
from sparsecnn.passes.roofline import conv_gemm_shapes

H100 = {"name": "NVIDIA H100 80GB HBM3"}


def _conv_64x64_3x3_at_16x16():
    """One 3x3 conv, 64 -> 64 channels, pad 1, on 16x16; every 10th weight kept (3687 of 36864)."""
    w = np.zeros((64, 64, 3, 3), np.float32)
    w.reshape(-1)[::10] = 1.0
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 16, 16])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _report(step: dict, dtype="fp32", device="cuda:0", card=H100, tf32=False):
    return build_report(pruned=_conv_64x64_3x3_at_16x16(), steps=[{"name": "c", **step}], runtime="csr",
                        device=device, dtype=dtype, card=card, tf32=tf32)


def test_a_csr_layer_on_an_h100_by_hand():
    report = _report({"op": "sparsecnn::CsrConv", "format": "csr", "ms": 0.0005})
    (row,) = report["layers"]
    # CSR: 2 x nnz x N useful FLOPs; values 4 B + uint16 column 2 B a non-zero, 65 int32 row pointers,
    # input and output 64 x 256 fp32 each
    assert row["roofline_flops"] == 2 * 3687 * 256 == 1_887_744
    assert row["roofline_bytes"] == 3687 * 6 + 65 * 4 + 2 * 64 * 256 * 4 == 153_454
    # memory-bound: 153,454 B / 3.35 TB/s = 0.045807 us (compute: 1,887,744 / 67e12 = 0.028175 us)
    assert row["roofline_bound"] == "memory" and row["roofline_us"] == pytest.approx(0.0458072, rel=1e-5)
    # dense: 2 x 64 x 576 x 256 = 18,874,368 FLOPs / 67 TFLOP/s = 0.281707 us, compute-bound
    assert row["roofline_dense_us"] == pytest.approx(0.2817070, rel=1e-5)
    assert row["roofline_csr_us"] == pytest.approx(0.0458072, rel=1e-5)
    assert row["measured_over_roofline"] == pytest.approx(0.5 / 0.0458072, rel=1e-5)  # 10.92
    head = report["roofline"]
    assert head["peak_tflops"] == 67.0 and head["bandwidth_gbs"] == 3350.0 and head["precision"] == "fp32"
    assert head["source"].startswith("data sheet: NVIDIA H100 Tensor Core GPU data sheet") and head["batch"] == 1
    text = format_report(report)
    assert "roof" in text.splitlines()[0]
    assert "0.0458us 10.9x" in next(ln for ln in text.splitlines() if ln.startswith("c "))
    assert "roof: ESTIMATE from published peaks (not measured), batch 1: max(FLOPs / 67 TFLOP/s FP32 CUDA cores" \
        in text
    assert json.loads(json.dumps(report))["layers"][0]["roofline_format"] == "csr"


def test_a_dense_fp16_layer_takes_the_tensor_core_peak_and_two_byte_values():
    (row,) = _report({"op": "Conv", "format": "dense"}, dtype="fp16")["layers"]
    # 2 x 36,864 weight bytes + 2 x 2 x 16,384 activation bytes = 139,264 B / 3.35 TB/s = 0.041571 us;
    # compute 18,874,368 / 989.5 TFLOP/s = 0.019075 us
    assert row["roofline_bytes"] == 139_264 and row["roofline_bound"] == "memory"
    assert row["roofline_us"] == pytest.approx(0.0415713, rel=1e-5)
    assert "measured_over_roofline" not in row  # no time measured
    assert _report({"op": "Conv", "format": "dense"}, tf32=True)["roofline"]["peak_tflops"] == 494.5


def test_a_layer_on_csrs_tensor_core_kernel_is_priced_as_load_sparse_compute_dense():
    choice = {"chosen": "tensor-core tc m64 n64", "library": "csr"}
    (row,) = _report({"op": "sparsecnn::CsrConv", "format": "csr", "choice": choice}, dtype="fp16")["layers"]
    # the dense FLOPs on the tensor cores, one 4-byte word per non-zero + fp16 input and output
    assert row["roofline_format"] == "tiled-csl" and row["roofline_flops"] == 2 * 64 * 576 * 256
    assert row["roofline_bytes"] == 4 * 3687 + 2 * 2 * 64 * 256
    (plain,) = _report({"op": "sparsecnn::CsrConv", "format": "csr", "choice": {"chosen": "r8v1w4"}},
                       dtype="fp16")["layers"]
    assert plain["roofline_format"] == "csr"


@pytest.mark.parametrize("device,card,dtype,reason", [
    ("cpu", None, "fp32", "a CPU engine: the roofline is drawn for GPUs only"),
    ("cuda:0", None, "fp32", "the GPU is not named"),
    ("cuda:0", {"name": "NVIDIA Future GPU", "sms": 100}, "fp32", "'NVIDIA Future GPU' is not in the peak table"),
    ("cuda:0", {"name": "NVIDIA Future GPU", "capability": [9, 0], "sms": 100, "clock_khz": 2_000_000,
                "mem_clock_khz": 1_000_000, "bus_bits": 4096}, "fp16", "no FP16 peak known for NVIDIA Future GPU"),
])
def test_the_roofline_is_blank_with_a_reason(device, card, dtype, reason):
    report = _report({"op": "sparsecnn::CsrConv", "format": "csr", "ms": 0.001}, dtype=dtype, device=device, card=card)
    assert report["roofline"]["reason"].startswith(reason)
    assert "roofline_us" not in report["layers"][0]
    text = format_report(report)
    assert f"roof: none ({reason}" in text
    assert next(ln for ln in text.splitlines() if ln.startswith("c ")).split()[-1] != "x"


def test_a_feature_map_sparse_layer_has_no_weight_roofline():
    (row,) = _report({"op": "sparsecnn::EcrConv", "format": "ecr", "ms": 0.001})["layers"]
    assert "roofline_us" not in row and row["roofline_reason"].startswith("feature-map-sparse format ecr")


def test_an_unknown_card_gets_peaks_derived_from_what_the_device_reports():
    # an sm_80 card of 108 SMs at 1.41 GHz with 5120-bit memory at 1.215 GHz: A100 40GB's figures
    # (its data sheet: 19.5 TFLOPS FP32, 1,555 GB/s); sm_80 has 64 FP32 lanes an SM
    board, how = card_peaks("an A100 by another name", (8, 0), 108, 1_410_000, 1_215_000, 5120)
    assert board.fp32_tflops == pytest.approx(108 * 64 * 2 * 1.41e9 / 1e12) == pytest.approx(19.49184)
    assert board.dram_gbs == pytest.approx(1555.2) and how.startswith("derived: 108 SMs x 64 FP32 lanes")
    assert board.peak_tflops("fp16") is None
    known, how = card_peaks("NVIDIA H100 PCIe")
    assert (known.fp32_tflops, known.dram_gbs, known.fp16_dense_tflops) == (51.0, 2000.0, 756.5)
    assert card_peaks("NVIDIA Tegra X1")[0].name == "Jetson Nano 4GB"


class _Shapes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)    # 16x16 -> 8x8
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)                 # the same GEMM as `a`
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = torch.nn.Linear(16, 10)                          # not a conv

    def forward(self, x):
        x = self.dw(self.pw(self.b(self.a(self.stem(x)))))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def shapes_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "shapes.onnx"
    torch.onnx.export(_Shapes().eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


def test_conv_gemm_shapes_lists_each_conv_once_as_m_k_n(shapes_onnx):
    import onnx

    model = onnx.load(str(shapes_onnx))
    # (Cout, Cin/groups x kh x kw, output pixels x batch)
    assert conv_gemm_shapes(model) == [(8, 27, 64), (8, 72, 64), (16, 8, 64), (16, 9, 64)]
    assert conv_gemm_shapes(model, batch=2) == [(8, 27, 128), (8, 72, 128), (16, 8, 128), (16, 9, 128)]


def test_the_gemm_sweep_takes_a_models_conv_shapes(shapes_onnx, capsys, tmp_path):
    from helpers import cli as run_cli
    from sparsecnn.common.errors import UserError
    from sparsecnn.converter.bench import run_bench
    from sparsecnn.converter.gemm_sweep import SWEEP_SHAPES, sweep_shapes

    ours = [(8, 27, 64), (8, 72, 64), (16, 8, 64), (16, 9, 64)]
    assert sweep_shapes(["seed", str(shapes_onnx), "seed"]) == SWEEP_SHAPES + ours
    with pytest.raises(UserError):
        sweep_shapes(["no-such-model"])
    result = run_bench(models=[], gemm=True, quick=False, regimes=[], batches=[1], prunes=["none"], dense=["best"],
                       runtime_dense_conv="best", runtimes=["torch"], devices=[torch.device("cpu")], repeats=1,
                       progress=False, gemm_shapes=[str(shapes_onnx)], gemm_methods=["cublas"], gemm_sparsities=[0.5],
                       gemm_regimes=["fp32-cuda-core"])
    gemm = result["gemm"]
    assert [tuple(s) for s in gemm["settings"]["shapes"]] == ours
    assert {(r["M"], r["K"], r["N"]) for r in gemm["rows"] if r["ok"]} == set(ours)
    # the CLI's --gemm-shapes reaches it: an unknown set is one line, before any timing
    code, _, err = run_cli(capsys, "bench", "spmm", "--gemm-shapes", "seed,no-such-model", "--device", "cpu",
                           "--no-progress", "-o", tmp_path / "out")
    assert code == 2 and "no-such-model" in err and len(err.strip().splitlines()) <= 2, err


def test_each_weight_format_costs_by_hand():
    from sparsecnn.passes.roofline import format_cost

    m, k, n, act, nnz = 64, 576, 196, 1000, 3686  # about 90 % of 64 x 576 pruned
    assert format_cost(m, k, n, "dense", 2, act) == {"flops": 2 * m * k * n, "bytes": 2 * m * k + 2 * act}
    assert format_cost(m, k, n, "csr", 2, act, nnz=nnz) == {"flops": 2 * nnz * n,
                                                            "bytes": nnz * (2 + 2) + 4 * (m + 1) + 2 * act}
    assert format_cost(m, k, n, "2:4", 2, act) == {"flops": m * k * n, "bytes": m * k + m * k // 8 + 2 * act}
    # load sparse, compute dense: the tensor cores do the dense FLOPs; one 32-bit word per non-zero
    assert format_cost(m, k, n, "tiled-csl", 2, act, nnz=nnz) == {"flops": 2 * m * k * n, "bytes": 4 * nnz + 2 * act}
    with pytest.raises(ValueError):
        format_cost(m, k, n, "ecr", 2, act)


def test_the_roof_gap_line_counts_layers_near_their_roofline_and_names_the_furthest():
    from sparsecnn.converter.bench_report import roof_gap

    rows = [{"name": "a", "measured_over_roofline": 2.0}, {"name": "b", "measured_over_roofline": 7.5},
            {"name": "c", "measured_over_roofline": 1.2}, {"name": "d", "measured_over_roofline": 3.5},
            {"name": "untimed"}]
    assert roof_gap(rows) == ("roof gap: 2 of 4 timed layers within 3x of their roofline time (median 2.8x); "
                              "furthest: b 7.5x, d 3.5x")
    assert roof_gap([{"name": "untimed"}]) == ""
