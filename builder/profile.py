"""Cluster profiles: YAML in, validated frozen dataclasses out.

Every problem in a profile is collected and reported at once, each with the
`file:line` it comes from, before any image is touched.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from builder import environment, promises, urls
from builder.catalog import parse_spec
from builder.errors import BuildError, InputError, Place, Problem, ProfileError
from builder.files import read_regular
from builder.formats import CONTROL_RE

PROFILE_NAME = "cluster.yaml"

# Every pattern is applied with fullmatch: `$` alone would let a trailing newline through.
HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
USERNAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")  # what userconf-pi accepts
INTERFACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # Debian policy 5.6.1
LEASE_RE = re.compile(r"infinite|0*[1-9][0-9]{0,8}[smhdw]?")  # 0 would be no lease at all
MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
CRYPT_RE = re.compile(r"\$(1|5|6|y|gy|7|2[aby])\$[./A-Za-z0-9$=,]{1,512}")
KeyPath = tuple

# Bounds on what a profile may hold: it is typed by hand and shared, and none of these
# is near what a real cluster needs.
PROFILE_LIMIT = 1 << 20  # bytes
KEY_FILE_LIMIT = 256 << 10  # an authorized_keys-style file
PASSPHRASE_LIMIT = 4 << 10
SOURCE_LIMIT = 64 << 20  # one `files:` source
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_TEXT = 4096  # characters in one value
MAX_LIST = 250  # entries in one list, like workers.count


def _q(value: str) -> str:
    """A value quoted for an error message: a short prefix of it, never the whole of a long one,
    and never a URL's credentials (hidden before it is cut, which could leave half of them)."""
    value = urls.shown(value)
    return f"'{value}'" if len(value) <= 60 else f"'{value[:57]}...' ({len(value)} characters)"


def _short(text: str) -> str:
    """A path or other text for an error message, cut short when it is long."""
    return text if len(text) <= 120 else f"{text[:117]}... ({len(text)} characters)"


def _text_problem(value: str) -> Optional[str]:
    """The rule every string of a profile meets, before the check of its own setting."""
    if len(value) > MAX_TEXT:
        return f"{_q(value)} is longer than {MAX_TEXT} characters"
    control = CONTROL_RE.search(value)
    if control:
        return (f"holds a control character ({ascii(control[0])} at character {control.start() + 1}); "
                "a value is one line of printable text")
    return None


# Names with a meaning of their own where node names are written: the machine itself,
# and Ansible's implicit groups (output/inventory.yaml).
RESERVED_NAMES = ("localhost", "all", "ungrouped")


def _check_hostname(value: str) -> Optional[str]:
    if not HOSTNAME_RE.fullmatch(value):
        return f"{_q(value)} is not a valid hostname (lower-case letters, digits and '-', at most 63, no leading or trailing '-')"
    if value in RESERVED_NAMES:
        return f"{_q(value)} cannot name a node: {', '.join(RESERVED_NAMES)} mean something else to ssh and Ansible"
    return None


def _check_host(value: str) -> Optional[str]:
    if "%" in value:
        return (f"{_q(value)} has a zone id (%...), which known_hosts cannot hold: give a global address, a DNS name "
                "or the master's mDNS name")
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        return None if urls.is_host_name(value) else f"{_q(value)} is not an IP address or a DNS name"


def _check_interface(value: str) -> Optional[str]:
    return None if INTERFACE_RE.fullmatch(value) else f"{_q(value)} is not a valid interface name"


# The node mounts fresh file systems over these at boot: a file baked there would never be seen.
HIDDEN_AT_BOOT = ("/proc", "/sys", "/dev", "/run", "/tmp")


def destination_problem(path: str) -> Optional[str]:
    """The rule a `files:` destination meets: a clean absolute path to a file, where the
    node will see it. Checked on the path as typed, and again on the path it resolves
    to inside the image."""
    parts = path.split("/")
    if not path.startswith("/") or path == "/":
        return f"{_q(path)} must be an absolute path to a file, like /etc/motd"
    if path.endswith("/"):
        return f"{_q(path)} ends in '/': name the file, not a folder"
    if any(part in ("", ".", "..") for part in parts[1:]):
        return f"{_q(path)} is not a clean path (no '//', '/./' or '/../')"
    if any(len(part.encode()) > 255 for part in parts):
        return f"{_q(path)} has a name longer than 255 bytes"
    hidden = next((top for top in HIDDEN_AT_BOOT if path == top or path.startswith(top + "/")), None)
    if hidden:
        return f"{_q(path)} is under {hidden}, which the node mounts afresh at boot: the file would never be seen"
    return None


