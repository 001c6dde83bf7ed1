"""Cluster profiles: YAML in, validated frozen dataclasses out.

Every problem in a profile is collected and reported at once, each with the
`file:line` it comes from, before any image is touched.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from builder import environment
from builder.catalog import is_url, parse_spec
from builder.errors import BuildError, ProfileError

PROFILE_NAME = "cluster.yaml"

HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
USERNAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")  # what userconf-pi accepts
INTERFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1
LEASE_RE = re.compile(r"^(infinite|\d+[smhdw]?)$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
CRYPT_RE = re.compile(r"^\$(1|5|6|y|gy|7|2[aby])\$[./A-Za-z0-9$=,]+$")
KeyPath = tuple


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
class ExtraFile:
    source: Path
    path: str
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class User:
    name: str
    password_hash: Optional[str] = field(repr=False)
    ssh_keys: tuple[str, ...]
    sudo: str  # nopasswd | password | none


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

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.master.node, *self.workers.nodes)

    def packages(self, node: Node) -> tuple[str, ...]:
        return self.master.packages if node.role == "master" else self.workers.packages

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


# libyaml's parser where PyYAML has it (Debian's does): a 50-node profile loads in a few
# milliseconds instead of forty.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _compose(text: str, name: str) -> tuple[Any, dict[KeyPath, int], dict[KeyPath, str]]:
    """Parse YAML keeping the line of every key, for `file:line` messages, and the text of
    every unquoted scalar that YAML turned into something else (0644, NO, 1:30)."""
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark else name
            problem = getattr(e, "problem", None) or str(e)
            raise ProfileError([f"{where}: not valid YAML: {problem}"]) from None
        lines: dict[KeyPath, int] = {}
        texts: dict[KeyPath, str] = {}
        problems: list[str] = []

        def build(node: yaml.Node, path: KeyPath) -> Any:
            lines.setdefault(path, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                out: dict[str, Any] = {}
                for key_node, value_node in node.value:
                    key = str(key_node.value)
                    if key in out:
                        problems.append(f"{name}:{key_node.start_mark.line + 1}: duplicate key '{key}'")
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    out[key] = build(value_node, path + (key,))
                return out
            if isinstance(node, yaml.SequenceNode):
                return [build(item, path + (i,)) for i, item in enumerate(node.value)]
            value = loader.construct_object(node)
            if not node.style and value is not None and not isinstance(value, str):  # plain, unquoted
                texts[path] = node.value
            return value

        data = build(root, ()) if root is not None else {}
    finally:
        loader.dispose()
    if problems:
        raise ProfileError(problems)
    return data, lines, texts


class _Reader:
    """Typed access to the parsed YAML that records problems instead of raising."""

    def __init__(self, path: Path, data: Any, lines: dict[KeyPath, int], texts: dict[KeyPath, str]) -> None:
        self.path = path
        self.data = data
        self.lines = lines
        self.texts = texts  # what was typed, where YAML 1.1 read a number or a boolean
        self.problems: list[str] = []

    def where(self, keypath: KeyPath) -> str:
        while keypath not in self.lines and keypath:
            keypath = keypath[:-1]
        return f"{self.path}:{self.lines.get(keypath, 1)}"

    def line_of(self, problem: str) -> int:
        """A problem's line in the profile, for sorting; those from elsewhere (the environment) go last."""
        head, _, rest = problem.partition(f"{self.path}:")
        number = rest.split(":", 1)[0]
        return int(number) if not head and number.isdigit() else 1 << 30

    def error(self, keypath: KeyPath, message: str) -> None:
        self.problems.append(f"{self.where(keypath)}: {message}")

    def raw(self, keypath: KeyPath) -> Any:
        node = self.data
        for key in keypath:
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                return None
        return node

    def section(self, keypath: KeyPath, allowed: set[str]) -> None:
        value = self.raw(keypath)
        if value is None:
            return
        if not isinstance(value, dict):
            self.error(keypath, f"{_dotted(keypath) or 'the profile'} must be a mapping")
            return
        for key in value:
            if key not in allowed:
                self.error(keypath + (key,), f"unknown key '{_dotted(keypath + (key,))}' (expected one of: {', '.join(sorted(allowed))})")

    def get(self, keypath: KeyPath, kind: type, default: Any) -> Any:
        value = self.raw(keypath)
        if value is None:
            return default
        if kind is str and keypath in self.texts:
            # A setting that is text means what was typed: 0644, not 420; NO (Norway), not false.
            return self.texts[keypath]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            self.error(keypath, f"{_dotted(keypath)} must be {_kind_name(kind)}, not {_kind_name(type(value))} ({value!r})")
            return default
        return value

    def string(self, keypath: KeyPath, default: Optional[str], check: Optional[Callable[[str], Optional[str]]] = None) -> Optional[str]:
        value = self.get(keypath, str, default)
        if value is not None and check is not None and value is not default:
            problem = check(value)
            if problem:
                self.error(keypath, f"{_dotted(keypath)}: {problem}")
        return value

    def strings(self, keypath: KeyPath, default: list[str]) -> list[str]:
        value = self.get(keypath, list, default)
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(item)
            else:
                self.error(keypath + (i,), f"{_dotted(keypath)} entries must be strings, not {item!r}")
        return out

    def address(self, keypath: KeyPath, default: str) -> Optional[IPv4Address]:
        value = self.raw(keypath)
        text = default if value is None else str(value)
        try:
            return IPv4Address(text)
        except ValueError:
            self.error(keypath, f"{_dotted(keypath)}: '{text}' is not an IPv4 address")
            return None

    def local_path(self, text: str) -> Path:
        path = Path(os.path.expanduser(os.path.expandvars(text)))
        return path if path.is_absolute() else self.path.parent / path


