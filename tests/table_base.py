"""A base image as a table: the links every Debian root has (as tests/rpios_image.py makes
them) and a few more, and the files plans read; what plans are played against in tests
that need no image."""

from __future__ import annotations

from builder.errors import Place
from builder.tree import Stat
from rpios_image import GROUP, LINKS, PASSWD

FOLDERS = ("/etc", "/etc/ssh", "/etc/ssl", "/etc/ssl/certs", "/usr", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib/ssl",
           "/var", "/run", "/run/lock", "/opt", "/boot", "/boot/firmware", "/home", "/home/pi", "/etc/sysctl.d")
BASE = {
    **{path: Stat("dir", 0o755) for path in FOLDERS},
    **{path: Stat("link", 0o777, target=target) for path, target in LINKS.items()},
    "/etc/hostname": Stat("file"),
    "/etc/ssh/sshd_config": Stat("file"),
    "/opt/ssh": Stat("link", 0o777, target="/etc/ssh"),  # absolute, into a folder pibake writes to
    "/opt/up": Stat("link", 0o777, target="../etc"),
    "/opt/loop": Stat("link", 0o777, target="/opt/loop"),
    "/opt/fw": Stat("link", 0o777, target="../boot/firmware"),
    "/opt/conf": Stat("link", 0o777, target="/etc/sysctl.d"),
    "/etc/passwd": Stat("file"),
    "/etc/group": Stat("file"),
}
CONTENT = {"/etc/passwd": PASSWD.encode(), "/etc/group": GROUP.encode()}
ORIGIN = Place(file="cluster.yaml", line=7, key="master.files[0]")


class TableBase:
    def lstat(self, path: str) -> Stat | None:
        return BASE.get(path)

    def read(self, path: str) -> bytes:
        return CONTENT.get(path, b"from the base\n")
