"""What a build leaves beside the images: manifest, checksums, and the operator's SSH files.

Each file is written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import datetime
import json
import shlex
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from builder import __version__, bmap
from builder.epoch import Epoch
from builder.files import read_json, write_file
from builder.formats import known_hosts_name, shell_safe_path, ssh_config_path
from builder.keys import KeyStore
from builder.plan import NodePlan, describe, known_hosts
from builder.profile import Profile

MANIFEST = "manifest.json"
OS_LIST = "os_list.json"
# The boards Raspberry Pi OS Lite (64-bit) is offered for in Imager's own list: Imager
# hides an entry whose tags do not name the board chosen.
DEVICES = ("pi5-64bit", "pi4-64bit", "pi3-64bit")


@dataclass(frozen=True)
class BuiltImage:
    plan: NodePlan
    path: Path  # final location in the output folder
    sha256: str
    size: int
    skipped: bool = False  # unchanged since the last build, left as it was
    blocks_sha256: str = ""  # the digest of its non-zero blocks: see image.hash_data


def write_atomic(path: Path, text: str) -> None:
    write_file(path, text, sync=True)


def read_manifest(output: Path) -> dict:
    return read_json(output / MANIFEST)


def update_manifest(output: Path, base: Path, base_sha256: str, built: list[BuiltImage], epoch: Epoch) -> dict:
    """Record the images just built, keeping entries for earlier images still present."""
    nodes = _present(output, read_manifest(output))
    base_stat = base.stat()
    for image in built:
        plan = image.plan
        nodes[plan.node.hostname] = {
            "role": plan.node.role,
            "hostname": plan.node.hostname,
            "address": str(plan.node.address),
            "image": image.path.name,
            "size": image.size,
            "sha256": image.sha256,
            # Lets a rebuild check the image by reading its data only, not its holes.
            "blocks_sha256": image.blocks_sha256,
            "inputs": plan.fingerprint(base_sha256, epoch.seconds),
            # The time written into the image, and where it came from.
            "epoch": {"seconds": epoch.seconds, "source": epoch.source},
            "pibake": __version__,
            # Size and mtime let a rebuild start from this sha256 while it checks it.
            "base_image": {"path": str(base), "sha256": base_sha256, "size": base_stat.st_size, "mtime_ns": base_stat.st_mtime_ns},
            "release": {"codename": plan.release.codename, "reason": plan.release.reason,
                        "first_boot": plan.release.first_boot},
            "operations": [describe(op) for op in plan.ops],
        }
    return _write_manifest(output, nodes)


def _present(output: Path, manifest: dict) -> dict:
    return {name: entry for name, entry in manifest.get("nodes", {}).items()
            if (output / entry.get("image", "")).is_file()}


def refresh_manifest(output: Path) -> dict:
    """The manifest and what is made from it written again, for the images present."""
    return _write_manifest(output, _present(output, read_manifest(output)))


def _write_manifest(output: Path, nodes: dict) -> dict:
    for entry in nodes.values():
        made = bmap.path_for(output / entry["image"])
        if made.is_file():
            entry["bmap"] = made.name
        else:
            entry.pop("bmap", None)
    ordered = dict(sorted(nodes.items()))
    manifest = {"pibake": __version__, "nodes": ordered}
    write_atomic(output / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    lines = "".join(f"{e['sha256']}  {e['image']}\n" for e in ordered.values())
    write_atomic(output / "SHA256SUMS", lines)
    # Made from the manifest again by every build: not synced on its own.
    write_file(output / OS_LIST, json.dumps(os_list(output, manifest), indent=2) + "\n")
    return manifest


def os_list(output: Path, manifest: dict) -> dict:
    """Raspberry Pi Imager's repository format (`rpi-imager --repo output/os_list.json`):
    one entry per node, the master first. init_format "none": Imager offers none of its
    own OS customisation, which would be applied over the node's configuration."""
    entries = []
    nodes = sorted(manifest["nodes"].values(), key=lambda e: (e["role"] != "master", e["hostname"]))
    for entry in nodes:
        path = (output / entry["image"]).resolve()
        # The time written into the image (an older manifest's: the file's own).
        seconds = entry.get("epoch", {}).get("seconds") or path.stat().st_mtime
        built = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).date()
        release = entry.get("release", {}).get("codename", "?")
        entries.append({
            "name": f"{entry['hostname']} ({entry['address']})",
            "description": f"pibake {entry['role']} {entry['hostname']}, {entry['address']}: Raspberry Pi OS "
                           f"{release}, configured. Answer No to OS customisation.",
            "icon": "",
            "url": path.as_uri(),
            "extract_size": entry["size"],
            "extract_sha256": entry["sha256"],
            "image_download_size": entry["size"],
            "release_date": built.isoformat(),
            "init_format": "none",
            "devices": list(DEVICES),
        })
    return {"os_list": entries}


