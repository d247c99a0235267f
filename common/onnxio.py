"""Loading and saving ONNX models with checks a user's file must pass (DESIGN contract 6)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import UserError
from .fileio import atomic_path

# Model metadata key under which export stores the input spec (size, normalisation, classes).
INPUT_SPEC_KEY = "sparsecnn.input_spec"
# Opsets of the default domain the executor and passes are written for: 11 is where Pad, Resize
# and Clip took their current form; newer than the installed onnx cannot be checked at all.
OPSET_FLOOR = 11
OPSET_CEILING = onnx.defs.onnx_opset_version()


def load_onnx(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Read and validate an ONNX file; every failure is a `UserError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"ONNX file not found: {p}")
    try:
        # external data is read by _read_external_data, which checks its paths first
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise UserError(f"{p} is not a readable ONNX file ({type(exc).__name__}: {exc}); re-export it") from None
    _read_external_data(model, p)
    validate_model(model, p, check=check)
    return model


def _read_external_data(model: onnx.ModelProto, p: Path) -> None:
    """Weights kept in files beside the model, read into it: torch.onnx.export writes them so by
    default since torch 2.9 ('m.onnx' + 'm.onnx.data'). Each tensor's file must lie in the model's
    folder and hold the bytes it names, so a crafted location reads nothing else; an engine's model
    (parse_model) never reads any."""
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

    tensors = [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data]
    if not tensors:
        return
    folder = p.resolve().parent
    for t in tensors:
        try:
            info = ExternalDataInfo(t)
        except ValueError as exc:
            raise UserError(f"{p}: tensor '{t.name}' has bad external data fields ({exc}); re-export it") from None
        loc = info.location
        target = (folder / loc).resolve() if loc else folder
        if not loc or Path(loc).is_absolute() or folder not in target.parents:
            raise UserError(f"{p}: tensor '{t.name}' keeps its data in '{loc}', not a file beside the model; "
                            "sparsecnn reads external data only from the model's own folder")
        if not target.is_file():
            raise UserError(f"{p}: tensor '{t.name}' keeps its data in {loc}, which is missing; put it beside "
                            f"{p.name}, or export a self-contained file (torch.onnx.export(..., external_data=False))")
        end = (info.offset or 0) + (info.length if info.length is not None else tensor_nbytes(t))
        if end > target.stat().st_size:
            raise UserError(f"{p}: tensor '{t.name}' needs bytes up to {end} of {loc}, which holds "
                            f"{target.stat().st_size}: the file is cut short or another model's; re-export it")
    try:
        load_external_data_for_model(model, str(folder))
    except Exception as exc:  # noqa: BLE001 - onnx's own checks of the same paths, an unreadable file
        raise UserError(f"{p}: cannot read its external data ({type(exc).__name__}: {exc}); re-export it") from None


def parse_model(data: bytes, where: str | os.PathLike) -> onnx.ModelProto:
    """An ONNX model from bytes someone else made (e.g. inside an engine file), validated."""
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise UserError(f"{where} is not an ONNX protobuf ({type(exc).__name__}); rebuild it") from None
    validate_model(model, where)
    return model


def skeleton(model: onnx.ModelProto, max_bytes: int = 4096) -> onnx.ModelProto:
    """The model with large initializers turned into typed graph inputs.

    The checker and shape inference see every name, type and shape without serialising
    hundreds of megabytes of weights; small initializers (shapes, axes) keep their values.
    """
    out = onnx.ModelProto()
    graph = model.graph
    out.CopyFrom(onnx.helper.make_model(onnx.GraphProto(), opset_imports=model.opset_import))
    out.ir_version = model.ir_version
    g = out.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    input_names = {i.name for i in graph.input}
    for t in graph.initializer:
        nbytes = tensor_nbytes(t)  # from its dims: reading raw_data would copy it (all of VGG-19's fc6)
        if nbytes <= max_bytes:
            g.initializer.append(t)
        elif t.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def graph_inputs(model: onnx.ModelProto) -> list[tuple[str, list[int | None] | None, int]]:
    """(name, declared dims, ONNX element type) of each graph input that is not a weight: dims None
    where symbolic (or 0), the list None for an input declared without a shape."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = ([d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
                if t.HasField("shape") else None)
        out.append((vi.name, dims, t.elem_type))
    return out


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """The bytes a tensor's values take, from its dims and type: no copy of its data is made."""
    n = 1
    for d in t.dims:
        n *= d
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return n * itemsize


