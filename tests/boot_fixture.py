#!/usr/bin/env python3
"""Build a bootable arm64 image shaped like Raspberry Pi OS Lite, from Debian's packages.

    python3 tests/boot_fixture.py bookworm trixie   # build those missing, print their folders
    python3 tests/boot_fixture.py trixie --path     # only print where it lives

The root file system comes from debootstrap (under qemu-user-static) and is then
shaped the way pi-gen shapes Lite (../shared/docs/rpios-facts.md). Both releases:
first user `pi` (uid 1000, locked password) with the rename wizard enabled, SSH
off unless `ssh` is on the boot partition, no host keys, machine-id
`uninitialized`, /etc/rpi-issue, no dnsmasq, iptables, tcpdump or Fabric.

- Bookworm: `pi` has passwordless sudo; a first-boot step deletes and regenerates
  the host keys; the first-boot init on the kernel command line changes the disk
  id and reboots.
- Trixie: `pi` has a nologin shell and no sudo rule (pi-gen since 2026-02);
  cloud-init is installed and enabled with pi-gen's NoCloud set-up (seeds on the
  boot partition, all commented out); OpenSSH makes the missing host keys on
  first boot;
  ` resize` on the kernel command line, which the initramfs acts on (new disk id,
  ` resize` removed from cmdline.txt) with no reboot.

Beside the image: Debian's arm64 kernel and a small initramfs for
`qemu-system-aarch64 -M virt`, and a partial Debian mirror (the real signed
InRelease, the Packages index it names, and the .debs pibake's default profile
asks for), so that tests serve apt on 127.0.0.1 and never leave this machine.

Everything is cached under $PIBAKE_FIXTURES (default ~/.cache/pibake-fixtures)
in a folder named by a hash of this file: change the recipe, get a new fixture.
Building needs root and Debian's mirror; it is the only step that goes online.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import inspect
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rpios_image import LAYOUTS, MIB, assemble  # noqa: E402

DEBIAN = "http://deb.debian.org/debian"
DISK_ID = "0x8a43ba1e"
# The packages pibake's default profile stages for the master (profiles/cluster.yaml).
STAGED = ("dnsmasq", "iptables", "tcpdump", "fabric")
# A Lite-like system: what pi-gen's stage lists add that matters on a headless node.
# debootstrap installs the first group; apt the second, whose maintainer scripts
# (polkitd's among them) need apt's configure order.
INCLUDE = ("systemd-sysv", "dbus", "udev", "kmod", "initramfs-tools", "sudo", "python3", "ca-certificates", "fdisk",
           "iproute2", "iputils-ping", "less")
LITE = ("network-manager", "dnsmasq-base", "openssh-server", "avahi-daemon", "linux-image-arm64")
# Trixie: busybox gives the initramfs the sed and od its set_partuuid step uses;
# cloud-init is what pi-gen's stage2/04-cloud-init installs.
EXTRA_INCLUDE = {"trixie": ("busybox",)}
EXTRA_LITE = {"trixie": ("cloud-init",)}
# Modules the initramfs needs to find the root file system on QEMU's virt machine.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4", "vfat", "nls_cp437", "nls_ascii")
# Kernel module trees no QEMU virt guest uses; dropping them keeps the image small.
UNUSED_MODULES = ("drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/net/ethernet", "drivers/infiniband",
                  "drivers/staging", "drivers/usb", "drivers/iio", "drivers/scsi", "drivers/mmc", "drivers/bluetooth",
                  "drivers/hwmon", "drivers/crypto", "drivers/mtd", "drivers/nfc", "sound", "net/wireless",
                  "net/mac80211", "net/bluetooth", "fs/ocfs2", "fs/xfs", "fs/btrfs", "fs/nfs", "fs/smb", "fs/ceph")

USERCONF_SERVICE = """\
[Unit]
Description=User configuration dialog
After=systemd-user-sessions.service
Before=getty@tty1.service
Conflicts=getty@tty1.service

