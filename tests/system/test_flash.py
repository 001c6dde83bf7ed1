"""`pibake flash` on real block devices: loop devices over sparse files this module
makes (tests run as root), and the block maps and Imager list a build leaves.

Bytes written are counted from each device's own statistics, never from pibake's
report. No test points a write at a real disk: the root-disk refusal is checked on
the device-selection logic with the machine's own lsblk output.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import pty
import select
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from builder import bmap, card, devices
from conftest import Result, run_pibake, write_profile
from flash_devices import MIB, Loop, Loops, synthetic_output
from rpios_image import make_image


def pibake_flash(*args: str, cwd: Path) -> Result:
    return run_pibake("flash", *args, cwd=cwd, timeout=600)


def same_as_image(loop: Loop, image: Path) -> None:
    """Every mapped block of the image reads the same on the device."""
    block_map = bmap.read(bmap.path_for(image))
    with open(image, "rb") as f:
        for r in block_map.ranges:
            start, stop = block_map.span(r)
            f.seek(start)
            assert loop.read(start, stop - start) == f.read(stop - start), f"blocks {r.first}-{r.last} differ"


def written(loop: Loop, before: int) -> int:
    return (loop.sectors_written() - before) * 512


# ------------------------------------------------------------------ choosing the device


def test_the_root_disk_is_refused_on_this_machine() -> None:
    disks = devices.disks(devices.lsblk())
    root = devices.root_numbers()
    holding = [d for d in disks if "/" in d.mounts or d.numbers & root]
    assert holding, f"no disk of {[d.path for d in disks]} holds / by lsblk"
    for disk in holding:
        # Even forced, and with room to spare.
        assert devices.refusal(disk, 1, True, root) == "it holds the running system (/)"


TREE = {"blockdevices": [
    {"name": "sda", "path": "/dev/sda", "maj:min": "8:0", "type": "disk", "size": 500 << 30, "rm": False,
     "hotplug": False, "tran": "sata", "model": "Disk", "ro": False, "mountpoints": [None], "children": [
         {"name": "sda1", "path": "/dev/sda1", "maj:min": "8:1", "type": "part", "mountpoints": ["/boot/efi"]},
         {"name": "sda2", "path": "/dev/sda2", "maj:min": "8:2", "type": "part", "mountpoints": [None], "children": [
             {"name": "root", "path": "/dev/mapper/root", "maj:min": "254:0", "type": "crypt", "mountpoints": ["/"]}]}]},
    {"name": "sdb", "path": "/dev/sdb", "maj:min": "8:16", "type": "disk", "size": 32 << 30, "rm": True,
     "tran": "usb", "vendor": "SanDisk ", "model": "Ultra", "ro": False, "mountpoints": [None], "children": [
         {"name": "sdb1", "path": "/dev/sdb1", "maj:min": "8:17", "type": "part", "fstype": "vfat", "label": "bootfs",
          "mountpoints": ["/media/u/bootfs"]}]},
    {"name": "mmcblk0", "path": "/dev/mmcblk0", "maj:min": "179:0", "type": "disk", "size": 16 << 30, "rm": False,
     "tran": None, "ro": False, "mountpoints": [None]},
    {"name": "sdc", "path": "/dev/sdc", "maj:min": "8:32", "type": "disk", "size": 2 << 30, "rm": False,
     "hotplug": True, "tran": "usb", "ro": True, "mountpoints": [None]},
    {"name": "nvme0n1", "path": "/dev/nvme0n1", "maj:min": "259:0", "type": "disk", "size": 1 << 40, "rm": False,
     "tran": "nvme", "ro": False, "mountpoints": [None], "children": [
         {"name": "nvme0n1p1", "path": "/dev/nvme0n1p1", "maj:min": "259:1", "type": "part", "mountpoints": [None],
          "children": [{"name": "vg-data", "path": "/dev/mapper/vg-data", "maj:min": "254:1", "type": "lvm",
                        "mountpoints": [None]}]}]},
    {"name": "sdd", "path": "/dev/sdd", "maj:min": "8:48", "type": "disk", "size": 1 << 30, "rm": True,
     "tran": "usb", "ro": False, "mountpoints": [None]},
    {"name": "sde", "path": "/dev/sde", "maj:min": "8:64", "type": "disk", "size": 64 << 30, "rm": False,
     "tran": "sata", "ro": False, "mountpoints": [None]},
]}


def test_device_selection_rules() -> None:
    by_path = {d.path: d for d in devices.disks(TREE)}
    image = 3 << 30

    def why(path: str, force: bool = False, root: set[str] = frozenset()) -> str | None:
        return devices.refusal(by_path[path], image, force, set(root))

    assert why("/dev/sda", force=True) == "it holds the running system (/)"  # through LUKS, two levels down
    assert "mounted file systems (/media/u/bootfs)" in why("/dev/sdb")
    assert why("/dev/mmcblk0") is None  # an SD slot is removable, whatever RM says
    assert "read-only" in why("/dev/sdc")
    assert "in use by /dev/mapper/vg-data" in why("/dev/nvme0n1", force=True)
    assert "too small: 1.00 GiB for a 3.00 GiB image" in why("/dev/sdd")
    assert "not a removable disk" in why("/dev/sde")
    assert why("/dev/sde", force=True) is None
    # The device holding / by its numbers, where lsblk shows no mount point for it.
    assert why("/dev/sde", force=True, root={"8:64"}) == "it holds the running system (/)"
    assert by_path["/dev/sdb"].describe() == "/dev/sdb (SanDisk Ultra, 32.0 GiB, usb, removable)"
    assert by_path["/dev/sdb"].contents == ("sdb1 vfat bootfs",)


def test_list_shows_every_disk_and_its_verdict(tmp_path: Path, loops: Loops) -> None:
    loop = loops.make(64 * MIB)
    result = pibake_flash("--list", cwd=tmp_path)
    assert result.code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith(loop.device + " "))
    assert "no: it is not a removable disk" in row
    root = next(d for d in devices.disks(devices.lsblk()) if "/" in d.mounts or d.numbers & devices.root_numbers())
    assert "no: it holds the running system (/)" in next(line for line in result.stdout.splitlines()
                                                        if line.startswith(root.path + " "))


@pytest.mark.parametrize("case", ["mounted", "too small", "not removable", "no terminal", "partition", "unknown node"])
def test_refusals_write_nothing(tmp_path: Path, loops: Loops, case: str) -> None:
    out = tmp_path / "output"
    image = synthetic_output(out, 24)
    loop = loops.make(8 * MIB if case == "too small" else 64 * MIB)
    where = None
    if case == "mounted":
        where = loops.mount(loop)
    if case == "partition":
        subprocess.run(["sfdisk", "--quiet", loop.device], input="start=2048, type=83\n", text=True, check=True,
                       capture_output=True)
        subprocess.run(["partx", "--update", loop.device], check=False)  # where the kernel did not scan it itself
        assert Path(loop.device + "p1").is_block_device()
    before, content = loop.sectors_written(), loop.backing.read_bytes()
    args = {"mounted": ["--yes", "--force"], "too small": ["--yes", "--force"], "not removable": ["--yes"],
            "no terminal": ["--force"], "partition": ["--yes", "--force"], "unknown node": ["--yes", "--force"]}[case]
    node, device = ("worker9" if case == "unknown node" else "worker7"), loop.device + ("p1" if case == "partition" else "")
    result = pibake_flash(node, device, *args, "-o", str(out), cwd=tmp_path)
    assert result.code == 2, result.output
    expected = {
        "mounted": f"will not write {loop.device}: it has mounted file systems ({where}): unmount them first; nothing was written",
        "too small": f"will not write {loop.device}: it is too small: 0.01 GiB for a 0.03 GiB image; nothing was written",
        "not removable": f"will not write {loop.device}: it is not a removable disk (USB or SD card): pass --force if it "
                         "really is the card; nothing was written",
        "no terminal": "flash overwrites whole disks and asks first: not on a terminal, pass --yes to go on",
        "partition": f"{loop.device}p1 is a partition of {loop.device}: give the whole card, {loop.device}",
        "unknown node": f"no image of 'worker9' in {out}/manifest.json (nodes: worker7)",
    }[case]
    assert result.stderr.strip().splitlines() == [f"pibake: error: {expected}"]
    assert "Traceback" not in result.output
    assert loop.sectors_written() == before
    assert loop.backing.read_bytes() == content
    assert image.is_file()


def _backing(name: str, major: int, minor: int) -> devices.Backing:
    return devices.Backing(0, 0, os.makedev(major, minor), 0, 0, 0, name)


def test_a_loop_device_inherits_the_refusals_of_the_device_it_is_over() -> None:
    context = devices.Context(devices.disks(TREE), set(), False, devices.Guard({}, []))
    forced = devices.Context(devices.disks(TREE), set(), True, devices.Guard({}, []))

    def why(name: str, major: int, minor: int, context: devices.Context = context) -> str | None:
        return devices.beneath_refusal(_backing(name, major, minor), context)

    # A partition, or a volume on one, is judged by its whole disk.
    assert why("/dev/sda2", 8, 2) == ("it is a loop device over /dev/sda2 (on /dev/sda), which pibake refuses: "
                                      "it holds the running system (/)")
    assert why("/dev/mapper/root", 254, 0).endswith("which pibake refuses: it holds the running system (/)")
    assert "mounted file systems (/media/u/bootfs)" in why("/dev/sdb1", 8, 17)
    assert "in use by /dev/mapper/vg-data" in why("/dev/mapper/vg-data", 254, 1, forced)
    assert "read-only" in why("/dev/sdc", 8, 32, forced)
    # Not removable: refused as that disk is, unless forced as that disk may be.
    assert "not a removable disk" in why("/dev/sde", 8, 64)
    assert why("/dev/sde", 8, 64, forced) is None
    assert why("/dev/mmcblk0", 179, 0) is None
    assert why("/dev/nbd0", 43, 0) == "it is a loop device over /dev/nbd0, which lsblk does not show"
    # This machine's own root disk, by its numbers.
    root = devices.root_numbers()
    real = devices.Context(devices.disks(devices.lsblk()), root, True, devices.Guard({}, []))
    disk = next(d for d in real.disks if d.numbers & root or "/" in d.mounts)
    major, minor = map(int, sorted(disk.numbers)[0].split(":"))
    assert devices.beneath_refusal(_backing(disk.path, major, minor), real).endswith(
        "which pibake refuses: it holds the running system (/)")


def _one_refusal(result: Result, *words: str) -> None:
    assert result.code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pibake: error: will not write ") and "Traceback" not in result.output, \
        result.stderr
    assert lines[0].endswith("; nothing was written") and all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("case", ["image", "hard link", "linked path", "other output file", "deleted output file",
                                  "cache file", "sudo user's cache file", "loop over loop", "loop over loop over hard link"])
def test_a_loop_device_over_a_file_of_pibakes_is_refused(tmp_path: Path, loops: Loops, case: str) -> None:
    out = tmp_path / "output"
    image = synthetic_output(out, 24)
    cache = tmp_path / "cache"
    target = image
    # Under sudo, the cache of the user who ran it: root's own here, in a file this test makes and removes.
    sudo_cache = Path(pwd.getpwnam("root").pw_dir) / ".cache/pibake"
    if case == "sudo user's cache file":
        target = sudo_cache / f"flash-test-{os.getpid()}-{tmp_path.name}.img"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as f:
            f.truncate(64 * MIB)
        loops.cleanup(lambda: target.unlink(missing_ok=True))
    elif case == "hard link" or case.endswith("hard link"):
        target = tmp_path / "card.img"
        os.link(image, target)
    elif case == "linked path":
        (tmp_path / "elsewhere").symlink_to(out)
        target = tmp_path / "elsewhere" / image.name
    elif case in ("other output file", "deleted output file", "cache file"):
        target = (cache / "pibake/images/base.img" if case == "cache file" else out / "old")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as f:
            f.truncate(64 * MIB)
    under = loops.attach(target)
    loop = loops.attach(Path(under.device)) if case.startswith("loop over loop") else under
    before = {d.device: d.sectors_written() for d in (under, loop)}
    content = hashlib.sha256(target.read_bytes()).hexdigest()
    if case == "deleted output file":  # known by the path the kernel keeps, "(deleted)" and all
        kept = os.open(target, os.O_RDONLY)
        target.unlink()
    result = run_pibake("flash", "worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path,
                        env={"XDG_CACHE_HOME": str(cache), "SUDO_USER": "root" if case.startswith("sudo") else None})
    what = {"cache file": f"a file of pibake's cache ({cache}/pibake)",
            "sudo user's cache file": f"a file of pibake's cache ({sudo_cache})"}.get(
        case, f"a file of pibake's output folder ({out})")
    shown = {"linked path": os.path.realpath(target), "deleted output file": f"{target} (deleted)"}.get(case, str(target))
    _one_refusal(result, f"will not write {loop.device}: ", f"it is a loop device over {shown}, {what}")
    if loop is not under:
        assert f"it is a loop device over {under.device}, which pibake refuses: " in result.stderr
    assert {d.device: d.sectors_written() for d in (under, loop)} == before
    if case == "deleted output file":
        with os.fdopen(kept, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == content
    else:
        assert hashlib.sha256(target.read_bytes()).hexdigest() == content


@pytest.mark.parametrize("case", ["mounted", "partition mounted", "loop over loop over a mounted one"])
def test_a_loop_device_over_a_mounted_device_is_refused(tmp_path: Path, loops: Loops, case: str) -> None:
    out = tmp_path / "output"
    synthetic_output(out, 24)
    disk = loops.make(64 * MIB)
    over = disk.device
    if case == "partition mounted":
        subprocess.run(["sfdisk", "--quiet", disk.device], input="start=2048, size=40960, type=83\nstart=43008, type=83\n",
                       text=True, check=True, capture_output=True)
        subprocess.run(["partx", "--update", disk.device], check=False)  # where the kernel did not scan it itself
        part = Loop(disk.device + "p1", disk.backing)
        assert Path(part.device).is_block_device()
        where = loops.mount(part)
        over = disk.device + "p2"  # the other partition: a loop over it is still a loop over a disk in use
    else:
        where = loops.mount(disk)
    loop = loops.attach(Path(over))
    if case.startswith("loop over loop"):
        loop = loops.attach(Path(loop.device))
    before, content = loop.sectors_written(), hashlib.sha256(disk.backing.read_bytes()).hexdigest()
    result = pibake_flash("worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path)
    _one_refusal(result, f"will not write {loop.device}: it is a loop device over ",
                 f"which pibake refuses: it has mounted file systems ({where}): unmount them first")
    assert loop.sectors_written() == before
    assert hashlib.sha256(disk.backing.read_bytes()).hexdigest() == content


@pytest.mark.parametrize("asked", [True, False])
def test_a_device_held_open_exclusively_is_refused_before_the_question(tmp_path: Path, loops: Loops, asked: bool) -> None:
    out = tmp_path / "output"
    synthetic_output(out, 8)
    loop = loops.make(64 * MIB)
    before, content = loop.sectors_written(), loop.backing.read_bytes()
    held = os.open(loop.device, os.O_RDONLY | os.O_EXCL)  # as a mount, or another flasher, holds it
    try:
        if asked:
            proc, question = at_the_question(loop.device, out)
            assert question == b"", question
            stdout, stderr = proc.communicate(timeout=120)
            result = Result(proc.returncode, stdout.decode(), stderr.decode())
        else:
            result = pibake_flash("worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path)
    finally:
        os.close(held)
    _one_refusal(result, f"will not write {loop.device}: it is in use (mounted, or opened by another program)")
    assert result.stdout == ""  # neither the device's description nor the question
    assert loop.sectors_written() == before
    assert loop.backing.read_bytes() == content


def _without(image: Path, left_out: set[int] | None) -> None:
    """Rewrite the image's block map with the blocks `left_out` (None: every block) not mapped,
    every checksum right: a block map that is well formed, and wrong."""
    block_map = bmap.read(bmap.path_for(image))
    runs: list[list[int]] = []
    for r in block_map.ranges:
        for block in range(r.first, r.last + 1):
            if left_out is None or block in left_out:
                continue
            if runs and runs[-1][1] == block - 1:
                runs[-1][1] = block
            else:
                runs.append([block, block])
    ranges = []
    with open(image, "rb") as f:
        for first, last in runs:
            f.seek(first * bmap.BLOCK)
            data = f.read(min((last + 1) * bmap.BLOCK, block_map.image_size) - first * bmap.BLOCK)
            ranges.append(bmap.Range(first, last, hashlib.sha256(data).hexdigest()))
    bmap.path_for(image).write_text(bmap.to_xml(bmap.Bmap(block_map.image_size, tuple(ranges))))
    assert bmap.read(bmap.path_for(image)).mapped_blocks == sum(last - first + 1 for first, last in runs)


@pytest.mark.parametrize("case", ["maps nothing", "partition table", "first partition", "second partition", "middle"])
def test_a_block_map_without_what_a_card_boots_from_is_refused(tmp_path: Path, loops: Loops, case: str) -> None:
    out = tmp_path / "output"
    image = synthetic_output(out, 24)
    if case == "second partition":  # its data split in two partitions, the second from 20 MiB
        subprocess.run(["sfdisk", "--quiet", str(image)], input="start=8192, size=32768, type=c\nstart=40960, type=83\n",
                       text=True, check=True, capture_output=True)
        bmap.write(image)
    left_out = {"maps nothing": None, "partition table": {0}, "first partition": {4 * MIB // bmap.BLOCK},
                "second partition": {20 * MIB // bmap.BLOCK}, "middle": {12 * MIB // bmap.BLOCK}}[case]
    _without(image, left_out)
    loop = loops.make(64 * MIB)
    before, content = loop.sectors_written(), loop.backing.read_bytes()
    result = pibake_flash("worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path)
    if case == "middle":  # not what a card boots from: pibake cannot tell it from a free block
        assert result.code == 0, result.output
        return
    assert result.code == 2, result.output
    why = {"maps nothing": "it maps nothing of worker7.img",
           "partition table": "it leaves out block 0, the partition table",
           "first partition": "it leaves out block 1024, the start of partition 1's file system",
           "second partition": "it leaves out block 5120, the start of partition 2's file system"}[case]
    assert result.stderr.strip().splitlines() == [
        f"pibake: error: {bmap.path_for(image)} is not a usable block map: {why}; build again"]
    assert "verified" not in result.output and "Traceback" not in result.output
    assert loop.sectors_written() == before
    assert loop.backing.read_bytes() == content


# ------------------------------------------------------------------ writing


def test_flash_writes_the_mapped_blocks_verifies_and_rewrites_only_what_differs(tmp_path: Path, loops: Loops) -> None:
    out = tmp_path / "output"
    image = synthetic_output(out, 40)
    block_map = bmap.read(bmap.path_for(image))
    loop = loops.make(128 * MIB)
    before = loop.sectors_written()
    result = pibake_flash("worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path)
    assert result.code == 0, result.output
    assert f"worker7 on {loop.device}: wrote 0.04 GiB; read back 40.0 MiB and verified; the card can be removed" in result.stdout
    same_as_image(loop, image)
    first = written(loop, before)
    # The data, and the card's record; the partition table's sector is in the first data piece.
    assert block_map.mapped_bytes <= first <= block_map.mapped_bytes + 8192, first
    record = card.decode_record(loop.read(card.RECORD_AT, card.RECORD_SIZE))
    assert record is not None and record["state"] == "finished" and record["node"] == "worker7"

    # The card changes under pibake's back: three blocks, at the start, middle and end. Each
    # byte is turned into its complement, so that it differs from the image whatever the
    # image holds there (a fixed b"\xff\xfe" matched the image's random byte 1 time in 256).
    spots = [4 * MIB + 4096, 20 * MIB + 123, block_map.image_size - 4 * MIB - 1]
    with open(loop.backing, "r+b") as f:
        for spot in spots:
            f.seek(spot)
            old = f.read(2)
            f.seek(spot)
            f.write(bytes(b ^ 0xFF for b in old))
    before = loop.sectors_written()
    result = pibake_flash("worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path)
    assert result.code == 0, result.output
    assert re.search(r"it held worker7 \([0-9a-f]{12}\): wrote the 0\.0 MiB that differed, of 0\.04 GiB compared",
                     result.stdout), result.stdout
    same_as_image(loop, image)
    # Three 4 KiB blocks, and the record twice (unfinished, then finished).
    assert written(loop, before) == 3 * 4096 + 2 * card.RECORD_SIZE


def test_read_back_catches_a_card_that_does_not_keep_a_block(tmp_path: Path, loops: Loops) -> None:
    out = tmp_path / "output"
    synthetic_output(out, 24)
    loop = loops.make(64 * MIB)
    # A card that does not keep what is written at one spot: something else keeps writing
    # there, underneath the device, for as long as the flash runs.
    stop = threading.Event()

    def spoil() -> None:
        with open(loop.backing, "r+b", buffering=0) as f:
            while not stop.is_set():
                os.pwrite(f.fileno(), b"\x5a" * 16, 8 * MIB + 100)
                time.sleep(0.0005)

    spoiler = threading.Thread(target=spoil)
    spoiler.start()
    try:
        result = pibake_flash("worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path)
    finally:
        stop.set()
        spoiler.join()
    assert result.code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"pibake: worker7 on {loop.device}: {loop.device}: what was read back differs from worker7.img near byte "
        f"{8 * MIB}: the card did not keep what was written (failing, or fake capacity)")
    assert "the card can be removed" not in result.output and "Traceback" not in result.output


def writing(loop: Loop, out: Path) -> subprocess.Popen:
    """`pibake flash worker7` onto `loop`, once it has written its first sector there."""
    before = loop.sectors_written()
    proc = subprocess.Popen([sys.executable, "-m", "builder", "flash", "worker7", loop.device, "--yes", "--force",
                             "-o", str(out)], cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while loop.sectors_written() == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0002)
    assert proc.poll() is None, "the flash ended before the test could step in"
    return proc


def test_an_interrupted_flash_is_written_in_full_next_time(tmp_path: Path, loops: Loops) -> None:
    out = tmp_path / "output"
    image = synthetic_output(out, 1024)
    loop = loops.make(1100 * MIB)
    assert pibake_flash("worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path).code == 0
    # Once the second flash has marked the card unfinished (its first write), Ctrl-C.
    proc = writing(loop, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines() == [
        f"pibake: worker7 on {loop.device}: interrupted; the card is unfinished, and its next flash writes it in full"]
    record = card.decode_record(loop.read(card.RECORD_AT, card.RECORD_SIZE))
    assert record is not None and record["state"] == "writing"
    result = pibake_flash("worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path)
    assert result.code == 0, result.output
    assert f"worker7 on {loop.device}: wrote 1.00 GiB; read back 1024.0 MiB and verified" in result.stdout
    same_as_image(loop, image)


def test_a_card_removed_while_written_is_one_line(tmp_path: Path, loops: Loops) -> None:
    out = tmp_path / "output"
    synthetic_output(out, 1024)
    loop = loops.make(1100 * MIB)
    proc = writing(loop, out)
    # The reader loses its card: the device's medium goes away under the writes.
    subprocess.run(["losetup", "--set-capacity", loop.device], check=True)
    os.truncate(loop.backing, 0)
    subprocess.run(["losetup", "--set-capacity", loop.device], check=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pibake: worker7 on {loop.device}: "), stderr
    assert "its next flash writes it in full" in lines[0] or "ended early" in lines[0], lines[0]
    assert "Traceback" not in stderr


# ------------------------------------------------------------------ what a build leaves for flashing


@pytest.fixture(scope="module")
def baked(tmp_path_factory, operator_key: Path) -> Path:
    """worker1 of a small cluster, baked from the tests' Bookworm image."""
    tmp = tmp_path_factory.mktemp("flash")
    base = make_image(tmp / "bookworm.img", "bookworm")
    (tmp / "profiles").mkdir()
    write_profile(tmp / "profiles", f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 1\n")
    result = run_pibake("build", "cluster", "--image", str(base), cwd=tmp)
    assert result.code == 0, result.output
    return tmp


@pytest.mark.image
def test_bmap_beside_every_image_and_bmaptool_takes_it(baked: Path, loops: Loops) -> None:
    out = baked / "output"
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["nodes"].items():
        assert entry["bmap"] == f"{entry['image']}.bmap"
        block_map = bmap.read(out / entry["bmap"])  # its own checksum holds
        assert block_map.image_size == entry["size"]
        assert 0 < block_map.mapped_bytes < entry["size"] // 4, name
    image = out / "worker1.img"
    by_pibake, by_bmaptool = loops.make(800 * MIB), loops.make(800 * MIB)
    before = by_bmaptool.sectors_written()
    copy = subprocess.run(["bmaptool", "copy", str(image), by_bmaptool.device], capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr
    assert "discovered bmap file" in copy.stderr and "worker1.img.bmap" in copy.stderr
    bmaptool_bytes = written(by_bmaptool, before)
    before = by_pibake.sectors_written()
    result = pibake_flash("worker1", by_pibake.device, "--yes", "--force", cwd=baked)
    assert result.code == 0, result.output
    assert written(by_pibake, before) <= bmaptool_bytes
    same_as_image(by_pibake, image)
    same_as_image(by_bmaptool, image)
    # Block for block the same, but for pibake's record on the card.
    a, b = by_pibake.backing.read_bytes(), by_bmaptool.backing.read_bytes()
    record = slice(card.RECORD_AT, card.RECORD_AT + card.RECORD_SIZE)
    assert a[: record.start] == b[: record.start] and a[record.stop :] == b[record.stop :]
    assert b[record] == bytes(card.RECORD_SIZE) and a[record] != b[record]


# The fields Imager's OSListModel reads from an entry, and what its JSON schema requires.
IMAGER_LEAF = {"name": str, "description": str, "icon": str, "url": str, "extract_size": int, "extract_sha256": str,
               "image_download_size": int, "release_date": str, "devices": list, "init_format": str}
IMAGER_INIT_FORMATS = {"", "none", "systemd", "cloudinit", "cloudinit-rpi", "rpi-preseed"}


@pytest.mark.image
def test_imager_repository_lists_every_node(baked: Path) -> None:
    out = baked / "output"
    manifest = json.loads((out / "manifest.json").read_text())
    listed = json.loads((out / "os_list.json").read_text())
    entries = listed["os_list"]
    assert [e["name"] for e in entries] == ["master (192.168.5.1)", "worker1 (192.168.5.101)"]
    for entry in entries:
        assert {k: type(entry[k]) for k in IMAGER_LEAF} == IMAGER_LEAF
        assert entry["init_format"] == "none" and entry["init_format"] in IMAGER_INIT_FORMATS
        assert "capabilities" not in entry
        assert entry["devices"] == ["pi5-64bit", "pi4-64bit", "pi3-64bit"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry["release_date"])
        assert entry["url"].startswith("file:///")
        node = manifest["nodes"][entry["name"].split()[0]]
        path = Path(entry["url"][len("file://"):])
        assert path == (out / node["image"]).resolve() and path.is_file()
        assert entry["extract_size"] == entry["image_download_size"] == path.stat().st_size == node["size"]
        assert entry["extract_sha256"] == node["sha256"]


@pytest.mark.image
def test_reflash_after_a_key_change_writes_only_what_changed(baked: Path, loops: Loops, tmp_path: Path) -> None:
    loop = loops.make(800 * MIB)
    assert pibake_flash("worker1", loop.device, "--yes", "--force", cwd=baked).code == 0
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "second@laptop", "-f", str(tmp_path / "k2")],
                   check=True)
    profile = (baked / "profiles/cluster.yaml").read_text()
    (baked / "profiles/cluster.yaml").write_text(profile.replace("ssh_keys: [", f"ssh_keys: [{tmp_path / 'k2.pub'}, "))
    result = run_pibake("build", "worker", "--image", str(baked / "bookworm.img"), cwd=baked)
    assert result.code == 0, result.output
    image = baked / "output/worker1.img"
    before = loop.sectors_written()
    result = pibake_flash("worker1", loop.device, "--yes", "--force", cwd=baked)
    assert result.code == 0, result.output
    assert "that differed" in result.stdout
    same_as_image(loop, image)
    changed = written(loop, before)
    assert 0 < changed < image.stat().st_size // 100, changed


