"""TensorRT 8.2 through 11, one Python API: the version differences in one place.

Written to NVIDIA's documented Python API; NOT run on this project's machines (TensorRT
cannot be installed there). Used by the `tensorrt` runtime and by the standalone Jetson
deploy script, so it must stay importable by Python 3.6 (JetPack 4.6) with nothing but the
standard library: no dataclasses, no `from __future__ import annotations`, no walrus, no
f-string `=`; TensorRT is passed in, never imported here.

Differences handled (each decided from the version and confirmed with hasattr):
  network flags   EXPLICIT_BATCH before 10 (implicit batch is gone in 10, the flag is
                  deprecated and ignored); STRONGLY_TYPED from 10.12, or whenever the
                  FP16 builder flag no longer exists (11)
  precision       fp16 through BuilderFlag.FP16 (weakly typed, 8.x-10.11); strongly typed
                  networks take their precision from the ONNX: the model must be fp16
  sparsity        BuilderFlag.SPARSE_WEIGHTS in every version (8.0+)
  workspace       config.max_workspace_size before 8.4, set_memory_pool_limit after
  build           builder.build_serialized_network (8.0+) -> plan bytes
  execution       bindings + execute_async_v2 before 8.5; tensor names +
                  set_input_shape / set_tensor_address + execute_async_v3 from 8.5
                  (v2 and bindings are gone in 10)
"""
import re

SPARSITY_ELIGIBLE = re.compile(r"Layers eligible for sparse math:\s*(.*)$")
SPARSITY_PICKED = re.compile(r"picked sparse implementation for layers:\s*(.*)$")


def parse_version(text):
    """'8.2.1.8' -> (8, 2, 1); '10.12.0' -> (10, 12, 0)."""
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group(0)) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def build_settings(version, dtype, has_fp16_flag=True, has_strongly_typed=None):
    """What a build of `dtype` ('fp32' | 'fp16') does on TensorRT `version` (a tuple)."""
    if has_strongly_typed is None:
        has_strongly_typed = version >= (9, 1)
    strongly_typed = has_strongly_typed and (version >= (10, 12) or not has_fp16_flag)
    return {
        "version": ".".join(str(v) for v in version),
        "explicit_batch_flag": version < (10, 0),
        "strongly_typed": strongly_typed,
        "fp16_builder_flag": dtype == "fp16" and not strongly_typed,
        "onnx_must_be_fp16": dtype == "fp16" and strongly_typed,
        "sparse_weights_flag": True,
        "workspace_api": "set_memory_pool_limit" if version >= (8, 4) else "max_workspace_size",
        "exec_api": "execute_async_v3" if version >= (8, 5) else "execute_async_v2",
    }


def settings_for(trt, dtype):
    version = parse_version(trt.__version__)
    flags = trt.NetworkDefinitionCreationFlag
    return build_settings(version, dtype, has_fp16_flag=hasattr(trt.BuilderFlag, "FP16"),
                          has_strongly_typed=hasattr(flags, "STRONGLY_TYPED"))


def make_logger(trt, echo=None):
    """A TensorRT logger that keeps INFO-and-worse messages (and any about sparsity) in `.lines`."""

    class CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines = []

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 3 or "parsity" in msg:
                self.lines.append(msg)
            if echo is not None and level <= 2:
                echo("[TensorRT] " + msg)

    return CaptureLogger()


def build_plan(trt, onnx_bytes, dtype, logger, input_shapes, sparse=True, workspace_bytes=1 << 30):
    """Parse ONNX, build a serialized engine; returns (plan bytes, settings).

    input_shapes: {input name: (min shape, opt shape, max shape)} for the optimization profile.
    Raises RuntimeError with the parser's errors or TensorRT's last messages on failure.
    """
    settings = settings_for(trt, dtype)
    builder = trt.Builder(logger)
    flags = 0
    if settings["explicit_batch_flag"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if settings["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser failed: " + "; ".join(errors))
    config = builder.create_builder_config()
    if settings["workspace_api"] == "set_memory_pool_limit" and hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    else:
        config.max_workspace_size = workspace_bytes
    if settings["fp16_builder_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if input_shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in input_shapes.items():
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        tail = " | ".join(getattr(logger, "lines", [])[-5:])
        raise RuntimeError("TensorRT could not build the engine" + (": " + tail if tail else ""))
    return bytes(plan), settings


def network_inputs(trt, onnx_bytes, logger):
    """(name, shape with -1 for dynamic dims) of each network input, parsed with TensorRT."""
    builder = trt.Builder(logger)
    settings = settings_for(trt, "fp32")
    flags = 0
    if settings["explicit_batch_flag"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        raise RuntimeError("TensorRT's ONNX parser failed: " + "; ".join(
            str(parser.get_error(i)) for i in range(parser.num_errors)))
    return [(network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs)]


def parse_sparsity_log(lines):
    """The two lists TensorRT logs after a build with SPARSE_WEIGHTS (layer names as TensorRT names them)."""
    eligible, picked = [], []
    for line in lines:
        for pattern, bucket in ((SPARSITY_ELIGIBLE, eligible), (SPARSITY_PICKED, picked)):
            m = pattern.search(line.strip())
            if m:
                bucket.extend(name.strip() for name in m.group(1).split(", ") if name.strip())
    return {"eligible": eligible, "picked_sparse": picked}


def match_layer(onnx_name, trt_names):
    """Whether ONNX node `onnx_name` is one of TensorRT's layers (possibly fused: 'a + b')."""
    for trt_name in trt_names:
        if trt_name == onnx_name or onnx_name in [part.strip() for part in trt_name.split(" + ")]:
            return True
    return False


# --- running an engine -------------------------------------------------------------------

def io_tensors(trt, engine):
    """[{name, input, dtype (TensorRT), index}] in engine order, for 8.2 through 11."""
    out = []
    if hasattr(engine, "num_io_tensors"):  # 8.5+
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            out.append({"name": name, "index": i, "dtype": engine.get_tensor_dtype(name),
                        "input": engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT})
    else:  # bindings (8.2-8.4); one optimization profile, so binding i is tensor i
        for i in range(engine.num_bindings):
            out.append({"name": engine.get_binding_name(i), "index": i, "dtype": engine.get_binding_dtype(i),
                        "input": engine.binding_is_input(i)})
    return out


def set_input_shape(context, engine, tensor, shape):
    if hasattr(context, "set_input_shape"):  # 8.5+
        if not context.set_input_shape(tensor["name"], tuple(shape)):
            raise ValueError("TensorRT refused input shape %s for %s (outside the optimization profile?)"
                             % (tuple(shape), tensor["name"]))
    elif not context.set_binding_shape(tensor["index"], tuple(shape)):
        raise ValueError("TensorRT refused input shape %s for %s (outside the optimization profile?)"
                         % (tuple(shape), tensor["name"]))


def output_shape(context, tensor):
    if hasattr(context, "get_tensor_shape"):  # 8.5+
        return tuple(context.get_tensor_shape(tensor["name"]))
    return tuple(context.get_binding_shape(tensor["index"]))


def execute(context, tensors, addresses, stream_handle):
    """Enqueue on `stream_handle`; addresses: {tensor name: device pointer}."""
    if hasattr(context, "execute_async_v3"):  # 8.5+
        for t in tensors:
            context.set_tensor_address(t["name"], int(addresses[t["name"]]))
        ok = context.execute_async_v3(stream_handle)
    else:
        bindings = [int(addresses[t["name"]]) for t in sorted(tensors, key=lambda t: t["index"])]
        ok = context.execute_async_v2(bindings, stream_handle)
    if not ok:
        raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
