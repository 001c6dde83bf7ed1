"""Base and node image files on the host: checks, decompression, copies, hashes."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.progress import bar

from builder import run
from builder.errors import BuildError

log = logging.getLogger(__name__)

SECTOR = 512
FAT_TYPES = {0x0B, 0x0C, 0x0E}  # FAT32 (CHS/LBA), FAT16 LBA
LINUX_TYPE = 0x83
CHUNK = 4 << 20


@dataclass(frozen=True)
class Partition:
    number: int
    type_id: int
    start: int  # bytes
    size: int  # bytes


def read_partitions(path: Path) -> list[Partition]:
    """The primary partitions of an MBR disk image; BuildError if it is not one."""
    try:
        with open(path, "rb") as f:
            mbr = f.read(SECTOR)
    except OSError as e:
        raise BuildError(f"cannot read image {path}: {e.strerror}") from None
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise BuildError(f"{path} is not a disk image: it has no MBR partition table")
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i : 462 + 16 * i]
        type_id = entry[4]
        start, sectors = struct.unpack("<II", entry[8:16])
        if type_id and sectors:
            parts.append(Partition(i + 1, type_id, start * SECTOR, sectors * SECTOR))
    return parts


def check_layout(path: Path) -> list[Partition]:
    """Refuse images without Raspberry Pi OS's layout: FAT p1, Linux p2, within the file."""
    parts = read_partitions(path)
    by_number = {p.number: p for p in parts}
    boot, root = by_number.get(1), by_number.get(2)
    if boot is None or root is None or boot.type_id not in FAT_TYPES or root.type_id != LINUX_TYPE:
        found = ", ".join(f"p{p.number} type 0x{p.type_id:02x}" for p in parts) or "no partitions"
        raise BuildError(f"{path} does not have Raspberry Pi OS's partitions: expected a FAT boot partition 1 "
                         f"and a Linux root partition 2, found {found}")
    size = path.stat().st_size
    if root.start + root.size > size:
        raise BuildError(f"{path} is truncated: its root partition ends at byte {root.start + root.size} "
                         f"but the file has {size} bytes")
    return parts


def sha256_file(path: Path, progress: bool = False, start: tuple[int, "hashlib._Hash"] | None = None) -> str:
    """The file's sha256; from `start` = (offset, state of the hash after the file's first offset bytes) if given."""
    with bar(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
             leave=False, disable=True if not progress else None) as meter:
        sha, _ = _hash_sparse(path, start or (0, hashlib.sha256()), None, meter.update)
    assert sha is not None
    return sha


def sha256_with_prefixes(path: Path, offsets: list[int], whole: bool = True) -> tuple[str | None, dict[int, "hashlib._Hash"]]:
    """The file's sha256 (unless not `whole`) and the hash's state after each of its first `offsets` bytes.

    Copies of the file that differ only after such an offset are hashed from there."""
    digest, states, done = hashlib.sha256(), {}, 0
    with open(path, "rb", buffering=0) as f:
        for offset in sorted(offsets):
            done += _feed(f, digest, offset - done)
            states[offset] = digest.copy()
        if whole:
            _feed(f, digest, None)
    return (digest.hexdigest() if whole else None), states


def same_prefix(a: Path, b: Path, length: int) -> bool:
    """Whether two files hold the same first `length` bytes, reading only where either has data."""
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        ranges = sorted(_data_ranges(fa.fileno(), length) + _data_ranges(fb.fileno(), length))
        merged: list[list[int]] = []
        for start, stop in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        # Outside these ranges both files are holes, which read as zeros.
        ba, bb = bytearray(CHUNK), bytearray(CHUNK)
        for start, stop in merged:
            fa.seek(start)
            fb.seek(start)
            while start < stop:
                n = min(CHUNK, stop - start)
                if n < CHUNK:
                    ba, bb = bytearray(n), bytearray(n)
                if fa.readinto(ba) != n or fb.readinto(bb) != n or ba != bb:
                    return False
                start += n
    return True


def _data_ranges(fd: int, end: int, pos: int = 0) -> list[tuple[int, int]]:
    """The file's data (not hole) ranges from `pos` to `end`; all of it where holes are not reported."""
    ranges = []
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here on
                break
            raise
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        ranges.append((start, stop))
        pos = stop
    return ranges


def _feed(f, digest: "hashlib._Hash", count: int | None, progress=lambda n: None) -> int:
    # One buffer, read into: a new bytes object per chunk costs page faults that,
    # on a sparse image, are most of the time.
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    fed = 0
    while count is None or fed < count:
        n = f.readinto(buffer if count is None or count - fed >= CHUNK else view[: count - fed])
        if not n:
            break
        digest.update(view[:n])
        fed += n
        progress(n)
    return fed


_ZEROS = memoryview(bytes(CHUNK))


def _feed_zeros(digest: "hashlib._Hash", count: int) -> None:
    while count > 0:  # none when negative
        digest.update(_ZEROS[: min(count, CHUNK)])
        count -= CHUNK


# Names what the digest covers, so that a different definition never matches an old one.
BLOCKS_DIGEST = b"pibake non-zero 64 KiB blocks v1\n"
BLOCK = 64 << 10
_ZERO_BLOCK = bytes(BLOCK)


def hash_data(path: Path, start: "tuple[int, hashlib._Hash] | None" = None) -> tuple[str | None, str]:
    """Read only the file's data: the digest of its blocks, and its sha256 if `start` is given.

    `start` = (offset, state of a sha256 after the file's first offset bytes): the
    sha256 goes on from there. The blocks' digest covers the number and bytes of every
    64 KiB block that is not all zeros, and the file's size. It follows the content
    only, not which parts the file system keeps as holes, so checking it reads only
    the data: a few MiB of a sparse image instead of all of it."""
    sha, blocks = _hash_sparse(path, start, hashlib.sha256(BLOCKS_DIGEST))
    assert blocks is not None
    return sha, blocks