[Service]
Type=oneshot
ExecStart=/usr/lib/userconf-pi/userconf-service
TimeoutSec=0

[Install]
WantedBy=multi-user.target
"""
# The real one runs an interactive dialog on tty8 and waits for a person.
USERCONF = """\
#!/bin/sh
echo "userconf-pi: waiting for a user name and password on tty8" | tee /run/userconf-wizard-pending
exec sleep infinity
"""
REGENERATE_SERVICE = """\
[Unit]
Description=Regenerate SSH host keys
Before=ssh.service
ConditionFileIsExecutable=/usr/bin/ssh-keygen

[Service]
Type=oneshot
ExecStart=/usr/lib/raspberrypi-sys-mods/regenerate_ssh_host_keys
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""
REGENERATE = """\
#!/bin/sh
rm -f /etc/ssh/ssh_host_*_key*
ssh-keygen -A > /dev/null
systemctl -q disable regenerate_ssh_host_keys
"""
SSHSWITCH_SERVICE = """\
[Unit]
Description=Turn on SSH if /boot/firmware/ssh is present
ConditionPathExistsGlob=|/boot/firmware/ssh
ConditionPathExistsGlob=|/boot/firmware/ssh.txt
After=regenerate_ssh_host_keys.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c "systemctl enable --now --no-block ssh; rm -f /boot/firmware/ssh /boot/firmware/ssh.txt"

[Install]
WantedBy=multi-user.target
"""
# pi-gen's stage2/04-cloud-init: the NoCloud datasource reads the boot partition.
CLOUD_CFG = """\
datasource_list: [ NoCloud, None ]
datasource:
  NoCloud:
    seedfrom: file:///boot/firmware
ssh_deletekeys: false
ssh_genkeytypes: []
"""
CLOUD_INIT_SEEDS = {
    "meta-data": "# meta-data for cloud-init's NoCloud datasource\ndsmode: local\ninstance_id: rpios-image\n",
    "user-data": "#cloud-config\n\n# hostname: raspberrypi\n# users:\n#   - name: pi\n#     ssh_authorized_keys: []\n",
    "network-config": "# network:\n#   version: 2\n#   ethernets:\n#     eth0:\n#       dhcp4: true\n",
}
# What Trixie's initramfs does when ` resize` is on the kernel command line, less
# the resize itself (raspberrypi-sys-mods' local-bottom/set_partuuid): a new disk
# id, fstab and cmdline.txt follow it, ` resize` goes, and boot goes on.
SET_PARTUUID = """\
#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
grep -qw resize /proc/cmdline || exit 0
old=$(sed -n 's/.*root=PARTUUID=\\([0-9a-f]*\\)-02.*/\\1/p' /proc/cmdline)
new=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
sfdisk --disk-id /dev/vda "0x$new" > /dev/null 2>&1 || true
root="${rootmnt:-/root}"
mount -o remount,rw "$root"
sed -i "s/$old/$new/g" "$root/etc/fstab"
mkdir -p /bootfs
mount -t vfat /dev/vda1 /bootfs
sed -i "s/$old/$new/g; s/ resize//" /bootfs/cmdline.txt
umount /bootfs
mount -o remount,ro "$root"
echo "set_partuuid: disk id $old -> $new"
"""
SET_PARTUUID_HOOK = """\
#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
copy_exec /usr/sbin/sfdisk /sbin
"""

