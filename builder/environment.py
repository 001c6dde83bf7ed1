"""Every environment variable pibake reads, in one place (the README lists them).

The command line's own (PIBAKE_PROFILES, PIBAKE_STATE, PIBAKE_IMAGE) are click
options' `envvar`s in cli.py; everything else is read here, when it is needed
(not at import), so that a test or a caller can set it for one run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from builder import urls
from builder.errors import InputError, Place, Problem

# name -> what it sets: the README's table is made from this (tests/test_profile.py checks)
VARIABLES = {
    "PIBAKE_PROFILES": "profile file, or folder holding cluster.yaml (--profiles)",
    "PIBAKE_STATE": "folder of generated keys (--state)",
    "PIBAKE_IMAGE": "base image spec (--image)",
    "PIBAKE_WIFI_PASSPHRASE": "the Wi-Fi passphrase, unless the profile names another variable or a file",
    "PIBAKE_APT_MIRRORS": "space-separated source-URL=mirror-URL pairs, on top of the profile's apt.mirrors",
    "PIBAKE_DOWNLOAD_BASE": "where Raspberry Pi OS images are downloaded from (a mirror of the official server)",
    "PIBAKE_OS_LIST": "the OS list (Imager's JSON) to choose images from",
    "PIBAKE_SIGNING_KEYS": "comma-separated fingerprints of the OpenPGP keys trusted to sign images",
    "PIBAKE_SIGNING_KEY_URL": "comma-separated URLs the signing keys are fetched from",
    "PIBAKE_SLOW_COPY": "seconds a first copy may take before the appliance is launched while the rest are made",
    "SOURCE_DATE_EPOCH": "every time written into an image (seconds since 1970; default: the base's own last write)",
    "XDG_CACHE_HOME": "the cache's parent folder (default ~/.cache)",
    "LIBGUESTFS_BACKEND_SETTINGS": "libguestfs' own; force_tcg skips the KVM attempt",
    "SUDO_USER": "sudo's own: `pibake flash` under sudo also keeps off the cache of the user who ran sudo",
}


def table() -> str:
    """The README's table of environment variables, made from VARIABLES."""
    return "| variable | what it sets |\n|---|---|\n" + "".join(f"| `{name}` | {what} |\n" for name, what in VARIABLES.items())


def _get(name: str) -> Optional[str]:
    assert name in VARIABLES, name
    value = os.environ.get(name)
    return value if value else None


def cache_home() -> Path:
    return Path(_get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))


def _checked_url(name: str, value: Optional[str]) -> Optional[str]:
    """A URL from the environment meets the rule every URL meets (urls.problem)."""
    problem = urls.problem(value) if value else None
    if problem:
        raise InputError(problem, Place(key=name))
    return value


def check_urls() -> None:
    """Every URL the environment gives, checked before anything is fetched."""
    download_base(), os_list(), signing_key_urls()


def download_base() -> Optional[str]:
    return _checked_url("PIBAKE_DOWNLOAD_BASE", _get("PIBAKE_DOWNLOAD_BASE"))


def os_list() -> Optional[str]:
    return _checked_url("PIBAKE_OS_LIST", _get("PIBAKE_OS_LIST"))


def signing_keys() -> Optional[list[str]]:
    value = _get("PIBAKE_SIGNING_KEYS")
    return value.split(",") if value else None


def signing_key_urls() -> Optional[list[str]]:
    value = _get("PIBAKE_SIGNING_KEY_URL")
    # Split only where the next URL begins: a ',' may stand in a URL's password or path.
    return [_checked_url("PIBAKE_SIGNING_KEY_URL", url) or "" for url in re.split(r",(?=https?://)", value)] if value else None


def apt_mirrors() -> tuple[dict[str, str], list[Problem]]:
    """PIBAKE_APT_MIRRORS as {source: mirror}, and the pairs that are not source=mirror."""
    mirrors: dict[str, str] = {}
    problems: list[Problem] = []
    for pair in (_get("PIBAKE_APT_MIRRORS") or "").split():
        old, _, new = pair.partition("=")
        problem = (urls.problem(old) or urls.problem(new)) if new else f"{urls.shown(pair)[:80]!r} is not source-URL=mirror-URL"
        if problem:
            problems.append(Problem(Place(key="PIBAKE_APT_MIRRORS"), problem))
        else:
            mirrors[old] = new
    return mirrors, problems


def slow_copy() -> float:
    value = _get("PIBAKE_SLOW_COPY")
    try:
        return float(value) if value else 0.5
    except ValueError:
        raise InputError(f"PIBAKE_SLOW_COPY must be a number of seconds, not '{value}'") from None


def source_date_epoch() -> Optional[str]:
    return _get("SOURCE_DATE_EPOCH")


def force_tcg() -> bool:
    return "force_tcg" in (_get("LIBGUESTFS_BACKEND_SETTINGS") or "")


def passphrase(variable: str) -> Optional[str]:
    """The Wi-Fi passphrase from the variable the profile names (PIBAKE_WIFI_PASSPHRASE by default)."""
    return os.environ.get(variable) or None


def sudo_user() -> Optional[str]:
    return _get("SUDO_USER")
