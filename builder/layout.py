"""A card's layout, as read from a running node or a card, and an empty image made with it.

A backup is an image with the node's own partition table (its disk id, each
partition's start, type and, on GPT, its UUID) and the node's own file systems'
identity (UUID or FAT volume id, label, ext4's features, block and inode sizes), so
that the node's cmdline.txt and fstab (`PARTUUID=…`, `LABEL=…`) find them. Only the
last partition, the root file system, is sized by its data rather than by the card.

The table comes from `sfdisk --json`, ext4's parameters from `dumpe2fs -h` (or
libguestfs' `tune2fs -l`, which prints the same fields), FAT's from its boot sector;
everything read is bounded, and checked before it reaches a command line.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from builder import run
from builder.errors import BuildError

SECTOR = 512
ALIGN = 4 << 20  # partitions and the image's size, in bytes
# The root file system's room beyond its data: a quarter more, and at least this much,
# for its metadata and journal and for the node to go on writing after a restore.
HEADROOM = 512 << 20
MAX_PARTITIONS = 16
MAX_CARD = 2 << 40  # bytes: an MBR card's limit
# The features a mounted ext4 file system shows that say what state it is in, not what it is.
STATE_FEATURES = {"needs_recovery", "orphan_present"}
FEATURE_RE = re.compile(r"[a-z0-9_]{1,40}")
LABEL_RE = re.compile(r"[\x20-\x7e]{0,16}")
FAT_LABEL_RE = re.compile(r"[\x20-\x7e]{0,11}")
TYPE_RE = re.compile(r"[0-9a-fA-F]{1,2}|[0-9a-fA-F-]{36}")


@dataclass(frozen=True)
class Ext4:
    uuid: str
    label: str
    features: tuple[str, ...]
    block_size: int
    inode_size: int
    reserved_percent: int


@dataclass(frozen=True)
class Fat:
    volume_id: str  # 8 hex digits, as mkfs.fat -i takes it
    label: str
    bits: int  # 12, 16 or 32
    sectors_per_cluster: int


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str  # MBR: a hex byte; GPT: a type UUID
    uuid: str  # GPT's partition UUID; empty on MBR (its PARTUUID is the disk id and the number)
    mount: str  # where the node mounts it ("/", "/boot/firmware"); empty: not backed up
    fs: Ext4 | Fat | None = None
    used: int = 0  # bytes its file system uses
    inodes: int = 0  # inodes it uses (ext4)


@dataclass(frozen=True)
class Layout:
    label: str  # "dos" or "gpt"
    disk_id: str  # MBR: 0x and 8 hex digits; GPT: a UUID
    partitions: tuple[Partition, ...]
    card_size: int  # bytes of the card it was read from

    @property
    def root(self) -> Partition:
        return next(p for p in self.partitions if p.mount == "/")

    @property
    def boot(self) -> Partition | None:
        return next((p for p in self.partitions if p.fs is not None and isinstance(p.fs, Fat)), None)


@dataclass(frozen=True)
class Slot:
    """A partition table's entry."""

    number: int
    start: int
    size: int
    type: str
    uuid: str