# What raspberrypi-sys-mods' firstboot init does on Bookworm, less the resize:
# a new disk id (fstab and cmdline.txt follow), fresh host keys, init= removed, reboot.
FIRSTBOOT = """\
#!/bin/sh
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mount -o remount,rw /
mount /boot/firmware
old=$(sed -n 's/.*root=PARTUUID=\\([0-9a-f]*\\)-02.*/\\1/p' /boot/firmware/cmdline.txt)
new=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
sfdisk --disk-id /dev/vda "0x$new" > /dev/null 2>&1
sed -i "s/$old/$new/g" /etc/fstab /boot/firmware/cmdline.txt
rm -f /etc/ssh/ssh_host_*_key*
ssh-keygen -A > /dev/null
sed -i 's| init=/usr/lib/raspberrypi-sys-mods/firstboot||' /boot/firmware/cmdline.txt
sync
umount /boot/firmware
mount -o remount,ro /
sync
echo 1 > /proc/sys/kernel/sysrq
echo b > /proc/sysrq-trigger
sleep 5
"""


def recipe_hash() -> str:
    """This file and the image layout code it uses: what decides the fixture's content."""
    recipe = Path(__file__).read_bytes() + inspect.getsource(assemble).encode() + repr(LAYOUTS).encode()
    return hashlib.sha256(recipe).hexdigest()[:16]


def fixtures_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pibake-fixtures"
    return Path(os.environ.get("PIBAKE_FIXTURES") or default)


def fixture_dir(release: str) -> Path:
    return fixtures_root() / f"{release}-{recipe_hash()}"


def run(*command: str, **kwargs: object) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def chroot(root: Path, script: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
           "HOME": "/root"}
    run("chroot", str(root), "/bin/sh", "-euxc", script, env=env)


