"""The plan: per node, an ordered list of file operations, computed without touching an image.

A build is a script of small `configure_*` steps, each adding operations for one
concern and returning early when it does not apply. Applying the plan is the
appliance module's job; printing it, testing it and recording it in the
manifest all read the same data.
"""

from __future__ import annotations

import functools
import hashlib
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from builder import __version__, promises
from builder.errors import BuildError, InputError, Place
from builder.formats import known_hosts_name
from builder.keys import KeyPair, KeyStore
from builder.operations import MASK, Append, Delete, EditLines, Mkdir, Move, Op, Symlink, Write
from builder.packages import STAGE_DIR, Deb
from builder.extra_files import UNIT_RE, install_targets
from builder.profile import Node, Profile
from builder.release import Release

USER_IDS = (1000, 1000)  # Raspberry Pi OS's first user, renamed or not
FIRST_USER = "pi"
OVERLAYS = Path(__file__).resolve().parent.parent / "overlays"
HOST_KEY_DIR = "/etc/ssh/pibake"
NOT_IN_IMAGE = ("origin", "source", "allow")  # an operation's fields that change nothing in the image


@dataclass(frozen=True)
class NodePlan:
    node: Node
    release: Release
    ops: tuple[Op, ...]
    install_room: int = 0  # what the staged packages take once installed at first boot
    # The name the first user (uid 1000) is renamed to, and where the profile says so: it
    # must not be an account or a group the image already has.
    renamed_to: tuple[str, Place] = ("", Place())

    def fingerprint(self, base_sha256: str, epoch: int) -> str:
        """A hash of everything that decides this node's image: base, pibake, the time written, and every operation in full."""
        h = hashlib.sha256(f"{__version__}\0{base_sha256}\0{self.release.codename}\0{epoch}\0".encode())
        for op in self.ops:
            for name, value in vars(op).items():
                if name in NOT_IN_IMAGE:  # where a profile lists a file, or reads it from, is not in the image
                    continue
                data = value if isinstance(value, bytes) else repr(value).encode()
                h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
            h.update(type(op).__name__.encode() + b"\n")
        return h.hexdigest()

    @property
    def bytes_needed(self) -> int:
        """A generous estimate of the root file system space the plan uses, first boot included."""
        return self.install_room + sum(op.size() for op in self.ops)


def describe(op: Op) -> dict[str, str]:
    """One operation as the plan and the manifest show it: secrets stay out."""
    return op.describe()


# ---------------------------------------------------------------- context


@dataclass
class _Context:
    profile: Profile
    node: Node
    release: Release
    keys: KeyStore
    debs: tuple[Deb, ...] = ()
    ops: list[Op] = field(default_factory=list)

    @property
    def home(self) -> str:
        return f"/home/{self.profile.user.name}"

    def boot(self, name: str) -> str:
        return f"{self.release.boot_dir}/{name}"


def _literal(text: str) -> str:
    """Escape text for use as a re.sub replacement."""
    return text.replace("\\", "\\\\")


# What lists the whole cluster is made once and shared by every node's plan, so that
# planning N nodes takes memory in proportion to N, not N squared.
@functools.lru_cache(maxsize=8)
def _hosts_lines(nodes: tuple[Node, ...]) -> str:
    return "".join(f"{n.address}\t{n.hostname}\n" for n in nodes)


@functools.lru_cache(maxsize=8)
def _known_hosts(nodes: tuple[Node, ...], keys: KeyStore, master_names: tuple[str, ...] = ()) -> str:
    """One line per node: its names, then its host key. `master_names`: other names the master
    goes by, each already in known_hosts' form (formats.known_hosts_name)."""
    lines = []
    for n in nodes:
        names = [known_hosts_name(n.hostname), known_hosts_name(str(n.address))]
        names += master_names if n.role == "master" else ()
        lines.append(f"{','.join(names)} {_key_only(keys.host_key(n.hostname))}\n")
    return "".join(lines)


@functools.lru_cache(maxsize=8)
def _encoded(text: str) -> bytes:
    return text.encode()


def _key_only(pair: KeyPair) -> str:
    return " ".join(pair.public.split()[:2])


@functools.lru_cache(maxsize=8)
def _cluster_section(lines: str) -> str:
    return "\n# pibake cluster\n" + lines


