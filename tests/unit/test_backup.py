"""pibake backup's parts that need no node: what a node sends is read strictly, and a
backup's layout is the node's own (see tests/image/test_backup_image.py for the image
made from it, and tests/boot/test_boot.py for a live node)."""

from __future__ import annotations

import base64
import gzip
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from builder import backup, layout, node_side
from builder.errors import BuildError


def _listing(*entries: bytes) -> bytes:
    return gzip.compress(b"".join(e + b"\0" for e in entries))


ROOT = b"d 2 20 4096 1700000000.5 1700000000.5 ."


def test_a_listing_is_read_entry_by_entry_with_any_name() -> None:
    listing = backup.parse_listing(_listing(ROOT, b"f 12 1 6 1700000001.25 1700000002.0 ./etc/host\nname",
                                            b"l 13 1 9 1700000001 1700000001 ./a b\tc"), "/")
    assert listing["./etc/host\nname"] == backup.Entry("f", 12, 1, 6, "1700000001.25", "1700000002.0")
    assert set(listing) == {".", "./etc/host\nname", "./a b\tc"}


@pytest.mark.parametrize("entry", [
    b"f 12 1 6 1700000001 1700000001 /etc/passwd",  # not under the file system's root
    b"f 12 1 6 1700000001 1700000001 ./etc/../../x",
    b"f 12 1 6 1700000001 1700000001 ./etc//x",
    b"f 12 1 6 1700000001 1700000001 ./x/./y",
    b"x 12 1 6 1700000001 1700000001 ./etc/x",  # no such kind
    b"f -1 1 6 1700000001 1700000001 ./etc/x",
    b"f 12 1 123456789012345678901 1700000001 1700000001 ./etc/x",  # a size beyond any card
    b"f 12 1 6 1700000001 ./etc/x",
])
def test_a_listing_entry_that_is_not_well_formed_stops_the_backup(entry: bytes) -> None:
    with pytest.raises(BuildError, match="listing of /"):
        backup.parse_listing(_listing(ROOT, entry), "/")


def test_a_listing_is_bounded_and_must_be_gzip() -> None:
    with pytest.raises(BuildError, match="damaged"):
        backup.parse_listing(b"not gzip", "/")
    with pytest.raises(BuildError, match="larger than pibake reads"):
        backup.parse_listing(_listing(ROOT, *[b"f %d 1 0 1 1 ./f%d" % (i, i) for i in range(20)]), "/", max_entries=10)


@pytest.mark.parametrize("size", [8 << 30, (16 << 40) - 4096])
def test_a_file_longer_than_the_card_is_refused_by_name(size: int) -> None:
    card = 8 << 30
    fits = backup.parse_listing(_listing(ROOT, b"f 12 1 %d 1 1 ./srv/disk\x1b[2J.img" % card), "/")
    backup.larger_than_card(fits, card, "/")
    listing = backup.parse_listing(_listing(ROOT, b"d 13 2 4096 1 1 ./srv", b"f 12 1 %d 1 1 ./srv/disk\x1b[2J.img" % (size + 1)), "/")
    with pytest.raises(BuildError) as e:
        backup.larger_than_card(listing, card, "/")
    said = str(e.value)
    assert "/srv/disk" in said and "\x1b" not in said and "\n" not in said and f"{size + 1} bytes" in said


def test_only_what_changed_is_sent_and_what_went_is_deleted_deepest_first() -> None:
    e = backup.Entry
    old = {".": e("d", 2, 3, 4096, "1", "1"), "./a": e("f", 3, 1, 5, "1", "1"), "./d": e("d", 4, 2, 4096, "1", "1"),
           "./d/x": e("f", 5, 1, 1, "1", "1"), "./k": e("f", 6, 1, 1, "1", "1")}
    new = {".": e("d", 2, 3, 4096, "1", "2"), "./a": e("f", 3, 1, 5, "1", "1"), "./k": e("d", 6, 2, 4096, "2", "2"),
           "./n": e("f", 7, 1, 9, "2", "2")}
    send, gone = backup.changes(old, new)
    assert send == [".", "./k", "./n"]
    assert gone == ["./d/x", "./d", "./k"]
    assert backup.changes({}, new) == (list(new), [])


def test_tar_s_c_quoted_names_are_read_back_exactly() -> None:
    for name in ["./plain", "./new\nline", './quote"d', "./back\\slash", "./tab\there", "./ünï", "./\x7fdel"]:
        # tar --quoting-style=c, as the node's tar writes names in its messages
        quoted = subprocess.run(["tar", "--quoting-style=c", "--show-transformed-names", "-cf", "/dev/null",
                                 "--no-recursion", "--null", "-T", "-", "--ignore-failed-read"],
                                input=name.encode() + b"\0", capture_output=True).stderr.decode("utf-8", "surrogateescape")
        line = next(line for line in quoted.splitlines() if line.startswith('tar: "'))
        m = backup.C_QUOTED.match(line)
        assert m and backup._c_unquote(m[1]) == name, line