def enable_binfmt() -> None:
    """Let this x86 host run arm64 programs, which debootstrap's second stage needs."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        run("mount", "-t", "binfmt_misc", "binfmt_misc", str(misc))
    if not (misc / "qemu-aarch64").exists():
        (misc / "register").write_text(Path("/usr/lib/binfmt.d/qemu-aarch64.conf").read_text().strip())


def write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def bootstrap(root: Path, release: str) -> None:
    run("debootstrap", "--arch=arm64", f"--include={','.join(INCLUDE + EXTRA_INCLUDE.get(release, ()))}", release,
        str(root), DEBIAN)
    # Set before the kernel goes in, so its initramfs holds only what -M virt needs.
    write(root, "/etc/initramfs-tools/conf.d/pibake-fixture.conf", "MODULES=list\nCOMPRESS=gzip\n")
    write(root, "/etc/initramfs-tools/modules", "".join(f"{m}\n" for m in INITRAMFS_MODULES))
    if release == "trixie":
        write(root, "/usr/share/initramfs-tools/scripts/local-bottom/set_partuuid", SET_PARTUUID, 0o755)
        write(root, "/usr/share/initramfs-tools/hooks/set_partuuid", SET_PARTUUID_HOOK, 0o755)
    chroot(root, f"apt-get install -y --no-install-recommends {' '.join(LITE + EXTRA_LITE.get(release, ()))}")
    version = next((root / "lib/modules").iterdir()).name
    for tree in UNUSED_MODULES:
        shutil.rmtree(root / "lib/modules" / version / "kernel" / tree, ignore_errors=True)
    chroot(root, f"depmod {version}")


def shape_like_lite(root: Path, release: str) -> None:
    """What pi-gen's stages leave on a Lite image, as far as first boot is concerned."""
    boot_dir = LAYOUTS[release].boot_dir
    disk = DISK_ID[2:]
    write(root, "/lib/systemd/system/userconfig.service", USERCONF_SERVICE)
    write(root, "/usr/lib/userconf-pi/userconf-service", USERCONF, 0o755)
    write(root, "/etc/ssh/sshd_config.d/rename_user.conf", "Banner /usr/share/userconf-pi/sshd_banner\n")
    write(root, "/usr/share/userconf-pi/sshd_banner", "SSH may not work until a valid user has been set up.\n")
    write(root, "/lib/systemd/system/sshswitch.service", SSHSWITCH_SERVICE)
    SHAPES[release](root)
    chroot(root, "systemctl enable userconfig.service sshswitch.service"
                 " && systemctl disable ssh.service getty@tty1.service")
    write(root, "/etc/fstab", f"proc /proc proc defaults 0 0\nPARTUUID={disk}-01 {boot_dir} vfat defaults 0 2\n"
                              f"PARTUUID={disk}-02 / ext4 defaults,noatime 0 1\n")
    (root / boot_dir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    write(root, "/etc/hostname", "raspberrypi\n")
    hosts = (root / "etc/hosts").read_text()
    write(root, "/etc/hosts", re.sub(r"^127\.0\.1\.1.*$", "", hosts, flags=re.M).rstrip() + "\n127.0.1.1\t\traspberrypi\n")
    write(root, "/etc/rpi-issue", f"Raspberry Pi reference 2025-05-13\nGenerated using pi-gen, {release}, stage2\n")
    write(root, "/var/lib/NetworkManager/NetworkManager.state", "[main]\nWirelessEnabled=false\n")
    (root / "etc/NetworkManager/system-connections").mkdir(parents=True, exist_ok=True)
    write(root, "/etc/apt/sources.list", f"deb {DEBIAN} {release} main\n")
    (root / "etc/apt/sources.list.d/debian.sources").unlink(missing_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    write(root, "/etc/machine-id", "uninitialized\n", 0o444)
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)


def shape_bookworm(root: Path) -> None:
    """pi with passwordless sudo; host keys deleted and made again on first boot."""
    chroot(root, "useradd -m -u 1000 -U -s /bin/bash -G adm,sudo,netdev,dialout,video,plugdev pi && passwd -l pi")
    write(root, "/etc/sudoers.d/010_pi-nopasswd", "pi ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    write(root, "/lib/systemd/system/regenerate_ssh_host_keys.service", REGENERATE_SERVICE)
    write(root, "/usr/lib/raspberrypi-sys-mods/regenerate_ssh_host_keys", REGENERATE, 0o755)
    write(root, "/usr/lib/raspberrypi-sys-mods/firstboot", FIRSTBOOT, 0o755)
    chroot(root, "systemctl enable regenerate_ssh_host_keys.service")


def shape_trixie(root: Path) -> None:
    """pi as `adduser --disabled-login` makes it, no sudo rule; cloud-init on, seeded from the boot partition.

    Host keys: Debian's own sshd-keygen.service makes the missing ones on first
    boot; nothing deletes them (pi-gen no longer enables regenerate_ssh_host_keys)."""
    chroot(root, "useradd -m -u 1000 -U -s /usr/sbin/nologin -G adm,sudo,netdev,dialout,video,plugdev pi"
                 " && passwd -l pi")
    write(root, "/etc/cloud/cloud.cfg.d/99_raspberry-pi.cfg", CLOUD_CFG)
    # The package enables its units; check, so that the fixture cannot quietly lose them.
    chroot(root, "systemctl is-enabled cloud-init-local.service cloud-config.service cloud-final.service")


SHAPES = {"bookworm": shape_bookworm, "trixie": shape_trixie}
# The kernel command line pi-gen writes, after the root device.
CMDLINE_TAIL = {"bookworm": "rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot", "trixie": "rootwait resize"}
BOOT_SEEDS = {"bookworm": {}, "trixie": CLOUD_INIT_SEEDS}


def capture_mirror(root: Path, release: str, mirror: Path) -> None:
    """Copy, from Debian, the signed index and the .debs pibake will stage for the default profile."""
    chroot(root, "apt-get update")
    lists = root / "var/lib/apt/lists"
    inrelease = lists / f"deb.debian.org_debian_dists_{release}_InRelease"
    dists = mirror / "debian/dists" / release
    dists.mkdir(parents=True)
    shutil.copy(inrelease, dists / "InRelease")
    index = "main/binary-arm64/Packages.xz"
    sha = re.search(rf"^ ([0-9a-f]{{64}})\s+\d+\s+{re.escape(index)}$",
                    inrelease.read_text().split("SHA256:", 1)[1], re.M)[1]
    target = dists / index
    target.parent.mkdir(parents=True)
    fetch(f"{DEBIAN}/dists/{release}/main/binary-arm64/by-hash/SHA256/{sha}", target, sha)
    by_hash = target.parent / "by-hash/SHA256" / sha
    by_hash.parent.mkdir(parents=True)
    os.link(target, by_hash)
    signed = {m[1]: m[2] for m in re.finditer(r"^Filename: (\S+)\n(?:.+\n)*?SHA256: (\S+)$",
                                               lzma.decompress(target.read_bytes()).decode(), re.M)}
    uris = subprocess.run(
        ["chroot", str(root), "apt-get", "install", "-qq", "--print-uris", "--no-install-recommends", *STAGED],
        check=True, capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}).stdout
    urls = re.findall(r"^'(\S+)' ", uris, re.M)
    if not urls:
        raise SystemExit(f"apt found nothing to download for {' '.join(STAGED)}:\n{uris}")
    for url in urls:
        relative = urllib.parse.unquote(url.split("/debian/", 1)[1])
        fetch(url, mirror / "debian" / relative, signed[relative])
    chroot(root, "apt-get clean && rm -rf /var/lib/apt/lists/*")


def fetch(url: str, target: Path, sha256: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    run("curl", "-fsSL", "--retry", "5", "-o", str(target), url)
    if hashlib.sha256(target.read_bytes()).hexdigest() != sha256:
        raise SystemExit(f"{url}: sha256 does not match the signed index")


def build(release: str) -> Path:
    final = fixture_dir(release)
    if (final / "done").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{release}-", dir=final.parent))
    try:
        root = work / "root"
        enable_binfmt()
        bootstrap(root, release)
        capture_mirror(root, release, work / "mirror")
        shape_like_lite(root, release)
        for name in ("vmlinuz", "initrd.img"):
            shutil.copy(next((root / "boot").glob(f"{name}-*")), work / name)
        layout = LAYOUTS[release]
        used = int(subprocess.run(["du", "-sx", "--block-size=1", str(root)], check=True, capture_output=True,
                                  text=True).stdout.split()[0])
        root_size = -(-(used * 6 // 5 + 200 * MIB) // (4 * MIB)) * 4 * MIB  # pi-gen: du x 1.2 + 200 MiB
        disk = DISK_ID[2:]
        cmdline = (f"console=serial0,115200 console=tty1 root=PARTUUID={disk}-02 rootfstype=ext4 fsck.repair=yes "
                   f"{CMDLINE_TAIL[release]}\n")
        boot_files = {"cmdline.txt": cmdline, "config.txt": "dtparam=audio=on\narm_64bit=1\n",
                      "issue.txt": "Raspberry Pi reference 2025-05-13\n", **BOOT_SEEDS[release]}
        assemble(work / "rpios.img", layout, root, root_size, boot_files, disk_id=DISK_ID)
        shutil.rmtree(root)
        (work / "done").write_text(f"{release} {recipe_hash()}\n")
        work.chmod(0o755)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("releases", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--path", action="store_true", help="print the fixtures' folders without building them")
    args = parser.parse_args()
    if args.path or len(args.releases) == 1:
        for release in args.releases:
            print(fixture_dir(release) if args.path else build(release))
        return
    # debootstrap's second stage runs on one emulated core: build the releases side by side.
    enable_binfmt()
    with concurrent.futures.ThreadPoolExecutor(len(args.releases)) as pool:
        done = list(pool.map(build_in_child, args.releases))
    for release, (code, output) in zip(args.releases, done):
        print(f"=== {release}: {'ok' if code == 0 else f'failed ({code})'}\n{output}", flush=True)
    if any(code for code, _ in done):
        raise SystemExit(1)


def build_in_child(release: str) -> tuple[int, str]:
    child = subprocess.run([sys.executable, __file__, release], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    return child.returncode, child.stdout


if __name__ == "__main__":
    main()