def template_values(profile: Profile, node: Node) -> dict[str, str]:
    master = profile.master
    dhcp_hosts = "".join(
        f"dhcp-host={w.mac + ',' if w.mac else ''}{w.hostname},{w.address},{master.lease}\n" for w in profile.workers.nodes
    )
    return {
        "hostname": node.hostname,
        "address": str(node.address),
        "user": profile.user.name,
        "interface": profile.interface,
        "network": str(profile.network),
        "netmask": str(profile.network.netmask),
        "prefixlen": str(profile.network.prefixlen),
        "master_hostname": master.node.hostname,
        "master_address": str(master.node.address),
        "dhcp_start": str(master.dhcp_start),
        "dhcp_end": str(master.dhcp_end),
        "lease": master.lease,
        "uplink": master.uplink,
        "dhcp_hosts": dhcp_hosts,
        "cluster_hosts": _hosts_lines(profile.nodes),
        "worker_names": "".join(f"{n.hostname}\n" for n in profile.workers.nodes),
        "nat": "on" if master.nat else "off",
        "connection_uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.hostname}.lan.pibake")),
        "host_key_dir": HOST_KEY_DIR,
    }


# ---------------------------------------------------------------- steps


def configure_hostname(ctx: _Context) -> None:
    name = ctx.node.hostname
    ctx.ops.append(Write("/etc/hostname", f"{name}\n".encode()))
    # What raspi-config's do_hostname does: rename the 127.0.1.1 line.
    ctx.ops.append(EditLines("/etc/hosts", r"^127\.0\.1\.1\s.*$", _literal(f"127.0.1.1\t\t{name}")))
    ctx.ops.append(Append("/etc/hosts", _cluster_section(_hosts_lines(ctx.profile.nodes))))


def configure_user(ctx: _Context) -> None:
    """Do offline what userconf-pi does on first boot, so no wizard ever runs."""
    user = ctx.profile.user
    name = user.name
    ctx.ops.append(EditLines(
        "/etc/passwd", rf"^{FIRST_USER}:([^:]*):1000:1000:([^:]*):[^:]*:[^:]*$",
        _literal(f"{name}:") + r"\1:1000:1000:\2" + _literal(f":{ctx.home}:/bin/bash"),
    ))
    # '*' matches no password, yet unlike '!' it does not mark the account locked,
    # which some PAM stacks refuse even for key logins.
    ctx.ops.append(EditLines("/etc/shadow", rf"^{FIRST_USER}:[^:]*:", _literal(f"{name}:{user.password_hash or '*'}:"),
                             secret=user.password_hash is not None))
    if name != FIRST_USER:
        for path in ("/etc/group", "/etc/gshadow"):
            ctx.ops.append(EditLines(path, rf"^{FIRST_USER}:", f"{name}:"))
            ctx.ops.append(EditLines(path, rf"(?<=[:,]){FIRST_USER}(?=,|$)", name, required=False))
        for path in ("/etc/subuid", "/etc/subgid"):
            ctx.ops.append(EditLines(path, rf"^{FIRST_USER}:", f"{name}:", required=False))
        ctx.ops.append(Move(f"/home/{FIRST_USER}", ctx.home))
    if name != FIRST_USER or user.sudo != "nopasswd":
        ctx.ops.append(Delete(f"/etc/sudoers.d/010_{FIRST_USER}-nopasswd"))
    if user.sudo != "none":
        nopasswd = "NOPASSWD: " if user.sudo == "nopasswd" else ""
        ctx.ops.append(Write(f"/etc/sudoers.d/010_{name}-nopasswd", f"{name} ALL=(ALL) {nopasswd}ALL\n".encode(), 0o440))
    else:
        # Debian's sudoers lets the sudo group in with a password: no sudo means out of it too.
        for path in ("/etc/group", "/etc/gshadow"):
            for pattern, replacement in ((rf"^(sudo:[^:]*:[^:]*:(?:[^,]*,)*){name},", r"\1"),  # first or between others
                                         (rf"^(sudo:[^:]*:[^:]*:.+),{name}$", r"\1"),  # last of several
                                         (rf"^(sudo:[^:]*:[^:]*:){name}$", r"\1")):  # the only one
                ctx.ops.append(EditLines(path, pattern, replacement, required=False))
    # Cancel the first-boot rename wizard the way cancel-rename does, and mask it: an
    # [Install] section moved to another target would otherwise bring it back, and it
    # holds up multi-user.target waiting for an answer on tty8.
    ctx.ops.append(Delete("/etc/systemd/system/multi-user.target.wants/userconfig.service"))
    ctx.ops.append(Symlink("/etc/systemd/system/userconfig.service", MASK))
    ctx.ops.append(Delete("/etc/ssh/sshd_config.d/rename_user.conf"))
    ctx.ops.append(Symlink("/etc/systemd/system/getty.target.wants/getty@tty1.service", "/lib/systemd/system/getty@.service"))


