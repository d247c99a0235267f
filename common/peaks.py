"""Published peaks of the Jetson boards and data-centre cards (fp32, tf32, fp16 dense and 2:4, DRAM
bandwidth) with their sources, and a card's peaks derived from what it reports when it is in no table.

Data only, no heavy imports: `check-jetson --help` lists the boards, and the roofline estimates
(passes/roofline.py) and the per-layer report price layers with them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Board:
    name: str
    sm: str
    fp16_dense_tflops: float
    fp16_sparse_tflops: float | None  # None: no 2:4 sparse tensor cores
    dram_gbs: float
    source: str
    tensor_cores: bool = False  # fp16 mma (Volta sm_70 and newer)
    jetpack: str = ""  # the newest JetPack for the board, and what it brings
    python: str = ""  # that JetPack's Python
    fp32_tflops: float | None = None  # CUDA cores (FMA, no tensor cores): the CUDA-core regime
    tf32_tflops: float | None = None  # TF32 tensor cores, dense (fp32 engines with TF32 allowed)

    def peak_tflops(self, precision: str) -> float | None:
        """The dense peak an engine of `precision` ('fp32': TF32 off, 'tf32', 'fp16') reaches at most."""
        return {"fp32": self.fp32_tflops, "tf32": self.tf32_tflops, "fp16": self.fp16_dense_tflops or None}[precision]


_JETPACK6 = "JetPack 6 (CUDA 12.6, TensorRT 10.3)"


def _orin(name: str, fp16_dense: float, gbs: float, fp32: float, source: str, jetpack: str = _JETPACK6) -> Board:
    """An Orin module (sm_87, Ampere tensor cores, 2:4 doubling the fp16 rate, JetPack 6's Python 3.10)."""
    return Board(name, "sm_87", fp16_dense, 2 * fp16_dense, gbs, source, tensor_cores=True, jetpack=jetpack,
                 python="3.10", fp32_tflops=fp32)


# Peaks as NVIDIA publishes them for each module (data sheets, developer-kit pages); where a data
# sheet gives INT8 TOPS only, fp16 is derived (Ampere tensor cores: fp16 = half the INT8 rate) and
# the comment says so. Not checked on a board: no Jetson has been run by this project.
BOARDS = {
    # NVIDIA Jetson Nano data sheet / developer-kit page: 128-core Maxwell GPU at 921.6 MHz,
    # "472 GFLOPS" (FP16, 2 x the FP32 rate through half2 FMA); 4 GB 64-bit LPDDR4, 25.6 GB/s.
    # No tensor cores: 2:4 sparsity cannot be used.
    "nano": Board("Jetson Nano 4GB", "sm_53", 0.472, None, 25.6,
                  "NVIDIA Jetson Nano data sheet: 472 GFLOPS FP16, LPDDR4 25.6 GB/s",
                  jetpack="JetPack 4.6 (CUDA 10.2, TensorRT 8.2)", python="3.6", fp32_tflops=0.236),
    # NVIDIA Jetson TX2 data sheet: 256-core Pascal GPU at up to 1.3 GHz, "1.33 TFLOPS" FP16
    # (half2 FMA); 8 GB 128-bit LPDDR4, 59.7 GB/s. No tensor cores.
    "tx2": Board("Jetson TX2 8GB", "sm_62", 1.33, None, 59.7,
                 "NVIDIA Jetson TX2 data sheet: 1.33 TFLOPS FP16, LPDDR4 59.7 GB/s",
                 jetpack="JetPack 4.6 (CUDA 10.2, TensorRT 8.2)", python="3.6", fp32_tflops=0.665),
    # NVIDIA Jetson Xavier NX data sheet: 384-core Volta GPU with 48 tensor cores at 1100 MHz,
    # "6 TFLOPS" FP16 (48 x 64 FMA x 2 x 1.1 GHz = 6.8, rounded down there); 8 GB 128-bit LPDDR4x,
    # 51.2 GB/s (59.7 on the 16 GB module). Tensor cores, but no 2:4 sparse ones (that is Ampere).
    "xavier-nx": Board("Jetson Xavier NX 8GB", "sm_72", 6.0, None, 51.2,
                       "NVIDIA Jetson Xavier NX data sheet: 6 TFLOPS FP16 (tensor cores), LPDDR4x 51.2 GB/s",
                       tensor_cores=True, jetpack="JetPack 5.1 (CUDA 11.4, TensorRT 8.5)", python="3.8",
                       fp32_tflops=0.845),
    # NVIDIA Jetson Orin Nano series data sheet (8GB module, 15 W mode, GPU at 625 MHz, 1024
    # CUDA cores, 32 tensor cores): 40 INT8 TOPS sparse / 20 dense; 128-bit LPDDR5 68 GB/s.
    # Ampere tensor cores run FP16 at half the INT8 rate: 10 TFLOPS dense, 20 sparse
    # (derived from the INT8 figures). JetPack 6.1+ "Super" mode (1020 MHz, 102 GB/s,
    # 67 sparse INT8 TOPS) would raise every number here by ~1.6x (compute) and 1.5x (bytes).
    "orin-nano": _orin("Jetson Orin Nano 8GB", 10.0, 68.0, 1.28, "NVIDIA Jetson Orin Nano data sheet: 40/20 INT8 "
                       "TOPS sparse/dense -> fp16 20/10 TFLOPS, LPDDR5 68 GB/s"),
    # NVIDIA Jetson Orin Nano Super Developer Kit (JetPack 6.1+ "MAXN SUPER" mode of the same 8GB module):
    # GPU at 1020 MHz, "67 INT8 TOPS" (sparse), 128-bit LPDDR5 102 GB/s. fp16 derived as above: 67 / 2 =
    # 33.5 TFLOPS sparse, 16.75 dense.
    "orin-nano-super": _orin("Jetson Orin Nano 8GB (Super mode)", 16.75, 102.0, 2.09,
                             "NVIDIA Jetson Orin Nano Super Developer Kit: 67 sparse INT8 TOPS -> fp16 33.5/16.75 "
                             "TFLOPS sparse/dense (derived), LPDDR5 102 GB/s",
                             jetpack="JetPack 6.1+ in MAXN SUPER mode (CUDA 12.6, TensorRT 10.3)"),
    # NVIDIA Jetson Orin NX series data sheet (16GB module): 1024 CUDA cores, 32 tensor cores at
    # 918 MHz: the Orin Nano's GPU at 918/625 of its clock, so 60/30 INT8 TOPS sparse/dense ->
    # fp16 30/15 TFLOPS (derived the same way); 128-bit LPDDR5, 102.4 GB/s.
    "orin-nx": _orin("Jetson Orin NX 16GB", 15.0, 102.4, 1.88, "NVIDIA Jetson Orin NX data sheet: 1024-core GPU "
                     "at 918 MHz -> fp16 30/15 TFLOPS sparse/dense (derived), LPDDR5 102.4 GB/s"),
    # NVIDIA Jetson AGX Orin series data sheet (64GB module): 2048 CUDA cores, 64 tensor cores at
    # 1.3 GHz, GPU "170 sparse INT8 TOPS" -> fp16 85/42.5 TFLOPS sparse/dense; 256-bit LPDDR5, 204.8 GB/s.
    "agx-orin": _orin("Jetson AGX Orin 64GB", 42.5, 204.8, 5.32, "NVIDIA Jetson AGX Orin data sheet: GPU 170 "
                      "sparse INT8 TOPS -> fp16 85/42.5 TFLOPS, LPDDR5 204.8 GB/s"),
}

# fp32_tflops of the boards: CUDA cores x 2 (FMA) x the GPU clock of the mode above (derived, not in the
# data sheets): Nano 128 x 0.9216 GHz, TX2 256 x 1.3, Xavier NX 384 x 1.1, Orin Nano 1024 x 0.625,
# Orin Nano Super 1024 x 1.02, Orin NX 1024 x 0.918, AGX Orin 2048 x 1.3.

# Data-centre and desktop cards by the name torch.cuda.get_device_name reports. FP32 is the CUDA-core
# (non-tensor) rate; fp16 and tf32 the dense tensor-core rates (the data sheets print the 2:4-sparse
# figure, twice these). Sources:
#   NVIDIA H100 Tensor Core GPU data sheet (H100 SXM / H100 PCIe): FP32 67 / 51 TFLOPS, TF32 989 / 756*,
#     FP16 1,979 / 1,513* (*with sparsity), GPU memory bandwidth 3.35 TB/s (HBM3) / 2 TB/s (HBM2e).
#   NVIDIA H200 Tensor Core GPU data sheet (H200 SXM): FP32 67, TF32 989*, FP16 1,979*, 4.8 TB/s HBM3e.
#   NVIDIA A100 Tensor Core GPU data sheet: FP32 19.5, TF32 156, FP16 312 (dense); 2,039 GB/s (80GB SXM),
#     1,935 (80GB PCIe), 1,555 (40GB).
#   NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP32 82.6, FP16 tensor with FP32 accumulate
#     165.2 (cuBLAS's fp16 GEMMs accumulate in fp32), TF32 82.6, GDDR6X 1,008 GB/s.
def _card(name, sm, fp32, tf32, fp16, fp16_sparse, gbs, source):
    return Board(name, sm, fp16, fp16_sparse, gbs, source, tensor_cores=True, fp32_tflops=fp32, tf32_tflops=tf32)


_H100 = "NVIDIA H100 Tensor Core GPU data sheet"
_A100 = "NVIDIA A100 Tensor Core GPU data sheet"
CARDS = {
    "NVIDIA H100 80GB HBM3": _card("H100 SXM 80GB", "sm_90", 67.0, 494.5, 989.5, 1979.0, 3350.0,
                                   f"{_H100} (H100 SXM): FP32 67 TFLOPS, FP16 989.5 dense, HBM3 3.35 TB/s"),
    "NVIDIA H100 PCIe": _card("H100 PCIe 80GB", "sm_90", 51.0, 378.0, 756.5, 1513.0, 2000.0,
                              f"{_H100} (H100 PCIe): FP32 51 TFLOPS, FP16 756.5 dense, HBM2e 2 TB/s"),
    "NVIDIA H200": _card("H200 SXM 141GB", "sm_90", 67.0, 494.5, 989.5, 1979.0, 4800.0,
                         "NVIDIA H200 Tensor Core GPU data sheet (H200 SXM): FP32 67 TFLOPS, FP16 989.5 dense, "
                         "HBM3e 4.8 TB/s"),
    "NVIDIA A100-SXM4-80GB": _card("A100 SXM 80GB", "sm_80", 19.5, 156.0, 312.0, 624.0, 2039.0,
                                   f"{_A100} (80GB SXM): FP32 19.5 TFLOPS, FP16 312, 2,039 GB/s"),
    "NVIDIA A100 80GB PCIe": _card("A100 PCIe 80GB", "sm_80", 19.5, 156.0, 312.0, 624.0, 1935.0,
                                   f"{_A100} (80GB PCIe): FP32 19.5 TFLOPS, FP16 312, 1,935 GB/s"),
    "NVIDIA A100-SXM4-40GB": _card("A100 SXM 40GB", "sm_80", 19.5, 156.0, 312.0, 624.0, 1555.0,
                                   f"{_A100} (40GB): FP32 19.5 TFLOPS, FP16 312, 1,555 GB/s"),
    "NVIDIA A100-PCIE-40GB": _card("A100 PCIe 40GB", "sm_80", 19.5, 156.0, 312.0, 624.0, 1555.0,
                                   f"{_A100} (40GB): FP32 19.5 TFLOPS, FP16 312, 1,555 GB/s"),
    "NVIDIA GeForce RTX 4090": _card("GeForce RTX 4090", "sm_89", 82.6, 82.6, 165.2, 330.4, 1008.0,
                                     "NVIDIA Ada GPU architecture whitepaper (RTX 4090): FP32 82.6 TFLOPS, FP16 "
                                     "tensor (FP32 accumulate) 165.2, 1,008 GB/s"),
}
# The Jetsons by torch's name for their GPU (not checked on a board; an Orin or Xavier name does not say
# which module, so those are derived).
TORCH_BOARD_NAMES = {"NVIDIA Tegra X1": "nano", "NVIDIA Tegra X2": "tx2"}
# FP32 FMA lanes per SM by compute capability (CUDA C++ Programming Guide, arithmetic instruction
# throughput): 64 on sm_60, sm_7x and sm_80; 128 on the others since Maxwell.
FP32_LANES_PER_SM = {(6, 0): 64, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64}


def card_peaks(name: str, capability: tuple[int, int] | None = None, sms: int | None = None,
               clock_khz: int | None = None, mem_clock_khz: int | None = None,
               bus_bits: int | None = None) -> tuple[Board | None, str]:
    """The peaks of the card torch calls `name`, and where they come from: (Board, 'data sheet: ...');
    for a card in neither CARDS nor BOARDS, FP32 and bandwidth derived from what the device reports
    (SMs x FP32 lanes x 2 x clock; 2 x memory clock x bus width): (Board, 'derived: ...'); (None, why)
    when even that is not known."""
    if name in CARDS:
        return CARDS[name], f"data sheet: {CARDS[name].source}"
    board = BOARDS.get(TORCH_BOARD_NAMES.get(name, name))
    if board is not None:
        return board, f"data sheet: {board.source} (fp32 derived: CUDA cores x 2 x clock)"
    missing = [what for what, v in (("SM count", sms), ("GPU clock", clock_khz), ("memory clock", mem_clock_khz),
                                    ("memory bus width", bus_bits)) if not v]
    if missing:
        return None, f"'{name}' is not in the peak table and its {', '.join(missing)} is not known"
    lanes = FP32_LANES_PER_SM.get(tuple(capability or ()), 128)
    fp32 = sms * lanes * 2 * clock_khz * 1e3 / 1e12
    gbs = 2 * mem_clock_khz * 1e3 * bus_bits / 8 / 1e9
    sm = f"sm_{capability[0]}{capability[1]}" if capability else "?"
    how = (f"derived: {sms} SMs x {lanes} FP32 lanes x 2 x {clock_khz / 1e6:.3f} GHz = {fp32:.1f} TFLOP/s, "
           f"2 x {mem_clock_khz / 1e6:.3f} GHz x {bus_bits} bit = {gbs:.0f} GB/s; no tensor-core peak known")
    return Board(name, sm, 0.0, None, gbs, how, fp32_tflops=fp32), how
