"""SSH keys pibake makes and keeps: one host key per node, one cluster key.

They live in the state folder (private files 0600) and are reused on every
rebuild, so a rebuilt node keeps the identity the operator's known_hosts trusts.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from builder.errors import BuildError, InputError
from builder.files import write_file

log = logging.getLogger(__name__)
_HELD: dict[Path, int] = {}  # state folders' lock files this process holds
OPERATOR_KEY = "operator_id_ed25519"
LOCK = ".lock"  # in the state folder


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


def _read_own(path: Path) -> bytes:
    """A private key file of this user's, not a link, not open to others (made 0600 if it is)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        why = "it is a symlink, which pibake does not follow in its state folder" if e.errno == errno.ELOOP else e.strerror
        raise BuildError(f"cannot reuse key {path}: {why}; move it away to make a new one") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise BuildError(f"cannot reuse key {path}: not a file of yours; move it away to make a new one")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return f.read(64 << 10)


def _check_folder(folder: Path, st: os.stat_result) -> None:
    """As sshd's StrictModes: a folder of this user's that nobody else can write to."""
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"state folder {folder} is not a folder (a link?); pibake keeps its keys only in a real one")
    if st.st_uid != os.getuid():
        raise InputError(f"state folder {folder} belongs to another user (uid {st.st_uid}); "
                         "use a folder of your own (--state)")
    if st.st_mode & 0o022:
        raise InputError(f"state folder {folder} can be written by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                         f"chmod 700 it, or use another (--state)")


def _open_folder(state: Path) -> int:
    """The state folder, made if missing, opened without following a link, and checked:
    its lock is made in it only after that, through this descriptor."""
    state.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(state, 0o700)  # never through a link: mkdir does not follow one
    except FileExistsError:
        pass
    try:
        fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            _check_folder(state, os.lstat(state))
        raise InputError(f"cannot open state folder {state}: {e.strerror}") from None
    try:
        _check_folder(state, os.fstat(fd))
    except BuildError:
        os.close(fd)
        raise
    return fd


def _open_lock(lock: Path, folder: int) -> int:
    """The state folder's lock file, opened in the checked folder without following a
    link: a link planted there would have pibake create or lock a file elsewhere."""
    try:
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                     dir_fd=folder)
    except OSError as e:
        why = "it is a symlink, which pibake does not follow in its state folder" if e.errno == errno.ELOOP else e.strerror
        raise InputError(f"cannot use {lock} as the state folder's lock: {why}; remove it") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise InputError(f"cannot use {lock} as the state folder's lock: not a file of yours; remove it")
    return fd


def _same_file(held: int, folder: int) -> bool:
    """Whether the lock file held is still the one in the folder."""
    try:
        st = os.stat(LOCK, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(held)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


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
        folder = _open_folder(state)  # checked before anything is made in it
        try:
            lock = Path(os.path.realpath(state)) / LOCK
            held = _HELD.get(lock)
            if held is not None and not _same_file(held, folder):
                os.close(_HELD.pop(lock))  # the folder was removed and made again since
            if lock not in _HELD:  # one lock per folder and process: flock would wait on itself
                fd = _open_lock(lock, folder)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for another pibake run that uses %s", state)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                _HELD[lock] = fd  # released when this process ends
        finally:
            os.close(folder)
        self._lock = _HELD[lock]

    def _load_or_make(self, name: str, comment: str) -> KeyPair:
        private_path = self.dir / name
        public_path = self.dir / f"{name}.pub"
        self._check_folders()
        if os.path.lexists(private_path):
            private = _read_own(private_path)
            try:
                key = serialization.load_ssh_private_key(private, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as e:
                raise BuildError(f"cannot reuse key {private_path}: {e}; move it away to make a new one") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise BuildError(f"{private_path} is not an ed25519 key")
            # The public half is derived, never read back: a line added to the .pub file
            # would otherwise reach every node's authorized_keys.
            public = f"{_public_text(key)} {comment}"
            try:
                recorded = public_path.read_text() if not public_path.is_symlink() else ""
            except OSError:
                recorded = ""
            if recorded != public + "\n":
                write_file(public_path, (public + "\n").encode(), 0o644)
            return KeyPair(private, public)
        pair = _generate(comment)
        _write_pair(private_path, public_path, pair)
        return pair

    def _check_folders(self) -> None:
        """The state folder and its keys folder pass _check_folder, or nothing in them is trusted."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for folder in (self.dir.parent, self.dir):
            _check_folder(folder, os.lstat(folder))

    def host_key(self, hostname: str) -> KeyPair:
        return self._pair(f"{hostname}_ssh_host_ed25519_key", f"root@{hostname}")

    def operator_key(self) -> KeyPair:
        """The key pibake makes for the operator when the profile names none and ssh's usual
        ones do not exist; output/ssh_config names it with IdentityFile."""
        return self._pair(OPERATOR_KEY, "pibake-operator")

    @property
    def operator_key_path(self) -> Path:
        return self.dir / OPERATOR_KEY

    def cluster_key(self) -> KeyPair:
        return self._pair("cluster_id_ed25519", "pibake-cluster")
