"""A backup image filled and checked: the streams a node sent, written into its file systems.

The appliance deletes what the node no longer has and unpacks each stream as root
(libguestfs' tar-in with xattrs restores every namespace, not only `user.*` as GNU
tar does by default), so owners, modes, device nodes, ACLs, file capabilities and
hard links are as sent, and reads back every extended attribute beyond the user
namespace. Then every regular file is read back (the root file system's by debugfs on
the host): each file's sha256 must be what the stream held, or what the last backup
held for a file that did not change. Then each file system gets its own checker,
read-only: `e2fsck -fn` and `fsck.fat -n`.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from builder import ext4_read, layout as layouts, run
from builder.appliance import Appliance, Drive
from builder.errors import BuildError

log = logging.getLogger(__name__)

MAX_SUMS = 1 << 30  # bytes of the appliance's list of checksums


@dataclass(frozen=True)
class Entry:
    kind: str  # find's %y: f d l b c p s
    inode: int
    links: int
    size: int
    mtime: str
    ctime: str


Listing = dict[str, Entry]  # "./etc/hostname" -> Entry


@dataclass
class Fill:
    """What goes into one file system of the image."""

    partition: layouts.Partition
    gone: list[str]  # paths to delete first ("./etc/old")
    streams: list[Path]  # tar streams, unpacked in order
    sums: dict[str, str]  # every regular file it must hold when done, and its sha256
    xattrs: dict[str, dict[str, bytes]] = field(default_factory=dict)  # beyond the user namespace, read back


def fill(image_path: Path, fills: list[Fill], grown: int | None = None, launched: Appliance | None = None) -> None:
    """Write each file system's changes into the image; `grown`: the number of a partition made
    larger since its file system was made, which is grown to fill it first. `launched`: an
    appliance with the image attached, launched already; closed here."""
    held: dict[int, dict[str, str]] = {}
    with launched or Appliance([Drive(image_path)]) as appliance:
        g, device = appliance.g, appliance.devices[0]
        for part in fills:
            ext4 = isinstance(part.partition.fs, layouts.Ext4)
            try:
                if ext4 and part.partition.number == grown:
                    # Here, on the partition's own device: resize2fs on an image file at an offset
                    # would set the file's length to the file system's and cut the image's end off.
                    g.e2fsck(f"{device}{grown}", correct=True)
                    g.resize2fs(f"{device}{grown}")
                # FAT has no owners or modes: "quiet" lets tar's chown and chmod pass as on the node.
                g.mount_vfs("" if ext4 else "quiet", "ext4" if ext4 else "vfat", f"{device}{part.partition.number}", "/")
                for path in part.gone:
                    g.rm_rf(_inside(path))
                for stream in part.streams:
                    g.tar_in(str(stream), "/", xattrs=ext4, acls=ext4)
                if not ext4:  # a few files: read back here; the root file system's, on the host below
                    held[part.partition.number] = _sums(g)
                _check_xattrs(g, part.xattrs, _what(part))
            except RuntimeError as e:
                raise BuildError(f"cannot write {_what(part)} of the backup: {str(e).splitlines()[0][:300]}") from None
            finally:
                g.umount_all()
        g.sync()
    for part in fills:
        # Read back by debugfs, natively: hashing every file in the emulated appliance took most
        # of a backup's time.
        number = part.partition.number
        found = held[number] if number in held else ext4_read.sums(image_path, part.partition.start * layouts.SECTOR)
        _compare(part.sums, found, _what(part))


def _what(part: Fill) -> str:
    return f"the {'root' if part.partition.mount == '/' else 'boot'} file system"


def _inside(path: str) -> str:
    return "/" + path[2:] if path.startswith("./") else "/"


def _sums(g) -> dict[str, str]:
    with tempfile.NamedTemporaryFile(prefix="pibake-sums-") as f:
        g.checksums_out("sha256", "/", f.name)
        data = f.read(MAX_SUMS + 1)
    if len(data) > MAX_SUMS:
        raise BuildError("the backup holds more files than pibake checks")
    sums = {}
    for line in data.split(b"\n"):
        if not line:
            continue
        escaped = line.startswith(b"\\")  # sha256sum's mark for a name holding \n or \
        digest, _, name = (line[1:] if escaped else line).partition(b"  ")
        if escaped:
            name = name.replace(b"\\\\", b"\0").replace(b"\\n", b"\n").replace(b"\0", b"\\")
        text = name.decode("utf-8", "surrogateescape")
        sums[text if text.startswith("./") else "./" + text.lstrip("/")] = digest.decode()
    # With no regular file at all, checksums_out's sha256sum gets no name and reads its
    # (empty) stdin, which it calls "-": that is not a file unless "/-" is one.
    if sums.get("./-") == EMPTY_SHA256 and not g.is_file("/-", followsymlinks=False):
        del sums["./-"]
    return sums


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _check_xattrs(g, wanted: dict[str, dict[str, bytes]], what: str) -> None:
    for path, attrs in wanted.items():
        for name, value in attrs.items():
            if bytes(g.lgetxattr(_inside(path), name)) != value:
                raise BuildError(f"{what} of the backup lost {path[1:]}'s {name}")


def _compare(want: dict[str, str], held: dict[str, str], what: str) -> None:
    wrong = sorted(p for p in want.keys() | held.keys() if want.get(p) != held.get(p))
    if wrong:
        first = wrong[0]
        why = ("is missing" if first not in held else "was not sent" if first not in want else "differs from what was sent")
        raise BuildError(f"{what} of the backup does not hold what the node sent: {len(wrong)} files, "
                         f"first {first[1:]!r} ({why})")
    log.info("%s: %d files, each as the node sent it", what, len(held))


def check(image_path: Path, layout: layouts.Layout) -> None:
    """Each file system's own checker, changing nothing: e2fsck -fn, fsck.fat -n."""
    for p in layout.partitions:
        if isinstance(p.fs, layouts.Ext4):
            done = run.run(["e2fsck", "-fn", f"{image_path}?offset={p.start * layouts.SECTOR}"], check=False)
            if done.returncode != 0:
                raise BuildError(f"e2fsck finds the backup's root file system damaged: {run.tail(run.text(done.stdout))}")
        elif isinstance(p.fs, layouts.Fat):
            with tempfile.NamedTemporaryFile(prefix="pibake-boot-", dir=image_path.parent) as part:
                _copy_range(image_path, Path(part.name), p.start * layouts.SECTOR, p.size * layouts.SECTOR)
                done = run.run(["fsck.fat", "-n", part.name], check=False)
            if done.returncode != 0:
                raise BuildError(f"fsck.fat finds the backup's boot file system damaged: {run.tail(run.text(done.stdout))}")


