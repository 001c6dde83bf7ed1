"""A node for pibake backup that is not a Pi: its file systems are folders of this machine,
and its card's description (FACTS' answer) is made from a card image, by the tools the
node would run. Its scripts run as sshd would run them: over ssh to a stand-in sshd
(the bench), or in a local shell (the image tests)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

from builder import backup, node_side


class StandIn(backup.Link):
    """Over output/ssh_config as a node is reached, to a stand-in sshd on this machine: the
    node's file systems are folders here, its card's description is given."""

    def __init__(self, output: Path, node: str, folder: Path, *, mounts: dict[str, Path], facts: bytes,
                 log: list[str] | None = None) -> None:
        super().__init__(output, node, folder)
        self.mounts, self.facts, self.log = mounts, facts, [] if log is None else log

    def ask(self, remote: str, what: str, **kwargs) -> bytes:
        self.log.append(what)
        if remote == node_side.command(node_side.FACTS):
            self.received += len(self.facts)
            return self.facts
        return super().ask(remote, what, **kwargs)

    def view(self, mount: str) -> str:
        return str(self.mounts[mount])


class LocalNode(StandIn):
    """The node's scripts run by a shell here, as sshd runs them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base = ["sh", "-c"]

    def close(self) -> None:
        pass


def card_facts(card: Path, used: dict[str, tuple[int, int]]) -> bytes:
    """FACTS' answer for `card`, from the same tools the node runs."""
    table = subprocess.run(["sfdisk", "--json", str(card)], check=True, capture_output=True).stdout
    parts = json.loads(table)["partitiontable"]["partitions"]
    boot, root = parts[0]["start"] * 512, parts[1]["start"] * 512
    dump = subprocess.run(["dumpe2fs", "-h", f"{card}?offset={root}"], check=True, capture_output=True).stdout
    with open(card, "rb") as f:
        f.seek(boot)
        sector = f.read(512)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return (f"disk-size: {card.stat().st_size}\ntable: {b64(table)}\n"
            f"fat: /dev/mmcblk0p1 /boot/firmware {b64(sector)}\nused: /dev/mmcblk0p1 {used['boot'][0]} 0\n"
            f"ext4: /dev/mmcblk0p2 / {b64(dump)}\nused: /dev/mmcblk0p2 {used['root'][0]} {used['root'][1]}\n").encode()
