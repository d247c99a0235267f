"""The `sparsecnn` command: one sub-command per module, errors as one line (DESIGN contract 5)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..common.errors import UserError

# Each verb is a module with `add_parser(subparsers)` whose parser's `func` runs it. A verb's
# module is imported only when that verb runs (its summary for `sparsecnn --help` lives here),
# so help is fast and a verb that fails to import breaks only itself.
VERBS: dict[str, tuple[str, str]] = {  # name: (module, one-line summary)
    "convert": ("sparsecnn.converter.cmd_convert", "model -> pruned ONNX (and an engine)"),
    "run": ("sparsecnn.converter.cmd_run", "run a model on images or random input"),
    "inspect": ("sparsecnn.converter.cmd_inspect", "per-layer sparsity table of an ONNX model"),
    "doctor": ("sparsecnn.converter.cmd_doctor", "report Python, PyTorch, GPU and which runtimes are available"),
    "bench": ("sparsecnn.converter.cmd_bench", "benchmark runtimes vs eager and the best dense engine, with plots"),
    "check-jetson": ("sparsecnn.converter.cmd_check_jetson",
                     "TensorRT 8.2 compatibility check and Jetson roofline estimate"),
    "train": ("sparsecnn.converter.cmd_train", "train a classifier on Fashion-MNIST to a checkpoint"),
    "compare": ("sparsecnn.converter.cmd_compare", "accuracy: dense vs pruned one-shot vs pruned + fine-tuned"),
    "verify": ("sparsecnn.converter.cmd_verify", "check runtimes or an engine against ONNX Runtime, per output"),
}

DESCRIPTION = """\
sparsecnn turns a trained CNN into sparse inference and tells you whether it pays.

The flow: a model (registry name, checkpoint or ONNX) is exported to ONNX, pruned
(2:4, unstructured or channels), rewritten for a sparse runtime and run end to end,
with speed and accuracy reported beside the dense model.
"""

EPILOG = """\
examples:
  sparsecnn doctor                                   what runs on this machine
  sparsecnn convert resnet18 --prune 2:4 -o r18.onnx  prune 2 of every 4 input channels
  sparsecnn convert vgg19 --prune 0.9 -o v.onnx --runtime torch --engine v.engine
  sparsecnn inspect r18.onnx                         per-layer sparsity and 2:4 compliance
  sparsecnn run v.engine --input photos/ --topk 5    classify images with an engine

`sparsecnn COMMAND --help` explains each command.
"""


class _UsageError(Exception):
    """A bad command line, raised by the parser so that `main` returns 2 like any other user error."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other error of the CLI (exit 2)."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every verb listed and only `command`'s arguments defined (its module imported)."""
    parser = _Parser(prog="sparsecnn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in VERBS.items():
        if name == command:
            importlib.import_module(module).add_parser(_Subparsers(sub, summary))
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


class _Subparsers:
    """What a verb's `add_parser` is given: the subparsers, its listing line taken from VERBS."""

    def __init__(self, sub, summary: str):
        self._sub, self._summary = sub, summary

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._sub.add_parser(name, **{**kwargs, "help": self._summary})


def _command(argv: list[str]) -> str | None:
    """The verb named on the command line: the first word (the top level takes only --help and --version)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparsecnn")
    except PackageNotFoundError:
        return "unknown"


def library_error(exc: BaseException) -> str | None:
    """A library's error that the user can act on (out of memory, a model the ONNX checker or
    shape inference rejects, a full disk), as one line; None for anything else (a bug)."""
    import errno

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MemoryError):
        return "out of host memory; try a smaller --batch or model"
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():  # torch.OutOfMemoryError too
        return f"out of memory ({text[:160]}); try a smaller --batch, --dtype fp16 or another device"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                                  errno.ENAMETOOLONG):
        return f"{exc.strerror or text}{': ' + str(exc.filename) if exc.filename else ''}"
    mod = type(exc).__module__ or ""
    if mod.startswith("onnx") and type(exc).__name__ in ("ValidationError", "InferenceError", "ShapeInferenceError",
                                                         "TypeInferenceError", "ConvertError"):
        return f"the ONNX model is invalid ({type(exc).__name__}: {text[:200]})"
    if mod.startswith("google.protobuf") and type(exc).__name__ == "DecodeError":
        return f"a file is not a valid protobuf ({text[:200]})"
    return None


def _tolerate_narrow_terminals() -> None:
    # Under an ASCII locale without Python's UTF-8 mode (LC_ALL=C PYTHONUTF8=0, some CI and ssh set-ups)
    # a '\u2013' or '\u00d7' in a report would end the command with a traceback; escape what cannot be encoded.
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _tolerate_narrow_terminals()
    debug = "--debug" in argv  # anywhere on the line: `sparsecnn run ... --debug` as well
    argv = [a for a in argv if a != "--debug"]
    command = _command(argv)
    try:
        parser = build_parser(command if command in VERBS else None)
    except ImportError as exc:  # a missing library of this verb: the other verbs still work
        print(f"sparsecnn {command}: error: this command cannot load ({exc}); `sparsecnn doctor` says what is "
              "installed", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, in the handler below, not at exit
        return code
    except UserError as exc:
        if debug:
            raise
        print(f"sparsecnn {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `sparsecnn ... | head`: the reader left; leave quietly as tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as exc:  # noqa: BLE001 - only known library errors become one line, the rest re-raise
        line = None if debug else library_error(exc)
        if line is None:
            raise
        print(f"sparsecnn {args.command}: error: {line} (--debug shows the traceback)", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"sparsecnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