def configure_ssh(ctx: _Context) -> None:
    # What `systemctl enable ssh` creates (the unit's WantedBy and Alias).
    ctx.ops.append(Symlink("/etc/systemd/system/multi-user.target.wants/ssh.service", "/lib/systemd/system/ssh.service"))
    ctx.ops.append(Symlink("/etc/systemd/system/sshd.service", "/lib/systemd/system/ssh.service"))
    # Raspberry Pi OS deletes /etc/ssh/ssh_host_* on first boot; a key outside that
    # glob, named by sshd's HostKey, survives it and is the one the node serves.
    host = ctx.keys.host_key(ctx.node.hostname)
    ctx.ops.append(Mkdir(HOST_KEY_DIR))
    ctx.ops.append(Write(f"{HOST_KEY_DIR}/ssh_host_ed25519_key", host.private, 0o600, secret=True))
    ctx.ops.append(Write(f"{HOST_KEY_DIR}/ssh_host_ed25519_key.pub", f"{host.public}\n".encode()))
    ctx.ops.append(Write("/etc/ssh/ssh_known_hosts", _encoded(_known_hosts(ctx.profile.nodes, ctx.keys))))
    cluster = ctx.keys.cluster_key()
    operator = [ctx.keys.operator_key().public] if ctx.profile.user.operator_key else []
    authorized = [*ctx.profile.user.ssh_keys, *operator, cluster.public]
    ctx.ops.append(Mkdir(f"{ctx.home}/.ssh", 0o700, USER_IDS))
    ctx.ops.append(Write(f"{ctx.home}/.ssh/authorized_keys", "".join(f"{k}\n" for k in authorized).encode(), 0o600, USER_IDS))
    if ctx.node.role == "master":
        ctx.ops.append(Write(f"{ctx.home}/.ssh/id_ed25519", cluster.private, 0o600, USER_IDS, secret=True))
        ctx.ops.append(Write(f"{ctx.home}/.ssh/id_ed25519.pub", f"{cluster.public}\n".encode(), 0o644, USER_IDS))


def configure_overlay(ctx: _Context) -> None:
    """Render overlays/common and overlays/<role>, with the release's variants.

    Conventions: `+<variant>/` holds files for one network stack, `@boot/` maps to
    the release's boot partition, `*.tmpl` is rendered with string.Template,
    `*.append` is appended to the file of that name.
    """
    values = template_values(ctx.profile, ctx.node)
    for layer in ("common", ctx.node.role):
        roots = [OVERLAYS / layer] + [OVERLAYS / layer / f"+{v}" for v in ctx.release.variants]
        for root in roots:
            for source, relative, text, executable in _overlay_files(root):
                ctx.ops.append(_overlay_op(ctx, source, relative, text, executable, values))


@functools.lru_cache(maxsize=None)
def _overlay_files(root: Path) -> tuple[tuple[Path, Path, str, bool], ...]:
    """Each file under an overlay folder but its +variant folders: (path, path under root, text, executable).

    Read once per run: every node of a role has the same ones."""
    files = []
    for source in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = source.relative_to(root)
        if not relative.parts[0].startswith("+"):
            files.append((source, relative, source.read_text(), bool(source.stat().st_mode & 0o100)))
    return tuple(files)


