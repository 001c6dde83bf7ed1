"""Backup section of `make bench`: `pibake backup` of a node holding about 2 GB, on a card
four times that size, against the floors of doing it by hand.

The node is this machine standing in for a Pi: its card is an image file laid out as
Raspberry Pi OS lays cards out, its root file system (on a loop device) holding a copy
of this machine's /usr/share, /usr/bin and /usr/lib/<arch> (real files: many small, some
large); its boot file system is a folder (24 MiB), as in the image tests, since the
machine's kernel may have no vfat. It is reached with the real ssh client through an ssh_config, as pibake reaches
a node, to Debian's own sshd: unpacked from its package (not installed, so no service and
no port), started per connection by ssh's ProxyCommand in a mount namespace of its own.

Measured, in one run:
- live, first backup: seconds and bytes over the connection, against `tar` of the same
  file systems over the same ssh into /dev/null (the floor), and `dd` of the whole card;
  and against the least any backup that writes what it receives can take here: the same
  stream unpacked by `tar -x` as root into an ext4 file system the kernel has mounted (the
  fastest writer there is), synced; then with every file read back and hashed, and
  `e2fsck -fn` (what a backup that checks itself adds);
- live, the next backup after a 10 MB change: bytes over the connection;
- offline, `--device` on the card's loop device: bytes read (the device's own statistics)
  against the bytes its file systems use.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from backup_node import StandIn, card_facts
from builder import backup, layout
from builder.profile import load

MB = 1_000_000
MIB = 1 << 20
GIB = 1 << 30
CHANGE = 10 * MB
ARCH = subprocess.run(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"], capture_output=True, text=True).stdout.strip() \
    if shutil.which("dpkg-architecture") else f"{platform.machine()}-linux-gnu"
TREES = ("/usr/share", "/usr/bin", f"/usr/lib/{ARCH}")
SSHD_PACKAGES = ("openssh-server", "libwrap0")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


def stand_in_sshd(work: Path) -> str:
    """A ProxyCommand that runs Debian's sshd on the connection (sshd -i), as root, with a
    host key and an authorized key of the bench's; `sudo -n` on the node is a shim (the
    session is root already)."""
    unpacked = work / "sshd"
    if not (unpacked / "done").exists():
        shutil.rmtree(unpacked, ignore_errors=True)
        (unpacked / "debs").mkdir(parents=True)
        _run(["apt-get", "download", *SSHD_PACKAGES], cwd=unpacked / "debs", capture_output=True)
        for deb in (unpacked / "debs").iterdir():
            _run(["dpkg-deb", "-x", str(deb), str(unpacked / "root")])
        (unpacked / "done").touch()
    for key in ("host", "user"):
        if not (work / key).exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pibake-bench-{key}", "-f", str(work / key)])
    (work / "bin").mkdir(exist_ok=True)
    (work / "bin/sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    (work / "bin/sudo").chmod(0o755)
    # sshd's privilege separation wants a user "sshd" and /run/sshd: given in its own namespace.
    passwd = Path("/etc/passwd").read_text()
    (work / "passwd").write_text(passwd + ("" if passwd.endswith("\n") else "\n") + "sshd:x:65534:65534::/run/sshd:/usr/sbin/nologin\n")
    (work / "sshd_config").write_text(f"HostKey {work}/host\nAuthorizedKeysFile {work}/user.pub\nPermitRootLogin prohibit-password\n"
                                      f"StrictModes no\nUsePAM no\nSetEnv PATH={work}/bin:/usr/sbin:/usr/bin:/sbin:/bin\n")
    libs = ":".join(str(unpacked / "root" / d / ARCH) for d in ("lib", "usr/lib"))
    serve = work / "serve"
    serve.write_text(f"#!/bin/sh\nset -e\nmount --bind {work}/passwd /etc/passwd\nmount -t tmpfs tmpfs /run\nmkdir -m 755 /run/sshd\n"
                     f"LD_LIBRARY_PATH={libs} exec {unpacked}/root/usr/sbin/sshd -i -f {work}/sshd_config\n")
    serve.chmod(0o755)
    return f"unshare --mount {serve}"


def _write_ssh_config(output: Path, work: Path, proxy: str) -> None:
    kind, key = (work / "host.pub").read_text().split()[:2]
    (output / "known_hosts").write_text(f"master {kind} {key}\n")
    (output / "ssh_config").write_text(f"Host master\n  User root\n  IdentityFile {work}/user\n  IdentitiesOnly yes\n"
                                       f"  UserKnownHostsFile {output}/known_hosts\n  StrictHostKeyChecking yes\n"
                                       f"  HostKeyAlias master\n  ProxyCommand {proxy}\n")


def _card(work: Path) -> tuple[Path, int]:
    """The node's card: Raspberry Pi OS's layout, four times the data it holds."""
    data = sum(int(_run(["du", "-sb", t], capture_output=True, text=True).stdout.split()[0]) for t in TREES)
    size = -(-4 * data // GIB) * GIB
    card = work / "card.img"
    card.unlink(missing_ok=True)
    card_layout = layout.Layout("dos", "0x5e3da4a0", (
        layout.Partition(1, 8192, 1048576, "c", "", "/boot/firmware", layout.Fat("5de4665c", "bootfs", 32, 1)),
        layout.Partition(2, 1056768, size // 512 - 1056768, "83", "", "/", layout.Ext4(
            "56f80fa2-e005-4cca-86e6-19da1069914d", "rootfs", ("has_journal", "ext_attr", "resize_inode", "dir_index",
                                                              "filetype", "extent", "flex_bg", "sparse_super", "large_file",
                                                              "huge_file", "dir_nlink", "extra_isize", "metadata_csum"),
            4096, 256, 5))), size)
    layout.make_empty(card, card_layout)
    return card, data


def _used(mount: Path) -> tuple[int, int]:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree


def _over_ssh(output: Path, remote: str) -> tuple[float, int]:
    """Seconds and bytes of `remote`'s stdout over ssh, into nothing."""
    started = time.monotonic()
    proc = subprocess.Popen(["ssh", "-F", "ssh_config", "-o", "BatchMode=yes", "master", remote], cwd=output,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    count = 0
    while chunk := proc.stdout.read(MIB):
        count += len(chunk)
    if proc.wait() != 0:
        raise SystemExit(f"bench: ssh master {remote!r} failed")
    return time.monotonic() - started, count


def _kernel_writer(output: Path, work: Path, remote: str, size: int) -> tuple[float, float]:
    """Seconds to unpack `remote`'s tar stream with the kernel's ext4 as root, synced; and with
    every file then read back and hashed, and e2fsck -fn."""
    target, mount = work / "bound.img", work / "bound"
    target.unlink(missing_ok=True)
    with open(target, "wb") as f:
        f.truncate(size)
    _run(["mkfs.ext4", "-q", "-F", str(target)])
    device = _loop(target)
    mount.mkdir(exist_ok=True)
    try:
        _run(["mount", device, str(mount)])
        started = time.monotonic()
        ssh = subprocess.Popen(["ssh", "-F", "ssh_config", "-o", "BatchMode=yes", "master", remote], cwd=output,
                               stdout=subprocess.PIPE)
        _run(["tar", "-x", "-C", str(mount), "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner",
              "--same-owner", "--sparse"], stdin=ssh.stdout)
        if ssh.wait() != 0:
            raise SystemExit("bench: ssh master tar failed")
        _run(["sync", "-f", str(mount)])
        written = time.monotonic() - started
        for folder, _, names in os.walk(mount):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        hashlib.file_digest(f, "sha256")
        _run(["umount", str(mount)])
        _run(["e2fsck", "-fn", device], capture_output=True)
        return written, time.monotonic() - started
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)
        target.unlink(missing_ok=True)


