"""Cluster profiles: YAML in, validated frozen dataclasses out.

The document is read hardened (document.py); every setting is typed, defaulted and
checked as its record in the settings table says (settings.py); the rules that judge
several settings together run in one pass (`check_inputs`); then the model is built from
the checked values. Every problem is collected, each with the `file:line` it comes from,
and reported at once, before any image is touched.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Optional

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from builder import document, environment, urls
from builder.document import KeyPath
from builder.errors import BuildError, Place, Problem, ProfileError
from builder.extra_files import ExtraFile, read_files
from builder.checks import MAX_LIST, check_hostname, short
from builder.settings import Reader, Values, kind_name

PROFILE_NAME = "cluster.yaml"
KEY_FILE_LIMIT = 256 << 10  # an authorized_keys-style file
PASSPHRASE_LIMIT = 4 << 10
# The master answers to <hostname>.local on the home network, which output/ssh_config
# relies on: Raspberry Pi OS Lite has avahi-daemon; an image without it gets it staged.
MDNS = "avahi-daemon"


@dataclass(frozen=True)
class Wifi:
    ssid: str
    country: str
    passphrase: str = field(repr=False)

    @property
    def psk(self) -> str:
        """The WPA2 pre-shared key derived from the passphrase (IEEE 802.11i).

        Images carry only this, never the passphrase itself.
        """
        if re.fullmatch(r"[0-9a-fA-F]{64}", self.passphrase):
            return self.passphrase.lower()
        raw = hashlib.pbkdf2_hmac("sha1", self.passphrase.encode(), self.ssid.encode(), 4096, 32)
        return raw.hex()


@dataclass(frozen=True)
class User:
    name: str
    password_hash: Optional[str] = field(repr=False)
    ssh_keys: tuple[str, ...]
    sudo: str  # nopasswd | password | none
    # The profile names no key and the operator has none of ssh's usual ones: pibake makes
    # one in the state folder, authorizes it and names it in output/ssh_config.
    operator_key: bool = False
    key_files: tuple[Path, ...] = ()  # the public key files read: ssh_config names their private halves
    origin: Place = Place()  # where the profile names it: "profiles/cluster.yaml:3: user.name"


@dataclass(frozen=True)
class Node:
    role: str  # master | worker
    index: int  # 0 for the master, N for workerN
    hostname: str
    address: IPv4Address
    mac: Optional[str] = None


@dataclass(frozen=True)
class Master:
    node: Node
    dhcp_start: IPv4Address
    dhcp_end: IPv4Address
    lease: str
    uplink: str
    nat: bool
    wifi: Optional[Wifi]
    packages: tuple[str, ...]
    files: tuple[ExtraFile, ...]


@dataclass(frozen=True)
class Workers:
    nodes: tuple[Node, ...]
    packages: tuple[str, ...]
    files: tuple[ExtraFile, ...]


@dataclass(frozen=True)
class ImageSettings:
    spec: str  # latest | family | date | family@date | URL | local path
    sha256: Optional[str]
    os_list: Optional[str]
    download_base: Optional[str]
    verify_signature: bool


@dataclass(frozen=True)
class Profile:
    source: Path
    network: IPv4Network
    interface: str
    user: User
    master: Master
    workers: Workers
    image: ImageSettings = ImageSettings("latest", None, None, None, True)
    # apt source URI in the image -> URI to download from at build time
    apt_mirrors: dict[str, str] = field(default_factory=dict)
    # every setting of the table that is not a list's entry, by path, as read and checked
    settings: dict[str, Any] = field(default_factory=dict)

    def setting(self, path: str) -> Any:
        """A setting's checked value, for plan steps: a new setting needs its record in the
        settings table and the step that uses it, nothing here."""
        return self.settings[path]

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.master.node, *self.workers.nodes)

    def packages(self, node: Node) -> tuple[str, ...]:
        if node.role == "master":
            return self.master.packages + ((MDNS,) if MDNS not in self.master.packages else ())
        return self.workers.packages

    def files(self, node: Node) -> tuple[ExtraFile, ...]:
        return self.master.files if node.role == "master" else self.workers.files

    def select(self, role: str, first: int = 1, count: Optional[int] = None) -> tuple[Node, ...]:
        """The nodes a command builds: the master, a slice of workers, or all."""
        if role == "master":
            return (self.master.node,)
        if role == "cluster":
            return self.nodes
        workers = self.workers.nodes
        last = len(workers) if count is None else first + count - 1
        if first < 1 or last < first:
            raise BuildError(f"--first must be at least 1 and --count at least 1 (got --first {first})")
        if last > len(workers):
            raise BuildError(
                f"worker{last} is not in the profile: it defines {len(workers)} workers; "
                f"raise workers.count in {self.source} (and rebuild the master so it reserves their addresses)"
            )
        return workers[first - 1 : last]


# ---------------------------------------------------------------- loading


def load(path: Path) -> Profile:
    """Read and validate a profile; raise ProfileError listing every problem."""
    if path.is_dir():
        path = path / PROFILE_NAME
    doc = document.read(path)
    if not isinstance(doc.data, dict):
        raise ProfileError([Problem(Place(file=str(path), line=1),
                                    "a profile must be a mapping of sections (user, network, master, workers)")])
    r = Reader(doc)
    r.sections()
    values = r.all()
    workers = _workers(r, values)
    check_inputs(r, values, workers)
    user = _user(r, values)
    master = Master(Node("master", 0, values["master.hostname"], values["master.address"] or IPv4Address(0)),
                    values["master.dhcp.start"] or IPv4Address(0), values["master.dhcp.end"] or IPv4Address(0),
                    values["master.dhcp.lease"], values["master.uplink.interface"], values["master.uplink.nat"],
                    _wifi(r, values), tuple(values["master.packages"]), read_files(r, ("master", "files"), values))
    worker_files = read_files(r, ("workers", "files"), values)
    image = _image(r, values)
    mirrors = _apt_mirrors(r, values)
    if r.problems:
        raise ProfileError(r.problems)
    return Profile(path, values["network.subnet"], values["network.interface"], user, master,
                   Workers(workers, tuple(values["workers.packages"]), worker_files), image, mirrors, dict(values))


def load_image_settings(path: Path) -> ImageSettings:
    """Only the image section, for commands that fetch but bake nothing."""
    if path.is_dir():
        path = path / PROFILE_NAME
    if not path.exists():
        return ImageSettings("latest", None, None, None, True)
    doc = document.read(path)
    if not isinstance(doc.data, dict):
        doc.data = {}
    r = Reader(doc)
    values = Values({s: r.value(tuple(s.split(".")), Values()) for s in (
        "image.release", "image.url", "image.sha256", "image.file", "image.download_base", "image.os_list",
        "image.verify_signature")})
    r.sections(("image",))
    check_inputs(r, values)
    settings = _image(r, values)
    if r.problems:
        raise ProfileError(r.problems)
    return settings


def check_inputs(r: Reader, values: Values, workers: Optional[tuple[Node, ...]] = None) -> None:
    """The rules that judge several settings together, in one pass that collects every problem.
    A rule runs when the settings it reads were read (the image section alone, for a fetch)."""
    for needs, rule in RULES:
        if all(need in values for need in needs):
            rule(r, values)
    if workers is not None:
        _check_addresses(r, values, workers)


def _sudo_needs_a_password(r: Reader, values: Values) -> None:
    if values["user.sudo"] == "password" and values["user.password_hash"] is None:
        r.error(("user", "sudo"), "user.sudo is 'password' but user.password_hash is not set, so sudo could never succeed")


def _uplink_is_another_port(r: Reader, values: Values) -> None:
    if values["master.uplink.interface"] == values["network.interface"]:
        r.error(("master", "uplink", "interface"), f"master.uplink.interface is {values['master.uplink.interface']}, "
                                                  "the cluster LAN's port: the uplink must be another interface")


def _one_image(r: Reader, values: Values) -> None:
    chosen = [key for key in ("release", "url", "file") if values[f"image.{key}"] is not None]
    if len(chosen) > 1:
        r.error(("image", chosen[1]), f"image.{chosen[0]} and image.{chosen[1]} both choose the image: keep one")
    if values["image.sha256"] and not values["image.url"]:
        r.error(("image", "sha256"), "image.sha256 pins the file at image.url; set image.url too")


def _count_or_nodes(r: Reader, values: Values) -> None:
    count, nodes = r.doc.raw(("workers", "count")), values["workers.nodes"]
    if nodes is not None and count is not None and count != len(nodes):
        r.error(("workers", "count"), f"workers.count is {count} but workers.nodes lists {len(nodes)}")


RULES = (
    (("user.sudo", "user.password_hash"), _sudo_needs_a_password),
    (("master.uplink.interface", "network.interface"), _uplink_is_another_port),
    (("image.release", "image.url", "image.file", "image.sha256"), _one_image),
    (("workers.count", "workers.nodes"), _count_or_nodes),
)


def _check_addresses(r: Reader, values: Values, workers: tuple[Node, ...]) -> None:
    network: IPv4Network = values["network.subnet"]
    master_address, start, end = values["master.address"], values["master.dhcp.start"], values["master.dhcp.end"]
    if None in (master_address, start, end):
        return  # what is not an address has its own problem

    def usable(address: IPv4Address) -> bool:
        return address in network and address not in (network.network_address, network.broadcast_address)

    mkp = ("master",)
    if not usable(master_address):
        r.error(mkp + ("address",), f"master address {master_address} is not a usable address of {network}")
    for key, address in (("start", start), ("end", end)):
        if not usable(address):
            r.error(mkp + ("dhcp", key), f"DHCP range {key} {address} is not a usable address of {network}")
    if start > end:
        r.error(mkp + ("dhcp", "start"), f"DHCP range start {start} is after its end {end}")
    in_range = lambda a: start <= a <= end  # noqa: E731
    if in_range(master_address):
        r.error(mkp + ("dhcp", "start"), f"DHCP range {start}-{end} covers the master's address {master_address}")
    master = values["master.hostname"]
    seen_names = {master: "the master", f"{master}-lan": "the master's LAN alias in ssh_config"}
    seen_addresses = {master_address: "the master"}
    explicit = values["workers.nodes"] is not None
    for node in workers:
        kp = ("workers", "nodes", node.index - 1) if explicit else ("workers", "hostname")
        akp = kp + ("address",) if explicit else ("workers", "first_address")
        if node.hostname in seen_names:
            r.error(kp + (("hostname",) if explicit else ()),
                    f"hostname '{node.hostname}' is used twice ({seen_names[node.hostname]} and {node.hostname})")
        seen_names.setdefault(node.hostname, node.hostname)
        if not usable(node.address):
            r.error(akp, f"{node.hostname}'s address {node.address} is not a usable address of {network}")
        elif in_range(node.address):
            r.error(mkp + ("dhcp", "start"), f"DHCP range {start}-{end} covers {node.hostname}'s reserved address "
                                             f"{node.address}")
        if node.address in seen_addresses:
            r.error(akp, f"address {node.address} is given to both {seen_addresses[node.address]} and {node.hostname}")
        seen_addresses.setdefault(node.address, node.hostname)


# ---------------------------------------------------------------- the model, from checked values


def _workers(r: Reader, values: Values) -> tuple[Node, ...]:
    explicit = values["workers.nodes"]
    if explicit is not None:
        nodes = []
        for i, item in enumerate(explicit[:MAX_LIST]):
            kp = ("workers", "nodes", i)
            if not isinstance(item, dict):
                r.error(kp, "workers.nodes entries must be mappings with hostname and address")
                continue
            entry = r.entry(kp, values)
            nodes.append(Node("worker", i + 1, entry["workers.nodes[].hostname"] or "",
                              entry["workers.nodes[].address"] or IPv4Address(0), entry["workers.nodes[].mac"]))
        return tuple(nodes)
    count = values["workers.count"] if "workers.count" not in r.failed else 0
    first = values["workers.first_address"] or IPv4Address(0)
    pattern = values["workers.hostname"]
    nodes = [Node("worker", n, pattern.replace("{n}", str(n)), first + n - 1) for n in range(1, count + 1)]
    # Every name the pattern makes is checked, not the first: worker100 may be too long
    # where worker1 is not.
    if "workers.hostname" not in r.failed:
        bad = next(((node, problem) for node in nodes if (problem := check_hostname(node.hostname))), None)
        if bad:
            r.error(("workers", "hostname"), f"workers.hostname: {bad[1]} (worker {bad[0].index})")
    return tuple(nodes)


def _user(r: Reader, values: Values) -> User:
    keys: list[str] = []
    files: list[Path] = []
    # Not named: whichever of ssh's usual keys exist, or, if none, one pibake makes.
    named = r.doc.raw(("user", "ssh_keys")) is not None
    for i, text in enumerate(values["user.ssh_keys"]):
        path = r.local_path(("user", "ssh_keys", i), text)
        if path is not None and (named or path.exists()):
            keys.extend(_public_keys(r, ("user", "ssh_keys", i), path))
            files.append(path)
    return User(values["user.name"], values["user.password_hash"], tuple(keys), values["user.sudo"],
                not named and not keys, tuple(files), r.doc.where(("user", "name"), "user.name"))


def _public_keys(r: Reader, keypath: KeyPath, path: Path) -> list[str]:
    data = r.read(keypath, path, KEY_FILE_LIMIT, "SSH public key")
    if data is None:
        return []
    content = data.decode("utf-8", "replace")
    keys = []
    for line in content.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            load_ssh_public_key(" ".join(line.split()[:2]).encode())
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            if "PRIVATE KEY" in content:
                r.error(keypath, f"{path} is a private key: list the .pub file instead")
                return []
            r.error(keypath, f"{path} does not hold an SSH public key ({e})")
            return []
        keys.append(line)
    if not keys:
        r.error(keypath, f"{path} holds no SSH public key")
    return keys


def _wifi(r: Reader, values: Values) -> Optional[Wifi]:
    kp = ("master", "uplink", "wifi")
    ssid, env_name, file_text = (values[f"master.uplink.wifi.{key}"] for key in ("ssid", "passphrase_env",
                                                                                 "passphrase_file"))
    if ssid is None:
        return None
    passphrase = None
    if file_text is not None:
        path = r.local_path(kp + ("passphrase_file",), file_text)
        data = r.read(kp + ("passphrase_file",), path, PASSPHRASE_LIMIT, "the Wi-Fi passphrase file") if path else None
        if data is None:
            return None
        passphrase = data.decode("utf-8", "replace").rstrip("\r\n")
    elif env_name:
        passphrase = environment.passphrase(env_name)
    if passphrase is None:
        r.error(kp + ("ssid",), f"no passphrase for Wi-Fi '{ssid}': set the environment variable {env_name} "
                                 "or master.uplink.wifi.passphrase_file")
        return None
    if not (8 <= len(passphrase) <= 63 and passphrase.isascii() and passphrase.isprintable()
            or re.fullmatch(r"[0-9a-fA-F]{64}", passphrase)):
        r.error(kp + ("ssid",), "the Wi-Fi passphrase must be 8 to 63 printable ASCII characters (or a 64-digit hex PSK)")
        return None
    return Wifi(ssid, values["master.uplink.wifi.country"], passphrase)


def _image(r: Reader, values: Values) -> ImageSettings:
    spec = values["image.release"] or values["image.url"] or "latest"
    if values["image.file"] is not None:
        path = r.local_path(("image", "file"), values["image.file"])
        if path is not None and not path.is_file():
            r.error(("image", "file"), f"image file {short(str(path))} does not exist")
        spec = str(path or "")
    sha256 = values["image.sha256"]
    return ImageSettings(spec, sha256.lower() if sha256 else None, values["image.os_list"], values["image.download_base"],
                         values["image.verify_signature"])


def _apt_mirrors(r: Reader, values: Values) -> dict[str, str]:
    """apt.mirrors, then PIBAKE_APT_MIRRORS ("from=to from=to") on top of it."""
    kp = ("apt", "mirrors")
    mirrors: dict[str, str] = {}
    for old, new in (values["apt.mirrors"] or {}).items():
        if not (isinstance(old, str) and isinstance(new, str)):
            r.error(kp + (old,), f"apt.mirrors maps a source URL to a mirror URL: not {kind_name(type(old))} to "
                                 f"{kind_name(type(new))}")
            continue
        problem = urls.problem(old) or urls.problem(new)
        if problem:
            r.error(kp + (old,), f"apt.mirrors: {problem}")
        else:
            mirrors[old] = new
    from_environment, problems = environment.apt_mirrors()
    r.problems.extend(problems)
    return {**mirrors, **from_environment}
