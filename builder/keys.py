"""SSH keys pibake makes and keeps: one host key per node, one cluster key.

They live in the state folder (private files 0600) and are reused on every
rebuild, so a rebuilt node keeps the identity the operator's known_hosts trusts.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from builder.errors import BuildError
from builder.files import write_file

log = logging.getLogger(__name__)
_HELD: dict[Path, int] = {}  # state folders' lock files this process holds


@dataclass(frozen=True)
class KeyPair:
    private: bytes = field(repr=False)  # OpenSSH private key format
    public: str  # "ssh-ed25519 AAAA... comment"


def _generate(comment: str) -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return KeyPair(private, f"{_public_text(key)} {comment}")


def _public_text(key: Ed25519PrivateKey) -> str:
    """"ssh-ed25519 AAAA...", without a comment."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _write_pair(private_path: Path, public_path: Path, pair: KeyPair) -> None:
    """Write both halves, then rename them into place, the public one first.

    A crash before the second rename leaves a public key alone, which the next run
    replaces with a new pair; never a private key the next run cannot use."""
    private_tmp = write_file(private_path, pair.private, 0o600, rename=False)
    public_tmp = write_file(public_path, (pair.public + "\n").encode(), 0o644, rename=False)
    os.replace(public_tmp, public_path)
    os.replace(private_tmp, private_path)


class KeyStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "keys"
        self._loaded: dict[str, KeyPair] = {}  # each node's plan lists every host key
        self._lock: int | None = None

    def _pair(self, name: str, comment: str) -> KeyPair:
        if name not in self._loaded:
            self._locked()
            self._loaded[name] = self._load_or_make(name, comment)
        return self._loaded[name]

    def _locked(self) -> None:
        """Hold the state folder for the rest of this run: two runs making the same key at
        once would each keep one half of it."""
        if self._lock is not None:
            return
        state = self.dir.parent
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = (state / ".lock").resolve()
        if lock not in _HELD:  # one lock per folder and process: flock would wait on itself
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another pibake run that uses %s", state)
                fcntl.flock(fd, fcntl.LOCK_EX)
            _HELD[lock] = fd  # released when this process ends
        self._lock = _HELD[lock]

    def _load_or_make(self, name: str, comment: str) -> KeyPair:
        private_path = self.dir / name
        public_path = self.dir / f"{name}.pub"
        if private_path.exists():
            try:
                private = private_path.read_bytes()
                key = serialization.load_ssh_private_key(private, password=None)
            except (OSError, ValueError) as e:
                raise BuildError(f"cannot reuse key {private_path}: {e}; move it away to make a new one") from None
            if private_path.stat().st_mode & 0o077:
                os.chmod(private_path, 0o600)
            if not isinstance(key, Ed25519PrivateKey):
                raise BuildError(f"{private_path} is not an ed25519 key")
            public = f"{_public_text(key)} {comment}"
            try:
                recorded = public_path.read_text().strip()
            except OSError:
                recorded = ""
            if recorded.split()[:2] != public.split()[:2]:
                # Missing or not this key's: the private key is what the nodes serve.
                write_file(public_path, (public + "\n").encode(), 0o644)
                recorded = public
            return KeyPair(private, recorded)
        # The state folder and its keys are this user's alone.
        self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.mkdir(exist_ok=True, mode=0o700)
        pair = _generate(comment)
        _write_pair(private_path, public_path, pair)
        return pair

    def host_key(self, hostname: str) -> KeyPair:
        return self._pair(f"{hostname}_ssh_host_ed25519_key", f"root@{hostname}")

    def cluster_key(self) -> KeyPair:
        return self._pair("cluster_id_ed25519", "pibake-cluster")
