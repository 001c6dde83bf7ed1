"""The one time a build writes into images: SOURCE_DATE_EPOCH, or the base's own.

reproducible-builds.org's convention: when SOURCE_DATE_EPOCH is set, it is every
time pibake writes (file and folder times, the root file system's superblock, the
boot partition's directory entries; FAT holds it to the even second below). Otherwise
the time is the base image's: the last time its root file system was written, as its
superblock records it, to the even second below. So the same inputs give the same
image whatever the clock says, and the times pibake writes are never later than the
base's own were when it was made.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from builder import environment
from builder.errors import BuildError, InputError, Place

# FAT stores times from 1980; ext4 without its extra epoch bits, up to 2038-01-19.
EARLIEST = 315532800  # 1980-01-01T00:00:00Z
LATEST = 2**31 - 1

EXT4_MAGIC = 0xEF53
INCOMPAT_RECOVER = 0x4


@dataclass(frozen=True)
class Epoch:
    seconds: int
    source: str  # "SOURCE_DATE_EPOCH", or "base image"


def superblock(image: Path, offset: int) -> bytes:
    """The ext4 superblock of the file system at `offset` in `image` (1 KiB, 1 KiB into it)."""
    try:
        with open(image, "rb") as f:
            f.seek(offset + 1024)
            block = f.read(1024)
    except OSError as e:
        raise BuildError(f"cannot read {image}: {e.strerror}") from None
    if len(block) < 1024 or struct.unpack_from("<H", block, 0x38)[0] != EXT4_MAGIC:
        raise BuildError(f"{image}: partition 2 holds no ext4 file system")
    return block


def check_clean(image: Path, offset: int) -> None:
    """Refuse a base whose root file system's journal still holds changes to replay:
    pibake writes it directly, as a file system that was cleanly unmounted."""
    incompat = struct.unpack_from("<I", superblock(image, offset), 0x60)[0]
    if incompat & INCOMPAT_RECOVER:
        raise BuildError(f"{image}: its root file system was not cleanly unmounted (its journal needs recovery): "
                         "run e2fsck on it, or use the image as it was downloaded")


def of(image: Path, root_offset: int) -> Epoch:
    value = environment.source_date_epoch()
    if value is not None:
        if not value.isascii() or not value.isdigit() or not EARLIEST <= int(value) <= LATEST:
            raise InputError(f"SOURCE_DATE_EPOCH must be a whole number of seconds from {EARLIEST} (1980) to "
                             f"{LATEST} (2038), not '{value[:40]}'", Place(key="SOURCE_DATE_EPOCH"))
        return Epoch(int(value), "SOURCE_DATE_EPOCH")
    block = superblock(image, root_offset)
    wtime, mkfs = struct.unpack_from("<I", block, 0x30)[0], struct.unpack_from("<I", block, 0x108)[0]
    seconds = min(max(wtime, mkfs, EARLIEST), LATEST)
    # FAT counts time in steps of 2 s: an even second is held exactly on both file systems.
    return Epoch(seconds - seconds % 2, "base image")
