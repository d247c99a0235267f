"""Imports go down: common <- models, passes <- runtimes <- converter libraries <- CLI verbs.

Every module's imports are read with `ast` (absolute `sparsecnn.X` and relative imports,
those inside functions included), so a lazy import that runs upwards fails here too.

A verb module (converter/cmd_*.py) holds argument handling and printing only. What that
means, checkably:
- it defines no classes (dataclasses, evaluators and recipes are library code);
- its public functions are `add_parser` (the argparse definition) and `run` (turns the
  parsed arguments into library calls and prints); helpers are private (`_name`), so no
  other module can come to depend on a verb;
- it stays under VERB_MAX_LINES lines, so a flow cannot hide in private helpers;
- nothing but converter/cli.py imports a verb module;
- importing it loads no heavy library (torch, onnx, numpy, ...): `sparsecnn --help` and
  `sparsecnn COMMAND --help` stay fast, and one verb's missing library breaks only that verb.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["common", "models", "passes", "runtimes", "converter"]
VERB_MAX_LINES = 170
VERB_PUBLIC = {"add_parser", "run"}
HEAVY = ["torch", "onnx", "numpy", "onnxruntime", "matplotlib", "torchvision", "tensorrt", "onnx_graphsurgeon"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["sparsecnn", *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every sparsecnn module `name` imports, anywhere in the file, resolved to absolute names."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import cmd_x` names a module
    return {m for m in out if m == "sparsecnn" or m.startswith("sparsecnn.")}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2:
        return "sparsecnn"
    if parts[1] == "converter" and len(parts) > 2 and _is_verb(parts[2]):
        return "verb"
    return parts[1]


def _is_verb(leaf: str) -> bool:
    return leaf == "cli" or leaf.startswith("cmd_")


# Which layers each layer may import (itself included). models and passes are siblings: an
# architecture needs no ONNX pass and a pass works on any model.
ALLOWED = {
    "common": {"common"},
    "models": {"common", "models"},
    "passes": {"common", "passes"},
    "runtimes": {"common", "models", "passes", "runtimes"},
    "converter": {"common", "models", "passes", "runtimes", "converter"},
    "verb": {"common", "models", "passes", "runtimes", "converter", "verb"},
}


def _violations() -> list[str]:
    bad = []
    for name, path in _modules().items():
        src = _layer(name)
        for target in sorted(_imports(name, path)):
            dst = _layer(target)
            if dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(ROOT)} ({src}) imports {target} ({dst})")
            elif dst == "verb" and src == "verb" and not name.endswith(".cli"):
                bad.append(f"{path.relative_to(ROOT)} imports verb {target}: only converter/cli.py loads verbs")
    return bad


def test_imports_go_down():
    assert _violations() == []


def test_import_parser_sees_relative_and_function_level_imports(tmp_path):
    """The checker itself: a relative import inside a function is resolved and counted."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from ..converter.cmd_run import run\n    from . import timing\n")
    got = _imports("sparsecnn.runtimes.x", f)
    assert "sparsecnn.converter.cmd_run" in got and "sparsecnn.runtimes.timing" in got
    assert _layer("sparsecnn.converter.cmd_run") == "verb" and _layer("sparsecnn.converter.bench") == "converter"


def _verbs() -> list[Path]:
    return sorted((ROOT / "converter").glob("cmd_*.py"))


@pytest.mark.parametrize("path", _verbs(), ids=lambda p: p.stem)
def test_verb_holds_argument_handling_only(path):
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    public = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
              and not n.name.startswith("_") and n.name not in VERB_PUBLIC]
    lines = len(text.splitlines())
    assert not classes, f"{path.name} defines classes {classes}: library code belongs in a converter module"
    assert not public, f"{path.name} exports {public}: a verb has add_parser and run, helpers are private"
    assert lines <= VERB_MAX_LINES, f"{path.name} has {lines} lines: move the flow into a library module"


def test_verb_modules_load_no_heavy_library():
    code = ("import sys, importlib, pathlib\n"
            f"for p in sorted(pathlib.Path({str(ROOT / 'converter')!r}).glob('cmd_*.py')):\n"
            "    importlib.import_module('sparsecnn.converter.' + p.stem)\n"
            "import sparsecnn.converter.cli\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"verb modules import heavy libraries at module level: {out.stdout.strip()}"


def test_a_verb_that_cannot_import_breaks_only_itself(monkeypatch, tmp_path, capsys):
    from sparsecnn.converter import cli

    (tmp_path / "broken_verb.py").write_text("import no_such_library_for_sparsecnn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.VERBS, "broken", ("broken_verb", "a verb whose library is missing"))
    assert cli.main(["broken", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot load" in err and "no_such_library_for_sparsecnn" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0 and "broken" in capsys.readouterr().out
    assert cli.main(["inspect", "--models"]) == 0 and "resnet18" in capsys.readouterr().out


def test_help_imports_no_verb_and_a_verb_help_only_its_own():
    code = ("import sys, contextlib, io\n"
            "from sparsecnn.converter.cli import main\n"
            "for argv in (['--help'], ['bench', '--help']):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main(argv)\n"
            "    print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('sparsecnn.converter.cmd_')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True, cwd=ROOT)
    assert out.stdout.split("\n")[:2] == ["[]", "['cmd_bench']"]


def test_every_verb_help_loads_no_heavy_library():
    """`COMMAND --help` under a second: building a verb's parser imports no torch, onnx or numpy
    (check-jetson's --board choices imported the roofline model, torch with it: 2.2 s)."""
    code = ("import sys, contextlib, io\n"
            "from sparsecnn.converter.cli import VERBS, main\n"
            "for verb in VERBS:\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main([verb, '--help'])\n"
            f"    print(verb, ' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                         errors="replace", check=True, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    assert len(lines) >= 9 and all(len(line.split()) == 1 for line in lines), out.stdout


def test_top_level_api_loads_library_modules_only():
    """`import sparsecnn` (the repository root's __init__.py) names its API by module, loaded on first
    use: each is a library module below the verbs, and defines the name."""
    import importlib

    import sparsecnn

    assert sparsecnn._API, "the package's lazy API table is empty"
    for name, module in sparsecnn._API.items():
        assert _layer(module) in {"common", "models", "passes", "runtimes", "converter"}, (name, module)
        assert hasattr(importlib.import_module(module), name), (name, module)
