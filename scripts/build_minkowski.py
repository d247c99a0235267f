#!/usr/bin/env python3
"""Build MinkowskiEngine 0.5.4 for the running Python and PyTorch, cache the wheel, install it.

MinkowskiEngine's last release (0.5.4, 2021) is an sdist that no longer builds on today's
Python, PyTorch and CUDA. This recipe fetches that sdist from PyPI (sha256-pinned), applies
the project's patch (patches/minkowskiengine-0.5.4.patch: Python >= 3.10, numpy 2 / no
numpy.distutils, CUDA 13, cuSPARSE/cuBLAS from torch's nvidia wheels, no `pip uninstall`
side effects in setup.py), builds a wheel, strips it, caches it under
~/.cache/sparsecnn/wheels/<ME version>-<cpu|cuXY-smNN>-torch<version>-<cpXY>-<patch hash>/ and
installs it with pip.

  apt-get install -y libopenblas-dev && python scripts/build_minkowski.py        # CPU (7-12 min, 2 cores)
  python scripts/build_minkowski.py --cuda --arch 9.0                            # CUDA, needs nvcc
  python scripts/build_minkowski.py --cuda --arch 9.0 --no-install --out .whl    # a wheel to carry

CPU builds link OpenBLAS (Debian's libopenblas-dev). CUDA builds default to `--blas torch`:
the few CBLAS calls of ME's CPU code run on libtorch's matrix product, so the wheel needs
nothing on the target machine but the same torch (e.g. a GPU machine without internet).
Offline: `--sdist PATH` (or a cached sdist) and no download happens.

This script needs only the standard library and torch: it also runs in a bare venv of
another Python that holds the target torch.
"""
from __future__ import annotations

import argparse
import base64
import csv
import ctypes.util
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ME_VERSION = "0.5.4"
SDIST_NAME = f"MinkowskiEngine-{ME_VERSION}.tar.gz"
SDIST_SHA256 = "b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
# pip itself cannot fetch this sdist: `pip download` prepares metadata by running setup.py, which
# imports torch, looks BLAS up through numpy.distutils (gone) and runs `pip uninstall`. So the file
# comes from PyPI's simple index (PEP 691 JSON), the same place pip reads, and is checked by hash.
PYPI_SIMPLE = "https://pypi.org/simple/minkowskiengine/"
REPO = Path(__file__).resolve().parent.parent
PATCH = REPO / "patches" / f"minkowskiengine-{ME_VERSION}.patch"


class BuildError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def log(msg: str) -> None:
    print(f"[build_minkowski] {msg}", file=sys.stderr, flush=True)


def default_cache() -> Path:
    root = os.environ.get("SPARSECNN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "sparsecnn")
    return Path(root) / "wheels"


def find_nvcc(cuda_home: str | None) -> Path | None:
    for cand in ([cuda_home] if cuda_home else []) + [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]:
        if cand and (Path(cand) / "bin" / "nvcc").is_file():
            return Path(cand) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found).resolve() if found else None


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, encoding="utf-8", errors="replace").stdout
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return ".".join(token[1:].split(".")[:2])
    return "unknown"


def build_config(args) -> dict:
    """What we are building for: the running Python/torch, CPU or CUDA, and the cache key."""
    try:
        import torch
    except ImportError:
        raise BuildError(f"PyTorch is not importable by {sys.executable}: install torch first") from None
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    nvcc = find_nvcc(args.cuda_home)
    # Default: CUDA where a GPU is visible and nvcc is there; a GPU-less machine builds for CPU
    # unless told --cuda (with --arch) to build for a GPU elsewhere.
    want_cuda = args.cuda if args.cuda is not None else bool(nvcc and torch.version.cuda and torch.cuda.is_available())
    cfg = {"me": ME_VERSION, "python": py, "torch": torch.__version__, "cuda": None, "arch": None,
           "blas": args.blas, "patch_sha": hashlib.sha256(PATCH.read_bytes()).hexdigest()[:10]}
    if want_cuda:
        if nvcc is None:
            raise BuildError("--cuda asked for, but no nvcc found: install the CUDA toolkit or pass --cuda-home DIR")
        if not torch.version.cuda:
            raise BuildError(f"torch {torch.__version__} is a CPU build: a CUDA ME needs a CUDA torch")
        arch = args.arch
        if not arch:
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability(0)
                arch = f"{major}.{minor}"
            else:
                raise BuildError("no GPU visible to pick the architecture from: pass --arch (e.g. 9.0 for H100)")
        cfg.update(cuda=nvcc_version(nvcc), arch=arch, cuda_home=str(nvcc.parent.parent))
        cfg["blas"] = args.blas or "torch"
    else:
        cfg["blas"] = args.blas or "openblas"
    if cfg["blas"] == "openblas" and not ctypes.util.find_library("openblas"):
        raise BuildError("OpenBLAS not found: `apt-get install -y libopenblas-dev` (or pass --blas torch)")
    flavour = f"cu{cfg['cuda'].replace('.', '')}-sm{cfg['arch'].replace('.', '')}" if want_cuda else "cpu"
    torch_tag = cfg["torch"].replace("+", "_")
    cfg["key"] = f"me{ME_VERSION}-{flavour}-torch{torch_tag}-{py}-{cfg['blas']}-p{cfg['patch_sha']}"
    return cfg