def _copy_range(source: Path, target: Path, offset: int, length: int) -> None:
    import os
    with open(source, "rb") as src, open(target, "r+b") as dst:
        dst.truncate(length)
        copied = 0
        while copied < length:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length - copied, offset + copied, copied)
            if n <= 0:
                break
            copied += n


# ------------------------------------------------------------ what the streams hold


@dataclass
class Contents:
    """What a file system's streams hold: each regular file's sha256, and the extended
    attributes tar restores only in the user namespace unless told otherwise."""

    sums: dict[str, str] = field(default_factory=dict)
    xattrs: dict[str, dict[str, bytes]] = field(default_factory=dict)


def read_streams(streams: list[Path]) -> Contents:
    contents = Contents()
    for path in streams:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                name = _clean(member.name)
                if member.isreg():
                    f = tar.extractfile(member)
                    assert f is not None
                    digest = hashlib.sha256()
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                    contents.sums[name] = digest.hexdigest()
                elif member.islnk():
                    contents.sums[name] = contents.sums.get(_clean(member.linkname), "")
                else:
                    contents.sums.pop(name, None)
                attrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                         for k, v in member.pax_headers.items()
                         if k.startswith("SCHILY.xattr.") and not k.startswith("SCHILY.xattr.user.")}
                if attrs:
                    contents.xattrs[name] = attrs
                else:
                    contents.xattrs.pop(name, None)
    return contents


def _clean(name: str) -> str:
    name = name.rstrip("/")
    return "." if name in ("", ".") else name if name.startswith("./") else "./" + name


@dataclass
class Taken:
    """What was read of a node, ready to be made into an image."""

    layout: layouts.Layout  # sized for the backup
    fills: list[Fill]
    listings: dict[str, Listing]  # by mount point: what the next backup starts from
    incremental: bool  # made from the last backup's image
    report: tuple[str, ...] = ()
