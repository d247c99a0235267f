"""Handing freed memory back to the system (DESIGN point 7: weights are copied as little as protobuf allows)."""
from __future__ import annotations

import ctypes
import functools
import sys


def trim_heap() -> None:
    """Return the heap's free pages to the system; call it after dropping large arrays or a model.

    Blocks under glibc's mmap threshold (at most 32 MiB: VGG-19's conv weights, a mask's chunks) are
    freed into the heap, where the process keeps them: 100 MiB more at convert's next peak, until
    malloc_trim. A no-op where there is no glibc (its allocators differ, and so does their need).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):  # musl and others have none
        return None
