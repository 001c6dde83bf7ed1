"""Block maps against file systems' own checkers: an image copied by its block map onto
a card full of old data (only the mapped blocks written, as bmaptool and pibake flash
do) must be what the image is, for each kind of file system pibake maps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builder import bmap
from builder.errors import BuildError

MIB = 1 << 20
PART_AT = 1 * MIB


def _image(tmp: Path, kind: str) -> tuple[Path, dict[str, bytes]]:
    """A disk image with one partition of `kind` holding files, some with runs of zeros
    (holes in the sparse image) and one deleted (its blocks free, not zeroed)."""
    size = 48 * MIB
    fs = tmp / "fs.raw"
    with open(fs, "wb") as f:
        f.truncate(size - PART_AT)
    files = {"random.bin": os.urandom(300_000),
             "zeros-inside.bin": os.urandom(5000) + bytes(1 * MIB) + os.urandom(7000),
             "all-zeros.bin": bytes(2 * MIB)}
    gone = os.urandom(3 * MIB)
    for name, data in {**files, "gone.bin": gone}.items():
        (tmp / name).write_bytes(data)
    if kind == "ext4":
        # Written by the kernel, zeros and all (mke2fs -d would leave holes in the files).
        subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True)
        mounted = tmp / "mnt"
        mounted.mkdir()
        subprocess.run(["mount", "-o", "loop", str(fs), str(mounted)], check=True)
        try:
            for name in [*files, "gone.bin"]:
                subprocess.run(["cp", "--sparse=never", str(tmp / name), str(mounted / name)], check=True)
            subprocess.run(["sync"], check=True)
            (mounted / "gone.bin").unlink()
        finally:
            subprocess.run(["umount", str(mounted)], check=True)
        type_id = "83"
    else:
        bits = {"fat12": "12", "fat16": "16", "fat32": "32"}[kind]
        subprocess.run(["mkfs.vfat", "-F", bits, "-S", "512", "-s", {"12": "32", "16": "4", "32": "1"}[bits], str(fs)], check=True,
                       capture_output=True)
        for name in [*files, "gone.bin"]:
            subprocess.run(["mcopy", "-i", str(fs), str(tmp / name), f"::/{name}"], check=True)
        subprocess.run(["mdel", "-i", str(fs), "::/gone.bin"], check=True)
        type_id = {"12": "1", "16": "6", "32": "c"}[bits]
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--quiet", str(image)], input=f"start={PART_AT // 512}, type={type_id}\n", text=True,
                   check=True, capture_output=True)
    # Copied sparse, as pibake's copies are: every run of zeros a hole.
    subprocess.run(["dd", f"if={fs}", f"of={image}", "bs=1M", f"seek={PART_AT // MIB}", "conv=sparse,notrunc",
                    "status=none"], check=True)
    return image, files


def _copy_by_map(image: Path, card: Path, block_map: bmap.Bmap) -> None:
    with open(image, "rb") as src, open(card, "r+b") as dst:
        for r in block_map.ranges:
            start, stop = block_map.span(r)
            src.seek(start)
            dst.seek(start)
            dst.write(src.read(stop - start))


@pytest.mark.parametrize("kind", ["fat12", "fat16", "fat32", "ext4"])
def test_a_card_full_of_old_data_reads_as_the_image(tmp_path: Path, kind: str) -> None:
    image, files = _image(tmp_path, kind)
    block_map = bmap.read(_written(image))
    assert block_map.mapped_bytes < image.stat().st_size // 3  # the free space is left out
    card = tmp_path / "card.raw"
    card.write_bytes(b"\xa5\x5a" * (image.stat().st_size // 2))  # every byte old data
    _copy_by_map(image, card, block_map)
    part = tmp_path / "part.raw"
    subprocess.run(["dd", f"if={card}", f"of={part}", "bs=1M", f"skip={PART_AT // MIB}", "status=none"], check=True)
    if kind == "ext4":
        check = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
        read = {n: subprocess.run(["debugfs", "-R", f"cat {n}", str(part)], capture_output=True, check=True).stdout
                for n in files}
    else:
        check = subprocess.run(["fsck.fat", "-n", str(part)], capture_output=True, text=True)
        read = {n: subprocess.run(["mtype", "-i", str(part), f"::/{n}"], capture_output=True, check=True).stdout
                for n in files}
    assert check.returncode == 0, check.stdout + check.stderr
    assert read == files


def _written(image: Path) -> Path:
    return bmap.write(image)


def test_a_changed_block_map_is_refused(tmp_path: Path) -> None:
    image, _ = _image(tmp_path, "ext4")
    path = _written(image)
    text = path.read_text()
    for changed in (text.replace("<ImageSize> ", "<ImageSize> 1", 1), text.replace("</BlockMap>", "", 1), text[:-40]):
        path.write_text(changed)
        with pytest.raises(BuildError, match="is not a usable block map"):
            bmap.read(path)
