"""Which device a flash may write, and holding it until it is written.

A device is refused, before anything is opened for writing, if it holds the running
system or any mounted or held file system, is read-only, is smaller than the image, or
is not removable (USB, MMC) unless forced. A loop device is refused for all that lies
beneath it too: the device it is over (and what that is over), or a file of pibake's
own. The device is then opened exclusively (O_EXCL), which the kernel refuses while
anything uses it, before the question; the write goes to that same open device, after
its path, number and backing are checked again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import environment, run
from builder.errors import BuildError, InputError

REMOVABLE_TRANSPORTS = {"usb", "mmc", "sdio", "ieee1394"}
LSBLK = ["lsblk", "--json", "--bytes", "--tree",
         "--output", "NAME,PATH,MAJ:MIN,TYPE,SIZE,RM,HOTPLUG,TRAN,VENDOR,MODEL,RO,FSTYPE,LABEL,MOUNTPOINTS"]
LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO = struct.Struct("=5Q4I64s64s32s2Q")  # struct loop_info64
MAX_DEPTH = 8  # loops over loops over ...: the kernel allows no cycle, this bounds the walk all the same


@dataclass(frozen=True)
class Disk:
    """A whole disk as lsblk shows it, with what sits on it."""

    path: str
    name: str
    numbers: frozenset[str]  # MAJ:MIN of the disk and of everything on it
    size: int
    removable: bool
    transport: str
    model: str
    readonly: bool
    mounts: tuple[str, ...]  # mount points on it (its partitions', and theirs)
    holders: tuple[str, ...]  # devices built on it: LVM, dm-crypt, RAID
    contents: tuple[str, ...]  # "sdb1 vfat bootfs"
    partitions: frozenset[str] = field(default_factory=frozenset)  # the paths of its partitions

    def describe(self) -> str:
        kind = f"{self.transport or 'disk'}, {'removable' if self.removable else 'not removable'}"
        return f"{self.path} ({self.model or 'no model name'}, {self.size / 2**30:.1f} GiB, {kind})"


def lsblk() -> dict:
    result = run.run(LSBLK, what="cannot list the block devices")
    try:
        return json.loads(result.stdout[: 16 << 20])
    except ValueError:
        raise BuildError("cannot list the block devices: lsblk's answer is not JSON") from None


def disks(tree: dict) -> list[Disk]:
    """The whole disks of lsblk's JSON tree (`lsblk --json --tree` with LSBLK's columns)."""
    out = []
    for top in tree.get("blockdevices", []):
        if top.get("type") not in ("disk", "loop"):
            continue
        below = list(_below(top))
        mounts = tuple(m for node in [top, *below] for m in (node.get("mountpoints") or []) if m)
        tran = (top.get("tran") or "").lower()
        name = top.get("name", "")
        out.append(Disk(
            path=top.get("path") or f"/dev/{name}",
            name=name,
            numbers=frozenset(n.get("maj:min", "") for n in [top, *below]),
            size=int(top.get("size") or 0),
            removable=_flag(top.get("rm")) or _flag(top.get("hotplug")) or tran in REMOVABLE_TRANSPORTS
            or name.startswith("mmcblk"),
            transport=tran,
            model=" ".join(filter(None, [(top.get("vendor") or "").strip(), (top.get("model") or "").strip()])),
            readonly=_flag(top.get("ro")),
            mounts=mounts,
            holders=tuple(n.get("path") or n.get("name", "") for n in below if n.get("type") != "part"),
            contents=tuple(" ".join(filter(None, [n.get("name"), n.get("fstype"), n.get("label")])) for n in below),
            partitions=frozenset(n.get("path", "") for n in top.get("children", []) if n.get("type") == "part"),
        ))
    return out


def _below(node: dict) -> Any:
    for child in node.get("children", []) or []:
        yield child
        yield from _below(child)


def _flag(value: Any) -> bool:
    return value is True or value in ("1", 1, "true")


def root_numbers() -> set[str]:
    """MAJ:MIN of the device holding /, when it is a block device."""
    number = os.stat("/").st_dev
    return {f"{os.major(number)}:{os.minor(number)}"}


def refusal(disk: Disk, image_size: int | None, force: bool, root: set[str]) -> str | None:
    """Why `disk` must not be written, or None. `image_size` None: any size will do."""
    if "/" in disk.mounts or disk.numbers & root:
        return "it holds the running system (/)"
    if disk.mounts:
        return f"it has mounted file systems ({', '.join(sorted(disk.mounts))}): unmount them first"
    if disk.holders:
        return f"it is in use by {', '.join(disk.holders)} (LVM, encryption or RAID)"
    if disk.readonly:
        return "it is read-only (a card's lock switch?)"
    if image_size is not None and disk.size < image_size:
        return f"it is too small: {disk.size / 2**30:.2f} GiB for a {image_size / 2**30:.2f} GiB image"
    if not disk.removable and not force:
        return "it is not a removable disk (USB or SD card): pass --force if it really is the card"
    return None


def find(device: str, all_disks: list[Disk]) -> Disk:
    """The whole disk DEVICE names (a path, or a link to one); BuildError if it is none."""
    path = os.path.realpath(device)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{device}: no such device ({e.strerror})") from None
    if not stat.S_ISBLK(st.st_mode):
        raise InputError(f"{device} is not a block device: give a card's device, such as /dev/sdb or /dev/mmcblk0")
    number = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    for disk in all_disks:
        if path in disk.partitions:
            raise InputError(f"{device} is a partition of {disk.path}: give the whole card, {disk.path}")
        if disk.path == path or number == _own_number(disk):
            return disk
    raise InputError(f"{device} is not a whole disk lsblk knows (a partition, or a device mapper volume?)")


def _own_number(disk: Disk) -> str:
    try:
        st = os.stat(disk.path)
    except OSError:
        return ""
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


# ------------------------------------------------------------------ what a loop device is over


@dataclass(frozen=True)
class Backing:
    """What a loop device is over, as the kernel keeps it (LOOP_GET_STATUS64): the file's
    device and inode, or a block device's number, and the window onto it. Its path in
    sysfs may be out of date or say "(deleted)": it is only shown."""

    dev: int  # st_dev of the file (for a block device, of its device node)
    inode: int
    rdev: int  # the block device's number; 0 for a file
    offset: int
    sizelimit: int
    flags: int  # a detach its users delay sets autoclear
    name: str = field(default="", compare=False)


def loop_backing(fd: int, name: str) -> Backing | None:
    """What the device open at `fd` (kernel name `name`) is over; None if it is not a loop device."""
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO.size))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL, errno.ENXIO):  # not a loop device, or one over nothing
            return None
        raise
    dev, inode, rdev, offset, sizelimit, _number, _cipher, _key_size, flags = LOOP_INFO.unpack(raw)[:9]
    try:
        text = (Path("/sys/block") / name / "loop/backing_file").read_text().rstrip("\n")
    except OSError:
        text = f"inode {inode} of device {os.major(dev)}:{os.minor(dev)}"
    return Backing(dev, inode, rdev, offset, sizelimit, flags, text)


class Guard:
    """pibake's own files, which no device written may be over: every file in the output
    folder (the images, their staging copies, their block maps) and in the cache. They
    are known by device and inode, so a hard link or another path to one is known too."""

    def __init__(self, folders: dict[Path, str], images: list[Path]) -> None:
        self.folders = folders  # folder -> what a file in it is, for messages
        self.images = images  # the manifest's, which may be links to elsewhere
        self._files: dict[tuple[int, int], str] | None = None

    def _known(self) -> dict[tuple[int, int], str]:
        if self._files is None:
            files: dict[tuple[int, int], str] = {}
            for folder, what in self.folders.items():
                for top, _folders, names in os.walk(folder):
                    for name in names:
                        with contextlib.suppress(OSError):
                            st = os.lstat(os.path.join(top, name))
                            files.setdefault((st.st_dev, st.st_ino), what)
            for path in self.images:
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    files.setdefault((st.st_dev, st.st_ino), "one of pibake's images")
            self._files = files
        return self._files

    def refusal(self, backing: Backing) -> str | None:
        what = self._known().get((backing.dev, backing.inode))
        if what is None:  # a file since deleted, or out of reach of the walk: by its path
            path = Path(backing.name.removesuffix(" (deleted)"))
            what = next((w for f, w in self.folders.items() if path.is_relative_to(os.path.realpath(f))), None)
        return None if what is None else f"it is a loop device over {backing.name}, {what}"


@dataclass(frozen=True)
class Context:
    """What a device is judged against: the disks as lsblk shows them, the numbers of the
    root's device, --force, and pibake's own files."""

    disks: list[Disk]
    root: set[str]
    force: bool
    guard: Guard


def beneath_refusal(backing: Backing | None, context: Context, depth: int = 0) -> str | None:
    """Why what a loop device is over forbids writing it: a file of pibake's, or a device
    pibake would refuse to write itself (its whole disk, for a partition), or, for a loop
    device over a loop device, anything beneath that."""
    if backing is None:
        return None
    if not backing.rdev:
        return context.guard.refusal(backing)
    number = f"{os.major(backing.rdev)}:{os.minor(backing.rdev)}"
    holding = [d for d in context.disks if number in d.numbers]
    if not holding:
        return f"it is a loop device over {backing.name}, which lsblk does not show"
    for disk in holding:
        why = refusal(disk, None, context.force, context.root)
        if why is None:
            why = _loop_refusal(disk, context, depth + 1)
        if why is not None:
            over = backing.name if backing.name == disk.path else f"{backing.name} (on {disk.path})"
            return f"it is a loop device over {over}, which pibake refuses: {why}"
    return None


def _loop_refusal(disk: Disk, context: Context, depth: int) -> str | None:
    """beneath_refusal() of a loop device lying under the one to be written."""
    if not (Path("/sys/block") / disk.name / "loop").is_dir():
        return None
    if depth > MAX_DEPTH:
        return "its loop devices nest too deep to follow"
    try:
        fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot tell what {disk.path} is over ({e.strerror})"
    try:
        return beneath_refusal(loop_backing(fd, disk.name), context, depth)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ holding a device


@dataclass(frozen=True)
class Claim:
    """A device held open exclusively from its checks until it is written, and what it was
    when checked: the write goes to this descriptor, never to its path opened again."""

    given: str  # its path as given
    fd: int
    direct: bool  # O_DIRECT: reads come from the card, not the page cache
    number: int  # st_rdev
    backing: Backing | None  # for a loop device


def cache_roots(own: Path) -> list[Path]:
    """pibake's caches a flash must not write over: this user's, and under sudo, that of
    the user who ran sudo too (whose ~/.cache the environment no longer names)."""
    roots = [own]
    user = environment.sudo_user()
    if user:
        with contextlib.suppress(KeyError):
            roots.append(Path(pwd.getpwnam(user).pw_dir) / ".cache" / "pibake")
    return roots


def refuse(disk: Disk, why: str | None) -> None:
    if why is not None:
        raise InputError(f"will not write {disk.path}: {why}; nothing was written")


def claim(given: str, disk: Disk) -> Claim:
    """`disk` opened exclusively, for writing; BuildError if the kernel says it is in use."""
    flags = os.O_RDWR | os.O_EXCL | os.O_CLOEXEC
    direct = True
    try:
        try:
            fd = os.open(disk.path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            direct = False  # no O_DIRECT here: the page cache is dropped before reading back
            fd = os.open(disk.path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            refuse(disk, "it is in use (mounted, or opened by another program)")
        if e.errno in (errno.EACCES, errno.EPERM):
            raise BuildError(f"cannot open {disk.path} to write it: permission denied; run pibake flash with sudo") from None
        raise
    try:
        return Claim(given, fd, direct, os.fstat(fd).st_rdev, loop_backing(fd, disk.name))
    except BaseException:
        os.close(fd)
        raise


def check_claim(claim: Claim, disk: Disk, image_size: int, context: Context) -> None:
    """BuildError unless the device held open is the one its path names, over what it was
    over when first checked, and neither it nor anything beneath it is refused now."""
    if _number_at(claim.given) != claim.number or _number_at(disk.path) != claim.number:
        refuse(disk, f"{claim.given} no longer names the device that was checked")
    if loop_backing(claim.fd, disk.name) != claim.backing:
        refuse(disk, "what it is over changed since it was checked (detached, or set up again)")
    now = find(claim.given, context.disks)
    if now.path != disk.path:
        refuse(disk, f"{claim.given} no longer names the device that was checked")
    refuse(disk, refusal(now, image_size, context.force, context.root) or beneath_refusal(claim.backing, context))


def _number_at(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None
