"""Build small disk images laid out like Raspberry Pi OS Lite arm64.

MBR with the disk id pi-gen sets, FAT32 `bootfs` at the release's real offset,
ext4 `rootfs` populated with a tree shaped like the real one (first user `pi`,
uid 1000, the first-boot rename wizard enabled, no SSH host keys). Built with
host tools only (sfdisk, mkfs.fat, mke2fs -d, mtools), which needs root to give
files their real owners.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import apt_repo

MIB = 1 << 20
SECTOR = 512


@dataclass(frozen=True)
class Layout:
    codename: str
    version: str
    boot_start: int  # sectors
    boot_sectors: int
    boot_dir: str
    network: str
    ext4_features: str


LAYOUTS = {
    # Bullseye: 4 MiB alignment, 256 MiB boot, /boot, dhcpcd, no orphan_file (pi-gen forces ^orphan_file).
    "bullseye": Layout("bullseye", "11", 8192, 524288, "/boot", "dhcpcd", "^orphan_file"),
    # Bookworm from 2025-05: 8 MiB alignment, 512 MiB boot, /boot/firmware, NetworkManager;
    # a current build host leaves orphan_file and metadata_csum_seed on.
    "bookworm": Layout("bookworm", "12", 16384, 1048576, "/boot/firmware", "networkmanager", "orphan_file,metadata_csum_seed"),
    "trixie": Layout("trixie", "13", 16384, 1048576, "/boot/firmware", "networkmanager", "orphan_file,metadata_csum_seed"),
}

ROOT_SIZE = 128 * MIB
DISK_ID = "0x5e3da4a0"

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
sshd:x:106:65534::/run/sshd:/usr/sbin/nologin
pi:x:1000:1000:,,,:/home/pi:/bin/bash
"""
SHADOW = """root:*:19650:0:99999:7:::
daemon:*:19650:0:99999:7:::
sshd:*:19650:0:99999:7:::
pi:!:19650:0:99999:7:::
"""
GROUP = """root:x:0:
adm:x:4:pi
sudo:x:27:pi
video:x:44:pi
shadow:x:42:
netdev:x:108:pi
pi:x:1000:
"""
GSHADOW = """root:*::
adm:*::pi
sudo:*::pi
video:*::pi
shadow:*::
netdev:!::pi
pi:!::
"""
HOSTS = """127.0.0.1\tlocalhost
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters

127.0.1.1\t\traspberrypi
"""
SSHD_CONFIG = """Include /etc/ssh/sshd_config.d/*.conf
KbdInteractiveAuthentication no
UsePAM yes
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""
UNITS = {
    "ssh.service": "[Unit]\nDescription=OpenBSD Secure Shell server\n[Service]\nExecStart=/usr/sbin/sshd -D\n"
                   "[Install]\nWantedBy=multi-user.target\nAlias=sshd.service\n",
    "getty@.service": "[Unit]\nDescription=Getty on %I\n[Service]\nExecStart=-/sbin/agetty %I\n"
                      "[Install]\nWantedBy=getty.target\n",
    "userconfig.service": "[Unit]\nDescription=User configuration dialog\n[Service]\nType=oneshot\n"
                          "ExecStart=/usr/lib/userconf-pi/userconf-service\n[Install]\nWantedBy=multi-user.target\n",
    "regenerate_ssh_host_keys.service": "[Unit]\nDescription=Regenerate SSH host keys\n[Service]\nType=oneshot\n"
                                        "ExecStart=/usr/lib/raspberrypi-sys-mods/regenerate_ssh_host_keys\n"
                                        "[Install]\nWantedBy=multi-user.target\n",
}


def _os_release(layout: Layout) -> str:
    return (f'PRETTY_NAME="Debian GNU/Linux {layout.version} ({layout.codename})"\nNAME="Debian GNU/Linux"\n'
            f'VERSION_ID="{layout.version}"\nVERSION="{layout.version} ({layout.codename})"\n'
            f"VERSION_CODENAME={layout.codename}\nID=debian\n")


def _write(root: Path, path: str, text: str, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    os.chown(target, *owner)
    os.chmod(target, mode)


# Links every Debian root has: /usr merged (relative links), /var/run and /var/lock into
# /run (absolute), and openssl's certificate folder (absolute, under a merged folder).
LINKS = {"/bin": "usr/bin", "/sbin": "usr/sbin", "/lib": "usr/lib", "/var/run": "/run", "/var/lock": "/run/lock",
         "/usr/lib/ssl/certs": "/etc/ssl/certs"}


def _root_tree(root: Path, layout: Layout, rpios: bool) -> None:
    for folder in ("usr/bin", "usr/sbin", "usr/lib/ssl", "etc/ssl/certs", "run", "var"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for link, target in LINKS.items():
        os.symlink(target, root / link.lstrip("/"))
    if rpios:
        _write(root, "/usr/lib/os-release", _os_release(layout))
        (root / "etc").mkdir(parents=True, exist_ok=True)
        os.symlink("../usr/lib/os-release", root / "etc/os-release")
        _write(root, "/etc/rpi-issue", f"Raspberry Pi reference 2025-05-13\nGenerated using pi-gen, {layout.codename}\n")
    else:
        _write(root, "/etc/os-release", 'PRETTY_NAME="Ubuntu 24.04 LTS"\nID=ubuntu\nVERSION_CODENAME=noble\n')
    _write(root, "/etc/hostname", "raspberrypi\n")
    _write(root, "/etc/hosts", HOSTS)
    _write(root, "/etc/machine-id", "uninitialized\n", 0o444)
    _write(root, "/etc/fstab", f"proc /proc proc defaults 0 0\nPARTUUID=5e3da4a0-01 {layout.boot_dir} vfat defaults 0 2\n"
                                "PARTUUID=5e3da4a0-02 / ext4 defaults,noatime 0 1\n")
    if layout.codename == "trixie":  # pi-gen since 2026-02: adduser --disabled-login, no passwordless sudo
        _write(root, "/etc/passwd", PASSWD.replace("/home/pi:/bin/bash", "/home/pi:/usr/sbin/nologin"))
        _write(root, "/etc/cloud/cloud.cfg", "# The top level settings are used as module\n# and base configuration.\n")
    else:
        _write(root, "/etc/passwd", PASSWD)
    _write(root, "/etc/shadow", SHADOW, 0o640, (0, 42))
    _write(root, "/etc/group", GROUP)
    _write(root, "/etc/gshadow", GSHADOW, 0o640, (0, 42))
    _write(root, "/etc/subuid", "pi:100000:65536\n")
    _write(root, "/etc/subgid", "pi:100000:65536\n")
    if layout.codename != "trixie":
        _write(root, "/etc/sudoers.d/010_pi-nopasswd", "pi ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    _write(root, "/etc/ssh/sshd_config", SSHD_CONFIG)
    _write(root, "/etc/ssh/sshd_config.d/rename_user.conf", "Banner /usr/share/userconf-pi/sshd_banner\n")
    for name, text in UNITS.items():
        _write(root, f"/lib/systemd/system/{name}", text)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    for name in ("userconfig.service", "regenerate_ssh_host_keys.service"):
        os.symlink(f"/lib/systemd/system/{name}", wants / name)
    _write(root, "/var/lib/dpkg/status", apt_repo.dpkg_status())
    _write(root, "/etc/apt/sources.list", f"deb http://deb.debian.org/debian {layout.codename} main\n")
    keyring = root / "etc/apt/trusted.gpg.d" / apt_repo.KEYRING
    keyring.parent.mkdir(parents=True, exist_ok=True)
    keyring.write_bytes((apt_repo.shared() / apt_repo.KEYRING).read_bytes())
    _write(root, "/home/pi/.bashrc", "# ~/.bashrc\n", 0o644, (1000, 1000))
    _write(root, "/home/pi/.profile", "# ~/.profile\n", 0o644, (1000, 1000))
    os.chown(root / "home/pi", 1000, 1000)
    os.chmod(root / "home/pi", 0o755)
    (root / layout.boot_dir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if layout.network == "networkmanager":
        (root / "etc/NetworkManager/system-connections").mkdir(parents=True)
        os.chmod(root / "etc/NetworkManager/system-connections", 0o700)
        _write(root, "/var/lib/NetworkManager/NetworkManager.state", "[main]\nWirelessEnabled=false\n")
        _write(root, "/boot/cmdline.txt", "# DO NOT EDIT THIS FILE\n# The file you are looking for has moved to /boot/firmware/cmdline.txt\n")
    else:
        _write(root, "/etc/dhcpcd.conf", "hostname\nclientid\npersistent\noption rapid_commit\nslaac private\n")
        _write(root, "/etc/wpa_supplicant/wpa_supplicant.conf",
               "ctrl_interface=DIR=/var/run/wpa_supplicant GROUP=netdev\nupdate_config=1\n", 0o600)


# pi-gen's stage2/04-cloud-init seeds for Trixie: NoCloud, everything commented out.
CLOUD_INIT_SEEDS = {
    "meta-data": "dsmode: local\ninstance_id: rpios-image\n",
    "user-data": "#cloud-config\n\n# hostname: raspberrypi\n# users:\n#   - name: pi\n",
    "network-config": "# network:\n#   version: 2\n#   ethernets:\n#     eth0:\n#       dhcp4: true\n",
}


def _boot_files(layout: Layout) -> dict[str, str]:
    if layout.codename == "trixie":
        tail = "rootwait resize"
    else:
        tail = "rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot"
    return {
        "cmdline.txt": f"console=serial0,115200 console=tty1 root=PARTUUID=5e3da4a0-02 rootfstype=ext4 fsck.repair=yes {tail}\n",
        "config.txt": "# For more options and information see\n# http://rptl.io/configtxt\ndtparam=audio=on\narm_64bit=1\n",
        "issue.txt": "Raspberry Pi reference 2025-05-13\n",
        **(CLOUD_INIT_SEEDS if layout.codename == "trixie" else {}),
    }


def _run(*command: str) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _free_blocks(filesystem: Path) -> int:
    header = subprocess.run(["dumpe2fs", "-h", str(filesystem)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^Free blocks:\s+(\d+)", header, re.M)[1])


def _fill(filesystem: Path, leave_blocks: int) -> None:
    """Add /var/filler so that about `leave_blocks` 4 KiB blocks stay free."""
    with tempfile.NamedTemporaryFile() as filler:
        filler.truncate(0)
        filler.write(b"\xa5" * ((_free_blocks(filesystem) - leave_blocks - 32) * 4096))
        filler.flush()
        _run("debugfs", "-w", "-R", f"write {filler.name} /var/filler", str(filesystem))


def make_image(path: Path, codename: str = "bookworm", rpios: bool = True, root_size: int = ROOT_SIZE,
               full: bool = False, data_bytes: int = 0, without: tuple[str, ...] = (),
               extra: dict[str, str] | None = None) -> Path:
    """Write a Raspberry Pi OS-shaped image to `path`.

    `full` leaves the root file system with a few dozen free blocks, too few for a bake.
    `data_bytes` adds a file of random bytes, so the image holds as much data as a real one.
    `without` leaves those files out of the root file system; `extra` adds or replaces files.
    """
    layout = LAYOUTS[codename]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _root_tree(root, layout, rpios)
        for left_out in without:
            (root / left_out.lstrip("/")).unlink()
        for added, content in (extra or {}).items():
            _write(root, added, content)
        if data_bytes:
            (root / "opt").mkdir(exist_ok=True)
            with open(root / "opt/data.bin", "wb") as data, open("/dev/urandom", "rb") as random:
                for _ in range(data_bytes >> 20):
                    data.write(random.read(1 << 20))
        return assemble(path, layout, root, root_size, _boot_files(layout), full=full)


def assemble(path: Path, layout: Layout, root: Path, root_size: int, boot_files: dict[str, str],
             disk_id: str = DISK_ID, full: bool = False) -> Path:
    """Lay out `path` as pi-gen does: MBR, FAT32 bootfs holding `boot_files`, ext4 rootfs made from `root`."""
    root_start = layout.boot_start + layout.boot_sectors
    root_sectors = root_size // SECTOR
    with open(path, "wb") as f:
        f.truncate((root_start + root_sectors) * SECTOR)
    table = (f"label: dos\nlabel-id: {disk_id}\n"
             f"start={layout.boot_start}, size={layout.boot_sectors}, type=c\n"
             f"start={root_start}, size={root_sectors}, type=83\n")
    subprocess.run(["sfdisk", "--quiet", str(path)], input=table.encode(), check=True, stdout=subprocess.DEVNULL)
    _run("mkfs.fat", "-F", "32", "-s", "4", "-n", "bootfs", f"--offset={layout.boot_start}", str(path),
         str(layout.boot_sectors * SECTOR // 1024))
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        filesystem = Path(tmp) / "rootfs.ext4"
        _run("mkfs.ext4", "-q", "-F", "-L", "rootfs", "-O", layout.ext4_features, "-m", "0", "-b", "4096",
             "-d", str(root), str(filesystem), f"{root_size // 1024}k")
        if full:
            _fill(filesystem, leave_blocks=8)
        _run("dd", f"if={filesystem}", f"of={path}", "bs=1M", f"seek={root_start * SECTOR}", "oflag=seek_bytes",
             "conv=notrunc,sparse", "status=none")
        boot = Path(tmp) / "boot"
        boot.mkdir()
        for name, text in boot_files.items():
            (boot / name).write_text(text)
            _run("mcopy", "-i", f"{path}@@{layout.boot_start * SECTOR}", str(boot / name), f"::/{name}")
    return path
