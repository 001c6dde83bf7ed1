"""Block maps: which blocks of an image must reach a card, in bmaptool's own format.

A block is mapped when a file system uses it (ext4's block bitmaps, read with
dumpe2fs; FAT's allocation table), or when it lies outside every file system and
holds data (the partition table). A block a file system uses is mapped even where
the image file has a hole there: the card must read zeros in it, and a used card
would not. A free block is not mapped, whatever it holds: nothing reads it.

The file is bmaptool's format 2.0 (sha256 per range, and the file's own sha256),
so `bmaptool copy` takes it as it is; `pibake flash` reads it too.
"""

from __future__ import annotations

import array
import hashlib
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from builder import image, run
from builder.errors import BuildError, InputError
from builder.files import write_file

BLOCK = 4096
VERSION = "2.0"
SUFFIX = ".bmap"
MAX_SIZE = 64 << 20  # a bmap file read back: far beyond any image's
MAX_FAT = 64 << 20  # a FAT larger than this is not read: its data ranges are mapped instead


@dataclass(frozen=True)
class Range:
    first: int  # block numbers, both included
    last: int
    sha256: str


@dataclass(frozen=True)
class Bmap:
    image_size: int
    ranges: tuple[Range, ...]
    block_size: int = BLOCK

    @property
    def blocks(self) -> int:
        return -(-self.image_size // self.block_size)

    @property
    def mapped_blocks(self) -> int:
        return sum(r.last - r.first + 1 for r in self.ranges)

    def span(self, r: Range) -> tuple[int, int]:
        """The bytes of a range: [start, stop), the image's last block being short."""
        return r.first * self.block_size, min((r.last + 1) * self.block_size, self.image_size)

    @property
    def mapped_bytes(self) -> int:
        return sum(stop - start for start, stop in map(self.span, self.ranges))


def path_for(image_path: Path) -> Path:
    """Where an image's bmap goes: bmaptool looks for `<image>.bmap` first."""
    return image_path.with_name(image_path.name + SUFFIX)


def used_extents(path: Path) -> list[tuple[int, int]]:
    """The byte ranges of the image that must reach the card, sorted and merged."""
    size = path.stat().st_size
    partitions = [p for p in image.read_partitions(path) if p.start < size]
    with open(path, "rb") as f:
        data = image._data_ranges(f.fileno(), size)
    extents = []
    for part in partitions:
        stop = min(part.start + part.size, size)
        # Known by their content, whatever the partition's type says; any other file
        # system: its data (where it is all that is known, a hole it uses would not be mapped).
        used = _fat_used(path, part)
        if used is None:
            used = _ext_used(path, part)
        extents += used if used is not None else _clip(data, part.start, stop)
    # Outside the partitions: the data there (the partition table, a boot loader).
    inside = sorted((p.start, min(p.start + p.size, size)) for p in partitions)
    at = 0
    for start, stop in [*inside, (size, size)]:
        extents += _clip(data, at, start)
        at = max(at, stop)
    return _merged(extents)


def _clip(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    return [(max(a, lo), min(b, hi)) for a, b in ranges if a < hi and b > lo]


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


_FREE = re.compile(r"^\s+Free blocks: (.*)$")


def _ext_used(path: Path, part: image.Partition) -> list[tuple[int, int]] | None:
    """The blocks an ext2/3/4 file system uses, from its block bitmaps; None if it is not one."""
    result = run.run(["dumpe2fs", f"{path}?offset={part.start}"], check=False)
    if result.returncode != 0:
        return None
    text = run.text(result.stdout)
    header = dict(re.findall(r"^(Block count|Block size):\s+(\d+)$", text, re.M))
    if len(header) != 2:
        return None
    block, count = int(header["Block size"]), int(header["Block count"])
    free = []
    for line in text.splitlines():
        match = _FREE.match(line)
        if match and match.group(1).strip():
            for item in match.group(1).split(","):
                lo, _, hi = item.strip().partition("-")
                free.append((int(lo), int(hi or lo) + 1))
    used, at = [], 0
    for lo, hi in sorted(free) + [(count, count)]:
        if lo > at:
            used.append((part.start + at * block, part.start + min(lo, count) * block))
        at = max(at, hi)
    return _clip(used, part.start, part.start + part.size)


def _fat_used(path: Path, part: image.Partition) -> list[tuple[int, int]] | None:
    """The bytes a FAT12/16/32 file system uses: its reserved sectors, FATs, root
    folder and allocated clusters; None if the boot sector is not a FAT one."""
    with open(path, "rb") as f:
        f.seek(part.start)
        boot = f.read(512)
        if len(boot) < 512 or boot[510:512] != b"\x55\xaa":
            return None
        sector, per_cluster, reserved, fats, root_entries, total16, fat16 = struct.unpack_from("<HBHBHHxH", boot, 11)
        total32, fat32 = struct.unpack_from("<II", boot, 32)
        if sector not in (512, 1024, 2048, 4096) or per_cluster == 0 or per_cluster & (per_cluster - 1) \
                or not reserved or not fats:
            return None
        fat_sectors = fat16 or fat32
        total = total16 or total32
        data_start = reserved + fats * fat_sectors + -(-root_entries * 32 // sector)
        if not fat_sectors or total <= data_start or total * sector > part.size:
            return None
        clusters = (total - data_start) // per_cluster
        width = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
        fat_bytes = -(-(clusters + 2) * width // 8)
        if fat_bytes > min(fat_sectors * sector, MAX_FAT):
            return None
        f.seek(part.start + reserved * sector)
        table = f.read(fat_bytes)
    if len(table) < fat_bytes:
        return None
    entries = _fat_entries(table, width, clusters + 2)
    cluster_bytes = per_cluster * sector
    base = part.start + data_start * sector
    used = [(part.start, base)]
    run_start = None
    for cluster in range(2, clusters + 3):
        taken = cluster < clusters + 2 and entries[cluster] != 0
        if taken and run_start is None:
            run_start = cluster
        elif not taken and run_start is not None:
            used.append((base + (run_start - 2) * cluster_bytes, base + (cluster - 2) * cluster_bytes))
            run_start = None
    return used


def _fat_entries(table: bytes, width: int, count: int) -> "array.array[int] | list[int]":
    if width == 32:
        entries = array.array("I", table[: count * 4])
        if sys.byteorder != "little":
            entries.byteswap()
        return array.array("I", (e & 0x0FFFFFFF for e in entries))
    if width == 16:
        entries = array.array("H", table[: count * 2])
        if sys.byteorder != "little":
            entries.byteswap()
        return entries
    out = []
    for n in range(count):  # FAT12: two entries in three bytes
        pair = table[n * 3 // 2] | table[n * 3 // 2 + 1] << 8
        out.append(pair >> 4 if n & 1 else pair & 0xFFF)
    return out


def create(path: Path) -> Bmap:
    """The image's bmap: its used blocks, in ranges, each with its sha256."""
    size = path.stat().st_size
    # Whole blocks, [first, stop): ranges that touch run together.
    blocks = _merged([(start // BLOCK, -(-stop // BLOCK)) for start, stop in used_extents(path)])
    ranges = []
    with open(path, "rb", buffering=0) as f:
        for first, stop in blocks:
            digest = hashlib.sha256()
            f.seek(first * BLOCK)
            length = min(stop * BLOCK, size) - first * BLOCK
            if image._feed(f, digest, length) != length:
                raise BuildError(f"{path} changed while its block map was made")
            ranges.append(Range(first, stop - 1, digest.hexdigest()))
    return Bmap(size, tuple(ranges))


def write(image_path: Path, sync: bool = False) -> Path:
    """Make the image's bmap and write it beside the image."""
    return write_file(path_for(image_path), to_xml(create(image_path)), sync=sync)


def to_xml(bmap: Bmap) -> str:
    """The bmap file's text, as bmaptool writes it."""
    mapped = bmap.mapped_bytes
    ranges = "".join(f'        <Range chksum="{r.sha256}"> {r.first if r.first == r.last else f"{r.first}-{r.last}"} </Range>\n'
                     for r in bmap.ranges)
    text = (
        '<?xml version="1.0" ?>\n'
        "<!-- Block map of a disk image made by pibake, in bmaptool's format: the blocks\n"
        "     the image's file systems use, which are all that must reach the card. -->\n"
        f'<bmap version="{VERSION}">\n'
        f"    <!-- Image size in bytes: {bmap.image_size / 2**30:.1f} GiB -->\n"
        f"    <ImageSize> {bmap.image_size} </ImageSize>\n\n"
        f"    <BlockSize> {bmap.block_size} </BlockSize>\n\n"
        f"    <BlocksCount> {bmap.blocks} </BlocksCount>\n\n"
        f"    <!-- Mapped: {mapped / 2**20:.1f} MiB, {100 * mapped / max(bmap.image_size, 1):.1f}% -->\n"
        f"    <MappedBlocksCount> {bmap.mapped_blocks} </MappedBlocksCount>\n\n"
        "    <ChecksumType> sha256 </ChecksumType>\n\n"
        "    <!-- The sha256 of this file, taken with this value all zeros -->\n"
        f"    <BmapFileChecksum> {'0' * 64} </BmapFileChecksum>\n\n"
        "    <BlockMap>\n"
        f"{ranges}"
        "    </BlockMap>\n"
        "</bmap>\n"
    )
    return text.replace("0" * 64, hashlib.sha256(text.encode()).hexdigest(), 1)


def read(path: Path) -> Bmap:
    """A bmap file pibake wrote, checked against its own checksum; BuildError if it is not one."""
    from xml.etree import ElementTree  # here: every pibake command would import it otherwise
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SIZE + 1)
    except OSError as e:
        raise InputError(f"cannot read the block map {path}: {e.strerror}") from None
    if len(raw) > MAX_SIZE:
        raise InputError(f"{path} is not a block map: over {MAX_SIZE >> 20} MiB")
    try:
        root = ElementTree.fromstring(raw)
        if root.tag != "bmap" or root.get("version", "").split(".")[0] != VERSION.split(".")[0]:
            raise ValueError(f"not a bmap of version {VERSION}")
        if root.findtext("ChecksumType", "").strip() != "sha256":
            raise ValueError("its checksums are not sha256")
        recorded = root.findtext("BmapFileChecksum", "").strip()
        if len(recorded) != 64 or hashlib.sha256(raw.replace(recorded.encode(), b"0" * 64, 1)).hexdigest() != recorded:
            raise ValueError("its own checksum does not match: it was changed or cut short")
        size, block = int(root.findtext("ImageSize", "")), int(root.findtext("BlockSize", ""))
        if block != BLOCK:
            raise ValueError(f"block size {block}, not {BLOCK}")
        ranges = []
        for element in root.iterfind("BlockMap/Range"):
            first, _, last = (element.text or "").strip().partition("-")
            ranges.append(Range(int(first), int(last or first), element.get("chksum", "")))
        previous = -1
        for r in ranges:
            if r.first <= previous or r.last < r.first or r.last * block >= size or not re.fullmatch(r"[0-9a-f]{64}", r.sha256):
                raise ValueError(f"range {r.first}-{r.last} is out of order or outside the image")
            previous = r.last
    except (ElementTree.ParseError, ValueError) as e:
        raise InputError(f"{path} is not a usable block map: {e}") from None
    return Bmap(size, tuple(ranges), block)


def check_covers(bmap: Bmap, image_path: Path, path: Path) -> None:
    """BuildError unless the block map maps the partition table and where each file system
    starts (a FAT boot sector at the partition's start, an ext superblock 1024 bytes on):
    a card written without them would not boot, whatever the read-back said."""
    if not bmap.ranges:
        raise InputError(f"{path} is not a usable block map: it maps nothing of {image_path.name}; build again")
    needed = {0: "the partition table"}
    with open(image_path, "rb") as f:
        for part in image.read_partitions(image_path):
            if part.start >= bmap.image_size:
                continue
            f.seek(part.start)
            if f.read(2048).strip(b"\0"):  # a file system starts there: its first blocks hold what says so
                for at in (part.start, part.start + 1024):
                    needed.setdefault(at // bmap.block_size, f"the start of partition {part.number}'s file system")
    for block, what in sorted(needed.items()):
        if not any(r.first <= block <= r.last for r in bmap.ranges):
            raise InputError(f"{path} is not a usable block map: it leaves out block {block}, {what}; build again")
