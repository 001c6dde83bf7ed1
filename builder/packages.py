"""Packages for first boot, resolved and downloaded at build time, offline on the node.

apt does the resolving: it runs on this host against a root of its own that holds
the image's package database, apt sources and keyrings, for the image's
architecture. So the answer is exactly what the node's own apt would install,
apt checks the archive signatures with the image's keys, and nothing here knows
Debian's dependency rules. The lists and .debs are kept in the cache between
builds. A mirror's credentials never go into the sources apt reads: apt gets them
from an auth.conf (0600) that is there only while apt runs.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from builder.files import read_json, write_file, write_json
from builder import run, urls
from builder.errors import BuildError, InputError

log = logging.getLogger(__name__)

STAGE_DIR = "/var/cache/pibake/debs"
# What apt reads from the image. Keyrings named by Signed-By are added as found.
APT_FILES = ("/etc/apt/sources.list", "/etc/apt/trusted.gpg", "/etc/apt/preferences")
APT_DIRS = ("/etc/apt/sources.list.d", "/etc/apt/trusted.gpg.d", "/etc/apt/preferences.d")
STATUS = "/var/lib/dpkg/status"
SIGNED_BY = re.compile(r"(signed-by=|^Signed-By:\s*)(/\S+?)(?=[\s\]]|$)", re.I | re.M)
# Source options that turn apt's signature checks off, one-line (`[trusted=yes]`) or
# deb822 (`Trusted: yes`): the build drops them, so every source it reads is checked.
UNCHECKED = re.compile(r"(?<=[\[\s])(trusted|allow-insecure|allow-weak|allow-downgrade-to-insecure)=[^\s\]]*"
                       r"|^(Trusted|Allow-Insecure|Allow-Weak|Allow-Downgrade-To-Insecure):[^\n]*\n?", re.I | re.M)


@dataclass(frozen=True)
class AptInputs:
    """The parts of an image that decide what apt would install on it."""

    files: dict[str, bytes]  # absolute path in the image -> content

    @property
    def architectures(self) -> list[str]:
        native = re.search(r"^Package: dpkg\n(?:.+\n)*?Architecture: (\S+)", self.status, re.M)
        if not native:
            raise BuildError("the image's package database (/var/lib/dpkg/status) has no dpkg entry: "
                             "cannot tell its architecture")
        foreign = self.files.get("/var/lib/dpkg/arch", b"").decode().split()
        return [native[1]] + [a for a in foreign if a != native[1]]

    @property
    def status(self) -> str:
        return self.files[STATUS].decode("utf-8", "replace")

    def installed(self, name: str) -> bool:
        for stanza in self.status.split("\n\n"):
            if re.search(rf"^Package: {re.escape(name)}$", stanza, re.M):
                if re.search(r"^Status: install ok installed$", stanza, re.M):
                    return True
        return False

    def sources(self) -> str:
        return "".join(v.decode("utf-8", "replace") for k, v in sorted(self.files.items())
                       if k == "/etc/apt/sources.list" or k.endswith((".list", ".sources")))

    def keyrings(self) -> list[str]:
        """Keyring paths that the sources name with Signed-By."""
        return sorted({m[2] for m in SIGNED_BY.finditer(self.sources())})


@dataclass(frozen=True)
class Deb:
    name: str
    path: Path
    installed_size: int  # bytes, from the package's control data


def source_uris(inputs: AptInputs) -> list[str]:
    uris = re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", inputs.sources(), re.M)
    uris += [u for line in re.findall(r"^URIs:\s*(.+)$", inputs.sources(), re.M) for u in line.split()]
    return sorted(set(uris))


def resolve(inputs: AptInputs, names: tuple[str, ...], mirrors: dict[str, str], folder: Path) -> list[Deb]:
    """Download what installing `names` on the image needs, with everything it depends on."""
    if STATUS not in inputs.files:
        raise BuildError("the image has no package database (/var/lib/dpkg/status): cannot stage packages for it")
    missing = [n for n in names if not inputs.installed(n)]
    if not missing:
        return []
    if not source_uris(inputs):
        raise BuildError("the image has no apt sources (/etc/apt/sources.list*): cannot stage packages for it")
    root = folder / _key(inputs, mirrors)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with _Apt(root, inputs, mirrors) as apt:
            apt.update()
            wanted = apt.plan(missing)
            apt.download(missing)
        archives = root / "var/cache/apt/archives"
        lost = [filename for _, filename in wanted if not (archives / filename).is_file()]
        if lost:
            raise BuildError(f"apt reported success but did not download {', '.join(lost)}")
        debs = [Deb(name, archives / filename, _installed_size(archives / filename)) for name, filename in wanted]
        memo = read_json(root / RESOLVED)
        memo[_question(inputs, missing)] = [[d.name, d.path.name, d.installed_size] for d in debs]
        write_json(root / RESOLVED, memo)
        return debs


RESOLVED = "resolved.json"  # resolve()'s last answers, by question


def resolved_before(inputs: AptInputs, names: tuple[str, ...], mirrors: dict[str, str], folder: Path) -> list[Deb] | None:
    """resolve()'s last answer for the same image and names, if its .debs are still in the cache.

    Not checked against the archive: what may have changed there since is for resolve() to say."""
    if STATUS not in inputs.files:
        return None
    missing = [n for n in names if not inputs.installed(n)]
    if not missing:
        return []
    root = folder / _key(inputs, mirrors)
    answer = read_json(root / RESOLVED).get(_question(inputs, missing))
    if not isinstance(answer, list):
        return None
    try:
        debs = [Deb(name, root / "var/cache/apt/archives" / filename, int(size)) for name, filename, size in answer]
    except (TypeError, ValueError):
        return None
    return debs if all(d.path.is_file() for d in debs) else None


def _question(inputs: AptInputs, missing: list[str]) -> str:
    # What is installed already decides the answer too (the lists are shared without it).
    return hashlib.sha256(inputs.files[STATUS]).hexdigest()[:16] + " " + " ".join(missing)


def _key(inputs: AptInputs, mirrors: dict[str, str]) -> str:
    """Lists and .debs are shared by builds whose images have the same sources, keys and architecture."""
    h = hashlib.sha256()
    for path, content in sorted(inputs.files.items()):
        if path != STATUS:
            h.update(path.encode() + b"\0" + hashlib.sha256(content).digest())
    # Without credentials: no name in the cache is made from a password.
    bare = sorted((urls.strip_credentials(old), urls.strip_credentials(new)) for old, new in mirrors.items())
    h.update(repr(bare).encode() + repr(inputs.architectures).encode())
    return h.hexdigest()[:16]


def _installed_size(deb: Path) -> int:
    """What the package takes once installed, in bytes, from its control data.

    The free-space check adds these up: a size that cannot be read is an error, not 0."""
    field = run.text(run.run(["dpkg-deb", "--field", str(deb), "Installed-Size"],
                             what=f"cannot read the installed size of {deb.name}").stdout).strip()
    if not field:
        # Policy makes the field optional; unpacked data is rarely more than four times the archive.
        log.debug("%s has no Installed-Size; counting four times its size", deb.name)
        return 4 * deb.stat().st_size
    if not field.isdigit():
        raise BuildError(f"cannot read the installed size of {deb.name}: Installed-Size is '{field[:40]}'")
    return int(field) * 1024


def _auth_conf(mirrors: dict[str, str]) -> bytes:
    """apt's auth.conf (apt_auth.conf(5)) for the mirrors that carry credentials.

    Each entry names its mirror's scheme, host, port and path, so it applies to that
    mirror only, even over http; apt takes the first entry that matches, so the longest
    paths come first."""
    entries = []
    for mirror in sorted(set(mirrors.values()), key=lambda url: (-len(urls.strip_credentials(url)), url)):
        login = urls.credentials(mirror)
        if login is None or login == (b"", b""):
            continue
        user, password = login
        if re.search(rb"[\x00-\x20\x7f]", user + password):
            raise InputError(f"the credentials of apt mirror {urls.shown(mirror)} hold a space or a control character, "
                             "which apt cannot take (its auth.conf separates words with spaces)")
        machine = urls.strip_credentials(mirror).rstrip("/") + "/"
        entries.append(b"machine " + machine.encode() + (b" login " + user if user else b"")
                       + (b" password " + password if password else b"") + b"\n")
    return b"".join(entries)


class _Apt:
    """apt run on a root of its own in the cache; a context: the mirrors' credentials are there only within it."""

    def __init__(self, root: Path, inputs: AptInputs, mirrors: dict[str, str]) -> None:
        self.root = root
        self.inputs = inputs
        self.mirrors = mirrors
        etc = root / "etc/apt"
        self.auth = etc / "auth.conf"
        shutil.rmtree(etc, ignore_errors=True)
        for sub in ("sources.list.d", "trusted.gpg.d", "preferences.d", "apt.conf.d"):
            (etc / sub).mkdir(parents=True)
        for sub in ("var/lib/dpkg", "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "keyrings"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for path, content in inputs.files.items():
            if path.startswith("/etc/apt/"):
                target = root / path.lstrip("/")
                if path.endswith((".list", ".sources")):
                    content = self._rewrite(path, content.decode("utf-8", "replace")).encode()
                write_file(target, content, 0o600)  # an image's own sources may carry credentials
            elif path in (STATUS, "/var/lib/dpkg/arch"):
                (root / path.lstrip("/")).write_bytes(content)
        for keyring in inputs.keyrings():
            if keyring in inputs.files:
                (root / "keyrings" / _flat(keyring)).write_bytes(inputs.files[keyring])
        archs = inputs.architectures
        user = getpass.getuser()
        (root / "apt.conf").write_text(
            f'Dir "{root}/";\n'
            'Dir::Etc::main "/dev/null";\n'
            f'Dir::Etc::parts "{etc}/apt.conf.d/";\n'
            f'Dir::Etc::netrc "{self.auth}";\n'
            f'APT::Architecture "{archs[0]}";\n'
            "APT::Architectures { " + " ".join(f'"{a}";' for a in archs) + " };\n"
            'Acquire::Languages "none";\n'
            'APT::Install-Recommends "false";\n'
            f'APT::Sandbox::User "{user}";\n'
            'Acquire::AllowInsecureRepositories "false";\n'
            'Acquire::AllowWeakRepositories "false";\n'
            'Acquire::AllowDowngradeToInsecureRepositories "false";\n'
            'APT::Get::AllowUnauthenticated "false";\n'
            'Debug::NoLocking "true";\n'
        )
        self.env = {**os.environ, "APT_CONFIG": str(root / "apt.conf"), "LC_ALL": "C.UTF-8"}

    def __enter__(self) -> "_Apt":
        login = _auth_conf(self.mirrors)
        if login:
            write_file(self.auth, login, 0o600)
        return self

    def __exit__(self, *exc: object) -> None:
        self.auth.unlink(missing_ok=True)

    def _rewrite(self, path: str, text: str) -> str:
        for found in UNCHECKED.finditer(text):
            log.warning("warning: %s: ignoring '%s': pibake checks the signature of every package source",
                        path, found[0].strip())
        text = re.sub(r"\[\s*\]\s*", "", UNCHECKED.sub("", text))
        for old, new in self.mirrors.items():
            bare = urls.strip_credentials(new).rstrip("/")  # apt takes the credentials from auth.conf
            text = re.sub(rf"(?<=\s){re.escape(old.rstrip('/'))}(?=/?(\s|$))", bare, text)
        return SIGNED_BY.sub(lambda m: m[1] + str(self.root / "keyrings" / _flat(m[2])), text)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        # stdin is closed: apt asks questions (a changed Release file, say) only on a
        # terminal, and a build must fail with apt's message rather than wait for an answer.
        done = run.run(["apt-get", "-q", *args], env=self.env, check=False)
        return subprocess.CompletedProcess(done.args, done.returncode, run.text(done.stdout), run.text(done.stderr))

    def update(self) -> None:
        done = self._run("update")
        problems = [line for line in (done.stdout + done.stderr).splitlines() if re.match(r"^(E|W|Err):", line)]
        for line in problems:
            log.debug("apt: %s", line)
        if done.returncode != 0:
            raise BuildError(f"apt could not read the image's package sources: {_apt_message(done)}")
        self.update_problems = problems

    def plan(self, names: list[str]) -> list[tuple[str, str]]:
        """(package, archive file name) for everything installing `names` would unpack."""
        done = self._run("install", "--simulate", *names)
        if done.returncode != 0:
            raise BuildError(self._explain(done, names))
        found = re.findall(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) .*\[(\S+)\]\)", done.stdout, re.M)
        # apt's name for a downloaded archive: an epoch's colon is escaped.
        return [(name.split(":")[0], f"{name.split(':')[0]}_{version.replace(':', '%3a')}_{arch}.deb")
                for name, version, arch in found]

    def download(self, names: list[str]) -> None:
        done = self._run("install", "-y", "--download-only", *names)
        if done.returncode != 0:
            raise BuildError(f"downloading packages failed: {_apt_message(done)}")

    def _explain(self, done: subprocess.CompletedProcess, names: list[str]) -> str:
        text = done.stdout + done.stderr
        unknown = re.findall(r"Unable to locate package (\S+)|Package '?(\S+?)'? has no installation candidate", text)
        unknown_names = [a or b for a, b in unknown]
        if unknown_names:
            where = ", ".join(self._via(uri) for uri in source_uris(self.inputs))
            hint = ""
            if self.update_problems:
                hint = f" (reading the sources failed: {self.update_problems[0].split(' ', 1)[-1]})"
            return (f"package {', '.join(unknown_names)} not found in the image's apt sources ({where}){hint}")
        return f"apt cannot install {' '.join(names)} on this image: {_apt_message(done)}"

    def _via(self, uri: str) -> str:
        for old, new in self.mirrors.items():
            if uri.rstrip("/") == old.rstrip("/"):
                return f"{uri} via {new}"
        return uri


def _flat(path: str) -> str:
    return PurePosixPath(path).as_posix().strip("/").replace("/", "_")


def _apt_message(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.startswith("E:")]
    return "; ".join(line.split(" ", 1)[-1].strip() for line in lines[:2]) or (done.stderr.strip().splitlines() or ["?"])[-1]


def read_inputs(exists, read, listdir) -> AptInputs:
    """Collect AptInputs through a reader of the mounted image (functions of an absolute path)."""
    files: dict[str, bytes] = {}
    for path in (*APT_FILES, STATUS, "/var/lib/dpkg/arch"):
        if exists(path):
            files[path] = read(path)
    for folder in APT_DIRS:
        if exists(folder):
            for name in listdir(folder):
                files[f"{folder}/{name}"] = read(f"{folder}/{name}")
    for keyring in AptInputs(files).keyrings():
        if exists(keyring):
            files[keyring] = read(keyring)
    return AptInputs(files)
