"""`pibake diff NODE`: what changed on a node since pibake baked it.

Two sides are compared: the image pibake baked for the node (output/NODE.img, read
with libguestfs) and the node as it is now (over ssh, or its card in a reader). What
is compared: the packages (dpkg's own table) and the files under the folders where a
person's changes live (/etc, /home, /root, /usr/local, /opt, /srv, /var/lib), without
logs, caches, apt's lists and what the system itself keeps changing as it runs
(systemd's and NetworkManager's state, dpkg's database, leases, machine ids, the host
keys Raspberry Pi OS makes on its first boot). Files a package brought with it are the
package's line, not lines of their own, unless they are its configuration files and
differ from what the package shipped. The packages pibake staged for first boot, and
their files, are pibake's own, and not shown.

A file that is not world-readable, or holds a private key, is shown by its path only.
"""

from __future__ import annotations

import hashlib
import posixpath
from fnmatch import fnmatchcase
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

FOLDERS = ("etc", "home", "root", "usr/local", "opt", "srv", "var/lib")
# What the system changes as it runs, or makes once on its first boot.
NOT_COMPARED = ("var/lib/apt", "var/lib/dpkg", "var/lib/systemd", "var/lib/NetworkManager", "var/lib/dhcp",
                "var/lib/misc", "var/lib/private", "var/lib/sudo", "var/lib/logrotate", "var/lib/pibake",
                "var/lib/ucf", "var/lib/polkit-1", "var/lib/dbus", "var/lib/man-db", "var/lib/cloud",
                "var/lib/avahi-autoipd", "var/lib/python", "var/lib/sgml-base", "var/lib/xml-core",
                "etc/machine-id", "etc/ld.so.cache", "etc/.pwd.lock", "etc/adjtime", "etc/fake-hwclock.data",
                "etc/ssh/ssh_host_*", "etc/resolv.conf", "etc/mtab", "home/*/.cache", "root/.cache",
                "home/*/.bash_history", "root/.bash_history", "home/*/.lesshst", "root/.lesshst",
                "home/*/.sudo_as_admin_successful", "home/*/.ansible", "home/*/.ssh/known_hosts")
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


@dataclass(frozen=True)
class File:
    kind: str  # f d l c b p s
    mode: int  # permission bits
    uid: int
    gid: int
    sha256: str  # regular files; a symlink's target
    secret: bool


@dataclass(frozen=True)
class Change:
    what: str  # "package" or "file"
    how: str  # installed, removed, upgraded; added, removed, changed
    name: str  # package name, or absolute path
    detail: str = ""  # versions; what changed of a file (content, mode, owner, kind)


@dataclass(frozen=True)
class Scope:
    """What a side holds: the files under `folders` (relative to /; "" is all of it), but for `skipped`."""

    folders: tuple[str, ...] = FOLDERS
    skipped: tuple[str, ...] = NOT_COMPARED

    def excluded(self, path: str) -> bool:
        return any(fnmatchcase(path, pattern) or fnmatchcase(path, pattern + "/*") for pattern in self.skipped)

    def holds(self, path: str) -> bool:
        return bool(path) and not self.excluded(path) and path.startswith(self.folders)


DIFF = Scope()
EVERYTHING = Scope(("",), ())  # pibake verify: every file of the image, its boot partition's too


def excluded(path: str) -> bool:
    """`path` ("etc/hostname", no leading slash) is one the diff does not compare."""
    return DIFF.excluded(path)


@dataclass
class Side:
    """One side of the comparison: files, dpkg's status, and each package's file list."""

    files: dict[str, File]
    md5s: dict[str, str]  # path -> md5 of regular files (conffiles are compared by it)
    status: str
    lists: dict[str, list[str]]  # package -> its files, relative to /
    first_boot: dict[str, File] | None = None  # as pibake's first boot left them (firstboot.list), if it did


# Written by pibake's first boot (overlays/common/usr/local/lib/pibake/firstboot) in
# NODE_LIST's format, its sections marked "firstboot".
FIRST_BOOT_LIST = "var/lib/pibake/firstboot.list"


