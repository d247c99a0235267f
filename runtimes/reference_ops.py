"""Reference (plain PyTorch, CPU-capable) implementations of the `sparsecnn`-domain ops.

Each sparse format keeps its op schemas and reference builders in its own module, which
exposes `OPS: dict[(domain, op_type), Builder]`; listing the module here is what makes
the reference runtime execute its ops (DESIGN contract 2). GPU kernels are tested
against these builders.
"""
from __future__ import annotations

import functools
import importlib

from .ops import Builder

REFERENCE_OP_MODULES: list[str] = [
    "sparsecnn.passes.two_four.reference",
    "sparsecnn.passes.csr.reference",
    "sparsecnn.passes.ecr.reference",
]


@functools.lru_cache(maxsize=None)
def reference_ops() -> dict[tuple[str, str], Builder]:
    table: dict[tuple[str, str], Builder] = {}
    for name in REFERENCE_OP_MODULES:
        table.update(importlib.import_module(name).OPS)
    return table
