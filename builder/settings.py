"""Every profile setting, once: its type, default, check, help and README row.

SETTINGS is the one table. A setting's record is the only place that names what it
holds (`kind`), what an absent key means (`default`, or `derive`d from the settings it
`needs`, which come before it in the table), what a value must be (`check`, of any kind:
a pattern, an enum, a range, an address; `each` for every entry of a list), what it
means (`help`) and how the README shows its default. `Reader` reads them all, in the
table's order: every string first meets the one rule for text (one printable line, at
most 4096 characters), then its setting's check, on the final value, derived or typed.

Adding a setting is one record here and the plan step that reads it with
`Profile.setting(path)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable, Optional

from builder import promises, urls
from builder.checks import (CRYPT_RE, DEFAULT_KEYS, LEASE_RE, MAC_RE, MAX_LIST, MODE_RE, PACKAGE_RE, USERNAME_RE, Check,
                            between, check_host, check_interface, check_owner, check_release, check_subnet,
                            includes, matches, UNIT_RE, one_of, check_hostname, destination_problem, q, short, text_problem)
from builder.document import Document, KeyPath, dotted, pattern
from builder.errors import Problem
from builder.files import read_regular

# ---------------------------------------------------------------- the table


class Mode:
    """The kind of a file mode: octal, as typed, quoted or not (0644, 644, "0644" and 0o644)."""


class Values(dict):
    """The settings read so far, by path; for a list's entry, also its index (0 for the first)."""

    index = 0

    def offset(self, path: str, n: int) -> Optional[IPv4Address]:
        """The address `n` after the network address of the subnet setting at `path`."""
        network = self.get(path)
        return network.network_address + n if isinstance(network, IPv4Network) else None


@dataclass(frozen=True)
class Setting:
    """One key of the profile: where it is, what it holds, its default, its check, and what it means."""

    path: str  # dotted; "[]" stands for every entry of a list: "workers.nodes[].mac"
    kind: type  # str, int, bool, list, dict, IPv4Address, IPv4Network or Mode
    default: Any  # what an absent key means; None: unset (or derived)
    help: str
    check: Optional[Check] = None  # a problem with the final value, or None
    shown: str = ""  # the default as the README shows it, when it is not `default` itself
    derive: Optional[Callable[[Values], Any]] = None  # the default, from the settings it needs
    needs: tuple[str, ...] = ()  # what derive reads: settings before this one in the table
    each: Optional[Check] = None  # for a list of strings: a problem with one entry

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
        Setting(f"{role}.files[].mode", Mode, 0o644, "octal mode, quoted or not (`0600`, `644`, `\"0640\"`)",
                shown="`0644`"),
        Setting(f"{role}.files[].owner", str, "root", "`root`, `USER` (the login user) or `UID:GID`", check_owner),
        Setting(f"{role}.files[].allow", list, [], "promises the entry breaks knowingly: "
                + ", ".join(f"`{name}`" for name in promises.NAMES) + " (see What a `files:` entry may not undo)",
                each=lambda v: None if v in promises.NAMES else f"{q(v)} is not one of {', '.join(promises.NAMES)}"),
        Setting(f"{role}.files[].enable", bool, False, "enable the unit it installs in /etc/systemd/system, as "
                "`systemctl enable` would (its `[Install]` `WantedBy=`/`RequiredBy=`)"),
    )


_URL: Check = urls.problem
_PACKAGE = matches(PACKAGE_RE, "{} is not a valid Debian package name")
_UNIT = matches(UNIT_RE, "{} is not a systemd unit name")