def check_build_tools() -> None:
    """pip builds the wheel in this environment (no build isolation): setuptools' bdist_wheel and ninja."""
    missing = []
    try:
        import setuptools

        major_minor = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
        if major_minor < (70, 1):
            import wheel  # noqa: F401  (older setuptools get bdist_wheel from the wheel package)
    except ImportError as exc:
        missing.append(exc.name or "setuptools")
    if not shutil.which("ninja"):
        try:
            import ninja  # noqa: F401
        except ImportError:
            missing.append("ninja")
    if missing:
        raise BuildError(f"missing build tools for {sys.executable}: {', '.join(missing)}; "
                         "`pip install -e '.[minkowski]'` (or `pip install ninja wheel setuptools`)")


def fetch_sdist(dest_dir: Path, given: str | None) -> Path:
    """The sdist: --sdist PATH, else a cached copy, else a download from PyPI; always hash-checked."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = Path(given) if given else dest_dir / SDIST_NAME
    if not path.is_file():
        if given:
            raise BuildError(f"sdist not found: {given}")
        log(f"downloading {SDIST_NAME} from PyPI")
        try:
            req = urllib.request.Request(PYPI_SIMPLE, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
            index = json.load(urllib.request.urlopen(req, timeout=60))
            url = next(f["url"] for f in index["files"] if f["filename"] == SDIST_NAME)
            data = urllib.request.urlopen(url, timeout=120).read()
        except (OSError, StopIteration, ValueError) as exc:
            raise BuildError(f"cannot download {SDIST_NAME} from PyPI ({type(exc).__name__}: {exc}); "
                             "offline, pass --sdist PATH to a copy") from None
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise BuildError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}: not the 0.5.4 release; delete it")
    return path


def unpack_and_patch(sdist: Path, work: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(work)
    src = work / f"MinkowskiEngine-{ME_VERSION}"
    cmd = (["patch", "-p1", "--forward", "--batch", "-i", str(PATCH)] if shutil.which("patch")
           else ["git", "apply", "-p1", str(PATCH)])
    res = subprocess.run(cmd, cwd=src, capture_output=True, encoding="utf-8", errors="replace")
    if res.returncode != 0:
        raise BuildError(f"patch {PATCH.name} does not apply: {res.stdout.strip()[-300:]} {res.stderr.strip()[-200:]}")
    return src


def build_wheel(src: Path, cfg: dict, out: Path, jobs: int) -> Path:
    env = dict(os.environ)
    env["MAX_JOBS"] = str(jobs)
    env["ME_BLAS"] = cfg["blas"]
    env.pop("ME_CPU_ONLY", None)
    env.pop("ME_FORCE_CUDA", None)
    if cfg["cuda"]:
        env.update(ME_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=cfg["arch"], CUDA_HOME=cfg["cuda_home"])
    else:
        env["ME_CPU_ONLY"] = "1"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(out), str(src)]
    logfile = out / "build.log"
    log(f"building ({'CUDA ' + cfg['cuda'] + ', sm_' + cfg['arch'].replace('.', '') if cfg['cuda'] else 'CPU'}, "
        f"BLAS {cfg['blas']}, {jobs} jobs); log: {logfile}")
    t0 = time.time()
    with open(logfile, "w") as fh:
        res = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        raise BuildError(f"the ME build failed (see {logfile})")
    wheels = _wheels(out)
    if not wheels:
        raise BuildError(f"pip wheel produced no wheel in {out}")
    log(f"built {wheels[-1].name} in {(time.time() - t0) / 60:.1f} min")
    return wheels[-1]


def _wheels(folder: Path) -> list[Path]:
    """ME wheels in `folder` (pip names them minkowskiengine-... or MinkowskiEngine-...)."""
    return sorted(p for p in folder.iterdir() if p.suffix == ".whl" and p.name.lower().startswith("minkowskiengine-"))


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_wheel(wheel: Path) -> None:
    """Strip debug symbols from the extension inside the wheel and rewrite RECORD to match."""
    if not shutil.which("strip"):
        log("no `strip` here: the wheel keeps its debug symbols")
        return
    before = wheel.stat().st_size
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zin:
        files = {i.filename: zin.read(i) for i in zin.infolist()}
        for name in list(files):
            if name.endswith(".so"):
                p = Path(tmp) / "ext.so"
                p.write_bytes(files[name])
                subprocess.run(["strip", "--strip-debug", str(p)], check=True)
                files[name] = p.read_bytes()
        record = next(n for n in files if n.endswith(".dist-info/RECORD"))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for name, data in files.items():
            writer.writerow([name, "", ""] if name == record else [name, _record_hash(data), len(data)])
        files[record] = buf.getvalue().encode()
        tmp_wheel = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp_wheel, "w", zipfile.ZIP_DEFLATED) as zout:
            for name, data in files.items():
                zout.writestr(name, data)
    tmp_wheel.replace(wheel)
    log(f"stripped: {before / 2**20:.1f} MiB -> {wheel.stat().st_size / 2**20:.1f} MiB")


def install(wheel: Path) -> None:
    log(f"installing {wheel}")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
                         capture_output=True, encoding="utf-8", errors="replace")
    if res.returncode != 0:
        raise BuildError(f"pip could not install {wheel}: {res.stderr.strip().splitlines()[-1:]}")
    check = subprocess.run([sys.executable, "-c", "import MinkowskiEngine as ME; from MinkowskiEngineBackend import _C;"
                            "print(ME.__version__, 'CUDA' if _C.is_cuda_available() else 'CPU')"],
                           capture_output=True, encoding="utf-8", errors="replace", cwd=tempfile.gettempdir())
    if check.returncode != 0:
        raise BuildError(f"installed, but `import MinkowskiEngine` fails: {check.stderr.strip().splitlines()[-1:]}")
    log(f"MinkowskiEngine {check.stdout.strip()} build installed for {sys.executable}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                      help="CUDA build (default: when a GPU is visible, nvcc is found and torch is a CUDA build)")
    mode.add_argument("--cpu", dest="cuda", action="store_false", help="CPU-only build (OpenBLAS)")
    ap.add_argument("--arch", help="CUDA architecture for TORCH_CUDA_ARCH_LIST, e.g. 9.0 (H100) or 8.7 (Orin); "
                                   "default: the visible GPU's")
    ap.add_argument("--cuda-home", help="CUDA toolkit folder holding bin/nvcc (default: $CUDA_HOME, /usr/local/cuda, PATH)")
    ap.add_argument("--blas", choices=["openblas", "torch", "mkl", "atlas", "blas"],
                    help="BLAS for ME's CPU code (default: openblas for CPU builds, torch for CUDA builds)")
    ap.add_argument("--sdist", help=f"a local {SDIST_NAME} (offline builds); default: cached, else PyPI")
    ap.add_argument("--cache-dir", type=Path, default=None, help="wheel cache (default ~/.cache/sparsecnn/wheels)")
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 16)),
                    help="parallel compile jobs (default: CPU count, at most 16)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache holds this wheel")
    ap.add_argument("--no-install", action="store_true", help="build and cache only")
    ap.add_argument("--out", type=Path, help="also copy the wheel into this folder (e.g. .whl to carry it)")
    ap.add_argument("--print-key", action="store_true", help="print the cache key for this Python/torch and exit")
    args = ap.parse_args(argv)
    try:
        cfg = build_config(args)
        if args.print_key:
            print(cfg["key"])
            return 0
        cache = (args.cache_dir or default_cache())
        slot = cache / cfg["key"]
        cached = _wheels(slot) if slot.is_dir() else []
        if cached and not args.force:
            wheel = cached[-1]
            log(f"cached wheel: {wheel}")
        else:
            check_build_tools()
            sdist = fetch_sdist(cache / "sdist", args.sdist)
            with tempfile.TemporaryDirectory(prefix="me-build-") as work:
                src = unpack_and_patch(sdist, Path(work))
                built = build_wheel(src, cfg, Path(work) / "dist", args.jobs)
                strip_wheel(built)
                slot.mkdir(parents=True, exist_ok=True)
                for old in _wheels(slot):
                    old.unlink()
                wheel = slot / built.name
                shutil.copy2(built, wheel.with_suffix(".part"))
                wheel.with_suffix(".part").replace(wheel)
                shutil.copy2(Path(work) / "dist" / "build.log", slot / "build.log")
                (slot / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()}, indent=1))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(wheel, args.out / wheel.name)
            log(f"copied to {args.out / wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB)")
        if not args.no_install:
            install(wheel)
        print(wheel)
        return 0
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
