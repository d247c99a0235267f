"""Reference (plain PyTorch, CPU-capable) implementations of the `sparsecnn`-domain ops.

Each sparse format's op registers its builder here beside its schema, so the reference
runtime executes every custom op (DESIGN contract 2).
"""
from __future__ import annotations

from .ops import Builder

REFERENCE_OPS: dict[tuple[str, str], Builder] = {}
