"""Loop devices over sparse files, standing in for SD cards, and images to write to them.

Every device is one this module created, checked by path and backing file before
a test may write to it; it is detached when the test ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from builder import bmap

MIB = 1 << 20


@dataclass
class Loop:
    device: str
    backing: Path

    def sectors_written(self) -> int:
        """Sectors written to the device, from its own statistics (field 7 of its stat)."""
        return int((Path("/sys/block") / Path(self.device).name / "stat").read_text().split()[6])

    def read(self, start: int, length: int) -> bytes:
        with open(self.backing, "rb") as f:
            f.seek(start)
            return f.read(length)


class Loops:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: list[Loop] = []
        self.mounted: list[Path] = []
        self.afterwards: list[Callable[[], None]] = []

    def make(self, size: int) -> Loop:
        backing = self.folder / f"card{len(self.made)}.raw"
        with open(backing, "xb") as f:
            f.truncate(size)
        return self.attach(backing)

    def attach(self, backing: Path) -> Loop:
        """A loop device over `backing`: a file the test made, or a loop device of this module's."""
        assert backing.is_file() or self.ours(str(backing)), backing  # only what the test made
        device = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                                check=True).stdout.strip()
        loop = Loop(device, backing)
        self.made.append(loop)
        assert re.fullmatch(r"/dev/loop\d+", device), device
        assert self.backed_by(loop), f"{device} is not backed by {backing}"
        return loop

    def ours(self, device: str) -> bool:
        """Whether `device` is a loop device of this module's, or a partition of one."""
        return any(re.fullmatch(re.escape(loop.device) + r"(p\d+)?", device) for loop in self.made)

    @staticmethod
    def backed_by(loop: Loop) -> bool:
        back = subprocess.run(["losetup", "--noheadings", "--output", "BACK-FILE", loop.device], capture_output=True,
                              text=True, check=False).stdout.strip().removesuffix(" (deleted)")
        return bool(back) and Path(back).resolve() == loop.backing.resolve()

    def mount(self, loop: Loop) -> Path:
        assert self.ours(loop.device)
        subprocess.run(["mkfs.ext4", "-q", "-F", loop.device], check=True)
        where = self.folder / f"mnt-{Path(loop.device).name}"
        where.mkdir()
        # Read-only: mounted all the same, and nothing of the kernel's writes to it meanwhile.
        subprocess.run(["mount", "-o", "ro", loop.device, str(where)], check=True)
        self.mounted.append(where)
        return where

    def cleanup(self, step: Callable[[], None]) -> None:
        """Something to undo once the loop devices are gone (a file made outside the test's folder)."""
        self.afterwards.append(step)

    def close(self) -> None:
        for where in self.mounted:
            subprocess.run(["umount", str(where)], check=False)
        for loop in reversed(self.made):  # a loop over another first
            if self.backed_by(loop):  # one a test had detached may be another's by now
                # Partitions a test added (partx) outlive a detach, and would stand in the way of
                # the next table on this device number.
                subprocess.run(["partx", "--delete", loop.device], check=False, capture_output=True)
                subprocess.run(["losetup", "--detach", loop.device], check=False)
        for step in self.afterwards:
            step()


def synthetic_output(folder: Path, data_mib: int, node: str = "worker7") -> Path:
    """An output folder holding one image of the Raspberry Pi OS shape (MBR, partition 1
    from 4 MiB) with `data_mib` MiB of data, its block map, and a manifest naming it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{node}.img"
    size = (4 + data_mib + 4) * MIB
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--quiet", str(path)], input=f"start=8192, size={(data_mib + 4) * 2048}, type=83\n",
                   text=True, check=True, capture_output=True)
    block = bytearray(os.urandom(MIB))
    with open(path, "r+b") as f:
        for i in range(data_mib):
            block[:8] = i.to_bytes(8, "big")
            f.seek((4 + i) * MIB)
            f.write(block)
    bmap.write(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {"nodes": {node: {"hostname": node, "role": "worker", "address": "192.168.5.107", "image": path.name,
                                 "size": size, "sha256": digest}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return path
