"""Files pibake writes beside images, in the cache and in the state folder: whole or not at all.

Every such file is written under a temporary name in its own folder and renamed
over the old one, so a reader, or the next run after a crash, sees the old file or
the new one and never half of either.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Union

# Files pibake reads back (manifests, cache metadata, remembered base reads) are its
# own, but a damaged or planted one must not exhaust memory.
MAX_JSON = 64 << 20


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; OSError otherwise.

    For every file a profile names: a device (/dev/zero), a FIFO (which would block)
    or a huge file is refused before anything is read into memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {_size(limit)}", str(path))
    return data


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def write_file(path: Path, data: Union[bytes, str], mode: int = 0o644, *, sync: bool = False,
               rename: bool = True) -> Path:
    """Write `data` to `path` atomically; with rename=False, leave it under its temporary
    name and return that, for callers that rename several files in an order of their own."""
    # A new file of a random name, created exclusively: a file or link planted under a
    # predictable name is never written through.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not rename:
        return tmp
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any, mode: int = 0o644, *, sync: bool = False, indent: int | None = 2) -> None:
    write_file(path, json.dumps(data, indent=indent) + "\n", mode, sync=sync)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when it is missing, unreadable, too large or not an object."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_JSON + 1)
        data = json.loads(text) if len(text) <= MAX_JSON else None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