def test_without_root_it_says_to_use_sudo(tmp_path: Path, loops: Loops) -> None:
    # An output folder another user can read, as a user's own is to that user.
    shared = Path(tempfile.mkdtemp(prefix="pibake-flash-"))
    shared.chmod(0o755)
    out = shared / "output"
    synthetic_output(out, 8)
    loop = loops.make(64 * MIB)
    before = loop.sectors_written()
    result = run_pibake("flash", "worker7", loop.device, "--yes", "--force", "-o", str(out), cwd=tmp_path,
                        within=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    shutil.rmtree(shared)
    assert result.code == 1, result.output
    # The device is opened before anything is shown or asked.
    assert result.stderr.strip().splitlines() == [
        f"pibake: error: cannot open {loop.device} to write it: permission denied; run pibake flash with sudo"]
    assert result.stdout == ""
    assert loop.sectors_written() == before


def test_all_writes_the_nodes_in_order_onto_several_cards_at_once(tmp_path: Path, loops: Loops) -> None:
    out = tmp_path / "output"
    nodes = {}
    for node, role, address in (("worker10", "worker", "192.168.5.110"), ("worker2", "worker", "192.168.5.102"),
                                ("master", "master", "192.168.5.1")):
        synthetic_output(out, 16, node)
        entry = json.loads((out / "manifest.json").read_text())["nodes"][node]
        nodes[node] = {**entry, "role": role, "address": address}
    (out / "manifest.json").write_text(json.dumps({"nodes": nodes}))
    cards = [loops.make(64 * MIB) for _ in range(3)]
    too_many = pibake_flash("--all", *[c.device for c in cards], cards[0].device, "--yes", "--force", "-o", str(out),
                            cwd=tmp_path)
    assert too_many.code == 2 and too_many.stderr.strip() == (
        "pibake: error: 4 devices for 3 node(s) (master worker2 worker10)")
    result = pibake_flash("--all", cards[0].device, cards[1].device, "--yes", "--force", "-o", str(out), cwd=tmp_path)
    assert result.code == 0, result.output
    assert "flashing master worker2; not this time: worker10" in result.stderr
    for loop, node in zip(cards, ("master", "worker2")):
        assert f"{node} on {loop.device}: wrote 0.02 GiB" in result.stdout
        same_as_image(loop, out / f"{node}.img")
    assert cards[2].read(0, 512) == bytes(512)


@pytest.mark.parametrize("answer", ["n", "y"])
def test_it_asks_on_a_terminal(tmp_path: Path, loops: Loops, answer: str) -> None:
    out = tmp_path / "output"
    image = synthetic_output(out, 8)
    loop = loops.make(64 * MIB)
    before = loop.sectors_written()
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "builder", "flash", "worker7", loop.device, "--force", "-o", str(out)],
                            cwd=tmp_path, stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(follower)
    os.write(leader, f"{answer}\n".encode())
    stdout, stderr = proc.communicate(timeout=120)
    os.close(leader)
    assert f"worker7 (worker7.img, 0.01 GiB to write of 0.02) -> {loop.device} (" in stdout
    if answer == "n":
        assert proc.returncode == 1 and stderr.strip() == "pibake: not flashed: nothing was written"
        assert loop.sectors_written() == before
    else:
        assert proc.returncode == 0, stdout + stderr
        same_as_image(loop, image)


