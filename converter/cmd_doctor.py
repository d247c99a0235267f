"""`sparsecnn doctor`: what this machine can run, and why not where it cannot."""
from __future__ import annotations

import importlib
import platform


def add_parser(sub) -> None:
    p = sub.add_parser("doctor",
                       description="Check the environment: versions, the GPU and its compute capability, and "
                                   "for each registered runtime whether it can run here or why not.")
    p.add_argument("--options", metavar="RUNTIME", help="list the runtime's --option settings (name, type, default, "
                                                        "what it does) instead")
    p.add_argument("--compile-kernels", nargs="*", metavar="ARCH",
                   help="compile every CUDA kernel the runtimes use into the kernel cache now, in parallel, so the "
                        "first bench or engine build does not pay for it (minutes on a fresh machine); for this "
                        "machine's GPUs, or for the given archs (e.g. sm_87 sm_90: NVRTC needs no GPU, and the cache "
                        "folder, printed at the end, can be copied to a machine with the same NVRTC)")
    p.set_defaults(func=run)


def _module_version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"
    return getattr(mod, "__version__", "installed")


def _compile_kernels(archs: list[str]) -> int:
    import torch

    from ..common.errors import UserError
    from ..runtimes import nvrtc
    from ..runtimes.kernel_programs import precompile

    ok, why = nvrtc.nvrtc_available()
    if not ok:
        raise UserError(f"cannot compile kernels: {why}")
    if not archs:
        if not torch.cuda.is_available():
            raise UserError("no CUDA GPU here: name the architectures to compile for, e.g. "
                            "`sparsecnn doctor --compile-kernels sm_87 sm_90`")
        archs = sorted({nvrtc.device_arch(i) for i in range(torch.cuda.device_count())})
    supported = nvrtc.supported_archs()
    for arch in archs:
        try:
            nvrtc.arch_number(arch)
        except ValueError:
            raise UserError(f"--compile-kernels {arch}: an architecture is written like sm_90") from None
        if supported and arch not in supported:
            raise UserError(f"--compile-kernels {arch}: {why} compiles for {supported[0]} to {supported[-1]} only "
                            "(CUDA 12's NVRTC still targets the Jetson Nano, TX2 and Xavier: docs/jetson.md)")
    rows = precompile(archs, progress=lambda line: print(line, flush=True))
    print(f"{sum(r['compiled'] for r in rows)} programs compiled, {sum(r['programs'] for r in rows)} in all, "
          f"into {nvrtc.cache_dir()} ({nvrtc.nvrtc_available()[1]})")
    return 0


def run(args) -> int:
    if getattr(args, "compile_kernels", None) is not None:
        return _compile_kernels(args.compile_kernels)
    if getattr(args, "options", None):  # run(None): the default report (tests call it so)
        from ..runtimes.options import format_options

        print(format_options(args.options))
        return 0
    import torch

    from ..runtimes import availability

    print(f"python        {platform.python_version()} ({platform.machine()})")
    print(f"torch         {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"gpu {i}         {torch.cuda.get_device_name(i)}, compute capability {major}.{minor} (sm_{major}{minor})")
    else:
        print("gpu           none: PyTorch sees no CUDA device; every runtime runs its CPU reference only")
    for mod in ("onnx", "onnxruntime", "onnx_graphsurgeon", "torchvision"):
        print(f"{mod:<13} {_module_version(mod)}")
    from ..common.support import problems, support_lines

    print("\n".join(support_lines() + [f"  PROBLEM: {p}" for p in problems()]))
    print("runtimes:")
    for name, (ok, reason) in availability().items():
        print(f"  {name:<12} {'available' if ok else 'NOT available'}: {reason}")
    return 0
