"""A profile's `files:` entries: read, and held to what a file may be before any plan sees it.

Each entry's settings are the table's (settings.py); what is read here is the source
file (never from the operator's own ~/.ssh), and what needs more than one setting at a
time: a private key must not be readable by everyone, a mode that breaks a promise
needs `allow:`, and `enable: true` is for a unit whose [Install] names only units.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from builder import promises
from builder.document import KeyPath, dotted
from builder.errors import Place
from builder.checks import owner_ids, q, short
from builder.settings import Reader, Values

SOURCE_LIMIT = 64 << 20  # one `files:` source
# A unit's name as systemd takes it (unit_name_is_valid): no '/', so no link climbs out.
UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,250}\.(service|socket|target|timer|path|mount|automount|swap|slice)")


@dataclass(frozen=True)
class ExtraFile:
    source: Path
    path: str
    mode: int
    uid: int
    gid: int
    content: bytes = field(default=b"", repr=False)  # read once, for every node that gets it
    origin: Place = Place()  # where the profile lists it: "profiles/cluster.yaml:12: master.files[0]"
    allow: tuple[str, ...] = ()  # the promises it may break knowingly (builder.promises)
    enable: bool = False  # a unit to enable, as `systemctl enable` would

    @property
    def secret(self) -> bool:
        """Not for everyone's eyes: plans and manifests show its size and sha256 only."""
        return not self.mode & 0o004 or is_private_key(self.content)


def is_private_key(content: bytes) -> bool:
    """OpenSSH, PEM and PKCS#8 private keys, encrypted or not, OpenPGP's, and PuTTY's."""
    return bool(re.search(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|^PuTTY-User-Key-File-", content, re.M))


def read_files(r: Reader, keypath: KeyPath, values: Values) -> tuple[ExtraFile, ...]:
    out = []
    for i, item in enumerate(values[dotted(keypath)] or []):
        kp = keypath + (i,)
        if not isinstance(item, dict):
            r.error(kp, f"{dotted(keypath)} entries must be mappings with source and path")
            continue
        entry = r.entry(kp, values)
        prefix = f"{keypath[0]}.files[]."
        source_text, dest, mode = entry[prefix + "source"], entry[prefix + "path"], entry[prefix + "mode"]
        allow, enable = tuple(entry[prefix + "allow"]), bool(entry[prefix + "enable"])
        if source_text is None or dest is None:
            r.error(kp, f"{dotted(kp)} needs both source and path")
            continue
        source = r.local_path(kp + ("source",), source_text)
        content = _read_source(r, kp + ("source",), source) if source is not None else None
        broken = promises.by_mode(mode)
        if broken is not None and broken.name not in allow:
            r.error(kp + ("mode",), f"{dotted(kp)}: {promises.refusal(f'mode {mode:04o}', broken)}")
        if content and is_private_key(content) and mode & 0o004:
            r.error(kp + ("mode",), f"{dotted(kp)}: {short(str(source))} is a private key, and mode {mode:04o} "
                                   "would let everyone on the node read it: use 0600")
        if enable:
            _check_unit(r, kp, dest, content or b"")
        uid, gid = owner_ids(entry[prefix + "owner"]) or (0, 0)
        out.append(ExtraFile(source or Path(), dest, mode, uid, gid, content or b"", r.doc.where(kp + ("path",), dotted(kp)),
                             allow, enable))
    return tuple(out)


def _read_source(r: Reader, keypath: KeyPath, source: Path) -> Optional[bytes]:
    """A `files:` source: never from the operator's own ~/.ssh (private keys, known hosts)."""
    ssh_folder = Path(os.path.expanduser("~/.ssh")).resolve()
    try:
        resolved = source.resolve()
    except (OSError, RuntimeError):  # a link loop: read() says so
        resolved = source
    if resolved == ssh_folder or ssh_folder in resolved.parents:
        r.error(keypath, f"{dotted(keypath)}: {short(str(resolved))} is in your ~/.ssh, whose files are your own "
                         "keys: a node gets the keys pibake makes for it")
        return None
    return r.read(keypath, source, SOURCE_LIMIT, "the file")


def _check_unit(r: Reader, keypath: KeyPath, dest: str, content: bytes) -> None:
    """`enable: true`: a unit in /etc/systemd/system, whose [Install] names units to be wanted by."""
    folder, name = dest.rsplit("/", 1)
    if folder != "/etc/systemd/system" or not UNIT_RE.fullmatch(name):
        r.error(keypath + ("enable",), f"{dotted(keypath)}: enable is for a unit file in /etc/systemd/system "
                                       f"(like /etc/systemd/system/app.service), not {q(dest)}")
        return
    wanted = install_targets(content)
    if not wanted:
        r.error(keypath + ("enable",), f"{dotted(keypath)}: {q(name)} has no WantedBy= or RequiredBy= in its "
                                       "[Install] section, so nothing would start it")
    for _, target in wanted:
        if not UNIT_RE.fullmatch(target):
            r.error(keypath + ("enable",), f"{dotted(keypath)}: {q(name)} names {q(target)} to be wanted by, "
                                           "which is not a unit name")


def install_targets(content: bytes) -> list[tuple[str, str]]:
    """A unit's [Install] WantedBy= and RequiredBy= as (folder suffix, unit): ("wants", "multi-user.target")."""
    found, section = [], ""
    for line in content.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Install]":
            key, _, value = line.partition("=")
            kind = {"WantedBy": "wants", "RequiredBy": "requires", "UpheldBy": "upholds"}.get(key.strip())
            if kind:
                found += [(kind, unit) for unit in value.split()]
    return found