def side_from_tar(path: Path, prefix: str = "", scope: Scope = DIFF) -> Side:
    """A side from a tar stream of the folders, dpkg's status and its .list files (names relative to /,
    or to `prefix` when the stream is of one folder)."""
    side = Side({}, {}, "", {})
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            name = posixpath.normpath(posixpath.join(prefix, member.name)).lstrip("/")
            name = "" if name == "." else name
            if name == "var/lib/dpkg/status" and member.isreg():
                side.status = _text(tar, member)
                continue
            if name.startswith("var/lib/dpkg/info/") and name.endswith(".list") and member.isreg():
                package = name[len("var/lib/dpkg/info/"):-len(".list")].split(":")[0]
                side.lists.setdefault(package, []).extend(
                    line.lstrip("/") for line in _text(tar, member).splitlines() if line.startswith("/"))
                continue
            if not scope.holds(name):
                continue
            _add(side, tar, member, name, posixpath.normpath(posixpath.join(prefix, member.linkname)).lstrip("/"))
    return side


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    f = tar.extractfile(member)
    assert f is not None
    return f.read(MAX_TEXT).decode("utf-8", "replace")


MAX_TEXT = 64 << 20


def _add(side: Side, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, hard_target: str) -> None:
    digest, secret = "", not member.mode & 0o004
    if member.isreg():
        f = tar.extractfile(member)
        assert f is not None
        h, md5, tail = hashlib.sha256(), hashlib.md5(usedforsecurity=False), b""
        while chunk := f.read(1 << 20):
            h.update(chunk)
            md5.update(chunk)
            secret = secret or bool(PRIVATE_KEY.search(tail + chunk))
            tail = chunk[-64:]
        digest = h.hexdigest()
        side.md5s[name] = md5.hexdigest()
    elif member.islnk():
        base = side.files.get(hard_target)
        digest = base.sha256 if base else ""
        side.md5s[name] = side.md5s.get(hard_target, "")
    elif member.issym():
        digest = member.linkname
    kind = "f" if member.isreg() or member.islnk() else "d" if member.isdir() else "l" if member.issym() else \
        "c" if member.ischr() else "b" if member.isblk() else "p"
    side.files[name] = File(kind, member.mode & 0o7777, member.uid, member.gid, digest, secret)


def packages_from_status(status: str) -> dict[str, str]:
    """Installed packages and their versions, from dpkg's status file."""
    out: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out[fields["Package"]] = fields.get("Version", "")
    return out


def conffiles_from_status(status: str, packages: set[str]) -> dict[str, str]:
    """Configuration files of `packages` and the md5 each shipped with."""
    out: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        name = re.search(r"^Package: (.*)$", stanza, re.M)
        block = re.search(r"^Conffiles:\n((?: .*\n?)*)", stanza, re.M)
        if name and block and name[1] in packages:
            for line in block[1].splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    out[parts[0].lstrip("/")] = parts[1]
    return out


