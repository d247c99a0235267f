#!/usr/bin/env python3
"""Build a TensorRT engine from an exported ONNX model ON the Jetson, time it, check its outputs.

Standalone: Python 3.6+ (JetPack 4.6 on the Jetson Nano), TensorRT 8.2 through 10.x (JetPack
6 on Orin Nano) and NumPy; device memory through libcudart with ctypes. It needs one helper
file, trt_compat.py (runtimes/tensorrt/trt_compat.py in sparsecnn), beside it or importable.

On the host (any machine with sparsecnn):
    sparsecnn convert resnet18 --prune 2:4 --opset 13 -o r18.onnx
    sparsecnn check-jetson r18.onnx                                  # TensorRT 8.2 compatibility
    sparsecnn run r18.onnx --random --batch 1 --save-inputs -o ref.npz   # reference inputs + outputs
    scp r18.onnx ref.npz scripts/jetson_deploy.py runtimes/tensorrt/trt_compat.py jetson:
On the Jetson:
    python3 jetson_deploy.py r18.onnx --ref ref.npz --fp16 [--sparse] [--plan r18.plan]

It prints the build's sparsity lines, the median / p90 GPU time (CUDA events around
execute, no copies), and max|trt - ref| / max|ref| per output against --tol; exit status 0
when every output is within tolerance, 1 when not, 2 on a usage error.
NOT RUN HERE: the project has no Jetson and no TensorRT; written to the documented APIs.
"""
import argparse
import ctypes
import ctypes.util
import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _import_trt_compat():
    for folder in (HERE, os.path.join(HERE, os.pardir, "runtimes")):
        if os.path.isfile(os.path.join(folder, "trt_compat.py")):
            sys.path.insert(0, os.path.abspath(folder))
            import trt_compat
            return trt_compat
    from sparsecnn.runtimes.tensorrt import trt_compat
    return trt_compat


