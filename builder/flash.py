"""Writing node images to cards: only the mapped blocks written, read back, and on a
card holding an earlier build only what differs; the whole of `pibake flash` but its
words on the screen.

Which devices may be written, and holding each from its checks to its write, is
devices.py's; the card's record and its reads and writes are card.py's; here is the
copy itself and the order of things: pair nodes with devices, check and hold them,
ask, check again, write every card at once, and say how each went.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from builder import bmap as bmaps
from builder import image, run
from builder.card import Buffer, Card, pread, record_fits
from builder.devices import (Claim, Context, Disk, Guard, check_claim, claim, disks, find, lsblk, refusal,
                             refuse, root_numbers)
from builder.errors import BuildError, InputError, Stopped

CHUNK = 4 << 20  # writes are up to this long, and do not cross a multiple of it
PIECE = 1 << 20  # a piece of a chunk this long that is all zeros in the image is read first, written only if needed
GONE = {errno.EIO, errno.ENODEV, errno.ENXIO, errno.ENOMEDIUM, errno.ESHUTDOWN, errno.ENOSPC}


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


def _chunks(start: int, stop: int) -> Any:
    while start < stop:
        end = min(stop, (start // CHUNK + 1) * CHUNK)
        yield start, end
        start = end


class Copy:
    """One card's write, in its own thread: the image's mapped blocks onto the card, then
    read back; the card's record says `writing` while it is not done."""

    def __init__(self, job: Job, stop: threading.Event, progress: Callable[[int], None]) -> None:
        self.job, self.stop, self.progress = job, stop, progress
        self.result = Result(job)
        self.card = Card(job.claim.fd, job.claim.direct)

    def run(self) -> Result:
        job, result = self.job, self.result
        source = os.open(job.image, os.O_RDONLY | os.O_CLOEXEC)
        buffer, src = Buffer(CHUNK), Buffer(CHUNK)
        keeps_record = record_fits(job.bmap, job.image)
        fields = {"node": job.node, "image": job.image.name, "image_sha256": job.image_sha256}
        try:
            if keeps_record:
                result.previous = self.card.previous(buffer)
                if result.previous is not None:  # it is no longer true once writing starts
                    if result.previous.get("state") == "finished":
                        result.mode = "changed"
                    self.card.mark(buffer, {**fields, "state": "writing"})
            written_runs = self._write(source, buffer, src)
            self.card.sync()
            self.card.forget()
            self._verify(source, buffer, src, written_runs)
            if keeps_record:
                self.card.mark(buffer, {**fields, "state": "finished"})
        finally:
            buffer.close()
            src.close()
            os.close(source)
        return result

    def _write(self, source: int, buffer: Buffer, src: Buffer) -> list[tuple[int, int]]:
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
                if pread(source, src.view, length, lo) != length:
                    raise BuildError(f"{job.image} is shorter than its block map says: rebuild it")
                digest.update(src.view[:length])
                padded = self.card.aligned(length)
                src.view[length:padded] = bytes(padded - length)
                if result.mode == "changed":
                    if self.card.read(buffer.view, padded, lo) != padded:
                        raise OSError(errno.EIO, "the card ended early")
                    result.compared += length
                    for a, b in self._differing(buffer.view, src.view, length):
                        self.card.write(src.view[a : a + self.card.aligned(b - a)], lo + a)
                        written.append((lo + a, lo + b))
                        result.written += b - a
                else:
                    for a, b in self._pieces(buffer, src, lo, hi):
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

    def _pieces(self, buffer: Buffer, src: Buffer, lo: int, hi: int) -> list[tuple[int, int]]:
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
            padded = self.card.aligned(b - a)
            if zero:
                if self.card.read(buffer.view, padded, at) != padded:
                    raise OSError(errno.EIO, "the card ended early")
                self.result.compared += b - a
                if not _is_zero(buffer.view, b - a):
                    self.card.zero(at, padded, src.view[a : a + padded])
                    done.append((a, b))
            else:
                self.card.write(src.view[a : a + padded], at)
                done.append((a, b))
            at = end
        return done

    def _verify(self, source: int, buffer: Buffer, src: Buffer, runs: list[tuple[int, int]]) -> None:
        """Read back what was written, from the card itself (O_DIRECT: not the page cache),
        and compare it with the image, whose bytes matched the block map's checksums."""
        job = self.job
        for start, stop in runs:
            for lo, hi in _chunks(start, stop):
                if self.stop.is_set():
                    raise Interrupted()
                length = hi - lo
                pread(source, src.view, length, lo)
                if self.card.read(buffer.view, self.card.aligned(length), lo) < length or buffer.view[:length] != src.view[:length]:
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
            outcomes[index] = Copy(jobs[index], stop, progress[index]).run()
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
            check_claim(job.claim, job.device, job.bmap.image_size, context)

    def close(self) -> None:
        for job in self.jobs:
            os.close(job.claim.fd)
        self.jobs = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare(output: Path, manifest: dict, pairs: list[tuple[str, str]], force: bool, caches: list[Path],
            restore: str | None = None) -> Batch:
    """The jobs for (node, device) pairs, every device checked and held open exclusively;
    BuildError at the first refusal, with nothing written and every device let go.
    With `restore` (a backup's path, or "latest"), the node's backup is written instead of its image."""
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
            image_path, block_map, image_sha256 = (_backup_of(output, node, restore) if restore
                                                   else _image_of(output, manifest, node))
            disk = find(device, context.disks)
            if disk.path in seen:
                raise InputError(f"{disk.path} is given twice")
            seen.add(disk.path)
            refuse(disk, refusal(disk, block_map.image_size, force, context.root))
            job = Job(node, image_path, block_map, image_sha256, disk, claim(device, disk))
            batch.jobs.append(job)
            check_claim(job.claim, disk, block_map.image_size, context)
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
    if not image_path.is_file():
        raise InputError(f"{image_path} is gone: build it again (pibake build)")
    block_map = _checked_block_map(image_path, "build again (pibake build) to write it", ": build again")
    return image_path, block_map, entry.get("sha256", "")


