"""The checks settings use: patterns, names, paths, owners, and the rule every string meets.

Each returns what is wrong with a value, in words for the user, or None. `q` and
`short` quote a value for a message without echoing too much of it (or a URL's login).
"""

from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Network
from typing import Any, Callable, Optional

from builder import urls
from builder.catalog import parse_spec
from builder.errors import BuildError
from builder.formats import CONTROL_RE

# Every pattern is applied with fullmatch: `$` alone would let a trailing newline through.
HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
USERNAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")  # what userconf-pi accepts
INTERFACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # Debian policy 5.6.1
LEASE_RE = re.compile(r"infinite|0*[1-9][0-9]{0,8}[smhdw]?")  # 0 would be no lease at all
# A systemd unit name (systemd.unit(5)): no leading "-" that systemctl would read as an option.
UNIT_RE = re.compile(r"[A-Za-z0-9_:@][A-Za-z0-9_:.@-]{0,254}")
MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
CRYPT_RE = re.compile(r"\$(1|5|6|y|gy|7|2[aby])\$[./A-Za-z0-9$=,]{1,512}")
MODE_RE = re.compile(r"(0o?)?[0-7]{3,4}")

# Bounds on what a profile may hold: it is typed by hand and shared, and none of these
# is near what a real cluster needs.
MAX_TEXT = 4096  # characters in one value
MAX_LIST = 250  # entries in one list, like workers.count
# Names with a meaning of their own where node names are written: the machine itself,
# and Ansible's implicit groups (output/inventory.yaml).
RESERVED_NAMES = ("localhost", "all", "ungrouped")
# The keys ssh tries first, and so the ones to authorize when the profile names none.
DEFAULT_KEYS = ("~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub")
# The node mounts fresh file systems over these at boot: a file baked there would never be seen.
HIDDEN_AT_BOOT = ("/proc", "/sys", "/dev", "/run", "/tmp")


def q(value: str) -> str:
    """A value quoted for a message: a short prefix of it, never the whole of a long one, and
    never a URL's credentials (hidden before it is cut, which could leave half of them)."""
    value = urls.shown(value)
    return f"'{value}'" if len(value) <= 60 else f"'{value[:57]}...' ({len(value)} characters)"


def short(text: str) -> str:
    """A path or other text for a message, cut short when it is long."""
    return text if len(text) <= 120 else f"{text[:117]}... ({len(text)} characters)"


def text_problem(value: str) -> Optional[str]:
    """The rule every string of a profile meets, before the check of its own setting."""
    if len(value) > MAX_TEXT:
        return f"{q(value)} is longer than {MAX_TEXT} characters"
    control = CONTROL_RE.search(value)
    if control:
        return (f"holds a control character ({ascii(control[0])} at character {control.start() + 1}); "
                "a value is one line of printable text")
    return None


# ---------------------------------------------------------------- checks


Check = Callable[[Any], Optional[str]]


def check_hostname(value: str) -> Optional[str]:
    if not HOSTNAME_RE.fullmatch(value):
        return f"{q(value)} is not a valid hostname (lower-case letters, digits and '-', at most 63, no leading or trailing '-')"
    if value in RESERVED_NAMES:
        return f"{q(value)} cannot name a node: {', '.join(RESERVED_NAMES)} mean something else to ssh and Ansible"
    return None


def check_host(value: str) -> Optional[str]:
    if "%" in value:
        return (f"{q(value)} has a zone id (%...), which known_hosts cannot hold: give a global address, a DNS name "
                "or the master's mDNS name")
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        return None if urls.is_host_name(value) else f"{q(value)} is not an IP address or a DNS name"


def check_interface(value: str) -> Optional[str]:
    return None if INTERFACE_RE.fullmatch(value) else f"{q(value)} is not a valid interface name"


def destination_problem(path: str) -> Optional[str]:
    """The rule a `files:` destination meets: a clean absolute path to a file, where the
    node will see it. Checked on the path as typed, and again on the path it resolves
    to inside the image."""
    parts = path.split("/")
    if not path.startswith("/") or path == "/":
        return f"{q(path)} must be an absolute path to a file, like /etc/motd"
    if path.endswith("/"):
        return f"{q(path)} ends in '/': name the file, not a folder"
    if any(part in ("", ".", "..") for part in parts[1:]):
        return f"{q(path)} is not a clean path (no '//', '/./' or '/../')"
    if any(len(part.encode()) > 255 for part in parts):
        return f"{q(path)} has a name longer than 255 bytes"
    hidden = next((top for top in HIDDEN_AT_BOOT if path == top or path.startswith(top + "/")), None)
    if hidden:
        return f"{q(path)} is under {hidden}, which the node mounts afresh at boot: the file would never be seen"
    return None


MAX_ID = 4294967294  # (uid_t) -1 means "no owner" to chown


def owner_ids(owner: str) -> Optional[tuple[int, int]]:
    """A `files:` owner as numbers: root, USER (the login user, uid 1000) or UID:GID."""
    named = {"root": (0, 0), "root:root": (0, 0), "USER": (1000, 1000), "USER:USER": (1000, 1000)}
    if owner in named:
        return named[owner]
    m = re.fullmatch(r"([0-9]{1,10}):([0-9]{1,10})", owner)
    ids = (int(m[1]), int(m[2])) if m else None
    return ids if ids and max(ids) <= MAX_ID else None


def check_owner(owner: str) -> Optional[str]:
    if owner_ids(owner) is None:
        return f"owner {q(owner)} must be root, USER (the login user) or UID:GID, each 0 to {MAX_ID}"
    return None


def check_release(value: str) -> Optional[str]:
    try:
        parse_spec(value)
    except BuildError as e:
        return e.message
    return None


def check_subnet(network: IPv4Network) -> Optional[str]:
    if network.prefixlen > 30:
        return f"{network} is too small for a cluster"
    if network.prefixlen < 8 or not network.is_private or network.is_loopback or network.is_link_local:
        return f"{network} is not a private LAN range (such as 192.168.5.0/24, 10.0.0.0/16 or 172.16.0.0/24)"
    return None


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"{q(v)} must be one of {', '.join(choices)}"


def between(low: int, high: int, what: str) -> Check:
    return lambda n: None if low <= n <= high else f"must be {what}, {low} to {high}, not {n}"


def matches(regex: re.Pattern, problem: str) -> Check:
    return lambda v: None if regex.fullmatch(v) else problem.format(q(v))


def includes(*needed: tuple[str, str]) -> Check:
    return lambda names: next((f"must include {name}: {why}" for name, why in needed if name not in names), None)
