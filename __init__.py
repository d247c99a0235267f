"""sparsecnn: prune a PyTorch CNN, export ONNX, run it on sparse runtimes, check it against ONNX Runtime.

The Python API follows the CLI's flow (docs/api.md has a worked example)::

    import sparsecnn
    pruned = sparsecnn.prune(my_module, "0.9", input_shape=(3, 224, 224))  # or an .onnx file / registry name
    engine = sparsecnn.compile(pruned, runtime="csr", device="cpu")
    print(sparsecnn.verify(engine))                                      # vs ONNX Runtime on the pruned ONNX
    outputs = engine(images)

This file stays cheap to import (`sparsecnn --help` imports it first): every name below is
loaded on first use, through the module-level `__getattr__`. The functions live in
`sparsecnn.converter.api`.
"""
from __future__ import annotations

# public name -> module that defines it (imported on first access)
_API = {
    "prune": "sparsecnn.converter.api",
    "compile": "sparsecnn.converter.api",
    "verify": "sparsecnn.converter.api",
    "compare": "sparsecnn.converter.api",
    "load": "sparsecnn.converter.api",
    "load_images": "sparsecnn.converter.api",
    "PrunedModel": "sparsecnn.converter.api",
    "VerifyResult": "sparsecnn.converter.verify",
    "UserError": "sparsecnn.common.errors",
}

__all__ = ["__version__", *_API]


def _version() -> str:
    """The installed distribution's version; from a bare checkout (scripts/gpu_env.sh's symlinks),
    the one pyproject.toml beside this file states."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparsecnn")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent / "pyproject.toml"
        try:  # no tomllib before Python 3.11: the [project] table's version line
            text = pyproject.read_text(encoding="utf-8")
        except OSError:
            return "unknown"
        found = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
        return found.group(1) if found else "unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
    else:
        raise AttributeError(f"module 'sparsecnn' has no attribute '{name}'")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
