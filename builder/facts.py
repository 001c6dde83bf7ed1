"""What a base image says about itself that plans depend on, remembered by its sha256.

Reading it takes an appliance launch; remembering it lets a rebuild decide
which nodes changed before copying or launching anything.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from builder.packages import AptInputs
from builder.release import Release, detect


@dataclass(frozen=True)
class BaseFacts:
    os_release: str
    is_rpios: bool
    apt: AptInputs

    def release(self, force: bool = False) -> Release:
        return detect(self.os_release, self.is_rpios, force)

    def save(self, cache: Path, sha256: str) -> None:
        folder = cache / "bases"
        folder.mkdir(parents=True, exist_ok=True)
        data = {"os_release": self.os_release, "is_rpios": self.is_rpios,
                "apt": {k: base64.b64encode(v).decode() for k, v in self.apt.files.items()}}
        tmp = folder / f".{sha256}.{os.getpid()}"
        tmp.write_text(json.dumps(data))
        tmp.replace(folder / f"{sha256}.json")


def remembered(cache: Path, sha256: str) -> Optional[BaseFacts]:
    try:
        data = json.loads((cache / "bases" / f"{sha256}.json").read_text())
        apt = AptInputs({k: base64.b64decode(v) for k, v in data["apt"].items()})
        return BaseFacts(data["os_release"], bool(data["is_rpios"]), apt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