def _loop(backing: Path, offset: int = 0, size: int = 0) -> str:
    window = ["--offset", str(offset), "--sizelimit", str(size)] if size else []
    device = _run(["losetup", "--find", "--show", *window, str(backing)], capture_output=True, text=True).stdout.strip()
    assert device.startswith("/dev/loop"), device
    return device


def _sectors_read(device: str) -> int:
    return int((Path("/sys/block") / Path(device).name / "stat").read_text().split()[2]) * 512


def bench_backup(work: Path, runs: int) -> dict:
    work = work / "backup"
    work.mkdir(parents=True, exist_ok=True)
    proxy = stand_in_sshd(work)
    card, data = _card(work)
    device = _loop(card)
    root, boot = work / "root", work / "boot"
    parts: list[str] = []
    try:
        # The root file system on a loop device of its own (no udev here to make /dev/loopNp2).
        # The boot file system is a folder here, as in the image tests: this kernel may have
        # no vfat; it holds 24 MiB of the 2 GB, and its partition stays empty on the card.
        root.mkdir(exist_ok=True)
        parts.append(_loop(card, 1056768 * 512, card.stat().st_size - 1056768 * 512))
        _run(["mount", parts[-1], str(root)])
        shutil.rmtree(boot, ignore_errors=True)
        boot.mkdir()
        for tree in TREES:
            into = root / Path(tree).parent.relative_to("/")
            into.mkdir(parents=True, exist_ok=True)
            _run(["cp", "-a", tree, str(into)])
        (boot / "kernel8.img").write_bytes(os.urandom(24 * MIB))
        _run(["sync"])
        profiles = work / "profiles"
        profiles.mkdir(exist_ok=True)
        (profiles / "cluster.yaml").write_text("workers:\n  count: 1\nmaster:\n  backup:\n    stop: []\n")
        profile = load(profiles / "cluster.yaml")
        node = profile.master.node
        mounts = {"/": root, "/boot/firmware": boot}

        def facts() -> bytes:
            return card_facts(card, {"boot": (sum(f.stat().st_size for f in boot.iterdir()), 0), "root": _used(root)})

        def connect(out: Path, name: str, folder: Path) -> StandIn:
            return StandIn(out, name, folder, mounts=mounts, facts=facts())

        output = work / "output"
        floors, firsts, received, writes, checks = [], [], [], [], []
        floor_bytes = 0
        tar = ("tar --create --file=- --one-file-system --xattrs --xattrs-include='*' --acls --sparse --numeric-owner "
               f"-C {shlex.quote(str(root))} . -C {shlex.quote(str(boot))} .")
        for _ in range(runs):
            shutil.rmtree(output, ignore_errors=True)
            output.mkdir()
            _write_ssh_config(output, work, proxy)
            seconds, floor_bytes = _over_ssh(output, tar)
            floors.append(seconds)
            started = time.monotonic()
            first = backup.backup(profile, node, output, connect=connect)
            firsts.append(time.monotonic() - started)
            received.append(first.received)
            written, checked = _kernel_writer(output, work, tar, 2 * data)
            writes.append(written)
            checks.append(checked)
        dd_seconds, dd_bytes = _over_ssh(output, f"dd if={device} bs=4M status=none")

        (root / "srv").mkdir(exist_ok=True)
        (root / "srv/change").write_bytes(os.urandom(CHANGE))
        _run(["sync"])
        started = time.monotonic()
        second = backup.backup(profile, node, output, connect=connect)
        incremental_seconds = time.monotonic() - started
        assert second.incremental

        used = _used(root)[0]  # the card's FAT holds nothing: only its own tables are read
        _run(["umount", str(root)])
        for part in parts:
            _run(["losetup", "-d", part])
        parts.clear()
        _run(["blockdev", "--flushbufs", device])
        before = _sectors_read(device)
        started = time.monotonic()
        offline = backup.backup(profile, node, output, device=device, force=True)
        offline_seconds = time.monotonic() - started
        offline_read = _sectors_read(device) - before
    finally:
        subprocess.run(["umount", str(root)], capture_output=True)
        for loop in (*parts, device):
            subprocess.run(["losetup", "-d", loop], capture_output=True)
    size = card.stat().st_size
    card.unlink()
    floor, first_median = statistics.median(floors), statistics.median(firsts)
    return {
        "data_bytes": data, "card_bytes": size, "files": first.files, "runs": runs,
        "floor_seconds": floors, "floor_bytes": floor_bytes, "first_seconds": firsts, "first_received": received,
        "first_over_floor": first_median / floor, "kernel_write_seconds": writes, "kernel_checked_seconds": checks,
        "dd_seconds": dd_seconds, "dd_bytes": dd_bytes,
        "change_bytes": CHANGE, "incremental_received": second.received, "incremental_seconds": incremental_seconds,
        "incremental_allowed": 2 * CHANGE + MIB, "offline_read": offline_read, "offline_used": used,
        "offline_seconds": offline_seconds, "offline_over_used": offline_read / used, "backup_image_bytes": first.path.stat().st_size
        if first.path.exists() else None, "offline_image": str(offline.path),
    }