def _hash_sparse(path: Path, start: "tuple[int, hashlib._Hash] | None", blocks: "hashlib._Hash | None",
                 progress=lambda n: None) -> tuple[str | None, str | None]:
    # Only the data ranges are read; holes are fed to the sha256 as the zeros they read as.
    offset, digest = (start[0], start[1].copy()) if start is not None else (0, None)
    fed = offset  # the sha256 holds the file's bytes before this
    progress(offset)
    buffer = bytearray(CHUNK)  # a whole number of blocks
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        done = 0  # the blocks before this are in the blocks' digest
        for lo, hi in _data_ranges(f.fileno(), size, 0 if blocks is not None else offset):
            # Whole blocks around each data range: the parts in holes read as zeros.
            lo, hi = max(done, lo // BLOCK * BLOCK), min(size, -(-hi // BLOCK) * BLOCK)
            f.seek(lo)
            while lo < hi:
                n = f.readinto(view[: min(CHUNK, hi - lo)])
                if n != min(CHUNK, hi - lo):
                    raise OSError(errno.EIO, f"{path} changed while it was read")
                if blocks is not None:
                    for at in range(0, n, BLOCK):
                        length = min(BLOCK, n - at)
                        if not buffer.startswith(_ZERO_BLOCK[:length], at, at + length):
                            blocks.update(struct.pack(">Q", (lo + at) // BLOCK))
                            blocks.update(view[at : at + length])
                if digest is not None and lo + n > fed:
                    _feed_zeros(digest, lo - fed)
                    digest.update(view[max(0, fed - lo) : n])
                    progress(lo + n - fed)
                    fed = lo + n
                lo += n
            done = max(done, hi)
        if digest is not None:
            _feed_zeros(digest, size - fed)
            progress(size - fed)
        if blocks is not None:
            blocks.update(struct.pack(">Q", size))
    return (digest.hexdigest() if digest is not None else None), (blocks.hexdigest() if blocks is not None else None)


def _chunks_from(command: list[str]) -> Iterator[bytes]:
    with run.stream(command, what=f"cannot decompress {command[-1]}") as out:
        while chunk := out.read(CHUNK):
            yield chunk


def _chunks_from_zip(path: Path) -> Iterator[bytes]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".img")]
            if len(members) != 1:
                raise BuildError(f"{path} holds {len(members)} .img files; expected one")
            with archive.open(members[0]) as f:
                while chunk := f.read(CHUNK):
                    yield chunk
    except (zipfile.BadZipFile, zlib.error) as e:
        raise BuildError(f"cannot decompress {path}: {e}") from None


def decompress(source: Path, target: Path, size: int | None = None) -> str:
    """Stream-decompress .img.xz (all cores), .gz or .zip to `target`; return its sha256.

    The hash is computed on the way, so checking the result costs no second read.
    """
    name = source.name
    if name.endswith(".xz"):
        chunks = _chunks_from(["xz", "--decompress", "--stdout", "--threads=0", str(source)])
    elif name.endswith(".gz"):
        chunks = _chunks_from(["gzip", "--decompress", "--stdout", str(source)])
    elif name.endswith(".zip"):
        chunks = _chunks_from_zip(source)
    else:
        raise BuildError(f"{source}: unknown compression (expected .img.xz, .img.gz or .zip)")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, bar(total=size, unit="B", unit_scale=True, desc=f"decompress {name}") as meter:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
                meter.update(len(chunk))
        os.replace(tmp, target)
    except OSError as e:
        raise BuildError(f"cannot decompress {source} into {target.parent}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def copy_image(source: Path, target: Path) -> None:
    """Copy as the file system allows at its fastest: reflink, else sparse."""
    result = run.run(["cp", "--reflink=auto", "--sparse=always", str(source), str(target)], check=False)
    if result.returncode != 0:
        target.unlink(missing_ok=True)
        _copy_failed(source, target, run.text(result.stderr).strip())


def copy_into(source: Path, target: Path) -> None:
    """Copy into `target`, an all-holes file of the source's size, never changing its size.

    For a disk that QEMU already has open: it took the size when it opened it (cp
    would truncate first). Data ranges only, with copy_file_range, which shares
    extents where the file system can, as cp does."""
    log.debug("%s: copying %s's data ranges into it", target, source)
    try:
        with open(source, "rb", buffering=0) as src, open(target, "r+b", buffering=0) as dst:
            for start, stop in _data_ranges(src.fileno(), os.fstat(src.fileno()).st_size):
                while start < stop:
                    copied = os.copy_file_range(src.fileno(), dst.fileno(), stop - start, start, start)
                    if copied == 0:
                        raise OSError(errno.EIO, f"{source} ended early")
                    start += copied
    except OSError as e:
        _copy_failed(source, target, e.strerror or str(e))


def _copy_failed(source: Path, target: Path, reason: str) -> None:
    if "No space left" in reason:
        free = shutil.disk_usage(target.parent).free
        raise BuildError(f"no space left on the output disk ({target.parent}): "
                         f"{free >> 20} MiB free, an image needs up to {_allocated(source) >> 20} MiB")
    raise BuildError(f"cannot copy {source} to {target}: {reason}")


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise BuildError(f"no space left on the output disk while writing {path}") from None
        raise