def validate_model(model: onnx.ModelProto, where: str | os.PathLike, check: bool = True) -> None:
    """Everything a model from a file must pass before sparsecnn uses it, each failure one line
    naming `where`: no external data, a supported opset, the ONNX checker, finite weights,
    readable metadata, an input that can feed the first conv."""
    if not model.graph.node:
        raise UserError(f"{where} holds no ONNX graph (no nodes); re-export it")
    for t in _all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data:
            raise UserError(f"{where}: tensor '{t.name}' keeps its data in an external file; sparsecnn reads "
                            "only self-contained models (save it without external data)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSET_FLOOR <= opset <= OPSET_CEILING:
        raise UserError(f"{where} uses ONNX opset {opset}; sparsecnn reads opsets {OPSET_FLOOR} to "
                        f"{OPSET_CEILING} (convert it with onnx.version_converter)")
    if check:
        try:  # on the skeleton: checking the model itself serialises and re-parses every weight (2 models more)
            onnx.checker.check_model(skeleton(model))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
            raise UserError(f"{where} fails the ONNX checker: {first}") from None
    for t in model.graph.initializer:  # one tensor at a time: what the checker checks of the weights it did not see
        try:
            values = onnx.numpy_helper.to_array(t)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{where}: weight tensor '{t.name}' holds data that does not fit its shape "
                            f"{list(t.dims)} ({str(exc).splitlines()[0][:120]})") from None
        if t.data_type in _FLOAT_TYPES:
            bad = nonfinite_kind(values)
            if bad:
                raise UserError(f"{where}: weight tensor '{t.name}' holds {bad} values; fix or retrain the model")
        del values
    _check_metadata(model, where)
    spec = get_input_spec(model, where)
    _check_input_feeds_first_conv(model, where, spec)


# The project's metadata keys and the JSON type each holds (passes/graph.py writes the exclusions).
METADATA_TYPES = {INPUT_SPEC_KEY: dict, "sparsecnn.prune_exclude": list}


def _check_metadata(model: onnx.ModelProto, where) -> None:
    """Every `sparsecnn.*` metadata value must be JSON of its key's type, so its readers need no guard."""
    for prop in model.metadata_props:
        if not prop.key.startswith("sparsecnn."):
            continue
        try:
            value = json.loads(prop.value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"{where}: metadata '{prop.key}' is not valid JSON ({exc}); re-export the model") from None
        want = METADATA_TYPES.get(prop.key)
        if want is not None and not isinstance(value, want):
            raise UserError(f"{where}: metadata '{prop.key}' should be a JSON {want.__name__}, got "
                            f"{type(value).__name__}; re-export the model")
        if want is list and not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: metadata '{prop.key}' should list tensor names (strings); re-export the model")


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def nonfinite_kind(values) -> str | None:
    """'NaN', 'Inf' or 'NaN and Inf' when an array (numpy or torch) holds such values, else None."""
    arr = np.asarray(values.detach().cpu().float() if hasattr(values, "detach") else values)
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return None
    has_nan, has_inf = bool(np.isnan(arr).any()), bool(np.isinf(arr).any())
    return " and ".join(k for k, on in (("NaN", has_nan), ("Inf", has_inf)) if on) or None


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_tensors(g)