def print_backup(b: dict, met) -> None:
    print(f"backup: a node holding {b['data_bytes'] / GIB:.2f} GiB ({b['files']} files) on a {b['card_bytes'] / GIB:.0f} GiB card")
    floor, first = statistics.median(b["floor_seconds"]), statistics.median(b["first_seconds"])
    print(f"  live, first: pibake {first:.1f} s, {statistics.median(b['first_received']) / MB:.0f} MB over ssh; floor "
          f"(tar over ssh into /dev/null) {floor:.1f} s, {b['floor_bytes'] / MB:.0f} MB; dd of the card {b['dd_seconds']:.1f} s, "
          f"{b['dd_bytes'] / MB:.0f} MB")
    print(f"    pibake/floor {b['first_over_floor']:.2f} (target <= 1.3: {met(b['first_over_floor'] <= 1.3)}); "
          f"pibake/dd bytes {statistics.median(b['first_received']) / b['dd_bytes']:.3f}")
    written, checked = statistics.median(b["kernel_write_seconds"]), statistics.median(b["kernel_checked_seconds"])
    print(f"    least a backup that writes can take here (the same stream, tar -x as root into the kernel's ext4): "
          f"{written:.1f} s = {written / floor:.2f} x floor; with every file read back and e2fsck -fn: {checked:.1f} s = "
          f"{checked / floor:.2f} x floor; pibake/that {first / checked:.2f}")
    print(f"  live, after a {b['change_bytes'] / MB:.0f} MB change: {b['incremental_received'] / MB:.1f} MB over ssh in "
          f"{b['incremental_seconds']:.1f} s (target <= {b['incremental_allowed'] / MB:.1f} MB: "
          f"{met(b['incremental_received'] <= b['incremental_allowed'])})")
    print(f"  offline --device: {b['offline_read'] / MIB:.0f} MiB read of the card's {b['card_bytes'] / MIB:.0f} MiB, "
          f"the file systems use {b['offline_used'] / MIB:.0f} MiB: {b['offline_over_used']:.3f} of used "
          f"(target <= 1.05: {met(b['offline_over_used'] <= 1.05)}), {b['offline_seconds']:.1f} s")
