"""Image hashing that resumes from the base's state: the result must be the file's plain sha256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from builder import image

MIB = 1 << 20


def _sparse(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def _plain(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resumed_hash_is_the_plain_sha256(tmp_path: Path) -> None:
    base = _sparse(tmp_path / "base.img", 40 * MIB, {0: b"mbr", 5 * MIB: os.urandom(3 * MIB), 30 * MIB: b"root"})
    copy = tmp_path / "copy.img"
    copy.write_bytes(base.read_bytes())
    with open(copy, "r+b") as f:  # what baking changes: the root partition only
        f.seek(31 * MIB)
        f.write(b"baked")
    whole, states = image.sha256_with_prefixes(base, [4 * MIB, 20 * MIB])
    assert whole == _plain(base)
    for offset in (4 * MIB, 20 * MIB):
        assert image.sha256_file(copy, start=(offset, states[offset])) == _plain(copy)
    assert image.sha256_file(copy) == _plain(copy)


def test_same_prefix_reads_holes_as_zeros_and_finds_any_change(tmp_path: Path) -> None:
    base = _sparse(tmp_path / "base.img", 64 * MIB, {MIB: os.urandom(MIB), 60 * MIB: b"x"})
    dense = tmp_path / "dense.img"
    dense.write_bytes(base.read_bytes())  # no holes at all, same bytes
    assert image.same_prefix(dense, base, 62 * MIB)
    assert image.same_prefix(base, dense, 64 * MIB)
    for offset in (0, MIB + 12345, 40 * MIB, 60 * MIB):
        changed = _sparse(tmp_path / f"changed-{offset}.img", 64 * MIB, {MIB: base.read_bytes()[MIB:2 * MIB], 60 * MIB: b"x"})
        with open(changed, "r+b") as f:
            f.seek(offset)
            f.write(b"\x01" if offset != 60 * MIB else b"y")
        assert not image.same_prefix(changed, base, 64 * MIB), offset
        assert image.same_prefix(changed, base, offset)  # everything before the change is equal
