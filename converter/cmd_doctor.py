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
    p.set_defaults(func=run)


def _module_version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"
    return getattr(mod, "__version__", "installed")


def run(args) -> int:
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