def at_the_question(device: str, out: Path) -> tuple[subprocess.Popen, bytes]:
    """`pibake flash worker7 DEVICE` on a terminal, once it asks (or has ended without asking);
    returns it, and what it printed up to the question. Its stdin is `proc.leader`."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "builder", "flash", "worker7", device, "--force", "-o", str(out)],
                            cwd=out.parent, stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(follower)
    proc.leader = leader  # type: ignore[attr-defined]
    shown = b""
    deadline = time.monotonic() + 60
    while b"Overwrite this disk?" not in shown and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break  # it ended without asking
            shown += chunk
    return proc, shown


def _answer(proc: subprocess.Popen, text: str) -> Result:
    os.write(proc.leader, text.encode())  # type: ignore[attr-defined]
    stdout, stderr = proc.communicate(timeout=120)
    os.close(proc.leader)  # type: ignore[attr-defined]
    return Result(proc.returncode, stdout.decode(), stderr.decode())


def _set_offset(device: str, offset: int) -> None:
    """Move a loop device's window onto its file, as LOOP_SET_STATUS64 allows while it is open."""
    fd = os.open(device, os.O_RDONLY)
    try:
        info = list(devices.LOOP_INFO.unpack(fcntl.ioctl(fd, devices.LOOP_GET_STATUS64, bytes(devices.LOOP_INFO.size))))
        info[3] = offset
        fcntl.ioctl(fd, 0x4C04, devices.LOOP_INFO.pack(*info))  # LOOP_SET_STATUS64
    finally:
        os.close(fd)