def _fake_sudo(tmp_path: Path) -> dict[str, str]:
    """A `sudo -n` that runs its command as the test already is (root): sudo is the node's, not under test."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    (bin_dir / "sudo").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("word", ["plain", "two words", "it's", '"$(touch x)"', "`id`", "-n", "a\nb", "*", "\\"])
def test_a_remote_command_keeps_each_argument_one_word(tmp_path: Path, word: str) -> None:
    # ssh hands the command line to the node's shell, as sh -c does here.
    script = 'printf "%s\\0" "$@"'
    done = subprocess.run(["sh", "-c", node_side.command(script, word, "second")], capture_output=True,
                          env=_fake_sudo(tmp_path), cwd=tmp_path)
    assert done.stdout.split(b"\0")[:-1] == [word.encode(), b"second"]
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------ the card's layout

def _sfdisk(**overrides) -> bytes:
    table = {"label": "dos", "id": "0x5e3da4a0", "device": "/dev/mmcblk0", "unit": "sectors", "sectorsize": 512,
             "partitions": [{"node": "/dev/mmcblk0p1", "start": 8192, "size": 1048576, "type": "c"},
                            {"node": "/dev/mmcblk0p2", "start": 1056768, "size": 61276160, "type": "83"}]}
    table.update(overrides)
    return json.dumps({"partitiontable": table}).encode()


DUMPE2FS = """Filesystem volume name:   rootfs
Filesystem UUID:          56f80fa2-e005-4cca-86e6-19da1069914d
Filesystem features:      has_journal ext_attr resize_inode dir_index filetype needs_recovery extent flex_bg sparse_super large_file huge_file dir_nlink extra_isize metadata_csum
Block count:              7659520
Reserved block count:     382976
Block size:               4096
Inode size:               256
"""


def _fat_sector(volume_id: int = 0x5DE4665C, label: bytes = b"bootfs     ") -> bytes:
    sector = bytearray(512)
    sector[13] = 8
    struct.pack_into("<H", sector, 22, 0)
    struct.pack_into("<I", sector, 67, volume_id)
    sector[71:82] = label
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _facts(table: bytes = _sfdisk(), dump: str = DUMPE2FS, fat: bytes = _fat_sector()) -> bytes:
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return (f"disk-size: 31914983424\ntable: {b64(table)}\n"
            f"fat: /dev/mmcblk0p1 /boot/firmware {b64(fat)}\nused: /dev/mmcblk0p1 31457280 0\n"
            f"ext4: /dev/mmcblk0p2 / {b64(dump.encode())}\nused: /dev/mmcblk0p2 2147483648 70000\n").encode()


def test_the_node_s_card_is_described_as_it_is() -> None:
    facts = node_side.facts(_facts())
    assert facts.mounts == {"/boot/firmware": "/dev/mmcblk0p1", "/": "/dev/mmcblk0p2"}
    lay = facts.layout
    assert (lay.label, lay.disk_id, lay.card_size) == ("dos", "0x5e3da4a0", 31914983424)
    assert lay.boot and lay.boot.fs == layout.Fat("5de4665c", "bootfs", 32, 8)
    root = lay.root
    assert root.fs == layout.Ext4("56f80fa2-e005-4cca-86e6-19da1069914d", "rootfs",
                                  ("has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent", "flex_bg",
                                   "sparse_super", "large_file", "huge_file", "dir_nlink", "extra_isize", "metadata_csum"),
                                  4096, 256, 5)
    assert (root.used, root.inodes) == (2147483648, 70000)
    sized = layout.sized(lay)
    # 2 GiB of data and 512 MiB (a quarter, and the least headroom), far less than the card's 29 GiB
    assert sized.root.size * 512 == 2560 << 20 and sized.root.start == 1056768
    assert sized.boot == lay.boot
    assert layout.sfdisk_script(sized) == ("label: dos\nlabel-id: 0x5e3da4a0\nunit: sectors\n\n"
                                          "start=8192, size=1048576, type=c\nstart=1056768, size=5242880, type=83\n")


@pytest.mark.parametrize("answer", [
    _facts(table=_sfdisk(id="0x5e3da4a0\nstart=0")),
    _facts(table=_sfdisk(label="sun")),
    _facts(table=_sfdisk(partitions=[{"node": "/dev/x1", "start": 8192, "size": 100, "type": "83\nstart=0"}])),
    _facts(table=_sfdisk(partitions=[{"node": f"/dev/x{n}", "start": 8192 * n, "size": 100, "type": "83"}
                                     for n in range(1, 40)])),
    _facts(table=b"{not json"),
    _facts(dump=DUMPE2FS.replace("rootfs", "a-label-longer-than-sixteen")),
    _facts(dump=DUMPE2FS.replace("has_journal", "has_journal,^metadata_csum")),
    _facts(dump=DUMPE2FS.replace("56f80fa2-e005-4cca-86e6-19da1069914d", "-U")),
    _facts(fat=_fat_sector(label=b"BOOT\x1b[31m  ")),
    _facts(fat=b"\0" * 512),
    b"disk-size: 1\n",
    _facts(dump="Filesystem features: x\n"),
    _facts() * 200000,  # too long
])
def test_what_a_node_says_of_its_card_is_checked_before_it_reaches_a_command(answer: bytes) -> None:
    with pytest.raises(BuildError):
        node_side.facts(answer)


def test_partitions_beyond_the_card_are_refused() -> None:
    table = _sfdisk(partitions=[{"node": "/dev/x1", "start": 8192, "size": (1 << 39) - 8192, "type": "c"},
                                {"node": "/dev/x2", "start": 1 << 39, "size": 1048576, "type": "83"}])
    answer = _facts(table=table).replace(b"/dev/mmcblk0p2", b"/dev/x2").replace(b"/dev/mmcblk0p1", b"/dev/x1")
    with pytest.raises(BuildError, match="beyond the card"):
        layout.sized(node_side.facts(answer).layout)


def test_a_card_whose_root_is_not_last_is_refused() -> None:
    table = _sfdisk(partitions=[{"node": "/dev/x1", "start": 8192, "size": 1048576, "type": "c"},
                                {"node": "/dev/x2", "start": 2105344, "size": 1048576, "type": "83"},
                                {"node": "/dev/x3", "start": 1056768, "size": 1048576, "type": "83"}])
    answer = _facts(table=table).replace(b"/dev/mmcblk0p2", b"/dev/x3").replace(b"/dev/mmcblk0p1", b"/dev/x1")
    with pytest.raises(BuildError, match="not the card's last"):
        layout.sized(node_side.facts(answer).layout)


def test_a_gpt_card_keeps_its_disk_and_partition_uuids() -> None:
    table = _sfdisk(label="gpt", id="B2B1DBE6-6F8F-4C2A-A0E7-8B0E3F1B7C11",
                    partitions=[{"node": "/dev/sda1", "start": 2048, "size": 1048576,
                                 "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "uuid": "0F3B5E2A-1C4D-4E6F-8A9B-0C1D2E3F4A5B"},
                                {"node": "/dev/sda2", "start": 1050624, "size": 8388608,
                                 "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "uuid": "1A2B3C4D-5E6F-4A1B-8C2D-3E4F5A6B7C8D"}])
    # sfdisk prints GPT's UUIDs in capitals; the script takes them in either case
    lay = layout.sized(node_side.facts(_facts(table=table).replace(b"/dev/mmcblk0p", b"/dev/sda")).layout)
    script = layout.sfdisk_script(lay)
    assert "label: gpt\nlabel-id: b2b1dbe6-6f8f-4c2a-a0e7-8b0e3f1b7c11" in script
    assert "type=0fc63daf-8483-4772-8e79-3d69d8477de4, uuid=1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d" in script


def test_a_packed_stream_unpacks_into_no_more_than_its_files_hold(tmp_path: Path) -> None:
    from builder.backup import _unpack, packed_bound
    from builder.backup_image import Entry
    listing = {"./a": Entry("f", 1, 1, 1000, "0", "0"), "./b": Entry("f", 2, 1, 5 << 20, "0", "0")}
    assert packed_bound(listing, ["./a"]) == 1000 + 3 * 64 * 1024
    assert packed_bound(listing, ["./a", "./b", "./not-listed"]) == 1000 + (5 << 20) + 5 * 64 * 1024
    fine = tmp_path / "fine.tar.gz"
    fine.write_bytes(gzip.compress(b"x" * 100_000))
    _unpack(fine, tmp_path / "fine.tar", packed_bound(listing, ["./a"]), "node: /")
    assert (tmp_path / "fine.tar").read_bytes() == b"x" * 100_000 and not fine.exists()
    # A node that says it changed 1000 bytes and sends a stream unpacking to 64 MiB of zeros.
    for size in (300_000, 64 << 20):
        bomb = tmp_path / "bomb.tar.gz"
        bomb.write_bytes(gzip.compress(bytes(size), 9))
        with pytest.raises(BuildError, match=r"node: / unpacks to more than its files hold \(0 MiB\)"):
            _unpack(bomb, tmp_path / "bomb.tar", packed_bound(listing, ["./a"]), "node: /")
        assert (tmp_path / "bomb.tar").stat().st_size <= packed_bound(listing, ["./a"]) and not bomb.exists()
    for junk in (b"not gzip at all", gzip.compress(b"cut short")[:-6]):
        bad = tmp_path / "bad.tar.gz"
        bad.write_bytes(junk)
        with pytest.raises(BuildError, match="node: / is not a gzip stream"):
            _unpack(bad, tmp_path / "bad.tar", 1 << 20, "node: /")


def test_the_first_boot_lists_the_folders_pibake_diff_compares() -> None:
    """firstboot-list (shell, on the node) and drift.FOLDERS (here) name the same folders."""
    import re as regex

    from builder import drift
    script = (Path(__file__).resolve().parents[2] / "overlays/common/usr/local/lib/pibake/firstboot-list").read_text()
    folders = regex.search(r'^folders="([^"]*)"$', script, regex.M)
    assert folders and folders[1].split() == [f"./{f}" for f in drift.FOLDERS]
