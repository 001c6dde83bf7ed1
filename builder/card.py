"""A card: the record pibake keeps on it, and reading and writing it as a device.

pibake keeps a record on the card, in the 4 KiB before the first MiB (which Raspberry
Pi OS's layout leaves unused, and which no image's block map covers): which node and
build it holds, and whether its write finished. A card whose record says it holds a
finished build is compared block by block with the new image, and only the blocks
that differ are written. A write cut short leaves the record saying so, and the next
flash writes the card in full.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

from builder import bmap as bmaps
from builder import image

RECORD_AT = (1 << 20) - 4096
RECORD_SIZE = 4096
RECORD_MAGIC = b"pibake card record v1\n"
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
BLKSSZGET = 0x1268


def record_fits(bmap: bmaps.Bmap, image_path: Path) -> bool:
    """Whether the record's block is free in this image: unmapped, and before partition 1."""
    block = RECORD_AT // bmap.block_size
    if any(r.first <= block <= r.last for r in bmap.ranges):
        return False
    parts = image.read_partitions(image_path)
    return bool(parts) and min(p.start for p in parts) >= RECORD_AT + RECORD_SIZE


def encode_record(fields: dict) -> bytes:
    body = json.dumps(fields, sort_keys=True).encode()
    blob = RECORD_MAGIC + struct.pack(">I", len(body)) + body + hashlib.sha256(body).digest()
    assert len(blob) <= RECORD_SIZE
    return blob.ljust(RECORD_SIZE, b"\0")


def decode_record(blob: bytes) -> dict | None:
    if not blob.startswith(RECORD_MAGIC):
        return None
    at = len(RECORD_MAGIC)
    (length,) = struct.unpack_from(">I", blob, at)
    body = blob[at + 4 : at + 4 + length]
    if length > RECORD_SIZE - at - 36 or blob[at + 4 + length : at + 36 + length] != hashlib.sha256(body).digest():
        return None
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


class Buffer:
    """A page-aligned buffer, as O_DIRECT wants."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size)
        self.view = memoryview(self.map)

    def close(self) -> None:
        try:
            self.view.release()
            self.map.close()
        except BufferError:  # a slice of it is still held (by an error's traceback): freed with it
            pass


class Card:
    """The device open for writing: whole sectors, read from the card itself (O_DIRECT, or
    with the page cache dropped), and its record."""

    def __init__(self, fd: int, direct: bool) -> None:
        self.fd, self.direct = fd, direct
        try:
            self.sector = max(512, struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0])
        except OSError:
            self.sector = 512
        self.forget()

    def aligned(self, length: int) -> int:
        return -(-length // self.sector) * self.sector

    def forget(self) -> None:
        """Without O_DIRECT, what is read next comes from the card, not the page cache."""
        if not self.direct:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(self, view: memoryview, length: int, offset: int) -> int:
        return pread(self.fd, view, length, offset)

    def write(self, view: memoryview, offset: int) -> None:
        pwrite(self.fd, view, offset)

    def zero(self, offset: int, length: int, zeros: memoryview) -> None:
        """Zeros by BLKZEROOUT, which the device may do without them crossing the bus,
        else written."""
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        except OSError:
            pwrite(self.fd, zeros, offset)

    def sync(self) -> None:
        os.fsync(self.fd)

    def previous(self, buffer: Buffer) -> dict | None:
        """The record the card holds, if it holds one."""
        n = self.read(buffer.view, RECORD_SIZE, RECORD_AT)
        return decode_record(bytes(buffer.view[:n]))

    def mark(self, buffer: Buffer, fields: dict) -> None:
        """Write the record (fields and the time), and make sure it is on the card."""
        at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        buffer.view[:RECORD_SIZE] = encode_record({**fields, "at": at})
        self.write(buffer.view[:RECORD_SIZE], RECORD_AT)
        self.sync()


def pread(fd: int, view: memoryview, length: int, offset: int) -> int:
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:length]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def pwrite(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
