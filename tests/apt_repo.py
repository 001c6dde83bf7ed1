"""A tiny signed apt archive for the image tier, laid out like Debian's, served from a folder.

Its packages stand in for the master's (dnsmasq, iptables, tcpdump,
fabric) with a small dependency tree, part of which the test images
already have installed, so the tests see apt resolve against the image's own
package database. InRelease is signed with a key made for the session; the
test images trust it in /etc/apt/trusted.gpg.d, as Debian's images trust
Debian's key.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SUITES = ("bullseye", "bookworm", "trixie")
# name -> (Depends, Installed-Size in KiB)
PACKAGES = {
    "dnsmasq": ("dnsmasq-base", 100),
    "dnsmasq-base": ("libc6", 900),
    "iptables": ("libc6", 2000),
    "tcpdump": ("libpcap0.8", 1500),
    "libpcap0.8": ("libc6", 400),
    "fabric": ("python3-fabric", 200),
    "python3-fabric": ("python3", 700),
    "avahi-daemon": ("libavahi-core7", 300),  # what pibake adds to the master's list
    "libavahi-core7": ("libc6", 400),
    "huge-package": ("", 4 * 1024 * 1024),  # 4 GiB once installed: more than any test image holds
}
# What the test images list as installed in /var/lib/dpkg/status.
INSTALLED = ("dpkg", "libc6", "python3")
KEYRING = "pibake-test-archive.gpg"


def dpkg_status() -> str:
    return "".join(f"Package: {name}\nStatus: install ok installed\nPriority: required\nArchitecture: arm64\n"
                   f"Version: 1.0-1\nDescription: {name}\n\n" for name in INSTALLED)


@functools.lru_cache(maxsize=None)
def shared() -> Path:
    """The archive the test images trust: the images and the server must agree on its key.

    One per process, removed at exit; or the one kept in $PIBAKE_TEST_APT_ARCHIVE,
    made there once (the benchmark keeps its images, so it keeps their archive too).
    """
    kept = os.environ.get("PIBAKE_TEST_APT_ARCHIVE")
    if kept:
        folder = Path(kept)
        if not (folder / KEYRING).exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
        return folder
    folder = Path(tempfile.mkdtemp(prefix="pibake-apt-"))
    atexit.register(shutil.rmtree, folder, True)
    return build(folder)


def build(folder: Path) -> Path:
    """Write the archive under folder/debian and its public key to folder/KEYRING; returns folder."""
    archive = folder / "debian"
    pool = archive / "pool/main"
    pool.mkdir(parents=True)
    stanzas = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (depends, size) in PACKAGES.items():
            tree = Path(tmp) / name
            (tree / "DEBIAN").mkdir(parents=True)
            doc = tree / "usr/share/doc" / name
            doc.mkdir(parents=True)
            (doc / "README").write_text(f"{name}: a stand-in package for pibake's tests\n")
            control = (f"Package: {name}\nVersion: 1.0-1\nArchitecture: arm64\nMaintainer: pibake tests <tests@pibake.invalid>\n"
                       f"Installed-Size: {size}\n" + (f"Depends: {depends}\n" if depends else "") +
                       f"Description: {name} for pibake's tests\n")
            (tree / "DEBIAN/control").write_text(control)
            deb = pool / f"{name}_1.0-1_arm64.deb"
            subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
                           check=True, capture_output=True)
            data = deb.read_bytes()
            stanzas.append(control.rstrip("\n") + f"\nFilename: pool/main/{deb.name}\nSize: {len(data)}\n"
                           f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    home = _keyring(folder)
    for suite in SUITES:
        index = archive / f"dists/{suite}/main/binary-arm64/Packages"
        index.parent.mkdir(parents=True)
        index.write_text("\n".join(stanzas))
        body = index.read_bytes()
        release = (f"Origin: pibake tests\nSuite: {suite}\nCodename: {suite}\nDate: Wed, 25 Nov 2026 00:00:00 UTC\n"
                   f"Architectures: arm64\nComponents: main\nSHA256:\n"
                   f" {hashlib.sha256(body).hexdigest()} {len(body)} main/binary-arm64/Packages\n")
        _sign(home, archive / f"dists/{suite}", release)
    subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)}, capture_output=True)
    shutil.rmtree(home, ignore_errors=True)
    return folder


GPG = ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", ""]


def _keyring(folder: Path) -> Path:
    """A signing key for this archive; its public half goes to folder/KEYRING."""
    home = Path(tempfile.mkdtemp(prefix="gnupg-"))
    home.chmod(0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run([*GPG, "--quick-gen-key", "pibake test archive <tests@pibake.invalid>", "ed25519", "sign", "never"],
                   check=True, env=env, capture_output=True)
    with open(folder / KEYRING, "wb") as key:
        subprocess.run([*GPG, "--export"], check=True, env=env, stdout=key)
    return home


def _sign(home: Path, dists: Path, release: str) -> None:
    (dists / "Release").write_text(release)
    subprocess.run([*GPG, "--clearsign", "--output", str(dists / "InRelease"), str(dists / "Release")],
                   check=True, env={**os.environ, "GNUPGHOME": str(home)}, capture_output=True)