SETTINGS: tuple[Setting, ...] = (
    Setting("image.release", str, None, "`latest`, a family (`bookworm`), a date (`2025-05-13`) or `family@date`",
            check_release, shown="`latest`"),
    Setting("image.url", str, None, "an exact image file to download instead", _URL),
    Setting("image.sha256", str, None, "the sha256 of the file at `image.url`",
            lambda v: None if re.fullmatch(r"[0-9a-fA-F]{64}", v) else "must be 64 hex digits"),
    Setting("image.file", str, None, "a local `.img`, `.img.xz`, `.img.gz` or `.zip` instead"),
    Setting("image.download_base", str, None, "where images are downloaded from (a local mirror)", _URL,
            shown="downloads.raspberrypi.com"),
    Setting("image.os_list", str, None, "the OS list images are chosen from (a local mirror)", _URL,
            shown="Imager's, on `download_base`"),
    Setting("image.verify_signature", bool, True, "check the OpenPGP signature against the pinned Raspberry Pi keys"),
    Setting("timezone", str, None, "every node's time zone, from the image's `/usr/share/zoneinfo` (`Europe/Berlin`)",
            lambda v: None if re.fullmatch(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*", v) and len(v) <= 64 else
            f"{q(v)} is not a time zone name like Europe/Berlin or UTC", shown="the image's (`Europe/London`)"),
    Setting("apt.mirrors", dict, {}, "`{source URL: mirror URL}`: where the build downloads packages from instead "
            "of the image's sources", shown="none"),
    Setting("user.name", str, "pi", "login user on every node (the image's uid 1000 is renamed to it)",
            lambda v: None if USERNAME_RE.fullmatch(v) and v != "root" else
            f"{q(v)} is not a valid user name (lower-case letter first, then letters, digits, '-'; not root)"),
    Setting("user.password_hash", str, None, "crypt hash (`openssl passwd -6`) for console login and `sudo`; "
            "SSH stays key-only",
            matches(CRYPT_RE, "must be a crypt hash such as the output of `openssl passwd -6` (a plain password is "
                               "not accepted)")),
    Setting("user.ssh_keys", list, list(DEFAULT_KEYS), "public key files allowed to log in",
            lambda keys: None if keys else "must list at least one public key file, or you could never log in",
            shown="those of `~/.ssh/id_ed25519.pub`, `id_ecdsa.pub`, `id_rsa.pub` that exist; if none, pibake makes "
                  "an operator key in the state folder"),
    Setting("user.sudo", str, "nopasswd", "`nopasswd`, `password` (needs `password_hash`) or `none`",
            one_of("nopasswd", "password", "none")),
    Setting("network.subnet", IPv4Network, IPv4Network("192.168.5.0/24"), "the cluster LAN", check_subnet,
            shown="`192.168.5.0/24`"),
    Setting("network.interface", str, "eth0", "the LAN port of every node", check_interface),
    Setting("master.hostname", str, "master", "the master's host name", check_hostname),
    Setting("master.address", IPv4Address, None, "static address on the LAN", shown="first address of the subnet",
            derive=lambda v: v.offset("network.subnet", 1), needs=("network.subnet",)),
    Setting("master.dhcp.start", IPv4Address, None, "start of dnsmasq's dynamic range; the range must not cover the "
            "master or a worker", shown="subnet `.2`",
            derive=lambda v: v.offset("network.subnet", 2), needs=("network.subnet",)),
    Setting("master.dhcp.end", IPv4Address, None, "end of dnsmasq's dynamic range", shown="subnet `.64`",
            derive=lambda v: v.offset("network.subnet", 64), needs=("network.subnet",)),
    Setting("master.dhcp.lease", str, "24h", "a number with `s`, `m`, `h`, `d` or `w`, or `infinite`",
            matches(LEASE_RE, "lease {} must be a number with an optional unit s, m, h, d or w, or 'infinite'")),
    Setting("master.uplink.interface", str, "wlan0", "the way out to the internet", check_interface),
    Setting("master.uplink.address", str, None, "how your machine reaches the master from the home network "
            "(an address or a DNS name), for output/ssh_config", check_host,
            shown="`<master.hostname>.local` (mDNS)",
            derive=lambda v: f"{v['master.hostname']}.local", needs=("master.hostname",)),
    Setting("master.uplink.port", int, 22, "the SSH port that reaches the master at that address (a router's "
            "port forward, say), for output/ssh_config", between(1, 65535, "a TCP port")),
    Setting("master.uplink.nat", bool, True, "the workers may go out of the uplink (masqueraded) when the image "
            "first boots; `sudo pibake-nat on|off` on the master changes it"),
    Setting("master.uplink.wifi.ssid", str, None, "Wi-Fi network; none leaves Wi-Fi unconfigured",
            lambda v: None if 1 <= len(v.encode()) <= 32 and v.isprintable() else "an SSID is 1 to 32 printable bytes"),
    Setting("master.uplink.wifi.country", str, "GB", "two-letter regulatory domain",
            matches(re.compile(r"[A-Z]{2}"), "{} must be a two-letter ISO 3166 country code, like GB or DE")),
    Setting("master.uplink.wifi.passphrase_env", str, "PIBAKE_WIFI_PASSPHRASE", "environment variable holding the passphrase"),
    Setting("master.uplink.wifi.passphrase_file", str, None, "or a file holding it (wins over the variable)"),
    Setting("master.packages", list, ["dnsmasq", "iptables", "tcpdump", "fabric"],
            "staged at build time, installed offline on first boot; must include dnsmasq",
            includes(("dnsmasq", "the master is the cluster's DHCP server"), ("iptables", "the master's firewall needs it")),
            each=_PACKAGE),
    Setting("master.backup.stop", list, ["dnsmasq"], "services stopped while `pibake backup` reads the master, "
            "started again after (by the master itself if the connection drops)", each=_UNIT),
    Setting("master.files", list, [], "extra files for the master, each with the six keys below"),
    *_file_settings("master"),
    Setting("workers.count", int, 5, f"number of workers (0 to {MAX_LIST})", between(0, MAX_LIST, "a number of workers")),
    Setting("workers.hostname", str, "worker{n}", "name pattern; `{n}` is the worker's number",
            lambda v: None if "{n}" in v else "must contain {n}, the worker's number"),
    Setting("workers.first_address", IPv4Address, None, "worker N gets `first_address + N - 1`", shown="subnet `.101`",
            derive=lambda v: v.offset("network.subnet", 101), needs=("network.subnet",)),
    Setting("workers.nodes", list, None, "instead of the three above, one entry per worker with the keys below",
            lambda nodes: None if len(nodes) <= MAX_LIST else f"lists {len(nodes)} workers; at most {MAX_LIST}"),
    Setting("workers.nodes[].hostname", str, None, "its host name", check_hostname, shown="from `workers.hostname`",
            derive=lambda v: str(v["workers.hostname"]).replace("{n}", str(v.index + 1)), needs=("workers.hostname",)),
    Setting("workers.nodes[].address", IPv4Address, None, "its reserved address", shown="subnet `.101` + N - 1",
            derive=lambda v: v.offset("network.subnet", 101 + v.index), needs=("network.subnet",)),
    Setting("workers.nodes[].mac", str, None, "its Ethernet address, added to its DHCP reservation",
            matches(MAC_RE, "{} is not a MAC address like dc:a6:32:01:02:03")),
    Setting("workers.packages", list, [], "staged for the workers, installed offline on first boot", each=_PACKAGE),
    Setting("workers.backup.stop", list, [], "services stopped while `pibake backup` reads a worker", each=_UNIT),
    Setting("workers.files", list, [], "extra files for every worker, each with the six keys below"),
    *_file_settings("workers"),
)
SETTING = {s.path: s for s in SETTINGS}


def children(section: str) -> set[str]:
    """The keys a section allows: the next part of every setting below it."""
    prefix = f"{section}." if section else ""
    return {s.path[len(prefix):].split(".")[0].split("[")[0] for s in SETTINGS if s.path.startswith(prefix)}


def settings_table() -> str:
    """The README's profile reference table, made from SETTINGS."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{s.path}` | {s.shown_default} | {s.help} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"


def kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a mapping"}.get(
        kind, kind.__name__)


# ---------------------------------------------------------------- reading


class Reader:
    """A document's settings, each typed, defaulted and checked as its record says, with
    every problem recorded (with its place) instead of raised."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.problems: list[Problem] = []
        self.failed: set[str] = set()  # settings (by dotted key path) whose value has a problem

    def error(self, keypath: KeyPath, message: str) -> None:
        self.problems.append(Problem(self.doc.where(keypath), message))
        self.failed.add(dotted(keypath))

    def sections(self, keypath: KeyPath = ()) -> None:
        """Every mapping of the document holds only the keys its section allows."""
        value = self.doc.raw(keypath)
        allowed = children(pattern(keypath))
        if value is None or not allowed:
            return
        if not isinstance(value, dict):
            self.error(keypath, f"{dotted(keypath) or 'the profile'} must be a mapping")
            return
        for key in value:
            if key not in allowed:
                self.error(keypath + (key,), f"unknown key '{dotted(keypath + (key,))}' "
                                             f"(expected one of: {', '.join(sorted(allowed))})")
                continue
            below = keypath + (key,)
            self.sections(below)
            entries = self.doc.raw(below)
            if isinstance(entries, list) and children(pattern(below) + "[]"):
                for i, entry in enumerate(entries[:MAX_LIST]):
                    if isinstance(entry, dict):
                        self.sections(below + (i,))

    def all(self) -> Values:
        """Every setting that is not a list's entry, in the table's order."""
        values = Values()
        for setting in SETTINGS:
            if "[]" not in setting.path:
                values[setting.path] = self.value(tuple(setting.path.split(".")), values)
        return values

    def entry(self, keypath: KeyPath, values: Values) -> Values:
        """The settings of one list entry (keypath ends with its index), over `values`."""
        entry = Values(values)
        entry.index = int(keypath[-1])
        prefix = pattern(keypath) + "."
        for setting in SETTINGS:
            if setting.path.startswith(prefix) and "[]" not in setting.path[len(prefix):]:
                entry[setting.path] = self.value(keypath + (setting.path[len(prefix):],), entry)
        return entry

    def value(self, keypath: KeyPath, values: Values) -> Any:
        """The setting at `keypath`: typed and checked; absent, its default or what it derives."""
        setting = SETTING[pattern(keypath)]
        raw = self.doc.raw(keypath)
        if raw is None:
            if setting.derive is None:
                return list(setting.default) if isinstance(setting.default, list) else setting.default
            if any(need in self.failed for need in setting.needs):
                return setting.derive(values)  # what it is made from has its own problem: said once
            value = setting.derive(values)
        else:
            value = self._typed(keypath, setting, raw)
            if dotted(keypath) in self.failed:
                return value if value is not None else setting.default
        self._check(keypath, setting, value)
        return value

    def _typed(self, keypath: KeyPath, setting: Setting, raw: Any) -> Any:
        kind, name = setting.kind, dotted(keypath)
        typed = self.doc.texts.get(keypath)
        if kind is str and typed is not None:
            return typed  # a setting that is text means what was typed: 0644, not 420; NO (Norway), not false
        if kind in (IPv4Address, IPv4Network):
            text = str(raw)
            try:
                return IPv4Address(text) if kind is IPv4Address else IPv4Network(text)
            except ValueError as e:
                what = ("is not an IPv4 address" if kind is IPv4Address else
                        f"is not an IPv4 network like 192.168.5.0/24 ({e})")
                self.error(keypath, f"{name}: '{text}' {what}")
                return setting.default
        if kind is Mode:
            mode = typed if typed is not None else raw if isinstance(raw, str) else None
            if mode is None or not MODE_RE.fullmatch(mode):
                shown = mode if mode is not None else kind_name(type(raw))
                self.error(keypath, f"{name}: {q(shown)} is not an octal file mode like 0644 or 0600")
                return setting.default
            return int(mode.removeprefix("0o"), 8)
        if kind is int and isinstance(raw, bool) or not isinstance(raw, kind):
            shown = f" ({q(raw) if isinstance(raw, str) else raw})" if isinstance(raw, (str, int, float, bool)) else ""
            self.error(keypath, f"{name} must be {kind_name(kind)}, not {kind_name(type(raw))}{shown}")
            return list(setting.default) if isinstance(setting.default, list) else setting.default
        if isinstance(raw, list) and not children(setting.path + "[]"):
            return self._strings(keypath, setting, raw)
        return raw

    def _strings(self, keypath: KeyPath, setting: Setting, raw: list) -> list[str]:
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                self.error(keypath + (i,), f"{dotted(keypath)} entries must be strings, not {kind_name(type(item))}")
                continue
            problem = text_problem(item) or (setting.each(item) if setting.each else None)
            if problem:
                self.error(keypath + (i,), f"{dotted(keypath)}[{i}]: {problem}")
            else:
                out.append(item)
        return out

    def _check(self, keypath: KeyPath, setting: Setting, value: Any) -> None:
        if value is None:
            return
        problem = text_problem(value) if isinstance(value, str) else None
        if problem is None and setting.check is not None:
            problem = setting.check(value)
        if problem:
            self.error(keypath, f"{dotted(keypath)}: {problem}")

    # ------------------------------------------------------------ files the profile names

    def read(self, keypath: KeyPath, path: Path, limit: int, what: str) -> Optional[bytes]:
        """A file the profile names: a regular file of at most `limit` bytes, or a problem."""
        try:
            return read_regular(path, limit)
        except OSError as e:
            self.error(keypath, f"cannot read {what} {short(str(path))}: {e.strerror}")
            return None

    def local_path(self, keypath: KeyPath, text: str) -> Optional[Path]:
        """A file on this machine the profile names: `~` expanded, relative to the profile.
        Environment variables are not expanded (a path would show a variable's value, a
        passphrase, say, in messages and plans); a NUL was reported by the text rule."""
        if "\0" in text:
            return None
        if re.search(r"\$(\{\w*\}?|\w)", text):
            self.error(keypath, f"{dotted(keypath)}: {q(text)} holds '$': environment variables are not expanded in "
                                "profile paths; write the path out (~ is expanded)")
            return None
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.doc.path.parent / path