def _checked_block_map(path: Path, missing: str, other_size: str) -> bmaps.Bmap:
    """`path`'s block map, read and checked against it; `missing` and `other_size` end the errors."""
    bmap_path = bmaps.path_for(path)
    if not bmap_path.is_file():
        raise InputError(f"{bmap_path} is missing: {missing}")
    block_map = bmaps.read(bmap_path)
    if block_map.image_size != path.stat().st_size:
        raise InputError(f"{bmap_path} is not {path.name}'s block map (another size){other_size}")
    bmaps.check_covers(block_map, path, bmap_path)
    return block_map


def _backup_of(output: Path, node: str, which: str) -> tuple[Path, bmaps.Bmap, str]:
    """A backup of `node` (a path, or "latest"), its block map (checked against it) and its sha256."""
    from builder import backup

    kept = {r["name"]: r for r in backup.records(output, node)}
    if which == "latest":
        if not kept:
            raise InputError(f"no backup of {node!r} in {backup.folder(output, node)} (pibake backup {node})")
        path = backup.folder(output, node) / list(kept)[-1]
    else:
        path = Path(which)
        if path.resolve().parent != backup.folder(output, node).resolve() or path.name not in kept:
            raise InputError(f"{which} is not a backup of {node} that {backup.folder(output, node)}/"
                             f"{backup.RECORDS} lists (pibake backup {node} makes one)")
    block_map = _checked_block_map(path, "the backup is not whole", "")
    return path, block_map, str(kept[path.name].get("sha256", ""))


# ------------------------------------------------------------------ the whole of `pibake flash`


@dataclass(frozen=True)
class Screen:
    """How flashing speaks on the way; the command line gives it these."""

    say: Callable[[str], None]  # a line on stdout
    warn: Callable[[str], None]  # a line on stderr
    ask: Callable[[str], Optional[bool]]  # a yes/no question: None when it was interrupted
    bar: Callable[[Job, int], Any]  # a progress bar for a job, at a position on the screen


def pairs(manifest: dict, args: Sequence[str], all_nodes: bool, note: Callable[[str], None]) -> list[tuple[str, str]]:
    """Which node goes onto which device: `NODE DEVICE`, or `--all` and devices in the nodes' order."""
    if not all_nodes:
        if len(args) != 2:
            raise InputError("give a node and a device (pibake flash worker3 /dev/sdb), --all and devices, or --list")
        return [(args[0], args[1])]
    nodes = [e["hostname"] for e in nodes_in_order(manifest)]
    if not args:
        raise InputError("--all needs the devices to write, one per node in order: " + " ".join(nodes))
    if len(args) > len(nodes):
        raise InputError(f"{len(args)} devices for {len(nodes)} node(s) ({' '.join(nodes)})")
    if len(args) < len(nodes):
        note(f"flashing {' '.join(nodes[: len(args)])}; not this time: {' '.join(nodes[len(args):])}")
    return list(zip(nodes, args))