@pytest.mark.parametrize("change", ["detached and attached again", "offset moved", "path names another device"])
def test_a_device_changed_while_asked_is_not_written(tmp_path: Path, loops: Loops, change: str) -> None:
    out = tmp_path / "output"
    synthetic_output(out, 8)
    card, other = loops.make(64 * MIB), loops.make(64 * MIB)
    spare = tmp_path / "spare.raw"
    with open(spare, "xb") as f:
        f.truncate(64 * MIB)
    given = tmp_path / "card"
    given.symlink_to(card.device)
    contents = {p: p.read_bytes() for p in (card.backing, other.backing, spare)}
    before = other.sectors_written()
    proc, shown = at_the_question(str(given), out)
    assert b"Overwrite this disk?" in shown, shown
    if change == "detached and attached again":
        subprocess.run(["losetup", "--detach", card.device], check=True)  # put off while pibake holds it
        again = subprocess.run(["losetup", card.device, str(spare)], check=False, capture_output=True)
        if again.returncode == 0:  # where the kernel allows it (this one says busy): pibake must refuse all the same
            loops.made.append(Loop(card.device, spare))
    elif change == "offset moved":
        _set_offset(card.device, 4096)
    else:
        given.unlink()
        given.symlink_to(other.device)
    result = _answer(proc, "y\n")
    why = (f"{given} no longer names the device that was checked" if change == "path names another device"
           else "what it is over changed since it was checked (detached, or set up again)")
    _one_refusal(result, f"will not write {card.device}: {why}")
    assert "verified" not in result.output
    assert {p: p.read_bytes() for p in contents} == contents
    assert other.sectors_written() == before
