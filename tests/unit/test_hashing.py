"""Image hashing that resumes from the base's state: the result must be the file's plain sha256."""

from __future__ import annotations

import hashlib
import os
import subprocess
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


def test_blocks_digest_follows_the_content_not_the_holes(tmp_path: Path) -> None:
    base = _sparse(tmp_path / "base.img", 64 * MIB, {0: b"mbr", 8 * MIB + 100: os.urandom(2 * MIB), 40 * MIB: os.urandom(MIB)})
    _, states = image.sha256_with_prefixes(base, [4 * MIB, 8 * MIB + 200, 30 * MIB])
    sha, blocks = image.hash_data(base, (4 * MIB, states[4 * MIB]))
    assert sha == _plain(base)  # one pass over the data, holes fed in as zeros
    for offset in (8 * MIB + 200, 30 * MIB):  # from within a data range, or a hole
        assert image.hash_data(base, (offset, states[offset])) == (sha, blocks)
    dense = tmp_path / "dense.img"
    dense.write_bytes(base.read_bytes())  # the same content without holes
    assert image.hash_data(dense) == (None, blocks)
    zeroed = _sparse(tmp_path / "zeroed.img", 64 * MIB, {0: b"mbr", 8 * MIB + 100: base.read_bytes()[8 * MIB + 100:10 * MIB + 100],
                                                         20 * MIB: bytes(MIB), 40 * MIB: base.read_bytes()[40 * MIB:41 * MIB]})
    assert image.hash_data(zeroed)[1] == blocks  # zeros written where the base has a hole
    subprocess.run(["fallocate", "--offset", str(30 * MIB), "--length", str(MIB), str(zeroed)], check=True)
    assert image.hash_data(zeroed)[1] == blocks  # allocated, unwritten: reads as zeros

    def changed(name: str, change) -> str:
        path = tmp_path / name
        subprocess.run(["cp", "--sparse=always", str(base), str(path)], check=True)
        change(path)
        return image.hash_data(path)[1]

    def write(offset: int, data: bytes):
        def change(path: Path) -> None:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(data)
        return change

    digests = {
        "data": changed("data.img", write(9 * MIB, b"\x00baked")),
        "hole": changed("hole.img", write(30 * MIB, b"x")),  # new data where there was a hole
        "next to data": changed("next.img", write(8 * MIB + 99, b"x")),  # in the block, before the data
        "last byte": changed("last.img", write(41 * MIB - 1, bytes([base.read_bytes()[41 * MIB - 1] ^ 1]))),
        "moved": changed("moved.img", write(40 * MIB, bytes(64 << 10) + base.read_bytes()[40 * MIB:41 * MIB - (64 << 10)])),
        "punched": changed("punched.img", lambda p: subprocess.run(
            ["fallocate", "--punch-hole", "--offset", str(40 * MIB), "--length", str(MIB), str(p)], check=True)),
        "longer": changed("longer.img", lambda p: os.truncate(p, 65 * MIB)),
    }
    assert blocks not in digests.values() and len(set(digests.values())) == len(digests), (blocks, digests)
    assert changed("first.img", write(0, b"MBR")) != blocks
