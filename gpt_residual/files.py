"""Writing files so that a full disk or a folder we may not write is one line that says what to do, never a
traceback, and never leaves a half-written file behind.

    write_atomic(path, text)            # temp file + fsync + rename; a failure removes the temp file
    with writing(path, "the export"):   # any write inside: ENOSPC, EDQUOT, EACCES, EROFS -> one WriteError line
        ...

torch.save reports a failed write as a RuntimeError whose __context__ is the OSError ("unexpected pos ..."), and
safetensors as a SafetensorError that says "(os error 28)": failure() reads those too. Imports nothing of the
project (the prepare scripts use it without torch).
"""

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteError(ValueError):
    """A file could not be written (full disk, no permission); printed as one line."""


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind e: e itself, or one in its chain of causes (torch.save wraps it in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def failure(e: BaseException, path: Path, what: str, need: int | None = None, after: str = "") -> WriteError | None:
    """The one-line WriteError for e, raised while writing `what` to path, or None when e is not a failed write
    (a bug: let it through). need: bytes the write needed, to say how much to free; after: what still holds."""
    path = Path(path)
    cause = os_error(e)
    code = cause.errno if cause is not None else errno_in_message(str(e))
    if cause is None and code is None and not (isinstance(e, RuntimeError) and is_torch_write_failure(e)):
        return None
    free = free_bytes(path)
    if code in NO_SPACE or (code is None and need is not None and free is not None and free < need):
        room = f"; about {size(need)} is needed, {size(free or 0)} is free" if need else ""
        msg = f"no space left on the device writing {what} ({path}){room}: free some space there or write elsewhere"
    elif code in DENIED:
        msg = f"cannot write {what} ({path}): {os.strerror(code).lower()}; choose a folder you can write to"
    elif code == errno.ENOENT and not path.parent.is_dir():
        msg = f"cannot write {what}: its folder {path.parent} no longer exists"
    else:
        reason = os.strerror(code) if code is not None else str(e).splitlines()[0][:120]
        msg = f"could not write {what} ({path}): {reason}"
    return WriteError(msg + (f"; {after}" if after else ""))


def errno_in_message(text: str) -> int | None:
    """The errno a library wrote into its message instead of raising an OSError: Rust's "(os error 28)"
    (safetensors), or the C library's words."""
    if m := re.search(r"\(os error (\d+)\)", text):
        return int(m.group(1))
    words = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT}
    return next((code for phrase, code in words.items() if phrase in text), None)


def is_torch_write_failure(e: RuntimeError) -> bool:
    """torch.save to a path (not a file object) gives no errno: its C++ writer says only this."""
    text = str(e)
    return any(s in text for s in ("unexpected pos", "file write failed", "iostream error"))


def free_bytes(path: Path) -> int | None:
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def remove(*paths: Path):
    """Delete temporary files, ignoring what is already gone (a cleanup must never hide the first error)."""
    for p in paths:
        try:
            Path(p).unlink()
        except OSError:
            pass


@contextmanager
def writing(path: Path, what: str, need: int | None = None, after: str = "", cleanup=()):
    """Turn a failed write inside the block into one WriteError line; the files in cleanup are removed first."""
    try:
        yield
    except Exception as e:  # an OSError, torch's RuntimeError, safetensors' SafetensorError, ...
        err = failure(e, path, what, need, after)
        if err is None:
            raise
        remove(*cleanup)
        raise err from None


def fsync_dir(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename itself is done
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, what: str | None = None):
    """Write data to path through a temp file, fsynced then renamed: path holds the old or the new content, never
    a part. A failed write is one WriteError line and removes the temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with writing(path, what or path.name, need=len(raw), cleanup=[tmp]):
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)
