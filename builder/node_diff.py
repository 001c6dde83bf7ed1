"""`pibake diff NODE`: the node (live, or its card in a reader, or one of its backups)
against the image pibake baked for it; the comparison itself is builder/drift.py's."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Callable

from builder import backup, card_backup, drift, node_side
from builder.appliance import Appliance, Drive
from builder.errors import BuildError, InputError
from builder.files import write_file
from builder.outputs import read_manifest
from builder.profile import Node, Profile


def baked_image(output: Path, node: str) -> Path:
    entry = read_manifest(output).get("nodes", {}).get(node)
    if not entry or not (output / str(entry.get("image", ""))).is_file():
        raise InputError(f"the image pibake baked for {node} is not in {output} (its manifest names none): "
                         "the diff compares against it")
    return output / entry["image"]


def _root(appliance: Appliance, index: int) -> str:
    parts = sorted(appliance.g.part_list(appliance.devices[index]), key=lambda p: p["part_start"])
    return f"{appliance.devices[index]}{parts[-1]['part_num']}"  # the root partition is the last


def diff(profile: Profile, node: Node, output: Path, device: str | None = None, force: bool = False,
         connect: Callable[[Path, str, Path], backup.Link] = backup.Link) -> list[drift.Change]:
    """What changed on `node` (live over ssh, or its card at `device`) since pibake baked it."""
    baked = baked_image(output, node.hostname)
    drives = [Drive(baked, readonly=True)]
    fd = None
    if device is not None:
        fd, path = card_backup.claim(device, force, output)
        drives.append(Drive(Path(path), readonly=True))
    try:
        if device is None and profile.user.sudo != "nopasswd":
            raise InputError(f"pibake diff reads {node.hostname} as root, which needs sudo without a password: "
                             f"this profile has user.sudo: {profile.user.sudo} (set it to nopasswd)")
        with Appliance(drives) as appliance:
            try:
                baked_side = drift.side_from_image(appliance.g, _root(appliance, 0))
                staged = drift.staged_packages(appliance.g, _root(appliance, 0))
                now = drift.side_from_image(appliance.g, _root(appliance, 1)) if device is not None else None
            except RuntimeError as e:
                raise BuildError(f"cannot read {node.hostname}'s images: {str(e).splitlines()[0][:300]}") from None
        if now is None:
            now = _live(output, node, connect)
    finally:
        if fd is not None:
            os.close(fd)
    return drift.compare(baked_side, now, staged)


def _live(output: Path, node: Node, connect: Callable[[Path, str, Path], backup.Link]) -> drift.Side:
    if not (output / "ssh_config").is_file():
        raise InputError(f"{output / 'ssh_config'} is missing: build the images first (pibake build)")
    mark = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="pibake-ssh-") as control:
        link = connect(output, node.hostname, Path(control))
        try:
            answer = link.ask(node_side.command(drift.NODE_LIST, mark, *drift.NOT_COMPARED, view=link.view("/")),
                              "list its files", limit=drift.MAX_ANSWER)
        finally:
            link.close()
    return drift.side_from_node(answer, mark)


def of_backup(output: Path, node: str, image: Path) -> list[drift.Change]:
    """A backup against the image pibake baked: both read through one appliance."""
    with Appliance([Drive(baked_image(output, node), readonly=True), Drive(image, readonly=True)]) as appliance:
        baked_side = drift.side_from_image(appliance.g, _root(appliance, 0))
        staged = drift.staged_packages(appliance.g, _root(appliance, 0))
        now = drift.side_from_image(appliance.g, _root(appliance, 1))
    return drift.compare(baked_side, now, staged)


def table(changes: list[drift.Change]) -> list[tuple[str, str, str, str]]:
    return [("what", "change", "name", "detail"), *((c.what, c.how, c.name, c.detail) for c in changes)]


def write_beside(image: Path, changes: list[drift.Change]) -> Path:
    """NAME.diff.json beside a backup (owner-only, as the backup)."""
    path = image.with_name(image.name.removesuffix(".img") + ".diff.json")
    write_file(path, json.dumps(drift.as_json(changes), indent=1) + "\n", 0o600)
    return path