def uplink_name(profile: Profile) -> str:
    """How the operator's machine reaches the master from the home network: the profile's
    master.uplink.address, or the master's mDNS name."""
    return profile.setting("master.uplink.address")


def _identities(profile: Profile, keys: KeyStore) -> list[Path]:
    """The private halves of the profile's keys, where they sit beside them (ssh tries only
    its usual names by itself), and the operator key pibake made, if it made one."""
    private = [f.with_suffix("") for f in profile.user.key_files if f.suffix == ".pub" and f.with_suffix("").is_file()]
    private += [keys.operator_key_path] if profile.user.operator_key else []
    return [p.resolve() for p in private]


def _ssh_config(output: Path, profile: Profile, keys: KeyStore) -> str:
    """The operator's ssh_config. Every value is written by OpenSSH's own rules
    (formats.ssh_config_path), or the build is refused: `ssh -G` reads back exactly
    the names, addresses and paths the build meant, and nothing else."""
    master = profile.master.node
    uplink = uplink_name(profile)
    port_number = profile.setting("master.uplink.port")
    port = f"    Port {port_number}\n" if port_number != 22 else ""
    folder = shell_safe_path(str(output.resolve()), "the output folder")
    known = ssh_config_path(f"{folder}/known_hosts", "the output folder's known_hosts")
    blocks = [
        "# Generated by pibake. From the home network or the cluster's switch alike:\n"
        f"#   ssh -F {folder}/ssh_config worker1\n"
        f"# {master.hostname} is reached by {uplink}, the workers through it; {master.hostname}-lan is its LAN\n"
        "# address. HostKeyAlias keeps strict checking working whatever HostName says.\n",
        f"Host {master.hostname}\n    HostName {uplink}\n    HostKeyAlias {master.hostname}\n{port}",
        f"Host {master.hostname}-lan\n    HostName {master.address}\n    HostKeyAlias {master.hostname}\n",
    ]
    for node in profile.workers.nodes:
        blocks.append(f"Host {node.hostname}\n    HostName {node.address}\n    HostKeyAlias {node.hostname}\n"
                      f"    ProxyJump {master.hostname}\n")
    identity = "".join(f"    IdentityFile {ssh_config_path(str(p), 'the key')}\n" for p in _identities(profile, keys))
    blocks.append(
        f"Host *\n    User {profile.user.name}\n    UserKnownHostsFile {known}\n"
        f"    StrictHostKeyChecking yes\n    PasswordAuthentication no\n{identity}"
    )
    return "\n".join(blocks)


# Ansible's group names hold '_', which no host name can: a group is never also a host.
MASTER_GROUP = "cluster_master"
WORKERS_GROUP = "cluster_workers"


def _inventory(output: Path, profile: Profile) -> str:
    """Ansible's ssh reads the same ssh_config, so it reaches the workers through the master too.
    Ansible splits ansible_ssh_common_args as a shell would; ssh then hands the path to one."""
    config = shell_safe_path(str(output.resolve()), "the output folder") + "/ssh_config"
    inventory = {"all": {
        "vars": {"ansible_user": profile.user.name, "ansible_ssh_common_args": f"-F {shlex.quote(config)}"},
        "children": {
            MASTER_GROUP: {"hosts": {profile.master.node.hostname: None}},
            WORKERS_GROUP: {"hosts": {n.hostname: None for n in profile.workers.nodes}},
        },
    }}
    return yaml.safe_dump(inventory, sort_keys=False)


