"""The csr runtime's options (its runtime.py exposes them as OPTIONS); defaults as runtime.py reads them."""
from __future__ import annotations

from ...passes.csr.rewrite import DEFAULT_MAX_DENSITY
from ..options import SHARED_OPTIONS, Option

OPTIONS = [
    *SHARED_OPTIONS,
    Option("csr_decide", str, "measure", "per layer: measure (time sparse and dense, keep the faster), threshold "
           "(sparse when density <= csr_max_density) or sparse (always)", choices=("measure", "threshold", "sparse")),
    Option("csr_max_density", float, DEFAULT_MAX_DENSITY, "layers denser than this stay dense (rewrite and "
           "csr_decide=threshold)", minimum=0.0),
    Option("csr_autotune", bool, True, "time every candidate kernel config (off: take the first)"),
    Option("csr_tune_reps", int, 15, "timed repetitions per candidate kernel config", minimum=1),
    Option("csr_exclude", list, [], "extra layers to leave dense in the rewrite (weight or module names, globs)"),
    Option("csr_fuse", bool, True, "fuse the residual Add after a layer into its op (a Relu is always fused)"),
    Option("csr_weight_budget", float, 0.0, "cap on the engine's weights as a fraction of dense fp32: layers "
           "measured faster dense stay sparse beyond it (0: off)", minimum=0.0),
]
