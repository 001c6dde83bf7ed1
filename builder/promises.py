"""What a profile's `files:` entry may not undo without saying so.

pibake promises SSH logins by key only (and only with the profile's keys), sudo rights
as the profile says, a master
whose firewall is loaded before it forwards, a first boot that applies what was baked
and nothing else, units enabled only when asked, and no file on a node that lets
anyone change it or run it as another user. A `files:` entry that would break one of
them is refused with one line that names the entry and the promise; `allow: [NAME]` on
the entry accepts it knowingly, and `pibake plan` then shows the entry in full.
Checked on the path as it resolves inside the image (formats of the node's own tools:
sshd reads all of /etc/ssh, systemd every `.wants/` folder).
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Promise:
    name: str  # what `allow:` names
    promise: str  # as a refusal says it
    paths: tuple[str, ...] = ()  # fnmatch patterns of resolved destinations that could break it ('*' crosses '/')


# Raspberry Pi OS's and Raspberry Pi Imager's first-boot hooks on the boot partition
# (raspberrypi-sys-mods, userconf-pi, cloud-init's NoCloud seed, Imager's firstrun.sh),
# and the kernel command line, which can name another init. FAT does not tell case apart.
BOOT_HOOKS = ("custom.toml", "userconf.txt", "userconf", "firstrun.sh", "ssh", "ssh.txt", "wpa_supplicant.conf",
              "user-data", "meta-data", "network-config", "cmdline.txt", "config.txt", "autoboot.txt")
_SYSTEMD = ("/etc/systemd", "/usr/local/lib/systemd", "/usr/lib/systemd", "/lib/systemd", "*/.config/systemd")

PROMISES = (
    Promise("sshd", "SSH logins by key only (sshd's configuration and how it is started)",
            ("/etc/ssh/*", "/etc/default/ssh", "/etc/pam.d/sshd",
             *(f"{folder}/{unit}" for folder in _SYSTEMD for unit in (
                 "system/ssh.*", "system/sshd.*", "system/ssh@*", "system/service.d/*", "system/socket.d/*",
                 "system.control/ssh*")))),
    Promise("login-keys", "logins only with the profile's ssh_keys (a .ssh folder is a login's keys)", ("*/.ssh/*",)),
    Promise("sudo", "sudo rights as user.sudo says", ("/etc/sudoers", "/etc/sudoers.d/*")),
    Promise("boot-hooks", "a first boot that applies what pibake baked and nothing else",
            tuple(f"{boot}/{name}" for boot in ("/boot", "/boot/firmware") for name in BOOT_HOOKS)),
    Promise("firewall", "the master's firewall, loaded before it forwards",
            ("/etc/sysctl.conf", "/etc/sysctl.d/*", "/usr/lib/sysctl.d/*", "/lib/sysctl.d/*", "/usr/local/lib/sysctl.d/*",
             "/etc/iptables/*", "/etc/nftables.conf", "*/systemd/system/pibake-*", "/etc/pibake/*",
             "/usr/local/sbin/pibake-*", "/usr/local/lib/pibake/*")),
    # What starts a unit, or a program, at boot or login without `systemctl enable`: links
    # and drop-ins that add dependencies, the control folder, generators, rc.local.
    Promise("units", "units enabled only when asked (`enable: true`)",
            ("*.wants/*", "*.requires/*", "*.upholds/*", "*/systemd/*.target.d/*", "*/systemd/system.control/*",
             "*/systemd/user.control/*", "*/systemd/system-generators/*", "*/systemd/user-generators/*",
             "/etc/rc.local")),
    Promise("setuid", "no setuid or setgid file"),
    Promise("world-writable", "no file that anyone on the node can change"),
)
NAMES = tuple(p.name for p in PROMISES)
_BY_NAME = {p.name: p for p in PROMISES}


def by_path(path: str) -> Optional[Promise]:
    """The promise a file at `path` (resolved in the image) could break, if any."""
    folder, name = posixpath.split(path)
    if folder in ("/boot", "/boot/firmware"):
        # FAT's long names: any case, and trailing dots and spaces dropped (`cmdline.txt.` is cmdline.txt).
        path = f"{folder}/{name.lower().rstrip('. ')}"
    return next((p for p in PROMISES if any(fnmatch.fnmatchcase(path, pattern) for pattern in p.paths)), None)


def by_mode(mode: int) -> Optional[Promise]:
    if mode & 0o6000:
        return _BY_NAME["setuid"]
    if mode & 0o002:
        return _BY_NAME["world-writable"]
    return None


def refusal(path: str, promise: Promise) -> str:
    return (f"{path} would break pibake's promise of {promise.promise}; if that is meant, add "
            f"`allow: [{promise.name}]` to the entry")
