"""The libguestfs appliance: the only module that imports guestfs.

One appliance is launched per command with every image attached; each image is
mounted, edited and unmounted in turn.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.errors import BuildError
from builder.facts import BaseFacts
from builder.packages import read_inputs
from builder.plan import Append, Delete, EditLines, Mkdir, Move, NodePlan, Op, Symlink, Write
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


def _wants_tcg() -> bool:
    return "force_tcg" in os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "")


class Appliance:
    """A launched libguestfs appliance with drives attached, in the order given."""

    def __init__(self, drives: list[Drive]) -> None:
        if guestfs is None:
            raise BuildError("the libguestfs Python bindings are missing: install python3-guestfs (see README)")
        self.drives = drives
        self.accelerator = ""
        self.launch_seconds = 0.0
        self.g = self._launch()
        self.devices = self.g.list_devices()
        self._dmesg_seen = len(self.g.dmesg().splitlines())

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
        for drive in self.drives:
            # cachemode=unsafe: the appliance's flushes are not needed, the host's
            # page cache holds the data and pibake fsyncs each output itself.
            g.add_drive_opts(str(drive.path), format="raw", readonly=drive.readonly, cachemode="unsafe")
        return g

    def _launch(self):
        start = time.monotonic()
        kvm_usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
        try_kvm = kvm_usable and not _wants_tcg()
        g = self._handle(force_tcg=not try_kvm)
        try:
            g.launch()
            self.accelerator = "KVM" if try_kvm else "TCG (software emulation" + ("" if kvm_usable else ", no /dev/kvm") + ")"
        except RuntimeError as first:
            g.close()
            if not try_kvm:
                raise BuildError(f"cannot launch the libguestfs appliance: {_first_line(first)} (run libguestfs-test-tool)") from None
            log.info("KVM launch failed (%s); falling back to TCG", _first_line(first))
            g = self._handle(force_tcg=True)
            try:
                g.launch()
            except RuntimeError as e:
                g.close()
                raise BuildError(f"cannot launch the libguestfs appliance: {_first_line(e)} (run libguestfs-test-tool)") from None
            self.accelerator = "TCG (software emulation; KVM failed to start)"
        self.launch_seconds = time.monotonic() - start
        log.info("libguestfs appliance up in %.1f s using %s", self.launch_seconds, self.accelerator)
        return g

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

    def partitions(self, index: int) -> tuple[str, str]:
        """The boot (FAT) and root (ext4) partitions of drive `index`, checked."""
        device = self.devices[index]
        name = self.drives[index].path
        parts = [p for p in self.g.list_partitions() if p.startswith(device)]
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
        mount = self.g.mount_ro if readonly else self.g.mount
        mount(root, "/")
        if not self.g.is_dir(boot_dir):
            if readonly:
                raise BuildError(f"{self.drives[index].path}: {boot_dir} is missing from the root file system")
            self.g.mkdir_p(boot_dir)
        mount(boot, boot_dir)

    # ------------------------------------------------------------ applying

    def apply(self, index: int, plan: NodePlan) -> None:
        node = plan.node.hostname
        self.mount(index, plan.release.boot_dir)
        try:
            stat = self.g.statvfs("/")
            # bavail, not bfree: ext4 holds back clusters for its metadata that even
            # root cannot write into (it also leaves out the root reserve: conservative).
            free = stat["bavail"] * stat["frsize"]
            if free < plan.bytes_needed:
                packages = (f" ({plan.install_room // 1024} KiB of it for the packages installed on first boot)"
                            if plan.install_room else "")
                raise BuildError(f"{node}: the image's root file system is too full: {free // 1024} KiB free, "
                                 f"pibake needs about {plan.bytes_needed // 1024} KiB{packages}")
            for op in plan.ops:
                log.debug("%s: %s %s", node, type(op).__name__.lower(), op.path)
                try:
                    self._apply(op, plan.release.boot_dir)
                except RuntimeError as e:
                    raise BuildError(f"{node}: cannot {type(op).__name__.lower()} {op.path}: {_explain(e)}") from None
            self.g.sync()
        finally:
            self.g.umount_all()
        self._check_writes(index, node)

    def _check_writes(self, index: int, node: str) -> None:
        """Fail if the guest kernel saw a write fail: sync() does not return such errors."""
        lines = self.g.dmesg().splitlines()
        new, self._dmesg_seen = lines[self._dmesg_seen :], len(lines)
        if any("critical space allocation error" in line for line in new):
            free = shutil.disk_usage(self.drives[index].path.parent).free
            raise BuildError(f"{node}: no space left on the output disk ({self.drives[index].path.parent}, "
                             f"{free >> 20} MiB free)")
        failed = [line for line in new if re.search(r"I/O error|EXT4-fs error", line)]
        if failed:
            raise BuildError(f"{node}: writing the image failed: {failed[0].split('] ', 1)[-1]}")

    def _apply(self, op: Op, boot_dir: str) -> None:
        g = self.g
        on_boot = op.path == boot_dir or op.path.startswith(boot_dir + "/")
        if isinstance(op, (Write, Mkdir, Symlink, Move)):
            parent = os.path.dirname(op.path)
            if not g.is_dir(parent):
                g.mkdir_p(parent)
        if isinstance(op, Write):
            g.write(op.path, op.content)
            if not on_boot:  # FAT has no owners or modes
                g.chown(op.owner[0], op.owner[1], op.path)
                g.chmod(op.mode, op.path)
        elif isinstance(op, Mkdir):
            g.mkdir_p(op.path)
            if not on_boot:
                g.chown(op.owner[0], op.owner[1], op.path)
                g.chmod(op.mode, op.path)
        elif isinstance(op, Symlink):
            g.ln_sf(op.target, op.path)
        elif isinstance(op, Delete):
            g.rm_f(op.path)
        elif isinstance(op, Move):
            if not g.exists(op.path):
                raise BuildError(f"cannot move {op.path}: it does not exist in the image")
            g.mv(op.path, op.destination)
        elif isinstance(op, EditLines):
            self._edit_lines(op)
        elif isinstance(op, Append):
            old = self._read_text(op.path) if g.exists(op.path) else ""
            if op.text not in old:
                separator = "" if not old or old.endswith("\n") else "\n"
                g.write(op.path, (old + separator + op.text).encode("utf-8", "surrogateescape"))

    def _edit_lines(self, op: EditLines) -> None:
        if not self.g.is_file(op.path, followsymlinks=True):
            if op.required:
                raise BuildError(f"{op.path} is missing from the image")
            return
        old = self._read_text(op.path)
        pattern = re.compile(op.pattern)
        matches = 0
        lines = []
        for line in old.split("\n"):
            new, n = pattern.subn(op.replacement, line)
            matches += n
            lines.append(new)
        if op.required and matches == 0:
            raise BuildError(f"{op.path} in the image has no line matching {op.pattern}")
        new_text = "\n".join(lines)
        if new_text != old:
            self.g.write(op.path, new_text.encode("utf-8", "surrogateescape"))

    # ------------------------------------------------------------ reading back

    def read(self, path: str) -> bytes:
        return self.g.read_file(path)

    def snapshot(self, index: int, boot_dir: str) -> dict[str, dict[str, object]]:
        """Every path of a mounted-read-only image with type, mode, owner and content hash."""
        self.mount(index, boot_dir, readonly=True)
        try:
            return dict(self._walk())
        finally:
            self.g.umount_all()

    def _walk(self) -> Iterator[tuple[str, dict[str, object]]]:
        g = self.g
        for rel in g.find("/"):
            path = "/" + rel
            st = g.lstatns(path)
            kind = _kind(st["st_mode"])
            entry: dict[str, object] = {"type": kind, "mode": st["st_mode"] & 0o7777, "uid": st["st_uid"], "gid": st["st_gid"]}
            if kind == "file":
                entry["sha256"] = g.checksum("sha256", path)
            elif kind == "link":
                entry["target"] = g.readlink(path)
            yield path, entry


def _kind(mode: int) -> str:
    fmt = mode & 0o170000
    return {0o100000: "file", 0o040000: "dir", 0o120000: "link"}.get(fmt, "other")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _explain(e: RuntimeError) -> str:
    text = _first_line(e)
    if "No space left" in text:
        return "the image's root file system is full"
    if "Input/output error" in text:
        return f"{text} (is the output disk full?)"
    return text