def _fabfile(profile: Profile, keys: KeyStore) -> str:
    return FABFILE.substitute(master=repr(profile.master.node.hostname),
                              workers=repr([n.hostname for n in profile.workers.nodes]),
                              identities=repr([str(p) for p in _identities(profile, keys)]))


def check_operator_files(output: Path, profile: Profile, keys: KeyStore) -> None:
    """Refuse, before anything is baked, a build whose ssh_config, inventory or fabfile
    could not be written by their formats' rules (a folder name ssh would misread)."""
    _ssh_config(output, profile, keys)
    _inventory(output, profile)
    _fabfile(profile, keys)


def write_ssh_files(output: Path, profile: Profile, keys: KeyStore) -> None:
    """known_hosts, ssh_config, an Ansible inventory and a fabfile for the operator's machine.

    The operator's machine is on the home network, the master's uplink side, where the
    cluster's LAN addresses cannot be reached: `ssh master` goes to the master's uplink
    name, and every worker is reached through it (ProxyJump), with strict host key
    checking at both hops. `master-lan` is the master's LAN address, for a machine
    plugged into the cluster's switch."""
    reached_as = known_hosts_name(uplink_name(profile), profile.setting("master.uplink.port"))
    files = {"ssh_config": _ssh_config(output, profile, keys), "inventory.yaml": _inventory(output, profile),
             "fabfile.py": _fabfile(profile, keys), "known_hosts": known_hosts(profile, keys, (reached_as,))}
    for name, text in files.items():
        write_atomic(output / name, text)


# Fabric (paramiko) reads ssh_config's HostName, Port, User and ProxyJump, but not
# UserKnownHostsFile or StrictHostKeyChecking: the fabfile loads known_hosts and refuses
# any other key itself, at every hop, and names the keys to log in with itself.
FABFILE = string.Template('''"""Generated by pibake: run a command on every node of the cluster, from this machine.

    fab -r output on --cmd uptime               # every node, the master first
    fab -r output on --cmd uptime --workers     # the workers only

It reaches the nodes as ssh_config beside it says (the workers through the master) and
refuses any host key but those in known_hosts beside it. Needs Fabric (pip install fabric).
"""

from pathlib import Path

from fabric import Config, Connection, task
from paramiko import RejectPolicy, SSHException

HERE = Path(__file__).resolve().parent
MASTER = $master
WORKERS: list = $workers
# The keys ssh_config names, given to paramiko as they are: it reads ssh_config's quoting
# and `%` tokens otherwise than ssh does.
IDENTITIES: list = $identities


def connect(host: str) -> Connection:
    connection = Connection(host, config=Config(runtime_ssh_path=str(HERE / "ssh_config")))
    hop = connection
    while isinstance(hop, Connection):  # the node, then the master it is reached through
        hop.connect_kwargs["key_filename"] = list(IDENTITIES)
        hop.client.load_host_keys(str(HERE / "known_hosts"))
        hop.client.set_missing_host_key_policy(RejectPolicy())
        hop = hop.gateway
    return connection


def shown(text: str) -> str:
    """A node's line with everything a terminal would act on (escape sequences, carriage
    returns) written as its escape: no node rewrites another's lines or the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


@task
def on(c, cmd, workers=False):
    """Run CMD on every node (--workers: on the workers only), one after the other."""
    failed = []
    for host in WORKERS if workers else [MASTER, *WORKERS]:
        try:
            with connect(host) as connection:
                result = connection.run(cmd, hide=True, warn=True)
        except (OSError, SSHException) as e:  # down, unreachable, or a host key that is not the cluster's
            print(f"{host}: cannot run it there: {e}")
            failed.append(host)
            continue
        for line in (result.stdout + result.stderr).rstrip("\\n").split("\\n"):
            print(f"{host}: {shown(line)}")
        if not result.ok:
            failed.append(host)
    if failed:
        raise SystemExit(f"failed on {', '.join(failed)}")
''')
