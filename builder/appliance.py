"""The libguestfs appliance: the only module that imports guestfs, and an adapter over it.

One appliance is launched per command with every image attached. It reads the base:
its facts, and the files the plans look at. It plans nothing and, in a build, writes
nothing (image_write does, on the host).
"""

from __future__ import annotations

import logging
import os
import posixpath
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder import cache, environment
from builder.errors import BuildError
from builder.facts import BaseFacts, BaseReads
from builder.packages import read_inputs
from builder.tree import Stat
from builder.release import Release

try:
    import guestfs
except ImportError:  # pragma: no cover - depends on the host
    guestfs = None

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drive:
    path: Path
    readonly: bool = False


class Appliance:
    """A launched libguestfs appliance with drives attached, in the order given."""

    def __init__(self, drives: list[Drive]) -> None:
        if guestfs is None:
            raise BuildError("the libguestfs Python bindings are missing: install python3-guestfs (see README)")
        self.drives = drives
        self.accelerator = ""
        self.launch_seconds = 0.0
        self.g = self._launch()
        self.devices = self._devices()

    def _handle(self, force_tcg: bool):
        g = guestfs.GuestFS(python_return_dict=True)
        if force_tcg:
            # set_backend_setting("force_tcg", "") crashes libguestfs 1.48; the list form does not.
            g.set_backend_settings([*g.get_backend_settings(), "force_tcg"])
            # Emulated vCPUs run on threads of their own: a second one shortens the launch.
            g.set_smp(max(1, min(4, os.cpu_count() or 1)))
        # qemu's default on a full host disk is to pause the VM, which hangs the
        # build; report the error to the guest instead, where apply() finds it.
        for device in ("scsi-hd", "virtio-blk-pci"):
            g.config("-global", f"{device}.werror=report")
        # Everything here unmounts what it mounted, and a failed build's copies are
        # thrown away: the sync on close would only cost seconds (more with more drives).
        g.set_autosync(False)
        for drive in self.drives:
            # cachemode=unsafe: the appliance's flushes are not needed, the host's
            # page cache holds the data and pibake fsyncs each output itself.
            g.add_drive_opts(str(drive.path), format="raw", readonly=drive.readonly, cachemode="unsafe")
        return g

    def _launch(self):
        start = time.monotonic()
        kvm_usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
        try_kvm = kvm_usable and not environment.force_tcg()
        g = self._handle(force_tcg=not try_kvm)
        hung = _KvmHang(g.get_hv())
        why_not_kvm = "" if kvm_usable else ", no /dev/kvm"
        if try_kvm and hung.before():
            log.info("KVM hung at launch on this machine before; using TCG (delete %s to try KVM again)", hung.memo)
            g.close()
            try_kvm, why_not_kvm = False, "; KVM hangs here"
            g = self._handle(force_tcg=True)
        try:
            if try_kvm:
                hung.watch(g)
            else:
                g.launch()
            self.accelerator = "KVM" if try_kvm else f"TCG (software emulation{why_not_kvm})"
        except RuntimeError as first:
            g.close()
            if not try_kvm:
                raise BuildError(f"cannot launch the libguestfs appliance: {_first_line(first)} (run libguestfs-test-tool)") from None
            if hung.seen:
                log.info("KVM launch hung (nothing from the appliance in %d s); falling back to TCG", KVM_FIRST_WORDS)
                hung.remember()
            else:
                log.info("KVM launch failed (%s); falling back to TCG", _first_line(first))
            g = self._handle(force_tcg=True)
            try:
                g.launch()
            except RuntimeError as e:
                g.close()
                raise BuildError(f"cannot launch the libguestfs appliance: {_first_line(e)} (run libguestfs-test-tool)") from None
            self.accelerator = f"TCG (software emulation; KVM {'hung' if hung.seen else 'failed to start'})"
        self.launch_seconds = time.monotonic() - start
        log.info("libguestfs appliance up in %.2f s using %s", self.launch_seconds, self.accelerator)
        return g

    def _devices(self) -> list[str]:
        """The drives' device names, in the order added.

        Listing them in the appliance takes seconds with fifty drives; they are
        named like the kernel's sd disks (sda ... sdz, sdaa ...), which one call checks.
        """
        names = [f"/dev/sd{_disk_letters(i)}" for i in range(len(self.drives))]
        try:
            if self.g.device_index(names[-1]) == len(names) - 1:
                return names
        except RuntimeError:
            pass
        return self.g.list_devices()

    def reread(self, indexes: list[int]) -> None:
        """Re-read the partition tables of drives written while the appliance was up.

        The kernel also drops what it had cached of those disks, so nothing read
        before their content was complete is used."""
        for index in indexes:
            try:
                self.g.blockdev_rereadpt(self.devices[index])
            except RuntimeError as e:
                raise BuildError(f"{self.drives[index].path.name}: cannot read its partition table: {_first_line(e)}") from None

    def close(self) -> None:
        try:
            self.g.shutdown()
        finally:
            self.g.close()

    def __enter__(self) -> "Appliance":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ layout

    def partitions(self, index: int, check: bool = True) -> tuple[str, str]:
        """The boot (FAT) and root (ext4) partitions of drive `index`, checked unless told not to.

        Checked is how drives are first read (facts, the base); written drives are not checked."""
        device = self.devices[index]
        name = self.drives[index].path
        if not check:
            return f"{device}1", f"{device}2"
        try:
            parts = [f"{device}{p['part_num']}" for p in sorted(self.g.part_list(device), key=lambda p: p["part_num"])]
        except RuntimeError:  # no partition table at all
            parts = []
        if len(parts) < 2:
            raise BuildError(f"{name}: not a Raspberry Pi OS image: expected a FAT boot partition and an ext4 root partition, found {len(parts)} partition(s)")
        boot, root = parts[0], parts[1]
        boot_type, root_type = self.g.vfs_type(boot), self.g.vfs_type(root)
        if boot_type != "vfat" or root_type != "ext4":
            raise BuildError(f"{name}: not a Raspberry Pi OS image: partition 1 is {boot_type or 'unformatted'} and "
                             f"partition 2 is {root_type or 'unformatted'} (expected vfat and ext4)")
        return boot, root

    def release(self, index: int, force: bool = False) -> Release:
        return self.facts(index).release(force)

    def facts(self, index: int) -> BaseFacts:
        """What the plans depend on in an image: its os-release, and what its own apt would read."""
        _, root = self.partitions(index)
        self.g.mount_ro(root, "/")
        try:
            os_release = self._read_text("/etc/os-release") if self.g.exists("/etc/os-release") else ""
            is_rpios = self.g.exists("/etc/rpi-issue")
            apt = read_inputs(lambda p: self._resolve(p) is not None,
                              lambda p: self.g.read_file(self._resolve(p)),
                              lambda p: [n for n in sorted(self.g.ls(p)) if self.g.is_file(self._resolve(f"{p}/{n}") or "/")])
        finally:
            self.g.umount_all()
        return BaseFacts(os_release, is_rpios, apt)

    def _resolve(self, path: str, depth: int = 0) -> str | None:
        """Follow symlinks inside the image (the appliance would follow absolute ones outside it)."""
        if depth > 8 or not self.g.exists(path) and not self.g.is_symlink(path):
            return None
        if not self.g.is_symlink(path):
            return path
        target = self.g.readlink(path)
        return self._resolve(os.path.normpath(os.path.join(os.path.dirname(path), target)), depth + 1)

    def _read_text(self, path: str) -> str:
        return self.g.read_file(path).decode("utf-8", "surrogateescape")

    def mount(self, index: int, boot_dir: str, readonly: bool = False) -> None:
        boot, root = self.partitions(index)
        options = "ro" if readonly else ""
        self.g.mount_vfs(options, "ext4", root, "/")
        if not self.g.is_dir(boot_dir):
            if readonly:
                raise BuildError(f"{self.drives[index].path}: {boot_dir} is missing from the root file system")
            self.g.mkdir_p(boot_dir)
        self.g.mount_vfs(options, "vfat", boot, boot_dir)

    # ------------------------------------------------------------ applying

    @contextmanager
    def base(self, boot_dir: str, known: BaseReads | None = None) -> Iterator[BaseReader]:
        """Drive 0 as the base the plans are played against (they all start equal).

        What `known` holds of it is not read again; what is read is added to it.
        Drive 0 is only mounted (and checked) when something is not known."""
        reader = BaseReader(self, boot_dir, known if known is not None else BaseReads())
        try:
            yield reader
        finally:
            reader.close()

    # ------------------------------------------------------------ reading back

    def read(self, path: str) -> bytes:
        return self.g.read_file(path)