def _overlay_op(ctx: _Context, source: Path, relative: Path, text: str, executable: bool, values: dict[str, str]) -> Op:
    target = "/" + relative.as_posix()
    if relative.parts[0] == "@boot":
        target = ctx.release.boot_dir + "/" + Path(*relative.parts[1:]).as_posix()
    for suffix in (".tmpl", ".append"):
        if target.endswith(suffix):
            target = target[: -len(suffix)]
            try:
                text = string.Template(text).substitute(values)
            except (KeyError, ValueError) as e:
                raise BuildError(f"{source}: unknown template variable {e}") from None
    if source.name.endswith(".append"):
        return Append(target, text)
    # NetworkManager ignores keyfiles that are not root-owned 0600.
    mode = 0o600 if "/system-connections/" in target else 0o755 if executable else 0o644
    return Write(target, text.encode(), mode)


def configure_wifi(ctx: _Context) -> None:
    wifi = ctx.profile.master.wifi
    if ctx.node.role != "master" or wifi is None:
        return
    uplink = ctx.profile.master.uplink
    if ctx.release.network == "networkmanager":
        # The SSID as its bytes, each a number followed by ';': NetworkManager's keyfile reader
        # takes that form byte for byte, where text would lose leading and trailing spaces, turn
        # backslashes into escapes, and read a name like `65;66;` as bytes anyway.
        ssid = "".join(f"{byte};" for byte in wifi.ssid.encode())
        keyfile = (
            f"[connection]\nid=pibake-uplink\nuuid={uuid.uuid5(uuid.NAMESPACE_DNS, wifi.ssid + '.uplink.pibake')}\n"
            f"type=wifi\ninterface-name={uplink}\nautoconnect=true\n\n"
            f"[wifi]\nmode=infrastructure\nssid={ssid}\n\n"
            f"[wifi-security]\nkey-mgmt=wpa-psk\npsk={wifi.psk}\n\n"
            "[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n"
        )
        ctx.ops.append(Write("/etc/NetworkManager/system-connections/pibake-uplink.nmconnection", keyfile.encode(), 0o600, secret=True))
        # pi-gen leaves Wi-Fi disabled in NetworkManager's state when no country was set.
        ctx.ops.append(Write("/var/lib/NetworkManager/NetworkManager.state",
                             b"[main]\nNetworkingEnabled=true\nWirelessEnabled=true\nWWANEnabled=true\n"))
    else:
        conf = (
            "ctrl_interface=DIR=/var/run/wpa_supplicant GROUP=netdev\nupdate_config=1\n"
            f"country={wifi.country}\n\nnetwork={{\n\tssid={wifi.ssid.encode().hex()}\n\tpsk={wifi.psk}\n}}\n"
        )
        ctx.ops.append(Write("/etc/wpa_supplicant/wpa_supplicant.conf", conf.encode(), 0o600, secret=True))
    # Unblock the radio: systemd-rfkill's saved state for the Pi 3 and Pi 4 SDIO Wi-Fi, under
    # the names pi-gen writes them with. The regulatory domain goes on the kernel command
    # line, as raspi-config's do_wifi_country puts it.
    for platform in ("3f300000", "fe300000"):
        ctx.ops.append(Write(f"/var/lib/systemd/rfkill/platform-{platform}.mmcnr:wlan", b"0\n"))
    ctx.ops.append(EditLines(ctx.boot("cmdline.txt"), r"^(\S.*?)(?: cfg80211\.ieee80211_regdom=\S+)?\s*$",
                             r"\1" + f" cfg80211.ieee80211_regdom={wifi.country}"))


def configure_timezone(ctx: _Context) -> None:
    """What raspi-config's do_change_timezone leaves behind, without running anything."""
    zone = ctx.profile.setting("timezone")
    if zone is None:
        return
    # The link is refused if the zone is not in the image.
    ctx.ops.append(Symlink("/etc/localtime", f"/usr/share/zoneinfo/{zone}"))
    ctx.ops.append(Write("/etc/timezone", f"{zone}\n".encode()))


def configure_cloud_init(ctx: _Context) -> None:
    """Turn cloud-init off on releases that would run it: pibake has configured the node.

    Left on, it applies the seed files' hostname and user on every boot (and an
    Imager-written user-data, if any) over what pibake baked, and lengthens every
    boot for nothing. cloud-init reads this file and stops.
    """
    if not ctx.release.cloud_init:
        return
    ctx.ops.append(Write("/etc/cloud/cloud-init.disabled",
                         b"# Written by pibake, which configured this node when it baked the image.\n"
                         b"# Delete this file to let cloud-init run again on the next boot.\n"))