def _dotted(keypath: KeyPath) -> str:
    out = ""
    for key in keypath:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a mapping"}.get(kind, kind.__name__)


def _check_hostname(value: str) -> Optional[str]:
    if not HOSTNAME_RE.match(value):
        return f"'{value}' is not a valid hostname (lower-case letters, digits and '-', at most 63, no leading or trailing '-')"
    return None


def _check_interface(value: str) -> Optional[str]:
    return None if INTERFACE_RE.match(value) else f"'{value}' is not a valid interface name"


# ---------------------------------------------------------------- sections


def _read_user(r: _Reader) -> User:
    r.section(("user",), {"name", "password_hash", "ssh_keys", "sudo"})
    name = r.string(("user", "name"), "pi", lambda v: None if USERNAME_RE.match(v) and v != "root" else
                    f"'{v}' is not a valid user name (lower-case letter first, then letters, digits, '-'; not root)")
    password_hash = r.string(("user", "password_hash"), None, lambda v: None if CRYPT_RE.match(v) else
                             "must be a crypt hash such as the output of `openssl passwd -6` (a plain password is not accepted)")
    sudo = r.string(("user", "sudo"), "nopasswd", lambda v: None if v in ("nopasswd", "password", "none") else
                    f"'{v}' must be one of nopasswd, password, none")
    if sudo == "password" and password_hash is None:
        r.error(("user", "sudo"), "user.sudo is 'password' but user.password_hash is not set, so sudo could never succeed")
    keys: list[str] = []
    key_paths = r.strings(("user", "ssh_keys"), ["~/.ssh/id_ed25519.pub"])
    for i, text in enumerate(key_paths):
        keys.extend(_read_public_keys(r, ("user", "ssh_keys", i), text))
    if not key_paths:
        r.error(("user", "ssh_keys"), "user.ssh_keys must list at least one public key file, or you could never log in")
    return User(name or "pi", password_hash, tuple(keys), sudo or "nopasswd")


def _read_public_keys(r: _Reader, keypath: KeyPath, text: str) -> list[str]:
    path = r.local_path(text)
    try:
        content = path.read_text()
    except OSError as e:
        r.error(keypath, f"cannot read SSH public key {path}: {e.strerror}")
        return []
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


def _read_files(r: _Reader, keypath: KeyPath) -> tuple[ExtraFile, ...]:
    out = []
    for i, item in enumerate(r.get(keypath, list, [])):
        kp = keypath + (i,)
        if not isinstance(item, dict):
            r.error(kp, f"{_dotted(keypath)} entries must be mappings with source and path")
            continue
        r.section(kp, {"source", "path", "mode", "owner"})
        source_text = r.string(kp + ("source",), None)
        dest = r.string(kp + ("path",), None, lambda v: None if v.startswith("/") and ".." not in v.split("/") else
                        f"'{v}' must be an absolute path inside the image")
        mode = _read_mode(r, kp + ("mode",))
        owner = r.string(kp + ("owner",), "root:root") or "root:root"
        if source_text is None or dest is None:
            r.error(kp, f"{_dotted(kp)} needs both source and path")
            continue
        source = r.local_path(source_text)
        if not source.is_file() or not os.access(source, os.R_OK):
            r.error(kp + ("source",), f"cannot read {source}")
        uid_gid = _owner_ids(owner)
        if uid_gid is None:
            r.error(kp + ("owner",), f"owner '{owner}' must be root, USER (the login user) or UID:GID")
            uid_gid = (0, 0)
        out.append(ExtraFile(source, dest, mode, *uid_gid))
    return tuple(out)


