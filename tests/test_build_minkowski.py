"""The MinkowskiEngine build recipe (scripts/build_minkowski.py), without building ME itself."""
import base64
import csv
import hashlib
import importlib.util
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("build_minkowski", REPO / "scripts" / "build_minkowski.py")
bm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bm)


def _record_ok(wheel: Path) -> bool:
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        for name, digest, size in csv.reader(io.StringIO(z.read(record).decode())):
            if name == record:
                continue
            data = z.read(name)
            want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if digest != want or int(size) != len(data):
                return False
    return True


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("strip")), reason="needs gcc and strip")
def test_strip_wheel_shrinks_the_extension_and_keeps_record_hashes_valid(tmp_path):
    src = tmp_path / "ext.c"
    src.write_text("static int table[64];\nint answer(int i) { table[i & 63] += i; return table[i & 63] * 42; }\n")
    so = tmp_path / "ext.so"
    subprocess.run(["gcc", "-g3", "-O0", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    wheel = tmp_path / "Demo-1.0-py3-none-any.whl"
    files = {"demo/_C.so": so.read_bytes(), "demo/__init__.py": b"x = 1\n", "Demo-1.0.dist-info/METADATA": b"Name: Demo\n"}
    with zipfile.ZipFile(wheel, "w") as z:
        rec = io.StringIO()
        w = csv.writer(rec, lineterminator="\n")
        for name, data in files.items():
            z.writestr(name, data)
            w.writerow([name, bm._record_hash(data), len(data)])
        w.writerow(["Demo-1.0.dist-info/RECORD", "", ""])
        z.writestr("Demo-1.0.dist-info/RECORD", rec.getvalue())
    assert _record_ok(wheel)
    bm.strip_wheel(wheel)
    with zipfile.ZipFile(wheel) as z:
        assert len(z.read("demo/_C.so")) < len(files["demo/_C.so"])
        assert z.read("demo/__init__.py") == files["demo/__init__.py"]
    assert _record_ok(wheel)


def test_cache_key_names_me_torch_python_and_flavour():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "build_minkowski.py"), "--cpu", "--blas", "torch",
                          "--print-key"], capture_output=True, encoding="utf-8")
    assert out.returncode == 0, out.stderr
    import torch

    key = out.stdout.strip()
    assert key.startswith("me0.5.4-cpu-torch" + torch.__version__.replace("+", "_"))
    assert f"-cp{sys.version_info.major}{sys.version_info.minor}-torch-p" in key


def test_a_wrong_sdist_is_refused_with_one_line(tmp_path):
    bad = tmp_path / bm.SDIST_NAME
    bad.write_bytes(b"not the release")
    with pytest.raises(bm.BuildError, match="sha256"):
        bm.fetch_sdist(tmp_path, str(bad))


_SDIST = bm.default_cache() / "sdist" / bm.SDIST_NAME


@pytest.mark.skipif(not _SDIST.is_file(), reason="no cached ME sdist (the recipe downloads it on its first build)")
def test_patch_applies_to_the_release_and_fixes_what_the_issue_lists(tmp_path):
    src = bm.unpack_and_patch(bm.fetch_sdist(_SDIST.parent, None), tmp_path)
    me = src / "MinkowskiEngine"
    for f in ("MinkowskiCommon.py", "MinkowskiCoordinateManager.py", "MinkowskiKernelGenerator.py",
              "MinkowskiTensorField.py", "utils/quantization.py"):
        text = (me / f).read_text(encoding="utf-8")
        assert "from collections.abc import Sequence" in text and "from collections import Sequence" not in text
    setup = (src / "setup.py").read_text(encoding="utf-8")
    assert 'run_command("pip", "uninstall"' not in setup and 'run_command("rm", "-rf", "build")' not in setup
    assert "public thrust::unary_function" not in (src / "src" / "coordinate_map_functors.cuh").read_text(encoding="utf-8")
