"""Loading and saving ONNX models with checks a user's file must pass (DESIGN contract 6)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from .errors import UserError
from .fileio import atomic_path

# Model metadata key under which export stores the input spec (size, normalisation, classes).
INPUT_SPEC_KEY = "sparsecnn.input_spec"


def load_onnx(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Read and validate an ONNX file; every failure is a `UserError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise UserError(f"{p} is not a readable ONNX file ({type(exc).__name__}: {exc}); re-export it") from None
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
            raise UserError(f"{p} fails the ONNX checker: {first}") from None
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` atomically; files over protobuf's 2 GB limit keep weights in a side file."""
    p = Path(path)
    with atomic_path(p) as tmp:
        if model.ByteSize() < 2**31 - 1:
            tmp.write_bytes(model.SerializeToString())
        else:  # pragma: no cover - no supported model is this large
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=p.name + ".data")
    return p


def get_input_spec(model: onnx.ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == INPUT_SPEC_KEY:
            return json.loads(prop.value)
    return None


def set_input_spec(model: onnx.ModelProto, spec: dict) -> None:
    for prop in list(model.metadata_props):
        if prop.key == INPUT_SPEC_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = INPUT_SPEC_KEY
    entry.value = json.dumps(spec, sort_keys=True)
