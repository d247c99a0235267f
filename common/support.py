"""Which Python, PyTorch and torchvision releases sparsecnn supports, and why: one home for the
floors that pyproject.toml declares, README's install lines state and `sparsecnn doctor` prints.

The floors are what JetPack 6 (Jetson Orin: Python 3.10, CUDA 12.6) can run: NVIDIA builds
PyTorch 2.5 to 2.8 for it, and pip cannot bring a CUDA build of a newer one to a Jetson.
"""
from __future__ import annotations

import re
import sys

MIN_PYTHON = (3, 10)  # JetPack 6's Python
MIN_TORCH = (2, 5)  # the oldest of NVIDIA's PyTorch wheels for JetPack 6 (2.5-2.8)
MIN_TORCHVISION = (0, 20)  # the torchvision released with torch 2.5
# What CI's old-torch leg installs from PyPI: the newest patch release of each floor.
OLDEST_PINS = ("torch==2.5.1", "torchvision==0.20.1")

# Where each combination has run (card and date in results/; CI's legs on every submission).
TESTED = (
    ("3.11", "2.14.1", "0.29.1", "CI main leg (CPU, PyPI CUDA build)"),
    ("3.10", "2.5.1", "0.20.1", "CI old-torch leg (CPU, PyPI CUDA 12.4 build; CUDA 12's NVRTC compiles every kernel "
                                "for sm_53, sm_62, sm_72, sm_87)"),
    ("3.11", "2.11", "0.26", "GPU suite on an H100 (torch 2.11+cu130)"),
)
NOT_SUPPORTED = (
    "JetPack 4 (Jetson Nano, TX2: Python 3.6, torch <= 1.10) and JetPack 5 (Xavier: Python 3.8, torch <= 2.1): "
    "convert on a host and deploy the ONNX with TensorRT (scripts/jetson_deploy.py; docs/jetson.md)",
)


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.5.1+cu124' -> (2, 5, 1); '2.5.0a0+872d972e41.nv24.08' -> (2, 5, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.group() != piece:  # '0a0': a pre-release of 0 stops here
            break
    return tuple(parts)


def _fmt(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def problems(python: str | None = None, torch_version: str | None = None,
             torchvision_version: str | None = None) -> list[str]:
    """One line per installed release below its floor (the running ones when not given)."""
    if python is None:
        python = _fmt(sys.version_info[:3])
    if torch_version is None:
        torch_version = _installed("torch")
    if torchvision_version is None:
        torchvision_version = _installed("torchvision")
    out = []
    for what, have, floor in (("Python", python, MIN_PYTHON), ("torch", torch_version, MIN_TORCH),
                              ("torchvision", torchvision_version, MIN_TORCHVISION)):
        if have and version_tuple(have)[:len(floor)] < floor:
            out.append(f"{what} {have} is older than the supported {_fmt(floor)}")
    return out


def _installed(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed
        return None


def support_lines() -> list[str]:
    """What `doctor` prints: the floors, why, and where each combination has run."""
    lines = [f"supported: Python >= {_fmt(MIN_PYTHON)}, torch >= {_fmt(MIN_TORCH)}, "
             f"torchvision >= {_fmt(MIN_TORCHVISION)} (JetPack 6 on Jetson Orin ships Python 3.10 and "
             "NVIDIA's torch 2.5-2.8 wheels)"]
    lines += [f"  tested: Python {py}, torch {t}, torchvision {tv}: {where}" for py, t, tv, where in TESTED]
    lines += [f"  not supported: {n}" for n in NOT_SUPPORTED]
    return lines
