"""What a base image says about itself that plans depend on, remembered by its sha256.

Reading it takes an appliance launch; remembering it lets a rebuild decide
which nodes changed before copying or launching anything.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from builder.files import read_json, write_json
from builder.packages import AptInputs
from builder.tree import Stat
from builder.release import Release, detect


@dataclass(frozen=True)
class BaseFacts:
    os_release: str
    is_rpios: bool
    apt: AptInputs

    def release(self, force: bool = False) -> Release:
        return detect(self.os_release, self.is_rpios, force)

    def save(self, folder: Path, sha256: str) -> None:
        _save(folder, f"{sha256}.json", {"os_release": self.os_release, "is_rpios": self.is_rpios,
                                         "apt": {k: base64.b64encode(v).decode() for k, v in self.apt.files.items()}})


def remembered(folder: Path, sha256: str) -> Optional[BaseFacts]:
    try:
        data = read_json(folder / f"{sha256}.json")
        apt = AptInputs({k: base64.b64decode(v) for k, v in data["apt"].items()})
        return BaseFacts(data["os_release"], bool(data["is_rpios"]), apt)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class BaseReads:
    """What plans have read from a base: lstat answers (None: absent), file contents, and
    its root file system's free space. Remembered by the base's sha256, a rebuild's plans
    are played through without mounting the base; what is not known yet is read then."""
    stats: dict[str, Optional[Stat]] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)
    free: Optional[int] = None
    learned: bool = False  # read something new since loaded

    @staticmethod
    def remembered(folder: Path, sha256: str) -> "BaseReads":
        try:
            saved = read_json(folder / f"{sha256}.reads.json")
            stats = {path: None if st is None else Stat(st["kind"], st["mode"], tuple(st["owner"]), st["target"])
                     for path, st in saved["stats"].items()}
            return BaseReads(stats, {k: base64.b64decode(v) for k, v in saved["data"].items()}, saved["free"])
        except (OSError, ValueError, KeyError, TypeError):
            return BaseReads()

    def save(self, folder: Path, sha256: str) -> None:
        stats = {path: None if st is None else {"kind": st.kind, "mode": st.mode, "owner": st.owner, "target": st.target}
                 for path, st in self.stats.items()}
        # The base's own files (its /etc/shadow, say): readable by this user only.
        _save(folder, f"{sha256}.reads.json", {"stats": stats, "free": self.free,
                                               "data": {k: base64.b64encode(v).decode() for k, v in self.data.items()}})


def _save(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / name, data, 0o600, indent=None)