def is_private_key(content: bytes) -> bool:
    """OpenSSH, PEM and PKCS#8 private keys, encrypted or not, OpenPGP's, and PuTTY's."""
    return bool(re.search(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|^PuTTY-User-Key-File-", content, re.M))


# The master answers to <hostname>.local on the home network, which output/ssh_config
# relies on: Raspberry Pi OS Lite has avahi-daemon; an image without it gets it staged.
MDNS = "avahi-daemon"
# The keys ssh tries first, and so the ones to authorize when the profile names none.
DEFAULT_KEYS = ("~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub")


def _check_url(value: str) -> Optional[str]:
    return urls.problem(value)


def _check_release(value: str) -> Optional[str]:
    try:
        parse_spec(value)
    except BuildError as e:
        return e.message
    return None


def _one_of(*choices: str) -> Callable[[str], Optional[str]]:
    return lambda v: None if v in choices else f"{_q(v)} must be one of {', '.join(choices)}"


@dataclass(frozen=True)
class Setting:
    """One key of the profile: where it is, what it holds, its default and what it means.

    SETTINGS is the one list of them: the keys a section allows, the defaults the
    readers fall back on, and the README's profile table all come from it."""

    path: str  # dotted; "[]" stands for every entry of a list: "workers.nodes[].mac"
    kind: type  # str, int, bool, list, dict, or IPv4Address
    default: Any  # what an absent key means; None: unset, or computed (then `shown` says how)
    help: str
    check: Optional[Callable[[str], Optional[str]]] = None  # for strings: a problem, or None
    shown: str = ""  # the default as the README shows it, when it is not `default` itself

    @property
    def shown_default(self) -> str:
        if self.shown:
            return self.shown
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        if isinstance(self.default, list):
            return f"`[{', '.join(self.default)}]`"
        return f"`{self.default}`"


def _file_settings(role: str) -> tuple[Setting, ...]:
    return (
        Setting(f"{role}.files[].source", str, None, "file on this machine to copy (relative to the profile)"),
        Setting(f"{role}.files[].path", str, None, "where it goes in the image: an absolute path to a file, "
                "not one pibake writes itself", destination_problem),
        Setting(f"{role}.files[].mode", str, "0644", "octal mode, quoted or not (`0600`, `644`, `\"0640\"`)"),
        Setting(f"{role}.files[].owner", str, "root", "`root`, `USER` (the login user) or `UID:GID`"),
        Setting(f"{role}.files[].allow", list, [], "promises the entry breaks knowingly: "
                + ", ".join(f"`{name}`" for name in promises.NAMES) + " (see What a `files:` entry may not undo)"),
        Setting(f"{role}.files[].enable", bool, False, "enable the unit it installs in /etc/systemd/system, as "
                "`systemctl enable` would (its `[Install]` `WantedBy=`/`RequiredBy=`)"),
    )


SETTINGS: tuple[Setting, ...] = (
    Setting("image.release", str, None, "`latest`, a family (`bookworm`), a date (`2025-05-13`) or `family@date`",
            _check_release, shown="`latest`"),
    Setting("image.url", str, None, "an exact image file to download instead", _check_url),
    Setting("image.sha256", str, None, "the sha256 of the file at `image.url`",
            lambda v: None if re.fullmatch(r"[0-9a-fA-F]{64}", v) else "must be 64 hex digits"),
    Setting("image.file", str, None, "a local `.img`, `.img.xz`, `.img.gz` or `.zip` instead"),
    Setting("image.download_base", str, None, "where images are downloaded from (a local mirror)", _check_url,
            shown="downloads.raspberrypi.com"),
    Setting("image.os_list", str, None, "the OS list images are chosen from (a local mirror)", _check_url,
            shown="Imager's, on `download_base`"),
    Setting("image.verify_signature", bool, True, "check the OpenPGP signature against the pinned Raspberry Pi keys"),
    Setting("timezone", str, None, "every node's time zone, from the image's `/usr/share/zoneinfo` (`Europe/Berlin`)",
            lambda v: None if re.fullmatch(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*", v) and len(v) <= 64 else
            f"{_q(v)} is not a time zone name like Europe/Berlin or UTC", shown="the image's (`Europe/London`)"),
    Setting("apt.mirrors", dict, None, "`{source URL: mirror URL}`: where the build downloads packages from instead "
            "of the image's sources"),
    Setting("user.name", str, "pi", "login user on every node (the image's uid 1000 is renamed to it)",
            lambda v: None if USERNAME_RE.fullmatch(v) and v != "root" else
            f"{_q(v)} is not a valid user name (lower-case letter first, then letters, digits, '-'; not root)"),
    Setting("user.password_hash", str, None, "crypt hash (`openssl passwd -6`) for console login and `sudo`; "
            "SSH stays key-only",
            lambda v: None if CRYPT_RE.fullmatch(v) else
            "must be a crypt hash such as the output of `openssl passwd -6` (a plain password is not accepted)"),
    Setting("user.ssh_keys", list, list(DEFAULT_KEYS), "public key files allowed to log in",
            shown="those of `~/.ssh/id_ed25519.pub`, `id_ecdsa.pub`, `id_rsa.pub` that exist; if none, pibake makes "
                  "an operator key in the state folder"),
    Setting("user.sudo", str, "nopasswd", "`nopasswd`, `password` (needs `password_hash`) or `none`",
            _one_of("nopasswd", "password", "none")),
    Setting("network.subnet", str, "192.168.5.0/24", "the cluster LAN"),
    Setting("network.interface", str, "eth0", "the LAN port of every node", _check_interface),
    Setting("master.hostname", str, "master", "the master's host name", _check_hostname),
    Setting("master.address", IPv4Address, None, "static address on the LAN", shown="first address of the subnet"),
    Setting("master.dhcp.start", IPv4Address, None, "start of dnsmasq's dynamic range; the range must not cover the "
            "master or a worker", shown="subnet `.2`"),
    Setting("master.dhcp.end", IPv4Address, None, "end of dnsmasq's dynamic range", shown="subnet `.64`"),
    Setting("master.dhcp.lease", str, "24h", "a number with `s`, `m`, `h`, `d` or `w`, or `infinite`",
            lambda v: None if LEASE_RE.fullmatch(v) else
            f"lease {_q(v)} must be a number with an optional unit s, m, h, d or w, or 'infinite'"),
    Setting("master.uplink.interface", str, "wlan0", "the way out to the internet", _check_interface),
    Setting("master.uplink.address", str, None, "how your machine reaches the master from the home network "
            "(an address or a DNS name), for output/ssh_config", _check_host,
            shown="`<master.hostname>.local` (mDNS)"),
    Setting("master.uplink.port", int, 22, "the SSH port that reaches the master at that address (a router's "
            "port forward, say), for output/ssh_config"),
    Setting("master.uplink.nat", bool, True, "the workers may go out of the uplink (masqueraded) when the image "
            "first boots; `sudo pibake-nat on|off` on the master changes it"),
    Setting("master.uplink.wifi.ssid", str, None, "Wi-Fi network; none leaves Wi-Fi unconfigured",
            lambda v: None if 1 <= len(v.encode()) <= 32 and v.isprintable() else "an SSID is 1 to 32 printable bytes"),
    Setting("master.uplink.wifi.country", str, "GB", "two-letter regulatory domain",
            lambda v: None if re.fullmatch(r"[A-Z]{2}", v) else
            f"{_q(v)} must be a two-letter ISO 3166 country code, like GB or DE"),
    Setting("master.uplink.wifi.passphrase_env", str, "PIBAKE_WIFI_PASSPHRASE", "environment variable holding the passphrase"),
    Setting("master.uplink.wifi.passphrase_file", str, None, "or a file holding it (wins over the variable)"),
    Setting("master.packages", list, ["dnsmasq", "iptables", "tcpdump", "fabric"],
            "staged at build time, installed offline on first boot; must include dnsmasq"),
    Setting("master.files", list, [], "extra files for the master, each with the four keys below"),
    *_file_settings("master"),
    Setting("workers.count", int, 5, f"number of workers (0 to {MAX_LIST})"),
    Setting("workers.hostname", str, "worker{n}", "name pattern; `{n}` is the worker's number",
            lambda v: None if "{n}" in v else "must contain {n}, the worker's number"),
    Setting("workers.first_address", IPv4Address, None, "worker N gets `first_address + N - 1`", shown="subnet `.101`"),
    Setting("workers.nodes", list, None, "instead of the three above, one entry per worker with the keys below"),
    Setting("workers.nodes[].hostname", str, None, "its host name", _check_hostname, shown="from `workers.hostname`"),
    Setting("workers.nodes[].address", IPv4Address, None, "its reserved address", shown="subnet `.101` + N - 1"),
    Setting("workers.nodes[].mac", str, None, "its Ethernet address, added to its DHCP reservation",
            lambda v: None if MAC_RE.fullmatch(v) else f"{_q(v)} is not a MAC address like dc:a6:32:01:02:03"),
    Setting("workers.packages", list, [], "staged for the workers, installed offline on first boot"),
    Setting("workers.files", list, [], "extra files for every worker, each with the four keys below"),
    *_file_settings("workers"),
)
SETTING = {s.path: s for s in SETTINGS}


def _pattern(keypath: KeyPath) -> str:
    """A key path as SETTINGS names it: ("workers", "nodes", 2, "mac") is workers.nodes[].mac."""
    out = ""
    for key in keypath:
        out += "[]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _children(pattern: str) -> set[str]:
    """The keys a section allows: the next part of every setting below it."""
    prefix = f"{pattern}." if pattern else ""
    return {s.path[len(prefix):].split(".")[0].split("[")[0] for s in SETTINGS if s.path.startswith(prefix)}


def settings_table() -> str:
    """The README's profile reference table, made from SETTINGS."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{s.path}` | {s.shown_default} | {s.help} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"


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
    content: bytes = field(default=b"", repr=False)  # read once, for every node that gets it
    origin: Place = Place()  # where the profile lists it: "profiles/cluster.yaml:12: master.files[0]"
    allow: tuple[str, ...] = ()  # the promises it may break knowingly (builder.promises)
    enable: bool = False  # a unit to enable, as `systemctl enable` would

    @property
    def secret(self) -> bool:
        """Not for everyone's eyes: plans and manifests show its size and sha256 only."""
        return not self.mode & 0o004 or is_private_key(self.content)


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
    # every setting of SETTINGS that is not a list entry, by path, as read and checked
    settings: dict[str, Any] = field(default_factory=dict)

    def setting(self, path: str) -> Any:
        """A setting's checked value, for plan steps: a new setting needs its record in
        SETTINGS and the step that uses it, nothing here."""
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


# libyaml's parser where PyYAML has it (Debian's does): a 50-node profile loads in a few
# milliseconds instead of forty.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_events(text: str, name: str) -> None:
    """Refuse what a profile never needs and a hostile one uses: anchors and aliases (an alias
    bomb grows exponentially), explicit tags (`!!python/...`), and deep nesting; before
    anything is built from the text."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        where = Place(file=name, line=event.start_mark.line + 1)
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ProfileError([Problem(where, "YAML anchors and aliases (&, *) are not allowed in a profile; "
                                               "write the value out")])
        if getattr(event, "tag", None) is not None and not _implicit(event):
            raise ProfileError([Problem(where, "YAML tags (!...) are not allowed in a profile")])
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ProfileError([Problem(where, f"nested more than {MAX_DEPTH} levels deep")])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _implicit(event: Any) -> bool:
    implicit = getattr(event, "implicit", False)
    return all(implicit) if isinstance(implicit, tuple) else bool(implicit)


def _compose(text: str, name: str) -> tuple[Any, dict[KeyPath, int], dict[KeyPath, str]]:
    """Parse YAML keeping the line of every key, for `file:line` messages, and the text of
    every unquoted scalar that YAML turned into something else (0644, NO, 1:30)."""
    loader = _Loader(text)
    try:
        try:
            _check_events(text, name)
            root = loader.get_single_node()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e)
            raise ProfileError([Problem(Place(file=name, line=mark.line + 1 if mark else None),
                                        f"not valid YAML: {problem}")]) from None
        lines: dict[KeyPath, int] = {}
        texts: dict[KeyPath, str] = {}
        problems: list[Problem] = []

        def build(node: yaml.Node, path: KeyPath) -> Any:
            lines.setdefault(path, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                out: dict[str, Any] = {}
                for key_node, value_node in node.value:
                    key = str(key_node.value)
                    if key in out:
                        problems.append(Problem(Place(file=name, line=key_node.start_mark.line + 1), f"duplicate key '{key}'"))
                    lines[path + (key,)] = key_node.start_mark.line + 1
                    out[key] = build(value_node, path + (key,))
                return out
            if isinstance(node, yaml.SequenceNode):
                return [build(item, path + (i,)) for i, item in enumerate(node.value)]
            try:
                value = loader.construct_object(node)
            except (yaml.YAMLError, ValueError, OverflowError):
                # A plain scalar YAML 1.1 reads as something it then cannot make (a date like
                # 2025-02-30, `=`): what was typed, for its setting's own check to judge.
                value = node.value
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
        self.problems: list[Problem] = []
        self.values: dict[str, Any] = {}  # what value() read, by setting path
        self.sections: set[KeyPath] = set()  # the mappings section() checked

    def where(self, keypath: KeyPath, key: str = "") -> Place:
        """Where a key is in the profile: its file and line (its nearest present parent's), and its path."""
        present = keypath
        while present not in self.lines and present:
            present = present[:-1]
        return Place(file=str(self.path), line=self.lines.get(present, 1), key=key, setting=_dotted(keypath))

    def error(self, keypath: KeyPath, message: str) -> None:
        self.problems.append(Problem(self.where(keypath), message))

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

    def value(self, keypath: KeyPath, default: Any = None) -> Any:
        """The setting at `keypath`, typed and checked as SETTINGS says; absent, its default there
        (or `default`, for one computed from other settings)."""
        setting = SETTING[_pattern(keypath)]
        fallback = setting.default if default is None else default
        if isinstance(fallback, list):
            fallback = list(fallback)
        value: Any
        if setting.kind is str:
            value = self.string(keypath, fallback, setting.check)
        elif setting.kind is IPv4Address:
            value = None if fallback is None and self.raw(keypath) is None else self.address(keypath, str(fallback))
        else:
            value = self.get(keypath, setting.kind, fallback)
        if "[]" not in setting.path:
            self.values[setting.path] = value
        return value

    def the_rest(self) -> dict[str, Any]:
        """Every setting that is not a list entry, those no section reader asked for read now."""
        for setting in SETTINGS:
            if "[]" not in setting.path:
                keys = tuple(setting.path.split("."))
                for depth in range(len(keys)):
                    if keys[:depth] not in self.sections:
                        self.section(keys[:depth])
                if setting.path not in self.values:
                    self.value(keys)
        return dict(self.values)

    def section(self, keypath: KeyPath) -> None:
        """Check that `keypath` is a mapping of the keys SETTINGS has below it."""
        self.sections.add(keypath)
        allowed = _children(_pattern(keypath))
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
            shown = f" ({_q(value) if isinstance(value, str) else value})" if isinstance(value, (str, int, float, bool)) else ""
            self.error(keypath, f"{_dotted(keypath)} must be {_kind_name(kind)}, not {_kind_name(type(value))}{shown}")
            return default
        return value

    def string(self, keypath: KeyPath, default: Optional[str], check: Optional[Callable[[str], Optional[str]]] = None) -> Optional[str]:
        """A string setting, checked as it will be used: defaults made from other settings
        (a worker's name from the pattern) are checked as much as what was typed."""
        value = self.get(keypath, str, default)
        if value is not None:
            problem = _text_problem(value) or (check(value) if check is not None else None)
            if problem:
                self.error(keypath, f"{_dotted(keypath)}: {problem}")
        return value

    def strings(self, keypath: KeyPath) -> list[str]:
        value = self.value(keypath)
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.error(keypath + (i,), f"{_dotted(keypath)} entries must be strings, not {_kind_name(type(item))}")
            elif _text_problem(item):
                self.error(keypath + (i,), f"{_dotted(keypath)}[{i}]: {_text_problem(item)}")
            else:
                out.append(item)
        return out

    def address(self, keypath: KeyPath, default: str) -> Optional[IPv4Address]:
        value = self.raw(keypath)
        text = default if value is None else str(value)
        try:
            return IPv4Address(text)
        except ValueError:
            self.error(keypath, f"{_dotted(keypath)}: '{text}' is not an IPv4 address")
            return None

    def read(self, keypath: KeyPath, path: Path, limit: int, what: str) -> Optional[bytes]:
        """A file the profile names: a regular file of at most `limit` bytes, or a problem."""
        try:
            return read_regular(path, limit)
        except OSError as e:
            self.error(keypath, f"cannot read {what} {_short(str(path))}: {e.strerror}")
            return None

    def local_path(self, keypath: KeyPath, text: str) -> Optional[Path]:
        """A file on this machine the profile names: `~` expanded, relative to the profile.
        Environment variables are not expanded (a path would show a variable's value, a
        passphrase, say, in messages and plans); a NUL was reported by the text rule."""
        if "\0" in text:
            return None
        if re.search(r"\$(\{\w*\}?|\w)", text):
            self.error(keypath, f"{_dotted(keypath)}: {_q(text)} holds '$': environment variables are not expanded in "
                                "profile paths; write the path out (~ is expanded)")
            return None
        path = Path(os.path.expanduser(text))
        return path if path.is_absolute() else self.path.parent / path


def _dotted(keypath: KeyPath) -> str:
    out = ""
    for key in keypath:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a mapping"}.get(kind, kind.__name__)


# ---------------------------------------------------------------- sections


def _read_user(r: _Reader) -> User:
    r.section(("user",))
    name = r.value(("user", "name"))
    password_hash = r.value(("user", "password_hash"))
    sudo = r.value(("user", "sudo"))
    if sudo == "password" and password_hash is None:
        r.error(("user", "sudo"), "user.sudo is 'password' but user.password_hash is not set, so sudo could never succeed")
    keys: list[str] = []
    files: list[Path] = []
    # Not named: whichever of ssh's usual keys exist, or, if none, one pibake makes.
    named = r.raw(("user", "ssh_keys")) is not None
    key_paths = r.strings(("user", "ssh_keys"))
    for i, text in enumerate(key_paths):
        path = r.local_path(("user", "ssh_keys", i), text)
        if path is not None and (named or path.exists()):
            keys.extend(_read_public_keys(r, ("user", "ssh_keys", i), path))
            files.append(path)
    if named and not key_paths:
        r.error(("user", "ssh_keys"), "user.ssh_keys must list at least one public key file, or you could never log in")
    return User(name or "pi", password_hash, tuple(keys), sudo or "nopasswd", not named and not keys, tuple(files),
                r.where(("user", "name"), "user.name"))


def _read_public_keys(r: _Reader, keypath: KeyPath, path: Path) -> list[str]:
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


def _read_files(r: _Reader, keypath: KeyPath) -> tuple[ExtraFile, ...]:
    out = []
    for i, item in enumerate(r.value(keypath)):
        kp = keypath + (i,)
        if not isinstance(item, dict):
            r.error(kp, f"{_dotted(keypath)} entries must be mappings with source and path")
            continue
        r.section(kp)
        source_text = r.value(kp + ("source",))
        dest = r.value(kp + ("path",))
        mode = _read_mode(r, kp + ("mode",))
        owner = r.value(kp + ("owner",))
        allow = _read_allow(r, kp + ("allow",))
        enable = r.value(kp + ("enable",))
        if source_text is None or dest is None:
            r.error(kp, f"{_dotted(kp)} needs both source and path")
            continue
        source = r.local_path(kp + ("source",), source_text)
        content = _read_source(r, kp + ("source",), source) if source is not None else None
        uid_gid = _owner_ids(owner)
        if uid_gid is None:
            r.error(kp + ("owner",), f"owner {_q(owner)} must be root, USER (the login user) or UID:GID, "
                                     f"each 0 to {MAX_ID}")
            uid_gid = (0, 0)
        broken = promises.by_mode(mode)
        if broken is not None and broken.name not in allow:
            r.error(kp + ("mode",), f"{_dotted(kp)}: {promises.refusal(f'mode {mode:04o}', broken)}")
        if content and is_private_key(content) and mode & 0o004:
            r.error(kp + ("mode",), f"{_dotted(kp)}: {_short(str(source))} is a private key, and mode {mode:04o} "
                                   "would let everyone on the node read it: use 0600")
        if enable:
            _check_unit(r, kp, dest, content or b"")
        out.append(ExtraFile(source or Path(), dest, mode, *uid_gid, content or b"", r.where(kp + ("path",), _dotted(kp)),
                             tuple(allow), bool(enable)))
    return tuple(out)


def _read_allow(r: _Reader, keypath: KeyPath) -> list[str]:
    allow = r.strings(keypath)
    for i, name in enumerate(allow):
        if name not in promises.NAMES:
            r.error(keypath + (i,), f"{_dotted(keypath)}: {_q(name)} is not one of {', '.join(promises.NAMES)}")
    return allow


def _read_source(r: _Reader, keypath: KeyPath, source: Path) -> Optional[bytes]:
    """A `files:` source: never from the operator's own ~/.ssh (private keys, known hosts)."""
    ssh_folder = Path(os.path.expanduser("~/.ssh")).resolve()
    try:
        resolved = source.resolve()
    except (OSError, RuntimeError):  # a link loop: read() says so
        resolved = source
    if resolved == ssh_folder or ssh_folder in resolved.parents:
        r.error(keypath, f"{_dotted(keypath)}: {_short(str(resolved))} is in your ~/.ssh, whose files are your own "
                         "keys: a node gets the keys pibake makes for it")
        return None
    return r.read(keypath, source, SOURCE_LIMIT, "the file")


# A unit's name as systemd takes it (unit_name_is_valid): no '/', so no link climbs out.
UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,250}\.(service|socket|target|timer|path|mount|automount|swap|slice)")


def _check_unit(r: _Reader, keypath: KeyPath, dest: str, content: bytes) -> None:
    """`enable: true`: a unit in /etc/systemd/system, whose [Install] names units to be wanted by."""
    folder, name = dest.rsplit("/", 1)
    if folder != "/etc/systemd/system" or not UNIT_RE.fullmatch(name):
        r.error(keypath + ("enable",), f"{_dotted(keypath)}: enable is for a unit file in /etc/systemd/system "
                                       f"(like /etc/systemd/system/app.service), not {_q(dest)}")
        return
    wanted = install_targets(content)
    if not wanted:
        r.error(keypath + ("enable",), f"{_dotted(keypath)}: {_q(name)} has no WantedBy= or RequiredBy= in its "
                                       "[Install] section, so nothing would start it")
    for _, target in wanted:
        if not UNIT_RE.fullmatch(target):
            r.error(keypath + ("enable",), f"{_dotted(keypath)}: {_q(name)} names {_q(target)} to be wanted by, "
                                           "which is not a unit name")


def install_targets(content: bytes) -> list[tuple[str, str]]:
    """A unit's [Install] WantedBy= and RequiredBy= as (folder suffix, unit): ("wants", "multi-user.target")."""
    found, section = [], ""
    for line in content.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Install]":
            key, _, value = line.partition("=")
            kind = {"WantedBy": "wants", "RequiredBy": "requires", "UpheldBy": "upholds"}.get(key.strip())
            if kind:
                found += [(kind, unit) for unit in value.split()]
    return found


def _read_mode(r: _Reader, keypath: KeyPath) -> int:
    """A file mode as written, quoted or not: 0644, 644, "0644" and 0o644 are all rw-r--r--."""
    value = r.raw(keypath)
    if value is None:
        return int(SETTING[_pattern(keypath)].default, 8)
    text = r.texts.get(keypath, value if isinstance(value, str) else None)
    if text is None or not re.fullmatch(r"(0o?)?[0-7]{3,4}", text):
        shown = text if text is not None else _kind_name(type(value))
        r.error(keypath, f"{_dotted(keypath)}: {_q(shown)} is not an octal file mode like 0644 or 0600")
        return 0o644
    return int(text.removeprefix("0o"), 8)


MAX_ID = 4294967294  # (uid_t) -1 means "no owner" to chown


def _owner_ids(owner: str) -> Optional[tuple[int, int]]:
    named = {"root": (0, 0), "root:root": (0, 0), "USER": (1000, 1000), "USER:USER": (1000, 1000)}
    if owner in named:
        return named[owner]
    m = re.fullmatch(r"([0-9]{1,10}):([0-9]{1,10})", owner)
    ids = (int(m[1]), int(m[2])) if m else None
    return ids if ids and max(ids) <= MAX_ID else None


def _read_packages(r: _Reader, keypath: KeyPath) -> tuple[str, ...]:
    packages = r.strings(keypath)
    for i, name in enumerate(packages):
        if not PACKAGE_RE.fullmatch(name):
            r.error(keypath + (i,), f"{_q(name)} is not a valid Debian package name")
    return tuple(packages)


def _read_wifi(r: _Reader) -> Optional[Wifi]:
    kp = ("master", "uplink", "wifi")
    r.section(kp)
    ssid = r.value(kp + ("ssid",))
    country = r.value(kp + ("country",))
    env_name = r.value(kp + ("passphrase_env",))
    file_text = r.value(kp + ("passphrase_file",))
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
    return Wifi(ssid, country or "GB", passphrase)


def _read_workers(r: _Reader, network: IPv4Network) -> tuple[Node, ...]:
    kp = ("workers",)
    pattern = r.value(kp + ("hostname",))
    explicit = r.value(kp + ("nodes",))
    if explicit is not None and len(explicit) > MAX_LIST:
        r.error(kp + ("nodes",), f"workers.nodes lists {len(explicit)} workers; at most {MAX_LIST}")
        explicit = explicit[:MAX_LIST]
    if explicit is not None:
        if r.raw(kp + ("count",)) is not None and r.raw(kp + ("count",)) != len(explicit):
            r.error(kp + ("count",), f"workers.count is {r.raw(kp + ('count',))} but workers.nodes lists {len(explicit)}")
        nodes = []
        for i, item in enumerate(explicit):
            nkp = kp + ("nodes", i)
            if not isinstance(item, dict):
                r.error(nkp, "workers.nodes entries must be mappings with hostname and address")
                continue
            r.section(nkp)
            name = r.value(nkp + ("hostname",), (pattern or "worker{n}").replace("{n}", str(i + 1)))
            address = r.value(nkp + ("address",), network.network_address + 101 + i)
            mac = r.value(nkp + ("mac",))
            nodes.append(Node("worker", i + 1, name or "", address or IPv4Address(0), mac))
        return tuple(nodes)
    count = r.value(kp + ("count",))
    if not 0 <= count <= MAX_LIST:
        r.error(kp + ("count",), f"workers.count must be between 0 and {MAX_LIST}, not {count}")
        count = 0
    first = r.value(kp + ("first_address",), network.network_address + 101)
    nodes = []
    for n in range(1, count + 1):
        name = (pattern or "worker{n}").replace("{n}", str(n))
        nodes.append(Node("worker", n, name, (first or IPv4Address(0)) + n - 1))
    # Every name the pattern makes is checked, not the first: worker100 may be too long
    # where worker1 is not.
    bad = next(((node, problem) for node in nodes if (problem := _check_hostname(node.hostname))), None)
    if bad:
        r.error(kp + ("hostname",), f"workers.hostname: {bad[1]} (worker {bad[0].index})")
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
    seen_names = {master.node.hostname: "the master", f"{master.node.hostname}-lan": "the master's LAN alias in ssh_config"}
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


def _read_master(r: _Reader, network: IPv4Network, interface: str) -> Master:
    kp = ("master",)
    r.section(kp)
    r.section(kp + ("dhcp",))
    r.section(kp + ("uplink",))
    hostname = r.value(kp + ("hostname",)) or "master"
    address = r.value(kp + ("address",), network.network_address + 1) or IPv4Address(0)
    start = r.value(kp + ("dhcp", "start"), network.network_address + 2) or IPv4Address(0)
    end = r.value(kp + ("dhcp", "end"), network.network_address + 64) or IPv4Address(0)
    lease = r.value(kp + ("dhcp", "lease")) or "24h"
    uplink = r.value(kp + ("uplink", "interface")) or "wlan0"
    if uplink == interface:
        r.error(kp + ("uplink", "interface"), f"master.uplink.interface is {uplink}, the cluster LAN's port: "
                                              "the uplink must be another interface")
    port = r.value(kp + ("uplink", "port"))
    if not 1 <= port <= 65535:
        r.error(kp + ("uplink", "port"), f"master.uplink.port must be a TCP port, 1 to 65535, not {port}")
    nat = r.value(kp + ("uplink", "nat"))
    wifi = _read_wifi(r)
    packages = _read_packages(r, kp + ("packages",))
    if "dnsmasq" not in packages:
        r.error(kp + ("packages",), "master.packages must include dnsmasq: the master is the cluster's DHCP server")
    if "iptables" not in packages:
        r.error(kp + ("packages",), "master.packages must include iptables: the master's firewall needs it")
    files = _read_files(r, kp + ("files",))
    return Master(Node("master", 0, hostname, address), start, end, lease, uplink, nat, wifi, packages, files)


def _read_image(r: _Reader) -> ImageSettings:
    kp = ("image",)
    r.section(kp)
    chosen = [key for key in ("release", "url", "file") if r.raw(kp + (key,)) is not None]
    if len(chosen) > 1:
        r.error(kp + (chosen[1],), f"image.{chosen[0]} and image.{chosen[1]} both choose the image: keep one")
    release = r.value(kp + ("release",))
    url = r.value(kp + ("url",))
    sha256 = r.value(kp + ("sha256",))
    file_text = r.value(kp + ("file",))
    spec = release or url or "latest"
    if file_text is not None:
        path = r.local_path(kp + ("file",), file_text)
        if path is not None and not path.is_file():
            r.error(kp + ("file",), f"image file {_short(str(path))} does not exist")
        spec = str(path or "")
    if sha256 and not url:
        r.error(kp + ("sha256",), "image.sha256 pins the file at image.url; set image.url too")
    os_list = r.value(kp + ("os_list",))
    base = r.value(kp + ("download_base",))
    verify = r.value(kp + ("verify_signature",))
    return ImageSettings(spec, sha256.lower() if sha256 else None, os_list, base, verify)


def _profile_text(path: Path) -> str:
    try:
        data = read_regular(path, PROFILE_LIMIT)
    except OSError as e:
        raise InputError(f"cannot read profile {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ProfileError([Problem(Place(file=str(path), line=line), f"not UTF-8 text (byte {e.start})")]) from None


def load(path: Path) -> Profile:
    """Read and validate a profile; raise ProfileError listing every problem."""
    if path.is_dir():
        path = path / PROFILE_NAME
    data, lines, texts = _compose(_profile_text(path), str(path))
    r = _Reader(path, data, lines, texts)
    if not isinstance(data, dict):
        raise ProfileError([Problem(Place(file=str(path), line=1),
                                    "a profile must be a mapping of sections (user, network, master, workers)")])
    r.section(())
    r.section(("network",))
    r.section(("workers",))
    subnet = r.value(("network", "subnet")) or "192.168.5.0/24"
    try:
        network = IPv4Network(subnet)
    except ValueError as e:
        r.error(("network", "subnet"), f"network.subnet: '{subnet}' is not an IPv4 network like 192.168.5.0/24 ({e})")
        network = IPv4Network("192.168.5.0/24")
    if network.prefixlen > 30:
        r.error(("network", "subnet"), f"network.subnet {network} is too small for a cluster")
    elif network.prefixlen < 8 or not network.is_private or network.is_loopback or network.is_link_local:
        r.error(("network", "subnet"), f"network.subnet {network} is not a private LAN range "
                                       "(such as 192.168.5.0/24, 10.0.0.0/16 or 172.16.0.0/24)")
    interface = r.value(("network", "interface")) or "eth0"
    user = _read_user(r)
    master = _read_master(r, network, interface)
    workers = _read_workers(r, network)
    _check_addresses(r, network, master, workers)
    worker_packages = _read_packages(r, ("workers", "packages"))
    worker_files = _read_files(r, ("workers", "files"))
    image = _read_image(r)
    mirrors = _read_apt_mirrors(r)
    if r.problems:
        raise ProfileError(r.problems)
    settings = r.the_rest()
    if r.problems:
        raise ProfileError(r.problems)
    return Profile(path, network, interface, user, master, Workers(workers, worker_packages, worker_files), image, mirrors,
                   settings)


def _read_apt_mirrors(r: _Reader) -> dict[str, str]:
    """apt.mirrors, then PIBAKE_APT_MIRRORS ("from=to from=to") on top of it."""
    r.section(("apt",))
    kp = ("apt", "mirrors")
    raw = r.value(kp) or {}
    mirrors: dict[str, str] = {}
    for old, new in raw.items():
        if not (isinstance(old, str) and isinstance(new, str)):
            r.error(kp + (old,), f"apt.mirrors maps a source URL to a mirror URL: not {_kind_name(type(old))} to "
                                 f"{_kind_name(type(new))}")
            continue
        problem = urls.problem(old) or urls.problem(new)
        if problem:
            r.error(kp + (old,), f"apt.mirrors: {problem}")
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
    data, lines, texts = _compose(_profile_text(path), str(path))
    r = _Reader(path, data if isinstance(data, dict) else {}, lines, texts)
    settings = _read_image(r)
    if r.problems:
        raise ProfileError(r.problems)
    return settings
