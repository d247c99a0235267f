import functools

import onnx
import pytest
import torch


@functools.lru_cache(maxsize=None)
def _exported(name: str) -> bytes:
    from sparsecnn.converter.export import export_onnx
    from sparsecnn.models import load_model

    module, spec, entry = load_model(name)
    return export_onnx(module, spec, entry.exclude).SerializeToString()


@pytest.fixture(scope="session")
def exported():
    """exported(name) -> a fresh copy of the dense ONNX export of registry model `name`."""
    return lambda name: onnx.load_model_from_string(_exported(name))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
