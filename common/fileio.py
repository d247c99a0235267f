"""Outputs appear whole or not at all: write to a temporary file beside the target, then rename.

One writer for every output: `check_output` refuses a bad target before any work (missing or
read-only folder, a folder as the file, a name too long, an input file as the output);
`atomic_path` writes through a temporary file that is removed on any failure and on SIGTERM,
gives the result the mode the umask asks for, and turns a full disk into one line.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

# errno values of a write that the user can fix (space, permissions, names), not a bug
_USER_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                      errno.EISDIR, errno.ENOTDIR, errno.EFBIG}

_live_temps: set[Path] = set()
_lock = threading.Lock()
_sigterm_installed = False


def _umask() -> int:
    try:  # Linux states it; elsewhere reading it means setting it for an instant
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _lock:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _disk_full(folder: Path) -> bool:
    """Whether the folder's file system has (almost) no space left: libraries such as torch.save
    report a full disk as their own error type, not as OSError(ENOSPC)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < 2**20


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                 what: str = "output") -> Path:
    """Refuse, as one UserError line, a target that cannot or must not be written; before any work."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not target.name or str(path).endswith(os.sep):
        raise UserError(f"cannot write {what} {path}: it names a folder, give a file name")
    try:
        name_max = os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    # the temporary file's name is the target's with a prefix and suffix: it must fit too
    if len(os.fsencode(target.name)) + 16 > name_max:
        raise UserError(f"cannot write {what}: file name is {len(target.name)} characters, the limit here "
                        f"is about {name_max - 16}")
    if target.is_dir():
        raise UserError(f"cannot write {what} {target}: it is a folder; give a file name inside it")
    if not folder.is_dir():
        raise UserError(f"cannot write {what} {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {target}: folder {folder} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise UserError(f"cannot write {what} {target}: the file exists and is read-only")
    for inp in inputs:
        if inp and Path(inp).exists() and _same_file(target, Path(inp)):
            raise UserError(f"{what} {target} is also an input ({inp}); writing it would replace the input, "
                            "give another name")
    return target


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder to write several outputs into: an existing folder, or one that can be made."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write into {what} {folder}: it is a file, not a folder")
    existing = next((p for p in [folder, *folder.absolute().parents] if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"cannot write into {what} {folder}: {existing} is not a writable folder")
    return folder


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """`check_output` for each named output given, and no two outputs the same file."""
    inputs = [i for i in inputs if i]
    given = [(what, Path(p)) for what, p in outputs.items() if p]
    for i, (what, p) in enumerate(given):
        check_output(p, inputs, what)
        for other, q in given[:i]:
            if _same_file(p, q):
                raise UserError(f"{what} and {other} are the same file ({p}); give each its own name")


def _on_sigterm(signum, frame):  # pragma: no cover - exercised in a subprocess by the tests
    for tmp in list(_live_temps):
        with contextlib.suppress(OSError):
            tmp.unlink()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of the signal as if no handler were set


def _install_sigterm_cleanup() -> None:
    """SIGINT unwinds through `atomic_path`'s cleanup; SIGTERM by default kills without it."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def user_write_error(exc: OSError, target: str | os.PathLike) -> UserError | None:
    """A write failure the user can fix (disk full, permissions, names) as one line; None otherwise."""
    if exc.errno not in _USER_WRITE_ERRNOS:
        return None
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large for this file system",
           errno.ENAMETOOLONG: "the name is too long"}.get(exc.errno, exc.strerror or "write refused")
    return UserError(f"cannot write {target}: {why}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path`.

    On any exception (and on SIGTERM) the temporary file is removed and `path` is left as it was.
    """
    target = check_output(path)
    folder = target.parent if str(target.parent) else Path(".")
    _install_sigterm_cleanup()
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        err = user_write_error(exc, target)
        if err is None:
            raise
        raise err from exc
    os.close(fd)
    tmp = Path(tmp_name)
    _live_temps.add(tmp)
    try:
        yield tmp
        # mkstemp makes the file 0600; an output gets what any new file would (0666 less the umask)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        err = user_write_error(exc, target)
        if err is None:
            raise
        raise err from exc
    except Exception as exc:
        full = _disk_full(folder)  # before the temporary file's space is given back
        tmp.unlink(missing_ok=True)
        if full:
            raise UserError(f"cannot write {target}: no space left on the device") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _live_temps.discard(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def read_json(path: str | os.PathLike, what: str = "JSON file", hint: str = ""):
    """A JSON file a user gave: missing or not JSON is one line naming it (and `hint`, the fix)."""
    import json

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p} is not JSON ({exc}){'; ' + hint if hint else ''}") from None