def _read_mode(r: _Reader, keypath: KeyPath) -> int:
    """A file mode as written, quoted or not: 0644, 644, "0644" and 0o644 are all rw-r--r--."""
    value = r.raw(keypath)
    if value is None:
        return 0o644
    text = r.texts.get(keypath, value if isinstance(value, str) else None)
    if text is None or not re.fullmatch(r"(0o?)?[0-7]{3,4}", text):
        shown = text if text is not None else _kind_name(type(value))
        r.error(keypath, f"{_dotted(keypath)}: '{shown}' is not an octal file mode like 0644 or 0600")
        return 0o644
    return int(text.removeprefix("0o"), 8)


def _owner_ids(owner: str) -> Optional[tuple[int, int]]:
    named = {"root": (0, 0), "root:root": (0, 0), "USER": (1000, 1000), "USER:USER": (1000, 1000)}
    if owner in named:
        return named[owner]
    m = re.fullmatch(r"(\d+):(\d+)", owner)
    return (int(m[1]), int(m[2])) if m else None


def _read_packages(r: _Reader, keypath: KeyPath, default: list[str]) -> tuple[str, ...]:
    packages = r.strings(keypath, default)
    for i, name in enumerate(packages):
        if not PACKAGE_RE.match(name):
            r.error(keypath + (i,), f"'{name}' is not a valid Debian package name")
    return tuple(packages)


def _read_wifi(r: _Reader) -> Optional[Wifi]:
    kp = ("master", "uplink", "wifi")
    r.section(kp, {"ssid", "passphrase_env", "passphrase_file", "country"})
    ssid = r.string(kp + ("ssid",), None, lambda v: None if 1 <= len(v.encode()) <= 32 and v.isprintable() else
                    "an SSID is 1 to 32 printable bytes")
    country = r.string(kp + ("country",), "GB", lambda v: None if re.fullmatch(r"[A-Z]{2}", v) else
                       f"'{v}' must be a two-letter ISO 3166 country code, like GB or DE")
    env_name = r.string(kp + ("passphrase_env",), "PIBAKE_WIFI_PASSPHRASE")
    file_text = r.string(kp + ("passphrase_file",), None)
    if ssid is None:
        return None
    passphrase = None
    if file_text is not None:
        path = r.local_path(file_text)
        try:
            passphrase = path.read_text().rstrip("\r\n")
        except OSError as e:
            r.error(kp + ("passphrase_file",), f"cannot read the Wi-Fi passphrase file {path}: {e.strerror}")
            return None
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
    return Wifi(ssid, country or "GB", passphrase)


def _read_workers(r: _Reader, network: IPv4Network) -> tuple[Node, ...]:
    kp = ("workers",)
    pattern = r.string(kp + ("hostname",), "worker{n}", lambda v: None if "{n}" in v else "must contain {n}, the worker's number")
    explicit = r.get(kp + ("nodes",), list, None)
    if explicit is not None:
        if r.raw(kp + ("count",)) is not None and r.raw(kp + ("count",)) != len(explicit):
            r.error(kp + ("count",), f"workers.count is {r.raw(kp + ('count',))} but workers.nodes lists {len(explicit)}")
        nodes = []
        for i, item in enumerate(explicit):
            nkp = kp + ("nodes", i)
            if not isinstance(item, dict):
                r.error(nkp, "workers.nodes entries must be mappings with hostname and address")
                continue
            r.section(nkp, {"hostname", "address", "mac"})
            name = r.string(nkp + ("hostname",), (pattern or "worker{n}").replace("{n}", str(i + 1)), _check_hostname)
            address = r.address(nkp + ("address",), str(network.network_address + 101 + i))
            mac = r.string(nkp + ("mac",), None, lambda v: None if MAC_RE.match(v) else f"'{v}' is not a MAC address like dc:a6:32:01:02:03")
            nodes.append(Node("worker", i + 1, name or "", address or IPv4Address(0), mac))
        return tuple(nodes)
    count = r.get(kp + ("count",), int, 5)
    if not 0 <= count <= 250:
        r.error(kp + ("count",), f"workers.count must be between 0 and 250, not {count}")
        count = 0
    first = r.address(kp + ("first_address",), str(network.network_address + 101))
    nodes = []
    for n in range(1, count + 1):
        name = (pattern or "worker{n}").replace("{n}", str(n))
        nodes.append(Node("worker", n, name, (first or IPv4Address(0)) + n - 1))
    if nodes and _check_hostname(nodes[0].hostname):
        r.error(kp + ("hostname",), f"workers.hostname: {_check_hostname(nodes[0].hostname)}")
    return tuple(nodes)