class CudaRuntime(object):
    """The few libcudart calls the script needs, through ctypes (no pycuda, no cuda-python)."""

    H2D, D2H = 1, 2

    def __init__(self):
        names = ["libcudart.so"]
        found = ctypes.util.find_library("cudart")
        if found:
            names.append(found)
        names += sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"), reverse=True)
        names += sorted(glob.glob("/usr/local/cuda*/targets/*/lib/libcudart.so*"), reverse=True)
        self.lib = None
        for name in names:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.lib is None:
            raise SystemExit("cannot load libcudart (looked for %s); is CUDA installed (JetPack)?" % ", ".join(names))
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.lib.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cudaEventSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]

    def check(self, status, what):
        if status != 0:
            raise RuntimeError("%s failed: %s" % (what, self.lib.cudaGetErrorString(status).decode()))

    def malloc(self, nbytes):
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(int(nbytes), 1)), "cudaMalloc")
        return ptr.value

    def free(self, ptr):
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def to_device(self, ptr, array):
        self.check(self.lib.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, self.H2D), "cudaMemcpy H2D")

    def to_host(self, array, ptr):
        self.check(self.lib.cudaMemcpy(array.ctypes.data, ptr, array.nbytes, self.D2H), "cudaMemcpy D2H")

    def stream(self):
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return s.value

    def sync(self, stream):
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def event(self):
        e = ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        return e.value

    def record(self, event, stream):
        self.check(self.lib.cudaEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cudaEventRecord")

    def elapsed_ms(self, start, end):
        self.check(self.lib.cudaEventSynchronize(ctypes.c_void_p(end)), "cudaEventSynchronize")
        ms = ctypes.c_float()
        self.check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), ctypes.c_void_p(start), ctypes.c_void_p(end)),
                   "cudaEventElapsedTime")
        return ms.value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", help="the exported ONNX model (opset <= 13 for TensorRT 8.2)")
    p.add_argument("--ref", help=".npz from `sparsecnn run MODEL --save-inputs -o ref.npz`: inputs and outputs by name")
    p.add_argument("--fp16", action="store_true", help="fp16 (FP16 builder flag, or an fp16 ONNX on strongly typed TensorRT)")
    p.add_argument("--sparse", action="store_true", help="set SPARSE_WEIGHTS (2:4 kernels on sm_80+; ignored on the Nano)")
    p.add_argument("--batch", type=int, default=None, help="batch size without --ref (default 1)")
    p.add_argument("--iters", type=int, default=200, help="timed runs (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    p.add_argument("--tol", type=float, default=None, help="max relative error (default 1e-3 fp32, 2e-2 fp16)")
    p.add_argument("--plan", help="also write the serialized engine here (loadable by trtexec --loadEngine)")
    p.add_argument("--workspace-mb", type=int, default=512, help="builder workspace (default 512 MB)")
    p.add_argument("--verbose", action="store_true", help="print every TensorRT message of the build")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorrt as trt

    tc = _import_trt_compat()
    cuda = CudaRuntime()
    if not os.path.isfile(args.onnx):
        print("no such ONNX file: %s" % args.onnx, file=sys.stderr)
        return 2
    with open(args.onnx, "rb") as f:
        onnx_bytes = f.read()
    ref = dict(np.load(args.ref)) if args.ref else {}
    dtype = "fp16" if args.fp16 else "fp32"
    logger = tc.make_logger(trt, echo=(lambda m: print(m)) if args.verbose else None)
    inputs = tc.network_inputs(trt, onnx_bytes, logger)
    feeds = {}
    for name, shape in inputs:
        if name in ref:
            feeds[name] = np.ascontiguousarray(ref[name], dtype=np.float32)
        else:
            batch = args.batch or 1
            concrete = [batch if d < 0 else d for d in shape]
            feeds[name] = np.random.RandomState(0).standard_normal(concrete).astype(np.float32)
            print("input %s: no reference given, random %s" % (name, concrete))
    profile = {}
    for name, shape in inputs:
        if any(d < 0 for d in shape):
            profile[name] = (feeds[name].shape, feeds[name].shape, feeds[name].shape)
    settings = tc.settings_for(trt, dtype)
    if settings["onnx_must_be_fp16"]:
        print("TensorRT %s is strongly typed: fp16 must be in the ONNX (sparsecnn's tensorrt_runtime.fp16_onnx writes "
              "it); building the ONNX's own precision" % trt.__version__)
        dtype = "fp32"
    t0 = time.time()
    plan, settings = tc.build_plan(trt, onnx_bytes, dtype, logger, profile, sparse=args.sparse,
                                   workspace_bytes=args.workspace_mb << 20)
    print("built in %.1f s with TensorRT %s: %s" % (time.time() - t0, trt.__version__,
                                                   ", ".join("%s=%s" % kv for kv in sorted(settings.items()))))
    sparsity = tc.parse_sparsity_log(logger.lines)
    if args.sparse:
        print("eligible for sparse math: %d layers; picked sparse: %d layers" % (len(sparsity["eligible"]),
                                                                             len(sparsity["picked_sparse"])))
        for name in sparsity["picked_sparse"]:
            print("  sparse: %s" % name)
    if args.plan:
        with open(args.plan, "wb") as f:
            f.write(plan)
        print("wrote %s" % args.plan)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    tensors = tc.io_tensors(trt, engine)
    stream = cuda.stream()
    addresses, outputs, buffers = {}, {}, []
    for t in tensors:
        if t["input"]:
            tc.set_input_shape(context, engine, t, feeds[t["name"]].shape)
    for t in tensors:
        np_dtype = np.dtype(trt.nptype(t["dtype"]))
        if t["input"]:
            host = np.ascontiguousarray(feeds[t["name"]].astype(np_dtype))
        else:
            host = np.empty(tc.output_shape(context, t), dtype=np_dtype)
            outputs[t["name"]] = host
        ptr = cuda.malloc(host.nbytes)
        buffers.append(ptr)
        addresses[t["name"]] = ptr
        if t["input"]:
            cuda.to_device(ptr, host)
    for _ in range(max(args.warmup, 1)):
        tc.execute(context, tensors, addresses, stream)
    cuda.sync(stream)
    start, end = cuda.event(), cuda.event()
    times = []
    for _ in range(args.iters):
        cuda.record(start, stream)
        tc.execute(context, tensors, addresses, stream)
        cuda.record(end, stream)
        times.append(cuda.elapsed_ms(start, end))
    times.sort()
    median = times[len(times) // 2]
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    batch = next(iter(feeds.values())).shape[0]
    print("GPU time per run (batch %d, %s): median %.3f ms, p90 %.3f ms, %.1f images/s"
          % (batch, "fp16" if args.fp16 else "fp32", median, p90, batch * 1000.0 / median))
    for name, host in outputs.items():
        ptr = addresses[name]
        cuda.to_host(host, ptr)
    for ptr in buffers:
        cuda.free(ptr)
    tol = args.tol if args.tol is not None else (2e-2 if args.fp16 else 1e-3)
    status = 0
    for name, host in outputs.items():
        if name not in ref:
            print("output %s: shape %s (no reference to compare)" % (name, host.shape))
            continue
        want = ref[name].astype(np.float64)
        err = float(np.abs(host.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))
        verdict = "PASS" if err <= tol else "FAIL"
        if err > tol:
            status = 1
        print("output %s: rel err %.2e (tolerance %.0e) %s" % (name, err, tol, verdict))
    return status


if __name__ == "__main__":
    sys.exit(main())