def flash(output: Path, manifest: dict, chosen: list[tuple[str, str]], force: bool, yes: bool, screen: Screen,
          caches: list[Path], restore: str | None = None) -> int:
    """Check and hold every device, show what each holds and ask (unless `yes`), check
    again, write them all at once and say how each went; the number of cards that failed.
    A backup restored (`restore`) then has its root file system grown to fill its card."""
    if restore and len(chosen) != 1:
        raise InputError("--backup restores one node onto one device: pibake flash NODE DEVICE --backup PATH|latest")
    with prepare(output, manifest, chosen, force, caches, restore) as batch:
        for job in batch.jobs:
            on_it = ", ".join(job.device.contents) or "no partitions"
            screen.say(f"{job.node} ({job.image.name}, {job.bmap.mapped_bytes / 2**30:.2f} GiB to write of "
                       f"{job.bmap.image_size / 2**30:.2f}) -> {job.device.describe()}; on it now: {on_it}")
        if not yes:
            many = "this disk" if len(batch.jobs) == 1 else f"these {len(batch.jobs)} disks"
            go = screen.ask(f"Overwrite {many}? Everything on it is lost")
            if not go:
                raise Stopped("not flashed: nothing was written", interrupted=go is None)
        batch.recheck()  # what was shown and agreed to is what is written
        jobs = list(batch.jobs)
        failed = _write_all(jobs, screen)
    if restore and not failed:  # the card is let go first: resize2fs opens it exclusively
        job = jobs[0]
        screen.say(f"pibake: {job.node} on {job.device.path}: {grow_root(job.device.path, job.image)}")
    return failed


def grow_root(device: str, image_path: Path) -> str:
    """The card's last partition (the root file system) grown to the card's end, and its ext4 with it."""
    parts = image.read_partitions(image_path)
    root = max(parts, key=lambda p: p.start)
    fd = os.open(device, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    try:
        table = bytearray(os.pread(fd, 512, 0))
        if table != bytearray(_first_sector(image_path)) or table[450] == 0xEE:
            return "left its root partition as in the backup (the card's partition table is not the backup's MBR)"
        card_sectors = os.lseek(fd, 0, os.SEEK_END) // 512
        entry = 446 + 16 * (root.number - 1)
        start, count = struct.unpack_from("<II", table, entry + 8)
        if start * 512 != root.start or card_sectors - start <= count:
            return "its root partition already fills the card"
        struct.pack_into("<I", table, entry + 12, card_sectors - start)
        os.pwrite(fd, bytes(table), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    run.run(["resize2fs", "-f", f"{device}?offset={start * 512}", f"{card_sectors - start}s"],
            what=f"cannot grow the root file system on {device}")
    return f"grew the root file system to fill the card ({(card_sectors - start) * 512 / 2**30:.2f} GiB)"


def _first_sector(image_path: Path) -> bytes:
    with open(image_path, "rb") as f:
        return f.read(512)


def _write_all(jobs: list[Job], screen: Screen) -> int:
    bars = [screen.bar(job, i) for i, job in enumerate(jobs)]
    try:
        outcomes = write_cards(jobs, threading.Event(), [b.update for b in bars])
    except KeyboardInterrupt:
        for b in bars:
            b.close()
        for job in jobs:
            screen.warn(f"pibake: {explain(job, Interrupted())}")
        raise Stopped(interrupted=True) from None
    for b in bars:
        b.close()
    for job, outcome in zip(jobs, outcomes):
        if isinstance(outcome, Result):
            screen.say(f"pibake: {_flashed(outcome)}")
        else:
            screen.warn(f"pibake: {explain(job, outcome)}")
    return sum(not isinstance(outcome, Result) for outcome in outcomes)


def _flashed(result: Result) -> str:
    job = result.job
    held = result.previous or {}
    if result.mode == "changed":
        what = (f"it held {held.get('node', '?')} ({str(held.get('image_sha256', '?'))[:12]}): wrote the "
                f"{result.written / 2**20:.1f} MiB that differed, of {result.compared / 2**30:.2f} GiB compared")
    else:
        what = f"wrote {result.written / 2**30:.2f} GiB"
    return (f"{job.node} on {job.device.path}: {what}; read back {result.verified / 2**20:.1f} MiB and verified; "
            "the card can be removed")