def configure_packages(ctx: _Context) -> None:
    """List the packages for the first-boot unit and stage the .debs it installs, offline."""
    packages = ctx.profile.packages(ctx.node)
    if packages:
        ctx.ops.append(Write("/etc/pibake/packages", "".join(f"{p}\n" for p in packages).encode()))
    if ctx.debs:
        ctx.ops.append(Mkdir(STAGE_DIR))
    for deb in ctx.debs:
        ctx.ops.append(Write(f"{STAGE_DIR}/{deb.path.name}", _read_once(deb.path)))


@functools.lru_cache(maxsize=None)
def _read_once(path: Path) -> bytes:
    """Every node that stages a .deb shares one copy of it in memory."""
    return path.read_bytes()


def configure_extra_files(ctx: _Context) -> None:
    for extra in ctx.profile.files(ctx.node):
        ours = next((op for op in ctx.ops if op.path == extra.path), None)
        if ours:
            raise InputError(f"pibake writes {extra.path} itself ({ours.name} {ours.path}): "
                             "choose another path", extra.origin)
        broken = promises.by_path(extra.path)  # as typed; the build checks it again where it leads in the image
        if broken is not None and broken.name not in extra.allow:
            raise InputError(promises.refusal(extra.path, broken), extra.origin)
        source = extra.source.resolve()
        if ctx.keys.dir.resolve() in source.parents:
            raise InputError(f"{source} is one of the keys pibake keeps for the cluster; "
                             "each node gets its own", extra.origin)
        ctx.ops.append(Write(extra.path, extra.content, extra.mode, (extra.uid, extra.gid), extra.secret, extra.origin,
                             str(source), extra.allow))


def enable_units(ctx: _Context) -> None:
    """Create the links that `systemctl enable` would: for pibake's own units, and for the
    units a `files:` entry asks to enable (`enable: true`), never for any other."""
    asked = {extra.path for extra in ctx.profile.files(ctx.node) if extra.enable}
    for op in list(ctx.ops):
        if not isinstance(op, Write) or (op.origin and op.path not in asked):
            continue
        folder, name = op.path.rsplit("/", 1)
        if folder == "/etc/systemd/system" and UNIT_RE.fullmatch(name):
            for kind, unit in install_targets(op.content):
                ctx.ops.append(Symlink(f"/etc/systemd/system/{unit}.{kind}/{name}", op.path))


STEPS = (
    configure_hostname,
    configure_user,
    configure_ssh,
    configure_overlay,
    configure_wifi,
    configure_timezone,
    configure_cloud_init,
    configure_packages,
    configure_extra_files,
    enable_units,
)


def plan_node(profile: Profile, node: Node, release: Release, keys: KeyStore, debs: tuple[Deb, ...] = ()) -> NodePlan:
    """`debs`: what installing the node's packages needs (packages.resolve); none for a plan without an image."""
    ctx = _Context(profile, node, release, keys, debs)
    for step in STEPS:
        step(ctx)
    user = profile.user
    renamed = (user.name, user.origin) if user.name != FIRST_USER else ("", Place())
    return NodePlan(node, release, tuple(ctx.ops), sum(d.installed_size for d in debs), renamed)


class _MadeUpKeys(KeyStore):
    """Keys that are neither read nor kept: for a plan made only to be checked."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))

    def _pair(self, name: str, comment: str) -> KeyPair:
        return KeyPair(b"", f"ssh-ed25519 {name} {comment}")


def check_plan(profile: Profile, nodes: tuple[Node, ...], release: Release) -> None:
    """Plan one node of each role with made-up keys, so that a profile the plan refuses
    (a `files:` entry on a path pibake writes, say) is refused before any key is made
    or package downloaded."""
    for role in sorted({node.role for node in nodes}):
        plan_node(profile, next(n for n in nodes if n.role == role), release, _MadeUpKeys())


def known_hosts(profile: Profile, keys: KeyStore, master_names: tuple[str, ...] = ()) -> str:
    return _known_hosts(profile.nodes, keys, master_names)
