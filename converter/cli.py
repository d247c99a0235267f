"""The `sparsecnn` command: one sub-command per module, errors as one line (DESIGN contract 5)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..common.errors import UserError

# Each verb is a module with `add_parser(subparsers)`; the parser's `func` runs it.
VERBS = [
    "sparsecnn.converter.cmd_convert",
    "sparsecnn.converter.cmd_run",
    "sparsecnn.converter.cmd_inspect",
    "sparsecnn.converter.cmd_doctor",
    "sparsecnn.converter.cmd_bench",
    "sparsecnn.converter.cmd_check_jetson",
    "sparsecnn.converter.cmd_train",
    "sparsecnn.converter.cmd_compare",
]

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsecnn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in VERBS:
        importlib.import_module(module).add_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparsecnn")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"sparsecnn {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"sparsecnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