def compare(baked: Side, now: Side, staged: set[str]) -> list[Change]:
    """What changed from the baked side to the node's; `staged`: the packages pibake staged for first boot."""
    baked_packages, now_packages = packages_from_status(baked.status), packages_from_status(now.status)
    moved = {p for p in now_packages.keys() | baked_packages.keys() if now_packages.get(p) != baked_packages.get(p)}
    owned = {path: p for p in moved for path in now.lists.get(p, []) + baked.lists.get(p, [])}
    conffiles = conffiles_from_status(now.status, moved)
    baked_files, now_files, md5s = baked.files, now.files, now.md5s
    changes = []
    for name in sorted(baked_packages.keys() | now_packages.keys()):
        old, new = baked_packages.get(name), now_packages.get(name)
        if old == new or (old is None and name in staged):
            continue
        if old is None:
            changes.append(Change("package", "installed", name, str(new)))
        elif new is None:
            changes.append(Change("package", "removed", name, old))
        else:
            changes.append(Change("package", "upgraded", name, f"{old} -> {new}"))
    first_boot = now.first_boot
    for path in sorted(baked_files.keys() | now_files.keys()):
        old_file, new_file = baked_files.get(path), now_files.get(path)
        if old_file == new_file:
            continue
        if first_boot is not None and _same(first_boot.get(path), new_file):
            continue  # as pibake's first boot left it (its packages' installation, Raspberry Pi OS's own first boot)
        if path in owned:
            if path not in conffiles or md5s.get(path) == conffiles[path]:
                continue  # the package's own file, as it shipped it
        if old_file is None:
            changes.append(Change("file", "added", "/" + path, _kind_name(new_file)))
        elif new_file is None:
            changes.append(Change("file", "removed", "/" + path, _kind_name(old_file)))
        else:
            what = [label for label, differs in (("kind", old_file.kind != new_file.kind),
                                                  ("content", old_file.sha256 != new_file.sha256),
                                                  ("mode", old_file.mode != new_file.mode),
                                                  ("owner", (old_file.uid, old_file.gid) != (new_file.uid, new_file.gid)))
                    if differs]
            if what == ["content"] and old_file.kind == "d":
                continue
            if what:
                changes.append(Change("file", "changed", "/" + path, ", ".join(what)))
    return changes


def _same(a: File | None, b: File | None) -> bool:
    """The same entry, whether or not its content was searched for a private key."""
    return a is None and b is None or a is not None and b is not None and (a.kind, a.mode, a.uid, a.gid, a.sha256) == \
        (b.kind, b.mode, b.uid, b.gid, b.sha256)


def _kind_name(f: File | None) -> str:
    if f is None:
        return ""
    name = {"f": "file", "d": "folder", "l": "symlink", "c": "device", "b": "device", "p": "fifo", "s": "socket"}[f.kind]
    return f"{name}, secret: path only" if f.secret else name


def as_json(changes: list[Change]) -> list[dict]:
    return [asdict(c) for c in changes]


# ------------------------------------------------------------ gathering the two sides

# The node lists its folders' entries (type, mode, owner, size, a link's target, path:
# NUL-separated fields, so no name can pass for another entry), then each regular
# file's sha256 and md5 and the names of those that hold a private key.
NODE_LIST = r"""
mark=$1
shift
prune=""
for pattern in "$@"; do prune="$prune -path ./$pattern -o"; done
list() { find ./etc ./home ./root ./usr/local ./opt ./srv ./var/lib -xdev \( $prune -false \) -prune -o "$@" 2>/dev/null; }
set -f
echo "== $mark entries"
list -printf '%y %m %U %G\0%l\0%p\0'
echo "== $mark sha256"
list -type f -print0 | xargs -0r sha256sum -z
echo "== $mark md5"
list -type f -path './etc/*' -print0 | xargs -0r md5sum -z
echo "== $mark secret"
list -type f -print0 | xargs -0r grep -lsZ -e '-----BEGIN [A-Z ]*PRIVATE KEY-----'
echo "== $mark status"
cat /mnt/var/lib/dpkg/status
echo "== $mark firstboot"
[ -f ./var/lib/pibake/firstboot.list ] && head -c 67108864 ./var/lib/pibake/firstboot.list
echo "== $mark lists"
set +f
for f in /mnt/var/lib/dpkg/info/*.list; do printf '%s\0' "${f##*/}"; cat "$f"; printf '\0'; done
"""
MAX_ANSWER = 256 << 20