def _check_addresses(r: _Reader, network: IPv4Network, master: Master, workers: tuple[Node, ...]) -> None:
    def usable(address: IPv4Address) -> bool:
        return address in network and address not in (network.network_address, network.broadcast_address)

    mkp = ("master",)
    if not usable(master.node.address):
        r.error(mkp + ("address",), f"master address {master.node.address} is not a usable address of {network}")
    for key, address in (("start", master.dhcp_start), ("end", master.dhcp_end)):
        if not usable(address):
            r.error(mkp + ("dhcp", key), f"DHCP range {key} {address} is not a usable address of {network}")
    if master.dhcp_start > master.dhcp_end:
        r.error(mkp + ("dhcp", "start"), f"DHCP range start {master.dhcp_start} is after its end {master.dhcp_end}")
    in_range = lambda a: master.dhcp_start <= a <= master.dhcp_end  # noqa: E731
    if in_range(master.node.address):
        r.error(mkp + ("dhcp", "start"), f"DHCP range {master.dhcp_start}-{master.dhcp_end} covers the master's address {master.node.address}")
    seen_names = {master.node.hostname: "the master"}
    seen_addresses = {master.node.address: "the master"}
    explicit = r.raw(("workers", "nodes")) is not None
    for node in workers:
        kp = ("workers", "nodes", node.index - 1) if explicit else ("workers", "hostname")
        akp = kp + ("address",) if explicit else ("workers", "first_address")
        if node.hostname in seen_names:
            r.error(kp + (("hostname",) if explicit else ()), f"hostname '{node.hostname}' is used twice ({seen_names[node.hostname]} and {node.hostname})")
        seen_names.setdefault(node.hostname, node.hostname)
        if not usable(node.address):
            r.error(akp, f"{node.hostname}'s address {node.address} is not a usable address of {network}")
        elif in_range(node.address):
            r.error(mkp + ("dhcp", "start"), f"DHCP range {master.dhcp_start}-{master.dhcp_end} covers {node.hostname}'s reserved address {node.address}")
        if node.address in seen_addresses:
            r.error(akp, f"address {node.address} is given to both {seen_addresses[node.address]} and {node.hostname}")
        seen_addresses.setdefault(node.address, node.hostname)


def _read_master(r: _Reader, network: IPv4Network) -> Master:
    kp = ("master",)
    r.section(kp, {"hostname", "address", "dhcp", "uplink", "packages", "files"})
    r.section(kp + ("dhcp",), {"start", "end", "lease"})
    r.section(kp + ("uplink",), {"interface", "nat", "wifi"})
    hostname = r.string(kp + ("hostname",), "master", _check_hostname) or "master"
    address = r.address(kp + ("address",), str(network.network_address + 1)) or IPv4Address(0)
    start = r.address(kp + ("dhcp", "start"), str(network.network_address + 2)) or IPv4Address(0)
    end = r.address(kp + ("dhcp", "end"), str(network.network_address + 64)) or IPv4Address(0)
    lease = r.string(kp + ("dhcp", "lease"), "24h", lambda v: None if LEASE_RE.match(v) else
                     f"lease '{v}' must be a number with an optional unit s, m, h, d or w, or 'infinite'") or "24h"
    uplink = r.string(kp + ("uplink", "interface"), "wlan0", _check_interface) or "wlan0"
    nat = r.get(kp + ("uplink", "nat"), bool, True)
    wifi = _read_wifi(r)
    packages = _read_packages(r, kp + ("packages",), ["dnsmasq", "iptables", "tcpdump", "fabric"])
    if "dnsmasq" not in packages:
        r.error(kp + ("packages",), "master.packages must include dnsmasq: the master is the cluster's DHCP server")
    if nat and "iptables" not in packages:
        r.error(kp + ("packages",), "master.packages must include iptables when master.uplink.nat is true")
    files = _read_files(r, kp + ("files",))
    return Master(Node("master", 0, hostname, address), start, end, lease, uplink, nat, wifi, packages, files)


