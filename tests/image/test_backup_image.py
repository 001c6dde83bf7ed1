"""pibake backup, end to end but for ssh: the node's own scripts (listing, tar, the services'
hold) run here in a shell, as sshd would run them, against folders of this machine
that stand for the node's root and boot file systems; the image is made by the real
libguestfs and checked by the real e2fsck and fsck.fat, and read back with libguestfs.

The card's description is what the node's tools (sfdisk, dumpe2fs, the FAT boot
sector) say of a card image the test makes with Raspberry Pi OS's layout. A live
node, over ssh, is tests/boot/test_boot.py's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import guestfs
import pytest

from builder import backup, layout
from builder.errors import BuildError, InputError
from builder.profile import load
from backup_node import LocalNode, card_facts
from conftest import write_profile

pytestmark = pytest.mark.image

MIB = 1 << 20
FIRST_BOOT_LIST = Path(__file__).resolve().parents[2] / "overlays/common/usr/local/lib/pibake/firstboot-list"


def _sh(*command: str, cwd: Path | None = None) -> None:
    subprocess.run(command, check=True, cwd=cwd)


def make_node_tree(root: Path, boot: Path) -> None:
    """What a node holds: every kind of file, and what a backup must not take."""
    for folder in ("etc", "srv/empty", "proc", "sys", "dev", "run", "tmp", "var", "boot/firmware", "home/pi"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("master\n")
    (root / "srv/data").write_bytes(b"data " * 2000)
    (root / "srv/big").write_bytes(os.urandom(8 * MIB))
    os.link(root / "srv/data", root / "srv/hard")
    os.symlink("../etc/hostname", root / "srv/link")
    _sh("mknod", str(root / "srv/null"), "c", "1", "3")
    os.mkfifo(root / "srv/fifo")
    with open(root / "srv/sparse", "wb") as f:
        f.truncate(64 * MIB)
        f.write(b"head")
        f.seek(32 * MIB)
        f.write(b"middle")
    (root / "srv/ping").write_bytes(b"\x7fELF pretend")
    _sh("setcap", "cap_net_raw+ep", str(root / "srv/ping"))
    _sh("setfattr", "-n", "user.note", "-v", "kept", str(root / "srv/data"))
    _sh("setfacl", "-m", "u:1234:r", str(root / "srv/data"))
    (root / "srv/new\nline \\ name").write_text("odd name\n")
    (root / "home/pi/secret").write_text("mine\n")
    os.chown(root / "home/pi", 1000, 1000)
    os.chown(root / "home/pi/secret", 1000, 1000)
    os.chmod(root / "home/pi/secret", 0o600)
    os.chmod(root / "srv/ping", 0o4755)
    (root / "tmp/scratch").write_text("not backed up\n")
    (root / "run/pid").write_text("not backed up\n")
    (root / "var/swap").write_bytes(b"\0" * 4096)  # dphys-swapfile's: made again at boot
    (boot / "cmdline.txt").write_text("console=serial0,115200 root=PARTUUID=5e3da4a0-02 rootfstype=ext4\n")
    (boot / "overlays").mkdir(exist_ok=True)
    (boot / "overlays/x.dtbo").write_bytes(b"\xd0\x0d" * 100)


@pytest.fixture(scope="module")
def fake_sudo(tmp_path_factory: pytest.TempPathFactory):
    """`sudo -n` on the stand-in node: the test runs as root already, and sudo is not under test."""
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    (bin_dir / "sudo").chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old}"
    yield
    os.environ["PATH"] = old


@pytest.fixture
def node(tmp_path: Path, fake_sudo) -> dict:
    root, boot = tmp_path / "node-root", tmp_path / "node-boot"
    root.mkdir()
    boot.mkdir()
    make_node_tree(root, boot)
    card = tmp_path / "card.img"  # the node's own card: Raspberry Pi OS's layout, 2 GiB
    card_layout = layout.Layout("dos", "0x5e3da4a0", (
        layout.Partition(1, 8192, 1048576, "c", "", "/boot/firmware", layout.Fat("5de4665c", "bootfs", 32, 1)),
        layout.Partition(2, 1056768, 3137536, "83", "", "/", layout.Ext4(
            "56f80fa2-e005-4cca-86e6-19da1069914d", "rootfs", ("has_journal", "ext_attr", "resize_inode", "dir_index",
                                                              "filetype", "extent", "flex_bg", "sparse_super", "large_file",
                                                              "huge_file", "dir_nlink", "extra_isize", "metadata_csum"),
            4096, 256, 5))), 2 << 30)
    layout.make_empty(card, card_layout)
    output = tmp_path / "output"
    output.mkdir()
    (output / "ssh_config").write_text("# the stand-in node is reached by a local shell\n")
    profile = load(write_profile(tmp_path, "workers:\n  count: 1\nmaster:\n  backup:\n    stop: [pibake-test-none]\n"))
    log: list[str] = []
    said = {"facts": card_facts(card, {"boot": (1 * MIB, 0), "root": (80 * MIB, 50)})}  # what the node says, for now
    connect = lambda out, name, folder: LocalNode(out, name, folder, mounts={"/": root, "/boot/firmware": boot},  # noqa: E731
                                                  facts=said["facts"], log=log)
    return {"root": root, "boot": boot, "output": output, "profile": profile, "connect": connect, "log": log, "card": card,
            "said": said}


def _clock(*times: str):
    stamps = iter(datetime.datetime.fromisoformat(t).replace(tzinfo=datetime.timezone.utc) for t in times)
    return lambda: next(stamps)


def _read_back(*images: Path, read=None) -> list[dict]:
    """What each image holds (by `read(g, device)`, _read_one by default), read with one libguestfs launch."""
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(["force_tcg"])
    for image in images:
        g.add_drive_opts(str(image), format="raw", readonly=True)
    g.launch()
    try:
        return [(read or _read_one)(g, device) for device in g.list_devices()]
    finally:
        g.close()


def _read_one(g, disk: str) -> dict:
    boot, root = f"{disk}1", f"{disk}2"
    got = {"uuid": g.vfs_uuid(root), "label": g.vfs_label(root), "boot_uuid": g.vfs_uuid(boot), "boot_label": g.vfs_label(boot)}
    g.mount_ro(root, "/")
    g.mount_ro(boot, "/boot/firmware")
    try:
        got["stat"] = {p: g.lstatns(p) for p in ("/srv/data", "/srv/hard", "/srv/null", "/srv/fifo", "/srv/ping",
                                                   "/srv/sparse", "/home/pi/secret", "/srv/empty", "/tmp", "/proc")
                       if g.exists(p)}
        got["xattrs"] = {p: {a["attrname"]: bytes(a["attrval"]) for a in g.lgetxattrs(p)} for p in ("/srv/data", "/srv/ping")
                         if g.exists(p)}
        got["link"] = g.readlink("/srv/link")
        got["files"] = {p: g.read_file(p) for p in ("/etc/hostname", "/srv/new\nline \\ name", "/boot/firmware/cmdline.txt",
                                                      "/boot/firmware/overlays/x.dtbo")}
        got["sparse"] = g.pread("/srv/sparse", 6, 32 * MIB)
        got["ls"] = {d: sorted(g.ls(d)) for d in ("/tmp", "/run", "/proc", "/srv/empty", "/var") if g.is_dir(d)}
        got["exists"] = {p: g.exists(p) for p in ("/srv/gone", "/srv/added", "/tmp/scratch")}
    finally:
        g.umount_all()
    return got


def test_a_backup_holds_the_node_s_files_as_they_are_in_its_card_s_layout(node: dict, tmp_path: Path) -> None:
    result = backup.backup(node["profile"], node["profile"].master.node, node["output"],
                           now=_clock("2026-12-05T10:00:00"), connect=node["connect"])
    image = node["output"] / "backups/master/master-20261205T100000Z.img"
    assert result.path == image and not result.incremental and not result.report
    # named only once checked; nothing else left behind; owner-only (it holds the node's keys)
    folder = image.parent
    assert sorted(p.name for p in folder.iterdir()) == ["backups.json", image.name, image.name + ".bmap",
                                                          image.name + ".sha256", "master-20261205T100000Z.state.json.gz"]
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o600"}
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == (folder / (image.name + ".sha256")).read_text().split()[0]
    # sized by the data, not the card: 80 MiB used, 512 MiB headroom, after the boot partition
    assert image.stat().st_size == (1056768 * 512 + 592 * MIB)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True).stdout)
    assert table["partitiontable"]["id"] == "0x5e3da4a0"
    assert [(p["start"], p["type"]) for p in table["partitiontable"]["partitions"]] == [(8192, "c"), (1056768, "83")]

    [got] = _read_back(image)
    assert (got["uuid"], got["label"], got["boot_uuid"], got["boot_label"]) == (
        "56f80fa2-e005-4cca-86e6-19da1069914d", "rootfs", "5DE4-665C", "bootfs")
    st = got["stat"]
    assert st["/srv/data"]["st_ino"] == st["/srv/hard"]["st_ino"] and st["/srv/data"]["st_nlink"] == 2
    assert st["/srv/null"]["st_mode"] & 0o170000 == 0o020000 and st["/srv/null"]["st_rdev"] == os.makedev(1, 3)
    assert st["/srv/fifo"]["st_mode"] & 0o170000 == 0o010000
    assert st["/srv/ping"]["st_mode"] & 0o7777 == 0o4755
    assert (st["/home/pi/secret"]["st_uid"], st["/home/pi/secret"]["st_mode"] & 0o777) == (1000, 0o600)
    assert st["/srv/sparse"]["st_size"] == 64 * MIB and st["/srv/sparse"]["st_blocks"] * 512 < MIB  # holes stay holes
    assert got["sparse"] == b"middle"
    assert got["xattrs"]["/srv/ping"]["security.capability"] == _xattr(node["root"] / "srv/ping", "security.capability")
    assert got["xattrs"]["/srv/data"]["user.note"] == b"kept"
    assert got["xattrs"]["/srv/data"]["system.posix_acl_access"] == _xattr(node["root"] / "srv/data",
                                                                             "system.posix_acl_access")
    assert got["link"] == "../etc/hostname"
    assert got["files"]["/srv/new\nline \\ name"] == b"odd name\n"
    assert got["files"]["/boot/firmware/overlays/x.dtbo"] == b"\xd0\x0d" * 100
    # what is mounted afresh at boot: the folders are kept, empty; the swap file is not taken
    assert got["ls"] == {"/tmp": [], "/run": [], "/proc": [], "/srv/empty": [], "/var": []}
    records = json.loads((folder / "backups.json").read_text())["backups"]
    assert [(r["name"], r["incremental"]) for r in records] == [(image.name, False)]


def _xattr(path: Path, name: str) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


def test_the_next_backup_sends_only_what_changed_and_is_whole_on_its_own(node: dict) -> None:
    profile, master, output = node["profile"], node["profile"].master.node, node["output"]
    clock = _clock("2026-12-05T10:00:00", "2026-12-05T11:00:00", "2026-12-05T12:00:00", "2026-12-05T13:00:00")
    first = backup.backup(profile, master, output, now=clock, connect=node["connect"])
    root = node["root"]
    change = os.urandom(3 * MIB)
    (root / "srv/added").write_bytes(change)
    (root / "srv/data").unlink()  # its hard link stays
    (root / "srv/empty").rmdir()
    (root / "srv/empty").write_text("a file where a folder was\n")
    (root / "etc/hostname").write_text("master2\n")
    # The node's root file system now uses 100 MiB more: the image grows by as much, and its file system fills it.
    node["said"]["facts"] = card_facts(node["card"], {"boot": (1 * MIB, 0), "root": (180 * MIB, 50)})

    second = backup.backup(profile, master, output, now=clock, connect=node["connect"])
    assert second.incremental
    assert second.path.stat().st_size == first.path.stat().st_size + 100 * MIB
    dump = subprocess.run(["dumpe2fs", "-h", f"{second.path}?offset={1056768 * 512}"], check=True, capture_output=True,
                          text=True).stdout
    blocks = int(re.search(r"^Block count:\s+(\d+)", dump, re.M)[1])  # type: ignore[index]
    assert blocks * 4096 == second.path.stat().st_size - 1056768 * 512
    # what changed (3 MiB) and the listings, not the 8 MiB that did not change
    assert second.received < len(change) + 256 * 1024, second.received
    assert first.received > 8 * MIB
    got, was = _read_back(second.path, first.path)
    assert got["files"]["/etc/hostname"] == b"master2\n"
    assert got["exists"] == {"/srv/gone": False, "/srv/added": True, "/tmp/scratch": False}
    assert got["stat"]["/srv/hard"]["st_nlink"] == 1 and "/srv/data" not in got["stat"]
    assert "/srv/empty" not in got["ls"] and got["stat"]["/srv/empty"]["st_size"] == 26
    # the first backup is as it was
    assert was["files"]["/etc/hostname"] == b"master\n"
    # --keep: only the newest stay, with their companions
    third = backup.backup(profile, master, output, keep=1, now=clock, connect=node["connect"])
    assert sorted(p.name for p in third.path.parent.iterdir()) == sorted(
        ["backups.json", third.path.name, third.path.name + ".bmap", third.path.name + ".sha256",
         "master-20261205T120000Z.state.json.gz"])
    assert third.received < 256 * 1024  # nothing changed

    # A file tar says changed while it read it is read once more; still changing, it is named.
    (root / "srv/busy").write_text("being written\n")

    class StillChanging(LocalNode):
        """tar says, each time it reads the root file system, that /srv/busy changed as it read it."""
        reads = 0

        def popen(self, remote: str, **kwargs):
            if "tar --create" in remote and str(root) in remote:
                StillChanging.reads += 1
                remote = "{ " + remote + "; }; echo 'tar: \"./srv/busy\": file changed as we read it' >&2"
            return super().popen(remote, **kwargs)

    changing = lambda out, name, folder: StillChanging(out, name, folder, mounts={"/": root, "/boot/firmware": node["boot"]},  # noqa: E731
                                                       facts=node["said"]["facts"], log=[])
    fourth = backup.backup(profile, master, output, now=clock, connect=changing)
    assert StillChanging.reads == 2 and fourth.report == ("/srv/busy changed while it was read",), fourth.report


def test_backup_needs_sudo_without_a_password(tmp_path: Path) -> None:
    profile = load(write_profile(tmp_path, "user:\n  sudo: none\n"))
    (tmp_path / "output").mkdir()
    with pytest.raises(InputError, match="sudo without a password: this profile has user.sudo: none"):
        backup.backup(profile, profile.master.node, tmp_path / "output")


def test_a_backup_restores_onto_a_smaller_card_and_a_card_in_a_reader_is_backed_up_offline(node: dict, tmp_path: Path,
                                                                                             loops) -> None:
    from conftest import run_pibake
    profile, master, output = node["profile"], node["profile"].master.node, node["output"]
    taken = backup.backup(profile, master, output, now=_clock("2026-12-05T10:00:00"), connect=node["connect"])
    # the node's card was 2 GiB; this one is smaller, and larger than the backup
    card = loops.make(1536 * MIB)
    assert taken.path.stat().st_size < 1536 * MIB < 2 << 30
    wrong = run_pibake("flash", "master", card.device, "--backup", str(tmp_path / "elsewhere.img"), "--yes", "--force",
                       "-o", str(output), cwd=tmp_path)
    assert wrong.code == 2 and "is not a backup of master" in wrong.stderr and "Traceback" not in wrong.output
    done = run_pibake("flash", "master", card.device, "--backup", "latest", "--yes", "--force", "-o", str(output),
                      cwd=tmp_path, timeout=600)
    assert done.code == 0, done.output
    assert "read back" in done.stdout and "grew the root file system to fill the card (1.00 GiB)" in done.stdout
    table = json.loads(subprocess.run(["sfdisk", "--json", card.device], check=True, capture_output=True).stdout)
    root = table["partitiontable"]["partitions"][1]
    assert table["partitiontable"]["id"] == "0x5e3da4a0" and root["start"] + root["size"] == 1536 * MIB // 512
    fsck = subprocess.run(["e2fsck", "-fn", f"{card.device}?offset={root['start'] * 512}"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # again onto the same card: only what differs is written, and it fills the card again
    again = run_pibake("flash", "master", card.device, "--backup", str(taken.path), "--yes", "--force", "-o", str(output),
                       cwd=tmp_path, timeout=600)
    assert again.code == 0 and "that differed" in again.stdout and "grew the root file system" in again.stdout, again.output

    # The card, in a reader: read-only, and only what its file systems use is read.
    stat = Path("/sys/block") / Path(card.device).name / "stat"
    read_before = int(stat.read_text().split()[2]) * 512
    read_ahead = subprocess.run(["blockdev", "--getra", card.device], capture_output=True, text=True, check=True).stdout
    offline = run_pibake("backup", "master", "--device", card.device, "--force", "-o", str(output),
                         "--profiles", str(tmp_path / "cluster.yaml"), cwd=tmp_path, timeout=900)
    assert offline.code == 0, offline.output
    read = int(stat.read_text().split()[2]) * 512 - read_before
    assert subprocess.run(["blockdev", "--getra", card.device], capture_output=True, text=True).stdout == read_ahead
    path = Path(offline.stdout.splitlines()[-1])
    assert path.parent == taken.path.parent and path != taken.path
    fields = layout.fields(subprocess.run(["dumpe2fs", "-h", f"{card.device}?offset={root['start'] * 512}"],
                                          capture_output=True, text=True, check=True).stdout)
    ext4_used = (int(fields["Block count"]) - int(fields["Free blocks"])) * 4096
    print(f"offline backup: {read / MIB:.1f} MiB read, {ext4_used / MIB:.1f} MiB used by the root file system")
    assert read < ext4_used * 1.05 + 8 * MIB, (read, ext4_used)

    want, on_card, got = _read_back(taken.path, card.backing, path)
    for held in (on_card, got):
        for key in ("uuid", "label", "boot_uuid", "boot_label", "xattrs", "link", "files", "ls"):
            assert held[key] == want[key], key
        assert {p: (s["st_mode"], s["st_uid"], s["st_nlink"]) for p, s in held["stat"].items()} == \
            {p: (s["st_mode"], s["st_uid"], s["st_nlink"]) for p, s in want["stat"].items()}

    # a card that is mounted is refused, as pibake flash refuses it
    mounted = loops.make(64 * MIB)
    loops.mount(mounted)
    refused = run_pibake("backup", "master", "--device", mounted.device, "--force", "-o", str(output),
                         "--profiles", str(tmp_path / "cluster.yaml"), cwd=tmp_path)
    assert refused.code != 0 and "mounted" in refused.stderr and "Traceback" not in refused.output, refused.output


def test_a_dropped_connection_ctrl_c_or_a_full_disk_leave_no_backup_under_a_final_name(node: dict, tmp_path: Path) -> None:
    profile, master, output = node["profile"], node["profile"].master.node, node["output"]
    first = backup.backup(profile, master, output, now=_clock("2026-12-05T10:00:00"), connect=node["connect"])
    before = {p.name: p.read_bytes() for p in first.path.parent.iterdir()}

    class Drops(LocalNode):
        def popen(self, remote: str, **kwargs):
            if "tar --create" in remote:  # the connection drops while the files come
                remote = "head -c 100000 /dev/urandom; exit 255"
            return super().popen(remote, **kwargs)

    dropping = lambda out, name, folder: Drops(out, name, folder, mounts={"/": node["root"], "/boot/firmware": node["boot"]},  # noqa: E731
                                               facts=node["connect"](out, name, folder).facts, log=[])
    (node["root"] / "srv/added").write_text("new\n")
    with pytest.raises(BuildError, match=r"master: reading /\S* stopped: ssh exit 255"):
        backup.backup(profile, master, output, now=_clock("2026-12-05T10:30:00"), connect=dropping)
    assert {p.name: p.read_bytes() for p in first.path.parent.iterdir()} == before

    class CtrlC(LocalNode):
        def popen(self, remote: str, **kwargs):
            if "tar --create" in remote:
                raise KeyboardInterrupt
            return super().popen(remote, **kwargs)

    interrupted = lambda out, name, folder: CtrlC(out, name, folder, mounts={"/": node["root"], "/boot/firmware": node["boot"]},  # noqa: E731
                                                  facts=node["connect"](out, name, folder).facts, log=[])
    (node["root"] / "srv/added").write_text("new\n")
    with pytest.raises(KeyboardInterrupt):
        backup.backup(profile, master, output, now=_clock("2026-12-05T11:00:00"), connect=interrupted)
    assert {p.name: p.read_bytes() for p in first.path.parent.iterdir()} == before  # no staging left either

    # An output folder on a disk with room for the stream but not for the image.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)], check=True)
    try:
        (small / "ssh_config").write_text("# local\n")
        (node["root"] / "srv/more").write_bytes(os.urandom(4 * MIB))
        with pytest.raises(BuildError) as error:
            backup.backup(profile, master, small, now=_clock("2026-12-05T12:00:00"), connect=node["connect"])
        assert "space" in str(error.value).lower() or "No space" in str(error.value), error.value
        assert [p.name for p in (small / "backups/master").iterdir()] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


STATUS = """Package: {name}
Status: install ok installed
Version: {version}
{extra}"""


def _status(*packages: tuple[str, str, str]) -> str:
    return "\n".join(STATUS.format(name=n, version=v, extra=e) for n, v, e in packages)


def test_diff_names_what_changed_since_the_bake_and_nothing_else(node: dict, tmp_path: Path, loops) -> None:
    from builder import node_diff
    from conftest import run_pibake
    root, output, profile = node["root"], node["output"], node["profile"]
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "etc/pibake").mkdir()
    (root / "etc/pibake/packages").write_text("staged\n")
    (root / "etc/keep.conf").write_text("as baked\n")
    (root / "root").mkdir(exist_ok=True)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "var/lib/systemd").mkdir()
    (root / "var/lib/dpkg/status").write_text(_status(("base", "1.0", ""), ("gone", "1.0", ""), ("old", "1.0", "")))
    (root / "etc/fstab").write_text("PARTUUID=5e3da4a0-02 / ext4 defaults 0 1\n")
    (root / "etc/group").write_text("root:x:0:\n")
    baked = backup.backup(profile, profile.master.node, output, now=_clock("2026-12-05T09:00:00"), connect=node["connect"])
    os.replace(baked.path, output / "master.img")  # stands for the image pibake baked
    (output / "manifest.json").write_text(json.dumps({"nodes": {"master": {"image": "master.img", "role": "master"}}}))

    # Since then: what the node's first boot did (pibake's), and what a person did.
    conf_md5 = hashlib.md5(b"shipped\n").hexdigest()
    (root / "var/lib/dpkg/status").write_text(_status(
        ("base", "1.0", ""), ("old", "1.1", ""), ("staged", "2.0", ""), ("htop", "3.2", f"Conffiles:\n /etc/htoprc {conf_md5}\n")))
    (root / "var/lib/dpkg/info/htop.list").write_text("/usr/local/bin/htop\n/etc/htoprc\n")
    (root / "var/lib/dpkg/info/staged:arm64.list").write_text("/etc/staged.conf\n")
    (root / "etc/staged.conf").write_text("from the staged package\n")
    # ... its maintainer scripts, and Raspberry Pi OS's own first boot: pibake's too, and
    # listed as the first boot left them (tested here as the image runs it).
    (root / "etc/alternatives").mkdir()
    os.symlink("/usr/sbin/iptables-nft", root / "etc/alternatives/iptables")
    (root / "etc/group").write_text("root:x:0:\ndnsmasq:x:108:\n")
    (root / "etc/fstab").write_text("PARTUUID=6a1b2c3d-02 / ext4 defaults 0 1\n")
    (root / "var/lib/pibake").mkdir()
    with open(root / "var/lib/pibake/firstboot.list", "wb") as listed:
        subprocess.run([str(FIRST_BOOT_LIST), str(root)], stdout=listed, check=True)
    (root / "etc/group").write_text("root:x:0:\ndnsmasq:x:108:\nlab:x:1001:\n")  # and later, a person's edit
    (root / "usr/local/bin/htop").write_text("binary\n")
    (root / "etc/htoprc").write_text("edited by hand\n")  # a conffile changed from what it shipped
    (root / "var/lib/systemd/random-seed").write_bytes(os.urandom(32))  # the system's own
    (root / "srv/added").write_text("a person's\n")
    (root / "etc/keep.conf").write_text("changed\n")
    os.chmod(root / "etc/hostname", 0o600)
    (root / "root/id_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    os.chmod(root / "root/id_key", 0o644)
    (root / "srv/data").unlink()

    want = [("package", "removed", "gone", "1.0"), ("package", "installed", "htop", "3.2"),
            ("package", "upgraded", "old", "1.0 -> 1.1"),
            ("file", "changed", "/etc/group", "content"),
            ("file", "changed", "/etc/hostname", "mode"), ("file", "added", "/etc/htoprc", "file"),
            ("file", "changed", "/etc/keep.conf", "content"), ("file", "added", "/root/id_key", "file, secret: path only"),
            ("file", "added", "/srv/added", "file"), ("file", "removed", "/srv/data", "file")]
    live = node_diff.diff(profile, profile.master.node, output, connect=node["connect"])
    got = [(c.what, c.how, c.name, c.detail) for c in live]
    assert got == want, got

    # the same from a backup of it, and from its card in a reader
    after = backup.backup(profile, profile.master.node, output, now=_clock("2026-12-05T10:00:00"), connect=node["connect"])
    assert [(c.what, c.how, c.name, c.detail) for c in node_diff.of_backup(output, "master", after.path)] == want
    card = loops.make(1536 * MIB)
    done = run_pibake("flash", "master", card.device, "--backup", "latest", "--yes", "--force", "-o", str(output),
                      cwd=tmp_path, timeout=600)
    assert done.code == 0, done.output
    cli = run_pibake("diff", "master", "--device", card.device, "--force", "--json", "-o", str(output),
                     "--profiles", str(tmp_path / "cluster.yaml"), cwd=tmp_path, timeout=900)
    assert cli.code == 0, cli.output
    assert [(c["what"], c["how"], c["name"], c["detail"]) for c in json.loads(cli.stdout)] == want
    assert "secret\n" not in cli.output


def test_a_file_system_with_no_file_reads_back_as_holding_none(tmp_path: Path) -> None:
    """checksums_out on a tree with no regular file names sha256sum's stdin "-"; a real "/-" is a file."""
    from builder import backup_image
    images = []
    for name, content in (("empty", None), ("dash", b"")):
        image = tmp_path / f"{name}.img"
        subprocess.run(["mkfs.fat", "-C", str(image), "8192"], check=True, capture_output=True)
        if content is not None:
            (tmp_path / "-").write_bytes(content)
            subprocess.run(["mcopy", "-i", str(image), str(tmp_path / "-"), "::/-"], check=True)
        images.append(image)

    def sums(g, device: str) -> dict:
        g.mount_ro(device, "/")
        try:
            return backup_image._sums(g)
        finally:
            g.umount_all()

    got = _read_back(*images, read=sums)
    assert got == [{}, {"./-": backup_image.EMPTY_SHA256}]