# Seconds a KVM launch may take to show the appliance's first words on its console
# (supermin's, which it prints however quiet the kernel is). A working KVM takes a
# second or two, TCG about four; nested KVM can also hang for good in the BIOS,
# and libguestfs would wait twenty minutes for it.
KVM_FIRST_WORDS = 20


class _KvmHang:
    """Launching under KVM with a watchdog, and remembering a machine where it hangs."""

    def __init__(self, hypervisor: str) -> None:
        self.memo = cache.layout().kvm_hangs
        try:
            self.key = f"{os.uname().release} {hypervisor} {os.stat(hypervisor).st_mtime_ns}\n"
        except OSError:
            self.key = f"{os.uname().release} {hypervisor}\n"
        self.seen = False

    def before(self) -> bool:
        """Whether KVM hung here before, with this host kernel and hypervisor."""
        try:
            return self.memo.read_text() == self.key
        except OSError:
            return False

    def remember(self) -> None:
        try:
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            self.memo.write_text(self.key)
        except OSError as e:  # only costs the wait again next time
            log.debug("cannot write %s: %s", self.memo, e.strerror)

    def watch(self, g) -> None:
        """g.launch(), its QEMU killed if the appliance says nothing in KVM_FIRST_WORDS seconds."""
        spoke, launched = threading.Event(), threading.Event()
        earlier = _hypervisors()

        def heard(event: int, handle: int, message: bytes | str, array: list) -> None:
            if "supermin" in (message if isinstance(message, str) else message.decode("utf-8", "replace")):
                spoke.set()

        def watchdog() -> None:
            if not spoke.wait(KVM_FIRST_WORDS) and not launched.is_set():
                self.seen = True
                for pid in _hypervisors() - earlier:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        callback = g.set_event_callback(heard, guestfs.EVENT_APPLIANCE)
        threading.Thread(target=watchdog, name="kvm-watchdog", daemon=True).start()
        try:
            g.launch()
        finally:
            launched.set()
            spoke.set()
            g.delete_event_callback(callback)


