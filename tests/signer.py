"""An OpenPGP signer for the tests' own images: a key made with the real gpg, in a home of its own."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Signer:
    home: Path
    fingerprint: str

    def sign(self, path: Path, signature: Path) -> None:
        subprocess.run(["gpg", "--homedir", str(self.home), "--batch", "--yes", "--detach-sign", "-u", self.fingerprint,
                        "--output", str(signature), str(path)], check=True, capture_output=True)

    def public(self) -> bytes:
        return subprocess.run(["gpg", "--homedir", str(self.home), "--armor", "--export", self.fingerprint],
                              check=True, capture_output=True).stdout


def make_signer(home: Path, name: str) -> Signer:
    home.mkdir(mode=0o700)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--passphrase", "", "--quick-gen-key",
                    f"{name} <signer@test.invalid>", "ed25519", "sign", "never"], check=True, capture_output=True)
    listing = subprocess.run(["gpg", "--homedir", str(home), "--with-colons", "--list-keys"], check=True,
                             capture_output=True, text=True).stdout
    return Signer(home, next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr")))