def side_from_node(answer: bytes, mark: str) -> Side:
    """The node's side, from NODE_LIST's answer; `mark`: the random word its section heads carry."""
    sections: dict[str, bytes] = {}
    pieces = re.split(rb"== " + re.escape(mark.encode()) + rb" (entries|sha256|md5|secret|status|firstboot|lists)\n", answer)
    for key, value in zip(pieces[1::2], pieces[2::2]):
        sections[key.decode()] = value
    side = Side({}, {}, sections.get("status", b"").decode("utf-8", "replace"), {})
    fields = sections.get("entries", b"").split(b"\0")
    sums = _sums(sections.get("sha256", b""))
    md5s = _sums(sections.get("md5", b""))
    secret = {_rel(n) for n in sections.get("secret", b"").split(b"\0") if n}
    for i in range(0, len(fields) - 2, 3):
        head, target, name = fields[i].split(), fields[i + 1], _rel(fields[i + 2])
        if len(head) != 4 or not name or excluded(name):
            continue
        try:
            kind, mode, uid, gid = head[0].decode(), int(head[1], 8), int(head[2]), int(head[3])
        except ValueError:
            continue
        digest = sums.get(name, "") if kind == "f" else target.decode("utf-8", "surrogateescape") if kind == "l" else ""
        side.files[name] = File(kind, mode, uid, gid, digest, not mode & 0o004 or name in secret)
        if name in md5s:
            side.md5s[name] = md5s[name]
    if sections.get("firstboot"):
        side.first_boot = side_from_node(sections["firstboot"][:MAX_TEXT], "firstboot").files
    items = sections.get("lists", b"").split(b"\0")
    for i in range(0, len(items) - 1, 2):
        package = items[i].decode("utf-8", "replace").removesuffix(".list").split(":")[0]
        side.lists[package] = [line.lstrip("/") for line in items[i + 1].decode("utf-8", "replace").splitlines()
                               if line.startswith("/")]
    return side


def _rel(name: bytes) -> str:
    path = posixpath.normpath(name.decode("utf-8", "surrogateescape")).lstrip("/")
    return "" if path == "." else path


def _sums(data: bytes) -> dict[str, str]:
    out = {}
    for line in data.split(b"\0"):
        digest, sep, name = line.partition(b"  ")
        if sep and re.fullmatch(rb"[0-9a-f]{32}|[0-9a-f]{64}", digest):
            out[_rel(name)] = digest.decode()
    return out


def side_from_image(g, device: str, scope: Scope = DIFF, boot: tuple[str, str] | None = None) -> Side:
    """A side read through libguestfs from an image's root file system (`device`), mounted read-only here,
    and its boot partition (device, folder) when given."""
    import tempfile
    side = Side({}, {}, "", {})
    g.mount_ro(device, "/")
    try:
        if boot is not None:
            g.mount_ro(boot[0], boot[1])
        with tempfile.TemporaryDirectory(prefix="pibake-diff-") as tmp:
            for folder in (*scope.folders, *(("var/lib/dpkg/info",) if "" not in scope.folders else ())):
                if not g.is_dir("/" + folder, followsymlinks=False):
                    continue
                inside = [p[len(folder) + 1:] for p in scope.skipped if p.startswith(folder + "/")]
                stream = Path(tmp) / "part.tar"
                g.tar_out("/" + folder, str(stream), numericowner=True,
                          excludes=[] if folder.endswith("info") else ["./" + p for p in inside])
                part = side_from_tar(stream, prefix=folder, scope=scope)
                side.files.update(part.files)
                side.md5s.update(part.md5s)
                side.lists.update(part.lists)
            if g.is_file("/var/lib/dpkg/status"):
                side.status = bytes(g.read_file("/var/lib/dpkg/status"))[:MAX_TEXT].decode("utf-8", "replace")
            if g.is_file("/" + FIRST_BOOT_LIST, followsymlinks=False) and g.filesize("/" + FIRST_BOOT_LIST) <= MAX_TEXT:
                side.first_boot = side_from_node(bytes(g.read_file("/" + FIRST_BOOT_LIST)), "firstboot").files
    finally:
        g.umount_all()
    return side


def staged_packages(g, device: str) -> set[str]:
    """What pibake staged for first boot in an image it baked: the list, and every .deb beside it."""
    names: set[str] = set()
    g.mount_ro(device, "/")
    try:
        if g.is_file("/etc/pibake/packages"):
            names |= {line.strip() for line in bytes(g.read_file("/etc/pibake/packages")).decode().splitlines()
                      if line.strip() and not line.startswith("#")}
        if g.is_dir("/var/cache/pibake/debs"):
            names |= {name.split("_")[0] for name in g.ls("/var/cache/pibake/debs") if name.endswith(".deb")}
    finally:
        g.umount_all()
    return names
