"""OpenPGP signatures of downloaded images, checked with GnuPG's gpgv.

Public keys may be fetched from the publisher, but only keys whose fingerprint
is pinned here (or by PIBAKE_SIGNING_KEYS, for a mirror with its own key) ever
reach the keyring gpgv uses.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from builder.download import get_text
from builder import environment, run
from builder.errors import BuildError
from builder.files import write_file

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

PINNED = {
    "54C3DD610D9D1B4AF82A37758738CD6B956F460C": "Raspberry Pi Downloads Signing Key (2017-2031)",
    "F4AADD86C4687D69AE04543E796C114AD12B2292": "Raspberry Pi downloads key announced with the 2025-11-24 release",
}
KEY_URLS = ("https://www.raspberrypi.org/raspberrypi_downloads.gpg.key",)


def pins() -> set[str]:
    chosen = environment.signing_keys() or PINNED
    return {fpr.replace(" ", "").upper() for fpr in chosen if fpr.strip()}


def key_urls() -> list[str]:
    return environment.signing_key_urls() or list(KEY_URLS)


def _fingerprints(homedir: str) -> set[str]:
    listing = run.text(run.run(["gpg", "--homedir", homedir, "--batch", "--with-colons", "--fingerprint"]).stdout)
    out, primary = set(), False
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            primary = True
        elif fields[0] == "fpr" and primary:
            out.add(fields[9])
            primary = False
    return out


def keyring(http: requests.Session, keys_dir: Path) -> Path:
    """A keyring holding the pinned keys, fetched once and kept in the cache."""
    wanted = pins()
    ring = keys_dir / f"pinned-{hashlib.sha256(','.join(sorted(wanted)).encode()).hexdigest()[:16]}.gpg"
    if ring.exists():
        return ring
    keys_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as home:
        for url in key_urls():
            armored = get_text(http, url, missing_ok=True)
            if armored:
                # A key file gpg cannot read is no pinned key: that is said below.
                run.run(["gpg", "--homedir", home, "--batch", "--quiet", "--import"], input=armored.encode(), check=False)
        accepted = _fingerprints(home) & wanted
        rejected = _fingerprints(home) - wanted
        for fpr in sorted(rejected):
            log.info("ignoring key %s from %s: its fingerprint is not pinned", fpr, ", ".join(key_urls()))
        if not accepted:
            raise BuildError(f"no pinned signing key could be fetched from {', '.join(key_urls())} "
                             f"(pinned: {', '.join(sorted(wanted))})")
        exported = run.run(["gpg", "--homedir", home, "--batch", "--export", *sorted(accepted)]).stdout
    return write_file(ring, exported)


def verify(data: Path, signature: Path, ring: Path, what: str) -> str:
    """Check a detached signature; return the signing key's primary fingerprint."""
    result = run.run(["gpgv", "--status-fd", "1", "--keyring", str(ring), str(signature), str(data)], check=False)
    status = [line.split()[1:] for line in run.text(result.stdout).splitlines() if line.startswith("[GNUPG:] ")]
    valid = [fields for fields in status if fields[0] == "VALIDSIG"]
    if result.returncode == 0 and valid:
        primary = valid[0][-1].upper()
        if primary in pins():
            return primary
    if any(fields[0] == "BADSIG" for fields in status):
        raise BuildError(f"BAD signature on {what}: the file does not match its .sig")
    missing = [fields[1] for fields in status if fields[0] in ("NO_PUBKEY", "ERRSIG")]
    if missing:
        raise BuildError(f"{what} is signed by key {missing[0]}, which is not a pinned Raspberry Pi signing key")
    raise BuildError(f"cannot verify the signature of {what}: {run.tail(run.text(result.stderr), 1) or result.returncode}")