def _hypervisors() -> set[int]:
    """QEMU processes started by this one."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if name.startswith("qemu-system") and int(rest[1]) == me:
            found.add(int(stat.parent.name))
    return found


def _disk_letters(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def _kind(mode: int) -> str:
    fmt = mode & 0o170000
    return {0o100000: "file", 0o040000: "dir", 0o120000: "link"}.get(fmt, "other")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class BaseReader:
    """Drive 0 as the base, read through the appliance only for what `reads` does not hold yet."""

    def __init__(self, appliance: Appliance, boot_dir: str, reads: BaseReads) -> None:
        self.appliance = appliance
        self.boot_dir = boot_dir
        self.reads = reads
        self.mounted = False

    def _g(self):
        if not self.mounted:
            self.appliance.mount(0, self.boot_dir, readonly=True)
            self.mounted = True
            self.reads.learned = True
        return self.appliance.g

    def close(self) -> None:
        if self.mounted:
            self.appliance.g.umount_all()
            self.mounted = False

    def free(self) -> int:
        if self.reads.free is None:
            stat = self._g().statvfs("/")
            # bavail, not bfree: ext4 holds back clusters for its metadata that even
            # root cannot write into (it also leaves out the root reserve: conservative).
            self.reads.free = stat["bavail"] * stat["frsize"]
        return self.reads.free

    def prefetch(self, paths: set[str]) -> None:
        """lstat many paths in one call per folder."""
        by_folder: dict[str, list[str]] = {}
        for path in paths - self.reads.stats.keys():
            by_folder.setdefault(posixpath.dirname(path), []).append(posixpath.basename(path))
        for folder, names in sorted(by_folder.items()):
            g = self._g()
            try:
                found = g.lstatnslist(folder, names)
            except RuntimeError:  # the folder itself is missing (or not one)
                found = [{"st_ino": -1}] * len(names)
            links = [n for n, st in zip(names, found) if st["st_ino"] != -1 and _kind(st["st_mode"]) == "link"]
            targets = dict(zip(links, g.readlinklist(folder, links))) if links else {}
            for name, st in zip(names, found):
                self.reads.stats[posixpath.join(folder, name)] = _stat(st, targets.get(name, ""))

    def lstat(self, path: str) -> Stat | None:
        if path not in self.reads.stats:
            g = self._g()
            try:
                st = g.lstatns(path)
            except RuntimeError:
                self.reads.stats[path] = None
            else:
                self.reads.stats[path] = _stat(st, g.readlink(path) if _kind(st["st_mode"]) == "link" else "")
        return self.reads.stats[path]

    def read(self, path: str) -> bytes:
        if path not in self.reads.data:
            self.reads.data[path] = self._g().read_file(path)
        return self.reads.data[path]


def _stat(st: dict, target: str) -> Stat | None:
    if st["st_ino"] == -1:
        return None
    return Stat(_kind(st["st_mode"]), st["st_mode"] & 0o7777, (st["st_uid"], st["st_gid"]), target)
