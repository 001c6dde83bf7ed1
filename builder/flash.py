"""Writing node images to cards: the device chosen safely, only the mapped blocks
written, read back, and on a card holding an earlier build only what differs.

Safety comes first: a device is refused, before anything is opened for writing, if
it holds the running system or any mounted or held file system, is read-only, is
smaller than the image, or is not removable (USB, MMC) unless forced. A loop device
is refused for all that lies beneath it too: the device it is over (and what that is
over), or a file of pibake's own. The device is then opened exclusively (O_EXCL),
which the kernel refuses while anything uses it, before the question; the write
goes to that same open device, after its path, number and backing are checked again.

pibake keeps a record on the card, in the 4 KiB before the first MiB (which Raspberry
Pi OS's layout leaves unused, and which no image's block map covers): which node and
build it holds, and whether its write finished. A card whose record says it holds a
finished build is compared block by block with the new image, and only the blocks
that differ are written. A write cut short leaves the record saying so, and the next
flash writes the card in full.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import mmap
import os
import pwd
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from builder import bmap as bmaps
from builder import environment
from builder import image, run
from builder.errors import BuildError, InputError

CHUNK = 4 << 20  # writes are up to this long, and do not cross a multiple of it
PIECE = 1 << 20  # a piece of a chunk this long that is all zeros in the image is read first, written only if needed
RECORD_AT = (1 << 20) - 4096
RECORD_SIZE = 4096
RECORD_MAGIC = b"pibake card record v1\n"
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
REMOVABLE_TRANSPORTS = {"usb", "mmc", "sdio", "ieee1394"}
LSBLK = ["lsblk", "--json", "--bytes", "--tree",
         "--output", "NAME,PATH,MAJ:MIN,TYPE,SIZE,RM,HOTPLUG,TRAN,VENDOR,MODEL,RO,FSTYPE,LABEL,MOUNTPOINTS"]
GONE = {errno.EIO, errno.ENODEV, errno.ENXIO, errno.ENOMEDIUM, errno.ESHUTDOWN, errno.ENOSPC}
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


# ------------------------------------------------------------------ the card's record


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


# ------------------------------------------------------------------ writing


@dataclass(frozen=True)
class Claim:
    """A device held open exclusively from its checks until it is written, and what it was
    when checked: the write goes to this descriptor, never to its path opened again."""

    given: str  # its path as given
    fd: int
    direct: bool  # O_DIRECT: reads come from the card, not the page cache
    number: int  # st_rdev
    backing: Backing | None  # for a loop device


@dataclass(frozen=True)
class Job:
    node: str
    image: Path
    bmap: bmaps.Bmap
    image_sha256: str
    device: Disk
    claim: Claim


@dataclass
class Result:
    job: Job
    mode: str = "full"  # or "changed": only the blocks that differ
    written: int = 0  # bytes written (or zeroed) on the card
    compared: int = 0  # bytes of the card read and compared before writing
    verified: int = 0  # bytes read back after writing
    previous: dict | None = None  # the record the card had


class Interrupted(Exception):
    pass


class _Buffer:
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


def _chunks(start: int, stop: int) -> Any:
    while start < stop:
        end = min(stop, (start // CHUNK + 1) * CHUNK)
        yield start, end
        start = end


def _pread(fd: int, view: memoryview, length: int, offset: int) -> int:
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:length]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _pwrite(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


class _Card:
    """One card's write, in its own thread."""

    def __init__(self, job: Job, stop: threading.Event, progress: Callable[[int], None]) -> None:
        self.job, self.stop, self.progress = job, stop, progress
        self.result = Result(job)
        self.sector = 512
        self.direct = job.claim.direct

    def run(self) -> Result:
        source = os.open(self.job.image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._flash(self.job.claim.fd, source)
        finally:
            os.close(source)
        return self.result

    def _aligned(self, length: int) -> int:
        return -(-length // self.sector) * self.sector

    def _flash(self, fd: int, source: int) -> None:
        job, result = self.job, self.result
        try:
            self.sector = max(512, struct.unpack("i", fcntl.ioctl(fd, 0x1268, b"\0" * 4))[0])  # BLKSSZGET
        except OSError:
            pass
        keeps_record = record_fits(job.bmap, job.image)
        if not self.direct:  # what is read from the card comes from the card
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        card, src = _Buffer(CHUNK), _Buffer(CHUNK)
        try:
            if keeps_record:
                n = _pread(fd, card.view, RECORD_SIZE, RECORD_AT)
                result.previous = decode_record(bytes(card.view[:n]))
                if result.previous is not None:  # it is no longer true once writing starts
                    if result.previous.get("state") == "finished":
                        result.mode = "changed"
                    self._record(fd, card, "writing")
            written_runs = self._write(fd, source, card, src)
            os.fsync(fd)
            if not self.direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._verify(fd, source, card, src, written_runs)
            if keeps_record:
                self._record(fd, card, "finished")
        finally:
            card.close()
            src.close()

    def _record(self, fd: int, buffer: _Buffer, state: str) -> None:
        job = self.job
        fields = {"state": state, "node": job.node, "image": job.image.name, "image_sha256": job.image_sha256,
                  "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        buffer.view[:RECORD_SIZE] = encode_record(fields)
        _pwrite(fd, buffer.view[:RECORD_SIZE], RECORD_AT)
        os.fsync(fd)

    def _write(self, fd: int, source: int, card: _Buffer, src: _Buffer) -> list[tuple[int, int]]:
        """Write (or, in "changed" mode, compare and write where different) every mapped
        block, checking the image against the block map's checksums on the way."""
        job, result = self.job, self.result
        written: list[tuple[int, int]] = []
        for r in job.bmap.ranges:
            digest = hashlib.sha256()
            start, stop = job.bmap.span(r)
            for lo, hi in _chunks(start, stop):
                if self.stop.is_set():
                    raise Interrupted()
                length = hi - lo
                if _pread(source, src.view, length, lo) != length:
                    raise BuildError(f"{job.image} is shorter than its block map says: rebuild it")
                digest.update(src.view[:length])
                padded = self._aligned(length)
                src.view[length:padded] = bytes(padded - length)
                if result.mode == "changed":
                    if _pread(fd, card.view, padded, lo) != padded:
                        raise OSError(errno.EIO, "the card ended early")
                    result.compared += length
                    for a, b in self._differing(card.view, src.view, length):
                        _pwrite(fd, src.view[a : a + self._aligned(b - a)], lo + a)
                        written.append((lo + a, lo + b))
                        result.written += b - a
                else:
                    for a, b in self._pieces(fd, card, src, lo, hi):
                        written.append((lo + a, lo + b))
                        result.written += b - a
                self.progress(length)
            if digest.hexdigest() != r.sha256:
                raise BuildError(f"{job.image} does not match its block map at blocks {r.first}-{r.last}: "
                                 "the image changed or is damaged; rebuild it (the card is marked as unfinished)")
        return written

    @staticmethod
    def _differing(card: memoryview, want: memoryview, length: int) -> list[tuple[int, int]]:
        """The byte ranges, in whole 4 KiB blocks, where the card differs from the image."""
        if card[:length] == want[:length]:
            return []
        runs: list[tuple[int, int]] = []
        block = bmaps.BLOCK
        for at in range(0, length, block):
            end = min(at + block, length)
            if card[at:end] != want[at:end]:
                if runs and runs[-1][1] == at:
                    runs[-1] = (runs[-1][0], end)
                else:
                    runs.append((at, end))
        return runs

    def _pieces(self, fd: int, card: _Buffer, src: _Buffer, lo: int, hi: int) -> list[tuple[int, int]]:
        """Write a chunk whose image bytes are in `src`; return what was written, relative to `lo`.

        Its data is written in one go per run of pieces. A piece that is all zeros in the
        image is read from the card first (reading is cheaper than writing, and a new
        card reads zeros), and zeroed only if it does not read zeros already."""
        done: list[tuple[int, int]] = []
        at = lo
        while at < hi:
            end = min(hi, (at // PIECE + 1) * PIECE)
            zero = _is_zero(src.view[at - lo :], end - at)
            while not zero and end < hi and not _is_zero(src.view[end - lo :], min(hi, end + PIECE) - end):
                end = min(hi, end + PIECE)  # data pieces run together into one write
            a, b = at - lo, end - lo
            padded = self._aligned(b - a)
            if zero:
                if _pread(fd, card.view, padded, at) != padded:
                    raise OSError(errno.EIO, "the card ended early")
                self.result.compared += b - a
                if not _is_zero(card.view, b - a):
                    self._zero(fd, at, padded, src.view[a : a + padded])
                    done.append((a, b))
            else:
                _pwrite(fd, src.view[a : a + padded], at)
                done.append((a, b))
            at = end
        return done

    @staticmethod
    def _zero(fd: int, offset: int, length: int, zeros: memoryview) -> None:
        """Zeros by BLKZEROOUT, which the device may do without them crossing the bus,
        else written."""
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        except OSError:
            _pwrite(fd, zeros, offset)

    def _verify(self, fd: int, source: int, card: _Buffer, src: _Buffer, runs: list[tuple[int, int]]) -> None:
        """Read back what was written, from the card itself (O_DIRECT: not the page cache),
        and compare it with the image, whose bytes matched the block map's checksums."""
        job = self.job
        for start, stop in runs:
            for lo, hi in _chunks(start, stop):
                if self.stop.is_set():
                    raise Interrupted()
                length = hi - lo
                _pread(source, src.view, length, lo)
                if _pread(fd, card.view, self._aligned(length), lo) < length or card.view[:length] != src.view[:length]:
                    raise BuildError(f"{job.device.path}: what was read back differs from {job.image.name} near byte "
                                     f"{lo}: the card did not keep what was written (failing, or fake capacity)")
                self.result.verified += length


_ZERO = bytes(CHUNK)


def _is_zero(view: memoryview, length: int) -> bool:
    return view[:length] == _ZERO[:length]


def write_cards(jobs: list[Job], stop: threading.Event, progress: list[Callable[[int], None]]) -> list[Result | BaseException]:
    """Flash every job's card in parallel; each gets its result, or the error that stopped it."""
    outcomes: list[Result | BaseException] = [Interrupted()] * len(jobs)

    def one(index: int) -> None:
        try:
            outcomes[index] = _Card(jobs[index], stop, progress[index]).run()
        except BaseException as e:  # reported per card by the caller
            outcomes[index] = e

    threads = [threading.Thread(target=one, args=(i,), name=f"flash-{job.node}") for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join()
        raise
    return outcomes


def explain(job: Job, error: BaseException) -> str:
    """One line for a card whose write did not finish."""
    where = f"{job.node} on {job.device.path}"
    if isinstance(error, Interrupted):
        return f"{where}: interrupted; the card is unfinished, and its next flash writes it in full"
    if isinstance(error, BuildError):
        return f"{where}: {error}"
    if isinstance(error, OSError):
        if error.errno in GONE:
            return (f"{where}: the card failed or was removed ({error.strerror}); "
                    "its next flash writes it in full")
        return f"{where}: {error.strerror or error}"
    return f"{where}: {error!r}"


# ------------------------------------------------------------------ what the command line asks for


def nodes_in_order(manifest: dict) -> list[dict]:
    """The manifest's nodes, the master first, then the workers by address."""
    import ipaddress

    def key(entry: dict) -> tuple:
        try:
            address = int(ipaddress.ip_address(entry.get("address", "")))
        except ValueError:
            address = 0
        return entry.get("role") != "master", address, entry.get("hostname", "")

    return sorted(manifest.get("nodes", {}).values(), key=key)


@dataclass
class Batch:
    """One run's jobs, each device held open from its checks until close()."""

    jobs: list[Job]
    force: bool
    guard: Guard

    def recheck(self) -> None:
        """Just before writing: BuildError unless every device is still what was checked."""
        context = Context(disks(lsblk()), root_numbers(), self.force, self.guard)
        for job in self.jobs:
            _check_claim(job, context)

    def close(self) -> None:
        for job in self.jobs:
            os.close(job.claim.fd)
        self.jobs = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cache_roots(own: Path) -> list[Path]:
    """pibake's caches a flash must not write over: this user's, and under sudo, that of
    the user who ran sudo too (whose ~/.cache the environment no longer names)."""
    roots = [own]
    user = environment.sudo_user()
    if user:
        with contextlib.suppress(KeyError):
            roots.append(Path(pwd.getpwnam(user).pw_dir) / ".cache" / "pibake")
    return roots


def prepare(output: Path, manifest: dict, pairs: list[tuple[str, str]], force: bool, caches: list[Path]) -> Batch:
    """The jobs for (node, device) pairs, every device checked and held open exclusively;
    BuildError at the first refusal, with nothing written and every device let go."""
    nodes = manifest.get("nodes", {})
    images = [output / e.get("image", "") for e in nodes.values() if e.get("image")]
    folders = {output: f"a file of pibake's output folder ({output})"}
    folders.update({root: f"a file of pibake's cache ({root})" for root in caches})
    guard = Guard(folders, images)
    context = Context(disks(lsblk()), root_numbers(), force, guard)
    batch = Batch([], force, guard)
    try:
        seen: set[str] = set()
        for node, device in pairs:
            image_path, block_map, image_sha256 = _image_of(output, manifest, node)
            disk = find(device, context.disks)
            if disk.path in seen:
                raise InputError(f"{disk.path} is given twice")
            seen.add(disk.path)
            _refuse(disk, refusal(disk, block_map.image_size, force, context.root))
            job = Job(node, image_path, block_map, image_sha256, disk, _claim(device, disk))
            batch.jobs.append(job)
            _check_claim(job, context)
    except BaseException:
        batch.close()
        raise
    return batch


def _image_of(output: Path, manifest: dict, node: str) -> tuple[Path, bmaps.Bmap, str]:
    """A node's image, its block map (checked against it) and its sha256."""
    nodes = manifest.get("nodes", {})
    entry = nodes.get(node)
    if entry is None:
        known = ", ".join(e["hostname"] for e in nodes_in_order(manifest)) or "none: build first (pibake build cluster)"
        raise InputError(f"no image of {node!r} in {output}/manifest.json (nodes: {known})")
    image_path = output / entry["image"]
    bmap_path = bmaps.path_for(image_path)
    if not image_path.is_file():
        raise InputError(f"{image_path} is gone: build it again (pibake build)")
    if not bmap_path.is_file():
        raise InputError(f"{bmap_path} is missing: build again (pibake build) to write it")
    block_map = bmaps.read(bmap_path)
    if block_map.image_size != image_path.stat().st_size:
        raise InputError(f"{bmap_path} is not {image_path.name}'s block map (another size): build again")
    bmaps.check_covers(block_map, image_path, bmap_path)
    return image_path, block_map, entry.get("sha256", "")


def _refuse(disk: Disk, why: str | None) -> None:
    if why is not None:
        raise InputError(f"will not write {disk.path}: {why}; nothing was written")


def _claim(given: str, disk: Disk) -> Claim:
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
            _refuse(disk, "it is in use (mounted, or opened by another program)")
        if e.errno in (errno.EACCES, errno.EPERM):
            raise BuildError(f"cannot open {disk.path} to write it: permission denied; run pibake flash with sudo") from None
        raise
    try:
        return Claim(given, fd, direct, os.fstat(fd).st_rdev, loop_backing(fd, disk.name))
    except BaseException:
        os.close(fd)
        raise


def _check_claim(job: Job, context: Context) -> None:
    """BuildError unless the device held open is the one its path names, over what it was
    over when first checked, and neither it nor anything beneath it is refused now."""
    claim, disk = job.claim, job.device
    if _number_at(claim.given) != claim.number or _number_at(disk.path) != claim.number:
        _refuse(disk, f"{claim.given} no longer names the device that was checked")
    if loop_backing(claim.fd, disk.name) != claim.backing:
        _refuse(disk, "what it is over changed since it was checked (detached, or set up again)")
    now = find(claim.given, context.disks)
    if now.path != disk.path:
        _refuse(disk, f"{claim.given} no longer names the device that was checked")
    _refuse(disk, refusal(now, job.bmap.image_size, context.force, context.root) or beneath_refusal(claim.backing, context))


def _number_at(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None
