"""The torch runtime's options (its runtime.py exposes them as OPTIONS).

The dense conv settings are shared with every runtime that leaves layers dense, so they are
declared once in runtimes/options.py; `choose_reps` times dense_conv=best's candidates.
"""
from __future__ import annotations

from ..options import CHOOSE_REPS, DENSE_CONV_OPTIONS

OPTIONS = [*DENSE_CONV_OPTIONS, CHOOSE_REPS]
