"""`pibake backup NODE --device DEV`: a node's card, in a reader, read as files.

The device meets `pibake flash`'s rules (never the disk holding /, nothing mounted or
held, loop devices judged by what they are over, at any depth) and is held open
exclusively while it is read, read-only, so nothing mounts it meanwhile; a card whose
lock switch is on is fine. libguestfs mounts its file systems read-only and tar reads
them as files, so only the blocks the file systems use are read: the device's own
read-ahead, which would read past each of them, is off while pibake holds it, and as
it was afterwards.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from builder import backup_image, layout as layouts, run
from builder.appliance import Appliance, Drive
from builder.errors import BuildError

log = logging.getLogger(__name__)

BLKRASET, BLKRAGET = 0x1262, 0x1263  # linux/fs.h: a block device's read-ahead, in sectors

# What is mounted afresh at boot, and the swap file: their contents are not taken.
EXCLUDES = ["./proc/*", "./sys/*", "./dev/*", "./run/*", "./tmp/*", "./var/swap"]


def claim(device: str, force: bool, output: Path) -> tuple[int, str]:
    from builder import devices

    context = devices.Context(devices.disks(devices.lsblk()), devices.root_numbers(), force,
                              devices.Guard({output: f"a file of pibake's output folder ({output})"}, []))
    disk = devices.find(device, context.disks)
    readable = dataclasses.replace(disk, readonly=False)  # reading a locked card is fine
    devices.refuse(disk, devices.refusal(readable, None, force, context.root))
    try:
        fd = os.open(disk.path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        raise BuildError(f"cannot open {disk.path} to read it: {e.strerror}"
                         f"{'; run pibake backup with sudo' if e.errno in (1, 13) else ''}") from None
    backing = devices.loop_backing(fd, disk.name)
    why = devices.beneath_refusal(backing, context)
    if why:
        os.close(fd)
        devices.refuse(disk, why)
    return fd, disk.path


@contextmanager
def no_read_ahead(fd: int, path: str) -> Iterator[None]:
    """The device at `fd` reads only what it is asked for while this holds: the host kernel
    reads ahead of qemu's reads on the device (128 KiB by default), past the blocks in use.
    Setting it needs CAP_SYS_ADMIN; without, the card is read with its read-ahead."""
    try:
        was = struct.unpack("l", fcntl.ioctl(fd, BLKRAGET, bytes(8)))[0]
        fcntl.ioctl(fd, BLKRASET, 0)
    except OSError as e:
        log.debug("%s: read-ahead left as it is: %s", path, e.strerror)
        yield
        return
    try:
        yield
    finally:
        fcntl.ioctl(fd, BLKRASET, was)


def take(device: str, force: bool, staging: Path, output: Path) -> backup_image.Taken:
    fd, path = claim(device, force, output)
    try:
        layout = _layout(fd, path)
        sized = layouts.sized(layout)
        fills: list = []
        listings: dict = {}
        with no_read_ahead(fd, path), Appliance([Drive(Path(path), readonly=True)]) as appliance:
            g, drive = appliance.g, appliance.devices[0]
            for p in sized.partitions:
                if p.fs is None:
                    continue
                ext4 = isinstance(p.fs, layouts.Ext4)
                stream = staging / f"{p.number}.tar"
                try:
                    g.mount_ro(f"{drive}{p.number}", "/")
                    g.tar_out("/", str(stream), numericowner=True, xattrs=ext4, acls=ext4,
                              excludes=EXCLUDES if ext4 else [])
                finally:
                    g.umount_all()
                contents = backup_image.read_streams([stream])
                fills.append(backup_image.Fill(p, [], [stream], contents.sums, contents.xattrs))
                listings[p.mount] = {}
        return backup_image.Taken(sized, fills, listings, False)
    except RuntimeError as e:
        raise BuildError(f"cannot read {path}: {str(e).splitlines()[0][:300]}") from None
    finally:
        os.close(fd)


def _layout(fd: int, path: str) -> layouts.Layout:
    """The card's layout, read from it as the node's own tools would."""
    label, disk_id, table = layouts.table(run.run(["sfdisk", "--json", path], what=f"cannot read {path}'s partitions").stdout)
    size = os.lseek(fd, 0, os.SEEK_END)
    parts = []
    for slot in table:
        first = os.pread(fd, 2048, slot.start * layouts.SECTOR + 1024)
        if first[56:58] == b"\x53\xef":  # ext4's magic, in its superblock
            dump = run.run(["dumpe2fs", "-h", f"{path}?offset={slot.start * layouts.SECTOR}"],
                           what=f"cannot read partition {slot.number} of {path}").stdout.decode("utf-8", "replace")
            fields = layouts.fields(dump)
            fs = layouts.ext4(fields)
            try:
                used = (int(fields["Block count"]) - int(fields["Free blocks"])) * fs.block_size
                inodes = int(fields["Inode count"]) - int(fields["Free inodes"])
            except (KeyError, ValueError):
                raise BuildError(f"cannot read partition {slot.number} of {path}: dumpe2fs") from None
            parts.append(layouts.Partition(slot.number, slot.start, slot.size, slot.type, slot.uuid, "/", fs, used, inodes))
            continue
        sector = os.pread(fd, 512, slot.start * layouts.SECTOR)
        try:
            fat = layouts.fat(sector)
        except BuildError:
            parts.append(layouts.Partition(slot.number, slot.start, slot.size, slot.type, slot.uuid, ""))
            continue
        parts.append(layouts.Partition(slot.number, slot.start, slot.size, slot.type, slot.uuid, "/boot/firmware", fat))
    if sum(p.mount == "/" for p in parts) != 1:
        raise BuildError(f"{path} does not hold one ext4 root file system: not a Raspberry Pi OS card")
    return layouts.Layout(label, disk_id, tuple(parts), size)