def _check_input_feeds_first_conv(model: onnx.ModelProto, where, spec: dict | None) -> None:
    """The declared input's channels must be what each conv reading it takes (and the spec's)."""
    inits = {t.name: t for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if len(dims) != 4:
            continue
        channels = dims[1]
        if spec is not None and channels and spec.get("channels") not in (None, channels):
            raise UserError(f"{where}: its input spec says {spec['channels']} channels, input '{vi.name}' "
                            f"has {channels}; re-export it")
        for node in model.graph.node:
            if node.op_type != "Conv" or not node.input or node.input[0] != vi.name or len(node.input) < 2:
                continue
            w = inits.get(node.input[1])
            if w is None or len(w.dims) != 4:
                continue
            group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
            if channels and w.dims[1] * group != channels:
                raise UserError(f"{where}: input '{vi.name}' has {channels} channels but conv "
                                f"'{node.name or node.output[0]}' takes {w.dims[1] * group}; the model cannot run")


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` atomically, its serialised form streamed (`serialized_parts`): protobuf's own
    SerializeToString (and ByteSize) built the whole file in memory twice over, 1.1 GB more for
    VGG-19's 548 MiB. Files over protobuf's 2 GB limit keep weights in a side file."""
    p = Path(path)
    size, parts = serialized_parts(model)
    with atomic_path(p) as tmp:
        if size < 2**31 - 1:
            with Path(tmp).open("wb") as f:
                for part in parts:
                    f.write(part)
        else:  # pragma: no cover - no supported model is this large
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=p.name + ".data")
    return p


# Field numbers of onnx.proto where the streamed serialisation splits messages.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_STREAM_ABOVE = 1 << 20  # tensors whose raw data is larger are written apart from their header


def serialized_parts(model: onnx.ModelProto) -> tuple[int, Iterator[bytes]]:
    """(size, parts): `model.SerializeToString()` as a sequence of byte strings whose concatenation is
    that string, byte for byte (fields in field-number order, as protobuf writes them). A large
    tensor's raw data is read once, as its part is written; nothing else is copied whole."""
    pre_m, post_m = _split(model, _MODEL_GRAPH)
    pre_g, post_g = _split(model.graph, _GRAPH_INITIALIZER)
    tensors = []  # (length of the TensorProto, its small parts or None to stream it)
    for t in model.graph.initializer:
        n = _raw_nbytes(t)
        if n > _STREAM_ABOVE:
            head, tail = _split(t, _TENSOR_RAW_DATA)
            body = len(head) + len(_tag(_TENSOR_RAW_DATA)) + len(_varint(n)) + n + len(tail)
            tensors.append((body, (head, n, tail)))
        else:
            blob = t.SerializeToString()
            tensors.append((len(blob), blob))
    graph_len = len(pre_g) + len(post_g) + sum(len(_tag(_GRAPH_INITIALIZER)) + len(_varint(n)) + n for n, _ in tensors)
    size = len(pre_m) + len(_tag(_MODEL_GRAPH)) + len(_varint(graph_len)) + graph_len + len(post_m)
    if not model.HasField("graph"):
        return len(model.SerializeToString()), iter([model.SerializeToString()])

    def parts():
        yield pre_m + _tag(_MODEL_GRAPH) + _varint(graph_len) + pre_g
        for t, (n, what) in zip(model.graph.initializer, tensors):
            yield _tag(_GRAPH_INITIALIZER) + _varint(n)
            if isinstance(what, bytes):
                yield what
            else:
                head, raw_len, tail = what
                raw = t.raw_data  # the one copy, dropped after the write
                if len(raw) != raw_len:
                    raise RuntimeError(f"tensor {t.name} changed while it was being written")
                yield head + _tag(_TENSOR_RAW_DATA) + _varint(raw_len)
                yield raw
                del raw
                yield tail
        yield post_g + post_m

    return size, parts()


def tensor_buffer(like: onnx.TensorProto, raw: bytes | None = None) -> tuple[bytearray, np.ndarray]:
    """(buffer, values): `like` serialised into a bytearray as name, type, dims and its values as raw
    data, and a writable array over those values (shaped and typed as `like`). Edit the values in
    place, then `model.graph.initializer.add().MergeFromString(buffer)`: protobuf parses a bytearray
    where it lies, so the one copy made is the model's own. Setting `raw_data` takes bytes, which
    costs a second copy of the tensor beside the array (VGG-19's fc6: 392 MiB more).
    `raw`: `like`'s raw data read out before (`split_raw`), `like` then holding the rest."""
    header = onnx.TensorProto(name=like.name, data_type=like.data_type, dims=like.dims)
    if raw is None:
        source = onnx.numpy_helper.to_array(like)  # a view of one copy of its bytes, dropped on return
    else:
        source = np.frombuffer(raw, dtype=onnx.helper.tensor_dtype_to_np_dtype(like.data_type)).reshape(tuple(like.dims))
    head = header.SerializeToString() + _tag(_TENSOR_RAW_DATA) + _varint(source.nbytes)
    buffer = bytearray(len(head) + source.nbytes)
    buffer[:len(head)] = head
    values = np.frombuffer(buffer, dtype=source.dtype, offset=len(head)).reshape(source.shape)
    values[...] = source
    return buffer, values


# Types whose raw data numpy reads as it lies (to_array converts the others: bfloat16, float8, 4-bit).
_PLAIN_RAW = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                        onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                        onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
                        onnx.TensorProto.INT64, onnx.TensorProto.UINT64})


def split_raw(t: onnx.TensorProto) -> tuple[onnx.TensorProto, bytes | None]:
    """(the rest, raw data): a copy of `t` in its own message without its raw data, and that raw data
    (one read, one copy), so the model `t` lies in can be freed while its values live on; (a whole
    copy, None) when numpy could not read the raw data as it lies (another type, a big-endian host,
    values in a typed field). `tensor_buffer(rest, raw)` and `join_raw(slot, rest, raw)` use them."""
    rest = onnx.TensorProto()
    if t.HasField("raw_data") and t.data_type in _PLAIN_RAW and sys.byteorder == "little":
        copy_fields(t, rest, skip={"raw_data"})
        return rest, t.raw_data
    rest.CopyFrom(t)
    return rest, None


def join_raw(slot: onnx.TensorProto, rest: onnx.TensorProto, raw: bytes | None) -> None:
    """Fill `slot` (empty) with what `split_raw` gave: the original tensor, serialised byte for byte."""
    slot.CopyFrom(rest)
    if raw is not None:
        slot.raw_data = raw


def _raw_nbytes(t: onnx.TensorProto) -> int:
    """len(t.raw_data) from dims and type, without reading it (0 when the values are elsewhere)."""
    if not t.HasField("raw_data"):
        return 0
    n = 1
    for d in t.dims:
        n *= d
    try:
        return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0  # a packed sub-byte type: small anyway, serialised whole


def _split(msg, number: int) -> tuple[bytes, bytes]:
    """`msg` serialised without field `number`: (the fields numbered below it, those above it)."""
    lo, hi = type(msg)(), type(msg)()
    copy_fields(msg, lo, keep=lambda fd: fd.number < number)
    copy_fields(msg, hi, keep=lambda fd: fd.number > number)
    return lo.SerializeToString(), hi.SerializeToString()


def copy_fields(src, dst, skip: set[str] = frozenset(), keep=None) -> None:
    """Copy `src`'s fields into `dst` (same message type) except those named in `skip` or refused by
    `keep(field descriptor)`: a partial deep copy that never reads the fields it leaves out."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name in skip or (keep is not None and not keep(fd)):
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED  # protobuf < 5.28
        if repeated:
            getattr(dst, fd.name).extend(getattr(src, fd.name))
        elif src.HasField(fd.name):
            if fd.message_type is not None:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))


def _tag(number: int) -> bytes:
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def get_input_spec(model: onnx.ModelProto, where: str | os.PathLike = "the model") -> dict | None:
    """The input spec stored in the metadata, as a dict (its fields are checked by InputSpec.from_dict)."""
    for prop in model.metadata_props:
        if prop.key == INPUT_SPEC_KEY:
            try:
                spec = json.loads(prop.value)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise UserError(f"{where}: metadata '{INPUT_SPEC_KEY}' is not valid JSON ({exc}); "
                                "re-export the model") from None
            if not isinstance(spec, dict):
                raise UserError(f"{where}: metadata '{INPUT_SPEC_KEY}' is not a JSON object; re-export the model")
            return spec
    return None


def set_input_spec(model: onnx.ModelProto, spec: dict) -> None:
    for prop in list(model.metadata_props):
        if prop.key == INPUT_SPEC_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = INPUT_SPEC_KEY
    entry.value = json.dumps(spec, sort_keys=True)