def table(sfdisk_json: bytes) -> tuple[str, str, list[Slot]]:
    """label, disk id and partitions from `sfdisk --json`."""
    try:
        data = json.loads(sfdisk_json)["partitiontable"]
        label, disk_id = str(data["label"]), str(data["id"]).lower()
        parts = []
        for entry in data.get("partitions", [])[:MAX_PARTITIONS + 1]:
            number = re.search(r"(\d+)$", str(entry["node"]))
            if not number:
                raise ValueError(entry["node"])
            parts.append(Slot(int(number[1]), int(entry["start"]), int(entry["size"]), str(entry["type"]).lower(),
                              str(entry.get("uuid", "")).lower()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BuildError(f"the card's partition table could not be read ({type(e).__name__})") from None
    if label not in ("dos", "gpt") or len(parts) > MAX_PARTITIONS:
        raise BuildError(f"the card's partition table is {label!r} with {len(parts)} partitions: "
                         "pibake backs up MBR (dos) and GPT cards of up to 16 partitions")
    if not (re.fullmatch(r"0x[0-9a-f]{8}", disk_id) if label == "dos" else _is_uuid(disk_id)):
        raise BuildError(f"the card's disk id {disk_id!r} is not one pibake can write back")
    for p in parts:
        if not TYPE_RE.fullmatch(p.type) or (p.uuid and not _is_uuid(p.uuid)) or not (
                0 < p.start < 1 << 40 and 0 < p.size < 1 << 40 and 0 < p.number <= 128):
            raise BuildError(f"partition {p.number} of the card is not one pibake can write back")
    return label, disk_id, parts


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()  # sfdisk prints GPT's in capitals
    except ValueError:
        return False


def ext4(fields: dict[str, str]) -> Ext4:
    """ext4's identity from dumpe2fs -h (or tune2fs -l) fields."""
    try:
        fs_uuid = fields["Filesystem UUID"].strip()
        label = fields.get("Filesystem volume name", "").strip()
        label = "" if label == "<none>" else label
        features = tuple(f for f in fields["Filesystem features"].split() if f not in STATE_FEATURES)
        block_size, inode_size = int(fields["Block size"]), int(fields["Inode size"])
        blocks, reserved = int(fields["Block count"]), int(fields["Reserved block count"])
    except (KeyError, ValueError):
        raise BuildError("the root file system's parameters could not be read (dumpe2fs -h)") from None
    if not (_is_uuid(fs_uuid) and LABEL_RE.fullmatch(label) and all(FEATURE_RE.fullmatch(f) for f in features)
            and block_size in (1024, 2048, 4096, 65536) and inode_size in (128, 256, 512, 1024) and blocks > 0):
        raise BuildError("the root file system's parameters are not ones pibake can write back")
    return Ext4(fs_uuid, label, features, block_size, inode_size, min(50, round(100 * reserved / blocks)))


def fields(dumpe2fs: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in dumpe2fs.splitlines()[:400]:
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def fat(boot_sector: bytes) -> Fat:
    """FAT's identity from its boot sector."""
    if len(boot_sector) < 512 or boot_sector[510:512] != b"\x55\xaa":
        raise BuildError("the boot partition is not a FAT file system pibake can read")
    sectors_per_cluster = boot_sector[13]
    fat16_size = struct.unpack_from("<H", boot_sector, 22)[0]
    if fat16_size == 0:  # FAT32: its extended boot record is further on
        volume_id, label, bits = struct.unpack_from("<I", boot_sector, 67)[0], boot_sector[71:82], 32
    else:
        volume_id, label = struct.unpack_from("<I", boot_sector, 39)[0], boot_sector[43:54]
        total = struct.unpack_from("<H", boot_sector, 19)[0] or struct.unpack_from("<I", boot_sector, 32)[0]
        bits = 12 if total // max(1, sectors_per_cluster) < 4085 else 16
    text = label.decode("ascii", "replace").rstrip()
    text = "" if text == "NO NAME" else text
    if not FAT_LABEL_RE.fullmatch(text) or sectors_per_cluster not in (1, 2, 4, 8, 16, 32, 64, 128):
        raise BuildError("the boot partition's FAT parameters are not ones pibake can write back")
    return Fat(f"{volume_id:08x}", text, bits, sectors_per_cluster)


def root_size(layout: Layout) -> int:
    """Sectors for the root partition of a backup: its data and headroom, never more than the card's."""
    root = layout.root
    want = root.used + max(root.used // 4, HEADROOM)
    want = -(-want // ALIGN) * ALIGN // SECTOR
    return min(want, root.size)


def sized(layout: Layout) -> Layout:
    """The layout of a backup image: as read, with the root partition cut to size."""
    root = layout.root
    if root.number != max(p.number for p in layout.partitions) or root.start != max(p.start for p in layout.partitions):
        raise BuildError("the root partition is not the card's last: pibake backs up cards laid out as "
                         "Raspberry Pi OS lays them out (boot first, root last)")
    parts = tuple(p if p is not root else Partition(p.number, p.start, root_size(layout), p.type, p.uuid, p.mount,
                                                  p.fs, p.used, p.inodes) for p in layout.partitions)
    result = Layout(layout.label, layout.disk_id, parts, layout.card_size)
    if image_size(result) > min(layout.card_size + ALIGN, MAX_CARD):
        raise BuildError("the card's partitions reach beyond the card (or beyond 2 TiB): not a layout pibake backs up")
    return result


def image_size(layout: Layout) -> int:
    end = max(p.start + p.size for p in layout.partitions) * SECTOR
    if layout.label == "gpt":
        end += 33 * SECTOR  # the backup GPT
    return -(-end // ALIGN) * ALIGN


def sfdisk_script(layout: Layout) -> str:
    lines = [f"label: {layout.label}", f"label-id: {layout.disk_id}", "unit: sectors", ""]
    for p in sorted(layout.partitions, key=lambda p: p.number):
        uuid_part = f", uuid={p.uuid}" if p.uuid else ""
        lines.append(f"start={p.start}, size={p.size}, type={p.type}{uuid_part}")
    return "\n".join(lines) + "\n"


def make_empty(path: Path, layout: Layout) -> None:
    """`path`: a sparse image holding the layout's table and empty file systems."""
    with open(path, "wb") as f:
        f.truncate(image_size(layout))
    run.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)], input=sfdisk_script(layout).encode(),
            what="cannot write the backup's partition table")
    for p in layout.partitions:
        if isinstance(p.fs, Fat):
            run.run(["mkfs.fat", "--offset", str(p.start), "-h", str(p.start), "-F", str(p.fs.bits), "-s", str(p.fs.sectors_per_cluster),
                     "-i", p.fs.volume_id, *(["-n", p.fs.label] if p.fs.label else []), str(path), str(p.size * SECTOR >> 10)],
                    what="cannot make the backup's boot file system")
        elif isinstance(p.fs, Ext4):
            fs = p.fs
            blocks = p.size * SECTOR // fs.block_size
            inodes = max(p.inodes + p.inodes // 4, blocks * fs.block_size // 16384)
            run.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={p.start * SECTOR},nodiscard",
                     "-b", str(fs.block_size), "-I", str(fs.inode_size), "-N", str(inodes), "-U", fs.uuid,
                     "-L", fs.label, "-m", str(fs.reserved_percent), "-O", "none," + ",".join(fs.features),
                     str(path), str(blocks)], what="cannot make the backup's root file system")
