"""`pibake verify NODE PATH`: whether PATH holds exactly the image NODE's inputs build.

The node is built again, into a scratch folder beside the outputs, from the base image
and the time its manifest entry records, with the profile and keys of today; their
inputs must be the ones the entry records (its fingerprint), or there is nothing to
verify against. Builds are reproducible (the same inputs give the same bytes), so PATH
holds the node's image when every block the rebuilt image's block map covers (its
partition table, and every block its file systems use: what pibake flash writes onto a
card, which leaves the rest as the card had it) hashes to the map's digest for it; an
image file is also compared whole. When it does not, the two are read file by file,
with `pibake diff`'s comparison (builder/drift.py) over every file of both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder import bmap, cache, card_backup, drift, image
from builder.appliance import Appliance, Drive
from builder.build import Options, build
from builder.cache import BaseImage
from builder.epoch import Epoch
from builder.errors import BuildError, InputError
from builder.outputs import read_manifest
from builder.profile import Node, Profile


@dataclass(frozen=True)
class Verdict:
    sha256: str  # the rebuilt image's
    size: int
    changes: list[drift.Change]  # empty when PATH holds it
    holds: bool
    whole: bool = False  # PATH's first bytes are the image's, every one (not only those its block map covers)
    mapped: int = 0  # bytes the image's block map covers


def verify(profile: Profile, node: Node, output: Path, state: Path, target: str, force: bool) -> Verdict:
    entry = read_manifest(output).get("nodes", {}).get(node.hostname)
    if not entry:
        raise InputError(f"{output / 'manifest.json'} records no build of {node.hostname}: "
                         "pibake verify rebuilds the node from what it records")
    recorded, written = entry.get("base_image") or {}, entry.get("epoch")
    if not written:
        raise InputError(f"{node.hostname} was built by a pibake that did not record the time it wrote "
                         f"(pibake {entry.get('pibake', '?')}): build it again first")
    base = Path(str(recorded.get("path", "")))
    if not base.is_file():
        raise InputError(f"the base image {node.hostname} was built from is gone: {base}")
    sha = image.sha256_file(base)
    if sha != recorded.get("sha256"):
        raise InputError(f"the base image {node.hostname} was built from has changed since: {base} "
                         f"(sha256 {sha[:12]}, was {str(recorded.get('sha256'))[:12]})")
    fd = _open(target, force, output)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=output))
        try:
            options = Options(BaseImage(base, sha, "recorded"), scratch, state, cache.layout(),
                              epoch=Epoch(int(written["seconds"]), str(written["source"])))
            rebuilt = build(profile, (node,), options)[0]
            again = read_manifest(scratch)["nodes"][node.hostname]
            if again["inputs"] != entry.get("inputs"):
                raise InputError(f"the profile, keys or pibake version are not those {node.hostname} was built with "
                                 "(its inputs differ from the manifest's record): pibake verify rebuilds from them")
            mapped = bmap.read(bmap.path_for(rebuilt.path))
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                # A card is never the image whole (what flash does not write is the card's own).
                whole = stat.S_ISREG(os.fstat(fd).st_mode) and _sha256(f, 0, rebuilt.size) == rebuilt.sha256
                if whole or all(_sha256(f, *mapped.span(r)) == r.sha256 for r in mapped.ranges):
                    return Verdict(rebuilt.sha256, rebuilt.size, [], True, whole, mapped.mapped_bytes)
            changes = _files(rebuilt.path, target, rebuilt.plan.release.boot_dir)
            return Verdict(rebuilt.sha256, rebuilt.size, changes, False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        os.close(fd)


def _open(target: str, force: bool, output: Path) -> int:
    """PATH, opened read-only: an image file, or a card (with pibake flash's device rules)."""
    try:
        mode = os.stat(target).st_mode
    except OSError as e:
        raise InputError(f"cannot read {target}: {e.strerror}") from None
    if stat.S_ISBLK(mode):
        return card_backup.claim(target, force, output)[0]
    if not stat.S_ISREG(mode):
        raise InputError(f"{target} is neither an image file nor a disk")
    try:
        return os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"cannot read {target}: {e.strerror}") from None


def _sha256(f, start: int, stop: int) -> str:
    """The sha256 of the bytes of `f` in [start, stop) (of fewer, where it ends before)."""
    digest = hashlib.sha256()
    f.seek(start)
    image._feed(f, digest, stop - start)
    return digest.hexdigest()


def _files(rebuilt: Path, target: str, boot_dir: str) -> list[drift.Change]:
    """Every file that differs between the rebuilt image and PATH, both read through one appliance."""
    with Appliance([Drive(rebuilt, readonly=True), Drive(Path(target), readonly=True)]) as appliance:
        sides = []
        for index in (0, 1):
            try:
                boot, root = appliance.partitions(index)
                sides.append(drift.side_from_image(appliance.g, root, drift.EVERYTHING, (boot, boot_dir)))
            except RuntimeError as e:
                raise BuildError(f"cannot read {target}: {str(e).splitlines()[0][:300]}") from None
    return drift.compare(sides[0], sides[1], set())
