"""The GPU studies (scripts/studies/*.py) and what they share with the bench harness (converter/study.py).

The studies run only on a GPU; here each one is imported (a renamed helper or a moved library
function breaks the import) and its --help text must name the command that reproduces it.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from sparsecnn.converter import bench, study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "scripts" / "studies").glob("*.py"))


def test_there_are_studies():
    assert len(STUDIES) >= 8


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_imports_and_names_its_command(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))  # studies may share helpers (ecr_profile uses ecr_pecr)
    spec = importlib.util.spec_from_file_location(f"study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None))
    assert f"scripts/studies/{path.name}" in (module.__doc__ or ""), "its docstring (--help) names the command"


def test_no_file_or_text_names_an_issue_number():
    """`grep -rE 'issue[0-9]|gpu_issue' scripts results README.md DESIGN.md` finds nothing."""
    pattern = re.compile(rb"issue[0-9]|gpu_issue")
    roots = [ROOT / "scripts", ROOT / "results", ROOT / "README.md", ROOT / "DESIGN.md"]
    files = [p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]
    assert files
    hits = [str(p.relative_to(ROOT)) for p in files
            if "__pycache__" not in p.parts and (pattern.search(p.read_bytes()) or pattern.search(p.name.encode()))]
    assert hits == []


def test_best_dense_is_the_fastest_timed_engine():
    assert study.best_dense({"NCHW": 1.2, "NHWC": 0.9, "failed": None}) == ("NHWC", 0.9)
    assert study.best_dense({"NCHW": None}) == (None, None)


def test_error_record_keeps_where_what_and_the_traceback():
    try:
        raise ValueError("bad shape")
    except ValueError as exc:
        rec = study.error_record(exc, where="nets resnet18")
    assert rec["where"] == "nets resnet18"
    assert rec["error"] == "ValueError: bad shape"
    assert "raise ValueError" in rec["traceback"]


def test_environment_is_the_benchs_and_reports_versions():
    assert bench.environment is study.environment
    env = study.environment(torch.device("cpu"), modules=("numpy", "no_such_module_here"))
    assert env["torch"] == torch.__version__ and env["card"].startswith("CPU")
    assert env["numpy"] and env["no_such_module_here"].startswith("missing")


def test_dense_engines_are_the_torch_runtime_with_best_dense_conv(exported):
    engines = study.dense_engines(exported("tinynet"), "cpu", {"dtype": "fp32"})
    assert list(engines) == ["NCHW", "NHWC"]
    assert [e.options.channels_last for e in engines.values()] == [False, True]
    assert all(e.options.extra["dense_conv"] == "best" for e in engines.values())
