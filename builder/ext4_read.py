"""An ext4 file system in an image file, read on the host with e2fsprogs' debugfs.

Every command names an inode by number (`ls -p <N>`, `cat <N>`), so no path is ever
quoted into a script: a name holding a line break or a quote is read like any other.
`ls -p` writes an entry as /inode/mode/uid/gid/name/size/ and a name cannot hold a
slash, so the listing of a sound file system cannot be misread (a damaged one, whose
names hold a slash or a NUL, is e2fsck's to find, which runs after); `cat` writes exactly
as many bytes as the listing gave the file, after debugfs's echo of the command, except
for a file under 60 bytes kept in its inode (the inline_data feature), which debugfs
writes out to 60: those are written to files and read to their size.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from builder import run
from builder.errors import BuildError
from builder.image_write import TOOL_ENV, quoted, tool

ROOT_INODE = 2
S_IFMT, S_IFDIR, S_IFREG = 0o170000, 0o040000, 0o100000
MAX_LISTING = 1 << 30  # bytes of one round of folder listings
MAX_ENTRIES = 5_000_000  # entries of the whole file system
INLINE = 60  # bytes of an inode's block map, where inline_data keeps a small file
# uid and gid: debugfs prints them signed, so one of 2^31 or more comes out negative.
ENTRY = re.compile(rb"/(\d{1,10})/([0-7]{6,7})/-?\d{1,10}/-?\d{1,10}/([^/]*)/(\d{1,20})?/\n")


@contextmanager
def _debugfs(image: Path, offset: int, commands: list[str], what: str) -> Iterator[IO[bytes]]:
    """debugfs running `commands` on the file system at `offset`: its output, read while it runs.
    Anything it says on stderr beyond its banner, or an exit status, is an error."""
    with tempfile.TemporaryDirectory(prefix="pibake-read-") as folder, open(Path(folder) / "err", "w+b") as err:
        script = Path(folder) / "commands"
        script.write_text("".join(c + "\n" for c in commands))
        proc = subprocess.Popen([tool("debugfs", "e2fsprogs"), "-f", str(script), f"{image}?offset={offset}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=TOOL_ENV)
        assert proc.stdout is not None
        try:
            yield proc.stdout
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        returncode = proc.wait()
        err.seek(0)
        lines = [line for line in run.text(err.read(1 << 20)).splitlines()
                 if line.strip() and not line.startswith("debugfs ")]
        if returncode != 0 or lines:
            raise BuildError(f"debugfs cannot {what}: {(lines or [f'exit status {returncode}'])[-1][:300]}")


def _expect(stream: IO[bytes], wanted: bytes, what: str) -> None:
    if stream.read(len(wanted)) != wanted:
        raise BuildError(f"debugfs answered {what} with something else than pibake reads")


def walk(image: Path, offset: int) -> dict[str, tuple[int, int, int]]:
    """Every entry of the file system below its root: "./path" -> (inode, mode, size)."""
    found: dict[str, tuple[int, int, int]] = {}
    level = [(".", ROOT_INODE)]
    folders = {ROOT_INODE}  # a folder has one name: a second one (a damaged file system) would loop
    while level:
        with _debugfs(image, offset, [f"ls -p <{ino}>" for _, ino in level], "list the file system") as out:
            data = _bounded(out, MAX_LISTING)
        following, at = [], 0
        for folder, ino in level:
            echo = f"debugfs: ls -p <{ino}>\n".encode()
            if not data.startswith(echo, at):
                raise BuildError("debugfs answered a listing with something else than pibake reads")
            at += len(echo)
            while not data.startswith(b"\n", at):
                m = ENTRY.match(data, at)
                if not m:
                    raise BuildError(f"debugfs listed {(folder[1:] or '/')[:300]!r} in a way pibake cannot read")
                at = m.end()
                name = m[3].decode("utf-8", "surrogateescape")
                if name in (".", "..") or m[1] == b"0":  # 0: an unused entry (lost+found has them)
                    continue
                path = f"{folder}/{name}"
                child, mode = int(m[1]), int(m[2], 8)
                found[path] = (child, mode, int(m[4] or 0))
                if len(found) > MAX_ENTRIES:
                    raise BuildError(f"the file system holds more than the {MAX_ENTRIES} entries pibake lists")
                if mode & S_IFMT == S_IFDIR:
                    if child in folders:
                        raise BuildError(f"the file system links folder inode {child} twice (at {path[1:][:300]!r})")
                    folders.add(child)
                    following.append((path, child))
            at += 1
        if at != len(data):
            raise BuildError("debugfs answered a listing with more than pibake asked for")
        level = following
    return found


def sums(image: Path, offset: int) -> dict[str, str]:
    """The sha256 of every regular file of the file system: "./path" -> hex digest."""
    files = {path: (ino, size) for path, (ino, mode, size) in walk(image, offset).items() if mode & S_IFMT == S_IFREG}
    by_inode = dict(sorted(set(files.values())))  # a hard link's content is read once
    inline = {ino: size for ino, size in by_inode.items() if size < INLINE} if _inline_data(image, offset) else {}
    digests = _contents(image, offset, {ino: size for ino, size in by_inode.items() if ino not in inline})
    digests.update(_small(image, offset, inline))
    return {path: digests[ino] for path, (ino, _) in files.items()}


def _bounded(out: IO[bytes], limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := out.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise BuildError("the file system holds more than pibake lists")
        chunks.append(chunk)
    return b"".join(chunks)


def _inline_data(image: Path, offset: int) -> bool:
    """Whether the file system may keep small files in their inodes (ext4's INCOMPAT_INLINE_DATA)."""
    with open(image, "rb") as f:
        superblock = os.pread(f.fileno(), 1024, offset + 1024)
    return len(superblock) == 1024 and int.from_bytes(superblock[0x60:0x64], "little") & 0x8000 != 0


def _small(image: Path, offset: int, sizes: dict[int, int]) -> dict[int, str]:
    """Files under 60 bytes, each written out by debugfs and read to its size."""
    digests: dict[int, str] = {}
    if not sizes:
        return digests
    with tempfile.TemporaryDirectory(prefix="pibake-small-") as folder:
        with _debugfs(image, offset, [f"dump <{ino}> {quoted(f'{folder}/{ino}')}" for ino in sizes], "read the file system's files") as out:
            _bounded(out, 64 * (len(sizes) + 1))  # its echoes
        for ino, size in sizes.items():
            try:
                with open(Path(folder) / str(ino), "rb") as f:
                    digests[ino] = hashlib.sha256(f.read(size)).hexdigest()
            except FileNotFoundError:
                raise BuildError(f"debugfs did not write out inode {ino}") from None
    return digests


def _contents(image: Path, offset: int, sizes: dict[int, int]) -> dict[int, str]:
    digests: dict[int, str] = {}
    if not sizes:
        return digests
    with _debugfs(image, offset, [f"cat <{ino}>" for ino in sizes], "read the file system's files") as out:
        for ino, size in sizes.items():
            _expect(out, f"debugfs: cat <{ino}>\n".encode(), "a read")
            digest, left = hashlib.sha256(), size
            while left and (chunk := out.read(min(left, 1 << 20))):
                digest.update(chunk)
                left -= len(chunk)
            if left:
                raise BuildError(f"debugfs read {size - left} of the {size} bytes inode {ino} holds")
            digests[ino] = digest.hexdigest()
        if out.read(1):
            raise BuildError("debugfs answered a read with more than the file holds")
    return digests