def _read_image(r: _Reader) -> ImageSettings:
    kp = ("image",)
    r.section(kp, {"release", "url", "sha256", "file", "os_list", "download_base", "verify_signature"})
    chosen = [key for key in ("release", "url", "file") if r.raw(kp + (key,)) is not None]
    if len(chosen) > 1:
        r.error(kp + (chosen[1],), f"image.{chosen[0]} and image.{chosen[1]} both choose the image: keep one")
    release = r.string(kp + ("release",), None, _check_release)
    url = r.string(kp + ("url",), None, lambda v: None if is_url(v) else f"'{v}' is not an http(s) URL")
    sha256 = r.string(kp + ("sha256",), None, lambda v: None if re.fullmatch(r"[0-9a-fA-F]{64}", v) else "must be 64 hex digits")
    file_text = r.string(kp + ("file",), None)
    spec = release or url or "latest"
    if file_text is not None:
        path = r.local_path(file_text)
        if not path.is_file():
            r.error(kp + ("file",), f"image file {path} does not exist")
        spec = str(path)
    if sha256 and not url:
        r.error(kp + ("sha256",), "image.sha256 pins the file at image.url; set image.url too")
    os_list = r.string(kp + ("os_list",), None, lambda v: None if is_url(v) else f"'{v}' is not an http(s) URL")
    base = r.string(kp + ("download_base",), None, lambda v: None if is_url(v) else f"'{v}' is not an http(s) URL")
    verify = r.get(kp + ("verify_signature",), bool, True)
    return ImageSettings(spec, sha256.lower() if sha256 else None, os_list, base, verify)


def _check_release(value: str) -> Optional[str]:
    try:
        parse_spec(value)
    except BuildError as e:
        return e.message
    return None


def load(path: Path) -> Profile:
    """Read and validate a profile; raise ProfileError listing every problem."""
    if path.is_dir():
        path = path / PROFILE_NAME
    try:
        text = path.read_text()
    except OSError as e:
        raise BuildError(f"cannot read profile {path}: {e.strerror}", exit_code=2) from None
    data, lines, texts = _compose(text, str(path))
    r = _Reader(path, data, lines, texts)
    if not isinstance(data, dict):
        raise ProfileError([f"{path}:1: a profile must be a mapping of sections (user, network, master, workers)"])
    r.section((), {"image", "apt", "user", "network", "master", "workers"})
    r.section(("network",), {"subnet", "interface"})
    r.section(("workers",), {"count", "hostname", "first_address", "nodes", "packages", "files"})
    subnet = r.string(("network", "subnet"), "192.168.5.0/24") or "192.168.5.0/24"
    try:
        network = IPv4Network(subnet)
    except ValueError as e:
        r.error(("network", "subnet"), f"network.subnet: '{subnet}' is not an IPv4 network like 192.168.5.0/24 ({e})")
        network = IPv4Network("192.168.5.0/24")
    if network.prefixlen > 30:
        r.error(("network", "subnet"), f"network.subnet {network} is too small for a cluster")
    interface = r.string(("network", "interface"), "eth0", _check_interface) or "eth0"
    user = _read_user(r)
    master = _read_master(r, network)
    workers = _read_workers(r, network)
    _check_addresses(r, network, master, workers)
    worker_packages = _read_packages(r, ("workers", "packages"), [])
    worker_files = _read_files(r, ("workers", "files"))
    image = _read_image(r)
    mirrors = _read_apt_mirrors(r)
    if r.problems:
        raise ProfileError(sorted(r.problems, key=r.line_of))
    return Profile(path, network, interface, user, master, Workers(workers, worker_packages, worker_files), image, mirrors)


def _read_apt_mirrors(r: _Reader) -> dict[str, str]:
    """apt.mirrors, then PIBAKE_APT_MIRRORS ("from=to from=to") on top of it."""
    r.section(("apt",), {"mirrors"})
    kp = ("apt", "mirrors")
    raw = r.get(kp, dict, {})
    mirrors: dict[str, str] = {}
    for old, new in raw.items():
        if not (isinstance(old, str) and is_url(old) and isinstance(new, str) and is_url(new)):
            r.error(kp + (old,), f"apt.mirrors maps a source URL to a mirror URL, both http(s): not {old!r}: {new!r}")
        else:
            mirrors[old] = new
    from_environment, problems = environment.apt_mirrors()
    r.problems.extend(problems)
    return {**mirrors, **from_environment}



def load_image_settings(path: Path) -> ImageSettings:
    """Only the image section, for commands that fetch but bake nothing."""
    if path.is_dir():
        path = path / PROFILE_NAME
    if not path.exists():
        return ImageSettings("latest", None, None, None, True)
    data, lines, texts = _compose(path.read_text(), str(path))
    r = _Reader(path, data if isinstance(data, dict) else {}, lines, texts)
    settings = _read_image(r)
    if r.problems:
        raise ProfileError(r.problems)
    return settings
