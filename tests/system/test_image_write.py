"""builder/image_write.py on real file systems: debugfs and mtools write, debugfs, e2fsck and mtools read back.

The commands debugfs reads are text pibake writes from profile values (paths, link
targets), so each name here is drawn from characters the ss library's parser treats
specially (quotes, spaces, `#`, `;`, backslashes), and every one must land as
itself: no name may end a word early, start a command, or be taken for another.
"""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest

from builder import image_write
from builder.errors import BuildError
from builder.tree import ROOT, Changes, Stat

EPOCH = 1_234_567_890
SPECIAL = ['"', "'", " ", "\t", "#", ";", "\\", "$", "*", "-", "=", "é", "ß", "|", "&"]


def ext4(tmp_path: Path, size: int = 32 << 20) -> Path:
    path = tmp_path / "root.ext4"
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-E", "root_owner=0:0", str(path)], check=True)
    subprocess.run(["debugfs", "-w", "-R", "mkdir /etc", str(path)], check=True, capture_output=True)
    return path


def debugfs(path: Path, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, str(path)], capture_output=True, check=True)
    return done.stdout.decode("utf-8", "surrogateescape")


def quoted(word: str) -> str:
    return '"' + word.replace('"', '""') + '"'


def hostile_name(rng: random.Random) -> str:
    return "".join(rng.choice(SPECIAL + list("abcXYZ019._")) for _ in range(rng.randint(1, 24)))


@pytest.mark.parametrize("seed", range(4))
def test_hostile_names_and_targets_land_as_themselves(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    root = ext4(tmp_path)
    names = sorted({hostile_name(rng) for _ in range(12)} - {".", ".."})
    changes = Changes()
    folder = "/etc/" + hostile_name(rng).replace("/", "_")
    changes.root[folder] = Stat("dir", 0o750, (0, 4))
    changes.before[folder] = "absent"
    for i, name in enumerate(names):
        path = f"{folder}/{name}"
        if i % 3 == 2:
            changes.root[path] = Stat("link", 0o777, ROOT, "../" + hostile_name(rng))
        else:
            changes.root[path] = Stat("file", 0o640 if i % 2 else 0o4755, (1000 + i, 1000), f"{name}\n".encode())
            changes.contents[path] = f"{name}\n".encode()
    image_write.write_root(root, 0, changes, EPOCH, "node1")
    fsck = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    for path, st in changes.root.items():
        shown = debugfs(root, f"stat {quoted(path)}")
        owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", shown)
        assert owner and (int(owner[1]), int(owner[2])) == st.owner, (path, shown)
        if st.kind == "file":
            assert debugfs(root, f"cat {quoted(path)}").encode("utf-8", "surrogateescape") == changes.contents[path], path
            mode = re.search(r"Mode:\s+(\d+)", shown)
            assert mode and int(mode[1], 8) == st.mode, (path, shown)
        elif st.kind == "link":
            assert f'Fast link dest: "{st.target}"' in shown, (path, shown)
        for field in ("ctime", "atime", "mtime", "crtime"):
            assert f"{field}: 0x{EPOCH:08x}:00000000" in shown, (path, field, shown)
    # and nothing else was made: the folder holds exactly these names
    listed = debugfs(root, f"ls -p {quoted(folder)}").splitlines()
    entries = {line.split("/")[5] for line in listed if line.count("/") >= 6} - {".", ".."}
    assert len(entries) == len(names), (entries, names)


def test_a_line_break_never_reaches_debugfs(tmp_path: Path) -> None:
    root = ext4(tmp_path)
    for bad in ("/etc/a\nrm /etc", "/etc/a\rb", "/etc/a\0b"):
        changes = Changes(root={bad: Stat("file")}, contents={bad: b"x"})
        with pytest.raises(BuildError, match="line break"):
            image_write.write_root(root, 0, changes, EPOCH, "node1")
    fsck = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


def test_a_full_file_system_is_named(tmp_path: Path) -> None:
    root = ext4(tmp_path, 8 << 20)
    changes = Changes(root={"/etc/big": Stat("file")}, contents={"/etc/big": b"\1" * (16 << 20)})
    with pytest.raises(BuildError, match=r"node1: cannot write the root file system .*: the image's root file system is full"):
        image_write.write_root(root, 0, changes, EPOCH, "node1")


def test_the_boot_partition_gets_the_epoch_and_refuses_names_fat_cannot_hold(tmp_path: Path) -> None:
    fat = tmp_path / "boot.fat"
    with open(fat, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.fat", "-F", "32", str(fat)], check=True, capture_output=True)
    changes = Changes(boot_writes={"/boot/firmware/cmdline.txt": b"console=tty1\n", "/boot/firmware/sp ace.txt": b"x"})
    image_write.write_boot(fat, 0, "/boot/firmware", changes, EPOCH, "node1")
    listing = subprocess.run(["mdir", "-i", str(fat), "::/"], capture_output=True, text=True, check=True,
                             env={"MTOOLSRC": "/dev/null", "TZ": "UTC", "PATH": image_write.TOOL_PATH}).stdout
    assert "2009-02-13  23:31" in listing and "sp ace.txt" in listing, listing
    assert subprocess.run(["mtype", "-i", str(fat), "::/cmdline.txt"], capture_output=True, check=True,
                          env={"MTOOLSRC": "/dev/null", "PATH": image_write.TOOL_PATH}).stdout == b"console=tty1\n"
    fsck = subprocess.run(["fsck.fat", "-n", str(fat)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    for bad in ('a"b.txt', "q?.txt", "x*y"):
        with pytest.raises(BuildError, match=r"node1: cannot write /boot/firmware/"):
            image_write.write_boot(fat, 0, "/boot/firmware", Changes(boot_writes={f"/boot/firmware/{bad}": b"x"}),
                                   EPOCH, "node1")
