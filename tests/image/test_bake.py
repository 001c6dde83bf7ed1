"""Tier 2: the real CLI bakes real images; libguestfs reads every output back.

Each build launches one appliance (about 25 s without KVM), so the module
shares one cluster build and one read-back between its tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.appliance import Appliance, Drive
from builder.tree import Stat, Tree
from conftest import WIFI_PASSPHRASE, Result, run_pibake, write_profile
from rpios_image import make_image

pytestmark = pytest.mark.image

PASSWORD_HASH = "$6$pibaketest$0wLiEfeyG8Kb9mPPbqCf7rsR5qWnTnVGMhbG3lP6fJzQKlnqOJd9VmLk8Yz1qCZgTjDFm6h1SPWwTJ6wz2d6u."


@dataclass
class Baked:
    workdir: Path
    base: Path
    results: list[Result]  # one per command
    boot_dir: str
    base_tree: dict
    trees: dict  # hostname -> snapshot
    files: dict  # hostname -> {path: bytes} for files the tests read

    @property
    def result(self) -> Result:
        return self.results[-1]

    @property
    def output(self) -> Path:
        return self.workdir / "output"

    @property
    def state(self) -> Path:
        return self.workdir / "state"


READ = ("/etc/hostname", "/etc/hosts", "/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow", "/etc/subuid",
        "/etc/ssh/sshd_config.d/pibake.conf", "/etc/ssh/ssh_known_hosts", "/etc/ssh/pibake/ssh_host_ed25519_key",
        "/etc/ssh/pibake/ssh_host_ed25519_key.pub", "/etc/dnsmasq.d/pibake-cluster.conf", "/etc/pibake/cluster.hosts",
        "/etc/iptables/rules.v4", "/etc/iptables/rules.v6", "/etc/systemd/system/pibake-firewall.service", "/etc/pibake/nat",
    "/etc/pibake/packages",
        "/etc/NetworkManager/system-connections/pibake-lan.nmconnection",
        "/etc/NetworkManager/system-connections/pibake-uplink.nmconnection",
        "/var/lib/NetworkManager/NetworkManager.state", "/etc/dhcpcd.conf", "/etc/wpa_supplicant/wpa_supplicant.conf",
        "/etc/sudoers.d/010_alice-nopasswd", "/etc/sudoers.d/010_pi-nopasswd")


def snapshot(a: Appliance, index: int, boot_dir: str) -> dict[str, dict[str, object]]:
    """Every path of drive `index`, mounted read-only, with type, mode, owner and content hash."""
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link"}
    a.mount(index, boot_dir, readonly=True)
    tree: dict[str, dict[str, object]] = {}
    try:
        for rel in a.g.find("/"):
            path = "/" + rel
            st = a.g.lstatns(path)
            kind = kinds.get(stat.S_IFMT(st["st_mode"]), "other")
            entry: dict[str, object] = {"type": kind, "mode": st["st_mode"] & 0o7777, "uid": st["st_uid"],
                                        "gid": st["st_gid"]}
            if kind == "file":
                entry["sha256"] = a.g.checksum("sha256", path)
            elif kind == "link":
                entry["target"] = a.g.readlink(path)
            tree[path] = entry
    finally:
        a.g.umount_all()
    return tree


def read_images(base: Path, images: dict[str, Path], boot_dir: str) -> tuple[dict, dict, dict]:
    """Snapshot the base and every image, and read the files tests look at, in one appliance."""
    names = list(images)
    with Appliance([Drive(base, readonly=True)] + [Drive(images[n], readonly=True) for n in names]) as a:
        base_tree = snapshot(a, 0, boot_dir)
        trees, files = {}, {}
        for index, name in enumerate(names, start=1):
            trees[name] = snapshot(a, index, boot_dir)
            a.mount(index, boot_dir, readonly=True)
            home = next(p for p in trees[name] if re.fullmatch(r"/home/[^/]+", p))
            wanted = READ + (f"{boot_dir}/cmdline.txt", f"{home}/.ssh/authorized_keys", f"{home}/.ssh/id_ed25519",
                             f"{home}/.ssh/id_ed25519.pub")
            files[name] = {p: a.read(p) for p in wanted if p in trees[name]}
            a.g.umount_all()
    return base_tree, trees, files


CLUSTER_CA = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUpibake\n-----END CERTIFICATE-----\n"
APP_TOKEN = "token: 7f3a9c2e-pibake-test-secret\n"
UPLINK_SSID = " Home\\Net 65;66; "  # what NetworkManager's keyfile reader would misread as text


def bake(tmp: Path, codename: str, profile: str, commands: list[list[str]], env: dict[str, str] | None = None) -> Baked:
    """Run each `pibake build ...` command as a user would, then read every output back."""
    base = make_image(tmp / f"{codename}.img", codename)
    (tmp / "profiles").mkdir()
    (tmp / "profiles/cluster-ca.pem").write_text(CLUSTER_CA)
    (tmp / "profiles/app-token").write_text(APP_TOKEN)
    write_profile(tmp / "profiles", profile)
    results = []
    for command in commands:
        results.append(run_pibake("build", *command, "--image", str(base), cwd=tmp, env=env))
        assert results[-1].code == 0, results[-1].output
    boot_dir = "/boot" if codename == "bullseye" else "/boot/firmware"
    manifest = json.loads((tmp / "output/manifest.json").read_text())
    images = {name: tmp / "output" / entry["image"] for name, entry in manifest["nodes"].items()}
    base_tree, trees, files = read_images(base, images, boot_dir)
    return Baked(tmp, base, results, boot_dir, base_tree, trees, files)


@pytest.fixture(scope="module")
def bookworm(tmp_path_factory, operator_key: Path) -> Baked:
    return bake(tmp_path_factory.mktemp("bookworm"), "bookworm", f"""
        user:
          name: alice
          password_hash: "{PASSWORD_HASH}"
          ssh_keys: [{operator_key}]
        master:
          uplink:
            wifi: {{ssid: '{UPLINK_SSID}', country: DE}}
          files:
            # merged /usr, then openssl's absolute link: it lands in /etc/ssl/certs
            - {{source: cluster-ca.pem, path: /lib/ssl/certs/pibake-cluster-ca.pem}}
            - {{source: app-token, path: /etc/app/token, mode: 0600, owner: USER}}
        workers:
          count: 3
        """, [["master", "-vv"], ["worker", "--count", "2", "-v"]],
        # Copies count as slow, as a real image's are: worker2 is copied while the appliance
        # launches, and every check below holds for it too.
        env={"PIBAKE_SLOW_COPY": "0"})


def master_and_one_worker(operator_key: Path) -> str:
    return f"""
        user:
          ssh_keys: [{operator_key}]
        master:
          uplink:
            wifi: {{ssid: HomeNet}}
        workers:
          count: 1
        """


@pytest.fixture(scope="module")
def bullseye(tmp_path_factory, operator_key: Path) -> Baked:
    return bake(tmp_path_factory.mktemp("bullseye"), "bullseye", master_and_one_worker(operator_key), [["cluster"]])


# A hypervisor whose KVM launches hang in the BIOS for good, as nested KVM can:
# anything else (TCG launches, libguestfs' questions about QEMU) goes to the real QEMU.
HANGING_KVM = """#!/bin/sh
case "$*" in
  *accel=kvm*-kernel*) echo "SeaBIOS (version hanging)"; echo "Booting from ROM.."; while :; do sleep 1; done ;;
esac
exec /usr/bin/qemu-system-x86_64 "$@"
"""


@pytest.fixture(scope="module")
def trixie(tmp_path_factory, operator_key: Path) -> Baked:
    tmp = tmp_path_factory.mktemp("trixie")
    hypervisor = tmp / "hv" / "qemu-system-x86_64"  # the name the watchdog looks for
    hypervisor.parent.mkdir()
    hypervisor.write_text(HANGING_KVM)
    hypervisor.chmod(0o755)
    return bake(tmp, "trixie", f"""
        user:
          ssh_keys: [{operator_key}]
        workers:
          count: 1
        """, [["master"], ["worker"]],
        env={"LIBGUESTFS_HV": str(hypervisor), "XDG_CACHE_HOME": str(tmp / "cache"), "LIBGUESTFS_BACKEND_SETTINGS": None})


def hash_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text(baked: Baked, node: str, path: str) -> str:
    return baked.files[node][path].decode()


def entry(baked: Baked, node: str, path: str) -> tuple:
    e = baked.trees[node][path]
    return e["type"], oct(e["mode"]), e["uid"], e["gid"]


class _Snapshot:
    """A snapshot read back from an image, as the base a plan is played against."""

    def __init__(self, tree: dict) -> None:
        self.tree = tree

    def lstat(self, path: str) -> Stat | None:
        e = self.tree.get(path)
        return Stat(e["type"], e["mode"], (e["uid"], e["gid"]), e.get("target", "")) if e else None

    def read(self, path: str) -> bytes:
        raise AssertionError(path)


def landed(baked: Baked, node: str, path: str) -> str:
    """Where a path of the plan is in the node's image, its links followed."""
    return Tree(_Snapshot(baked.trees[node]), baked.boot_dir).resolve_parent(path)


def changed_paths(baked: Baked, node: str) -> set[str]:
    before, after = baked.base_tree, baked.trees[node]
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def allowed_changes(baked: Baked, node: str) -> set[str]:
    """Paths the manifest says were touched, plus what moving a home and creating parents implies."""
    ops = json.loads((baked.output / "manifest.json").read_text())["nodes"][node]["operations"]
    allowed = set()
    for op in ops:
        allowed.add(landed(baked, node, op["path"]))
        if op["op"] == "move":
            destination = op["summary"].removeprefix("-> ")
            allowed |= {p for p in baked.base_tree if p.startswith(op["path"] + "/") or p == op["path"]}
            allowed |= {p for p in baked.trees[node] if p.startswith(destination + "/") or p == destination}
    new_dirs = {p for p, e in baked.trees[node].items() if p not in baked.base_tree and e["type"] == "dir"}
    return allowed | {d for d in new_dirs if any(a.startswith(d + "/") for a in allowed)}


# ------------------------------------------------------------ bookworm


def test_build_reports_its_accelerator_and_summary(bookworm: Baked) -> None:
    assert re.search(r"libguestfs appliance up in [\d.]+ s using (KVM|TCG)", bookworm.result.stderr)
    # worker2 was copied while the appliance launched (PIBAKE_SLOW_COPY=0).
    assert "launching the appliance while 1 more are made" in bookworm.result.stderr
    assert "release: bookworm (/etc/os-release: VERSION_CODENAME=bookworm" in bookworm.result.stderr
    lines = bookworm.result.stdout.splitlines()
    assert lines[0].split() == ["node", "image", "size", "sha256", "hostname", "address", "build"]
    assert [line.split()[0] for line in lines[1:]] == ["worker1", "worker2"]
    assert lines[2].split()[1:] == ["output/worker2.img", "0.63", "GiB",
                                    hash_of(bookworm.output / "worker2.img")[:12], "worker2", "192.168.5.102", "baked"]
    assert sorted(p.name for p in bookworm.output.iterdir()) == [
        "SHA256SUMS", "fabfile.py", "inventory.yaml", "known_hosts", "manifest.json", "master.img", "master.img.bmap",
        "os_list.json", "ssh_config", "worker1.img", "worker1.img.bmap", "worker2.img", "worker2.img.bmap"]


def test_imager_1_firstrun_is_replaced(bookworm: Baked, bullseye: Baked) -> None:
    # systemd runs Imager 1.x's firstrun.sh as kernel-command-line.service; a drop-in
    # runs pibake's script in its place (the boot tests run it).
    for baked in (bookworm, bullseye):
        for node in ("master", "worker1"):
            drop_in = "/etc/systemd/system/kernel-command-line.service.d/pibake.conf"
            assert entry(baked, node, drop_in)[1:] == ("0o644", 0, 0)
            assert entry(baked, node, "/usr/local/lib/pibake/no-imager-firstrun")[1:] == ("0o755", 0, 0)
            assert f"{baked.boot_dir}/user-data" not in baked.trees[node]


def test_nothing_else_changed(bookworm: Baked) -> None:
    for node in ("master", "worker1", "worker2"):
        unexpected = changed_paths(bookworm, node) - allowed_changes(bookworm, node)
        assert not unexpected, f"{node}: {sorted(unexpected)}"


def test_images_stay_flashable_whole_disks(bookworm: Baked) -> None:
    base_table = subprocess.run(["sfdisk", "-d", str(bookworm.base)], capture_output=True, text=True, check=True).stdout
    for name in ("master", "worker2"):
        image = bookworm.output / f"{name}.img"
        assert image.stat().st_size == bookworm.base.stat().st_size
        table = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True, check=True).stdout
        assert table.replace(str(image), "X") == base_table.replace(str(bookworm.base), "X")


def assert_every_operation_landed(baked: Baked, node: str) -> None:
    """Each operation the manifest records is what the image holds: hash, mode, owner, target."""
    ops = json.loads((baked.output / "manifest.json").read_text())["nodes"][node]["operations"]
    tree = baked.trees[node]
    last = {op["path"]: i for i, op in enumerate(ops)}
    for i, op in enumerate(ops):
        path, final = landed(baked, node, op["path"]), last[op["path"]] == i
        on_boot = path.startswith(baked.boot_dir + "/")
        if op["op"] == "delete":
            assert path not in tree or not final, path
        elif op["op"] == "move":
            assert path not in tree and op["summary"].removeprefix("-> ") in tree, path
        elif op["op"] == "symlink":
            assert tree[path] == {**tree[path], "type": "link", "target": op["summary"].removeprefix("-> ")}, path
        elif op["op"] in ("write", "mkdir"):
            kind = "file" if op["op"] == "write" else "dir"
            assert tree[path]["type"] == kind, path
            if not on_boot:
                assert (oct(tree[path]["mode"]), f"{tree[path]['uid']}:{tree[path]['gid']}") == (oct(int(op["mode"], 8)), op["owner"]), path
            if "sha256" in op and final:
                assert tree[path]["sha256"] == op["sha256"], path
        else:
            assert tree[path]["type"] == "file", path
    assert len(ops) > 20


def test_every_operation_landed(bookworm: Baked, bullseye: Baked) -> None:
    for baked, nodes in ((bookworm, ("master", "worker1", "worker2")), (bullseye, ("master", "worker1"))):
        for node in nodes:
            assert_every_operation_landed(baked, node)


def test_hostname_and_hosts(bookworm: Baked) -> None:
    for node, address in (("master", "192.168.5.1"), ("worker2", "192.168.5.102")):
        assert text(bookworm, node, "/etc/hostname") == f"{node}\n"
        hosts = text(bookworm, node, "/etc/hosts")
        assert f"\n127.0.1.1\t\t{node}\n" in hosts and "raspberrypi" not in hosts
        assert hosts.startswith("127.0.0.1\tlocalhost\n")
        for n, a in (("master", "192.168.5.1"), ("worker1", "192.168.5.101"), ("worker3", "192.168.5.103")):
            assert f"\n{a}\t{n}\n" in hosts
        assert entry(bookworm, node, "/etc/hosts")[1:] == ("0o644", 0, 0)
        assert f"{address}\t{node}" in hosts


def test_user_renamed_without_wizard(bookworm: Baked) -> None:
    for node in ("master", "worker1"):
        passwd = text(bookworm, node, "/etc/passwd")
        assert "alice:x:1000:1000:,,,:/home/alice:/bin/bash\n" in passwd and "\npi:" not in passwd
        shadow = text(bookworm, node, "/etc/shadow")
        assert f"alice:{PASSWORD_HASH}:19650:" in shadow
        assert entry(bookworm, node, "/etc/shadow")[1:] == ("0o640", 0, 42)  # kept as the system has it
        group = text(bookworm, node, "/etc/group")
        assert "sudo:x:27:alice\n" in group and "alice:x:1000:\n" in group and ":pi\n" not in group
        assert "alice:!::\n" in text(bookworm, node, "/etc/gshadow")
        assert text(bookworm, node, "/etc/subuid") == "alice:100000:65536\n"
        tree = bookworm.trees[node]
        assert "/home/pi" not in tree
        assert entry(bookworm, node, "/home/alice") == ("dir", "0o755", 1000, 1000)
        assert entry(bookworm, node, "/home/alice/.bashrc")[2:] == (1000, 1000)
        assert "/etc/systemd/system/multi-user.target.wants/userconfig.service" not in tree
        assert "/etc/ssh/sshd_config.d/rename_user.conf" not in tree
        assert tree["/etc/systemd/system/getty.target.wants/getty@tty1.service"]["target"] == "/lib/systemd/system/getty@.service"
        assert "/etc/sudoers.d/010_pi-nopasswd" not in tree
        assert text(bookworm, node, "/etc/sudoers.d/010_alice-nopasswd") == "alice ALL=(ALL) NOPASSWD: ALL\n"
        assert entry(bookworm, node, "/etc/sudoers.d/010_alice-nopasswd")[1:] == ("0o440", 0, 0)


def test_ssh_enabled_key_only_with_baked_host_key(bookworm: Baked, operator_key: Path) -> None:
    cluster_pub = (bookworm.state / "keys/cluster_id_ed25519.pub").read_text().strip()
    known = (bookworm.output / "known_hosts").read_text()
    for node in ("master", "worker1", "worker2"):
        tree = bookworm.trees[node]
        assert tree["/etc/systemd/system/multi-user.target.wants/ssh.service"]["target"] == "/lib/systemd/system/ssh.service"
        assert tree["/etc/systemd/system/sshd.service"]["target"] == "/lib/systemd/system/ssh.service"
        sshd = text(bookworm, node, "/etc/ssh/sshd_config.d/pibake.conf")
        for line in ("HostKey /etc/ssh/pibake/ssh_host_ed25519_key", "PasswordAuthentication no",
                     "KbdInteractiveAuthentication no", "PermitRootLogin no"):
            assert f"\n{line}\n" in sshd
        key_path = bookworm.state / f"keys/{node}_ssh_host_ed25519_key"
        assert bookworm.files[node]["/etc/ssh/pibake/ssh_host_ed25519_key"] == key_path.read_bytes()
        assert entry(bookworm, node, "/etc/ssh/pibake/ssh_host_ed25519_key")[1:] == ("0o600", 0, 0)
        public = text(bookworm, node, "/etc/ssh/pibake/ssh_host_ed25519_key.pub").split()[:2]
        address = {"master": "192.168.5.1"}.get(node, f"192.168.5.10{node[-1]}")
        # The operator's copy also knows the master by the name it is reached by from the home network.
        names = f"{node},{address}" + (",master.local" if node == "master" else "")
        assert f"{names} {' '.join(public)}\n" in known
        assert text(bookworm, node, "/etc/ssh/ssh_known_hosts") == known.replace(",master.local ", " ")
        # no pre-placed key where first boot would delete it
        assert not any(p.startswith("/etc/ssh/ssh_host_") for p in tree)
        authorized = text(bookworm, node, "/home/alice/.ssh/authorized_keys").splitlines()
        assert authorized == [operator_key.read_text().strip(), cluster_pub]
        assert entry(bookworm, node, "/home/alice/.ssh") == ("dir", "0o700", 1000, 1000)
        assert entry(bookworm, node, "/home/alice/.ssh/authorized_keys")[1:] == ("0o600", 1000, 1000)
    assert bookworm.files["master"]["/home/alice/.ssh/id_ed25519"] == (bookworm.state / "keys/cluster_id_ed25519").read_bytes()
    assert entry(bookworm, "master", "/home/alice/.ssh/id_ed25519")[1:] == ("0o600", 1000, 1000)
    assert "/home/alice/.ssh/id_ed25519" not in bookworm.trees["worker1"]


def test_master_gateway_configuration(bookworm: Baked) -> None:
    dnsmasq = text(bookworm, "master", "/etc/dnsmasq.d/pibake-cluster.conf")
    for line in ("interface=eth0", "dhcp-range=192.168.5.2,192.168.5.64,255.255.255.0,24h",
                 "dhcp-option=option:router,192.168.5.1", "dhcp-host=worker1,192.168.5.101,24h",
                 "dhcp-host=worker3,192.168.5.103,24h", "addn-hosts=/etc/pibake/cluster.hosts", "no-hosts"):
        assert f"\n{line}\n" in dnsmasq
    assert "192.168.5.102\tworker2\n" in text(bookworm, "master", "/etc/pibake/cluster.hosts")
    assert "/etc/sysctl.d/90-pibake-forward.conf" not in bookworm.trees["master"]
    assert "\n-A POSTROUTING -s 192.168.5.0/24 -o wlan0 -j MASQUERADE\nCOMMIT\n" in text(bookworm, "master", "/etc/iptables/rules.v4")
    assert "\n:FORWARD DROP [0:0]\n" in text(bookworm, "master", "/etc/iptables/rules.v6")
    tree = bookworm.trees["master"]
    unit = "/etc/systemd/system/pibake-firewall.service"
    assert tree["/etc/systemd/system/multi-user.target.wants/pibake-firewall.service"]["target"] == unit
    assert "\nBefore=network-pre.target shutdown.target\n" in text(bookworm, "master", unit)
    assert entry(bookworm, "master", "/usr/local/sbin/pibake-nat")[1:] == ("0o755", 0, 0)
    assert text(bookworm, "master", "/etc/pibake/nat").splitlines()[-1] == "on"
    lan = text(bookworm, "master", "/etc/NetworkManager/system-connections/pibake-lan.nmconnection")
    assert "interface-name=eth0\n" in lan and "method=manual\naddress1=192.168.5.1/24\n" in lan
    assert entry(bookworm, "master", "/etc/NetworkManager/system-connections/pibake-lan.nmconnection")[1:] == ("0o600", 0, 0)
    assert text(bookworm, "master", "/etc/pibake/packages") == "dnsmasq\niptables\ntcpdump\nfabric\navahi-daemon\n"
    for node in ("worker1", "worker2"):
        assert not any("dnsmasq" in p or "iptables" in p or "pibake-uplink" in p for p in bookworm.trees[node])
        # DHCP on the cluster LAN that keeps asking until the master's server is up.
        lan = text(bookworm, node, "/etc/NetworkManager/system-connections/pibake-lan.nmconnection")
        assert "interface-name=eth0\n" in lan and "method=auto\n" in lan and "autoconnect-retries=0\n" in lan
        assert entry(bookworm, node, "/etc/NetworkManager/system-connections/pibake-lan.nmconnection")[1:] == ("0o600", 0, 0)


def test_master_wifi_uplink(bookworm: Baked) -> None:
    keyfile_path = "/etc/NetworkManager/system-connections/pibake-uplink.nmconnection"
    import nm_keyfile  # libnm, from the system's packages

    keyfile = text(bookworm, "master", keyfile_path)
    psk = hashlib.pbkdf2_hmac("sha1", WIFI_PASSPHRASE.encode(), UPLINK_SSID.encode(), 4096, 32).hex()
    assert nm_keyfile.wifi(keyfile) == (UPLINK_SSID.encode(), psk, "wlan0")
    assert "type=wifi\ninterface-name=wlan0\n" in keyfile and WIFI_PASSPHRASE not in keyfile
    assert entry(bookworm, "master", keyfile_path)[1:] == ("0o600", 0, 0)
    assert "WirelessEnabled=true" in text(bookworm, "master", "/var/lib/NetworkManager/NetworkManager.state")
    for platform in ("3f300000", "fe300000"):
        assert f"/var/lib/systemd/rfkill/platform-{platform}.mmcnr:wlan" in bookworm.trees["master"]
    cmdline = text(bookworm, "master", "/boot/firmware/cmdline.txt")
    assert cmdline == ("console=serial0,115200 console=tty1 root=PARTUUID=5e3da4a0-02 rootfstype=ext4 fsck.repair=yes "
                       "rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot cfg80211.ieee80211_regdom=DE\n")
    assert "cfg80211" not in text(bookworm, "worker1", "/boot/firmware/cmdline.txt")


def test_outputs_checksums_and_manifest(bookworm: Baked) -> None:
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bookworm.output, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 3
    manifest = json.loads((bookworm.output / "manifest.json").read_text())
    base_sha = hashlib.sha256(bookworm.base.read_bytes()).hexdigest()
    for node in manifest["nodes"].values():
        assert node["base_image"]["sha256"] == base_sha
        assert node["sha256"] == hash_of(bookworm.output / node["image"])
        assert node["release"]["codename"] == "bookworm"
        assert any(op["path"] == "/etc/hostname" and op["op"] == "write" for op in node["operations"])
    assert manifest["nodes"]["worker2"]["address"] == "192.168.5.102"
    ssh_config = (bookworm.output / "ssh_config").read_text()
    resolved = subprocess.run(["ssh", "-G", "-F", str(bookworm.output / "ssh_config"), "worker2"],
                              capture_output=True, text=True, check=True).stdout
    assert "hostname 192.168.5.102\n" in resolved and "user alice\n" in resolved
    assert "stricthostkeychecking true\n" in resolved
    assert f"userknownhostsfile {bookworm.output.resolve()}/known_hosts\n" in resolved
    assert "HostKeyAlias worker2" in ssh_config
    found = subprocess.run(["ssh-keygen", "-F", "worker2", "-f", str(bookworm.output / "known_hosts")],
                           capture_output=True, text=True)
    assert found.returncode == 0


def test_no_secret_in_outputs_or_logs(bookworm: Baked) -> None:
    psk = hashlib.pbkdf2_hmac("sha1", WIFI_PASSPHRASE.encode(), UPLINK_SSID.encode(), 4096, 32).hex()
    private_bodies = [line for key in (bookworm.state / "keys").glob("*_key") for line in key.read_text().splitlines()[1:-1]]
    private_bodies += (bookworm.state / "keys/cluster_id_ed25519").read_text().splitlines()[1:-1]
    secrets = [WIFI_PASSPHRASE, psk, PASSWORD_HASH, "PRIVATE KEY", APP_TOKEN.split()[1], *private_bodies]
    # Every command's output (the master's build handles the PSK and the cluster key, at -vv;
    # the workers' at -v), and every file beside the images and in the state folder but
    # the private keys themselves.
    assert {"-v", "-vv"} <= {arg for result in bookworm.results for arg in result.args}
    texts = {f"{' '.join(r.args)} {stream}": getattr(r, stream) for r in bookworm.results for stream in ("stdout", "stderr")}
    private_files = {p for p in (bookworm.state / "keys").iterdir() if not p.name.endswith(".pub")}
    assert len(private_files) == 5  # four host keys and the cluster key
    for folder in (bookworm.output, bookworm.state):
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix != ".img" and path not in private_files:
                texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert len(texts) > 10
    for secret in secrets:
        for name, content in texts.items():
            assert secret not in content, f"a secret is in {name}"
    for key in (bookworm.state / "keys").iterdir():
        expected = 0o644 if key.name.endswith(".pub") else 0o600
        assert key.stat().st_mode & 0o777 == expected, key
    # Images hold private keys and the PSK; the state folder holds the keys.
    for image in bookworm.output.glob("*.img"):
        assert image.stat().st_mode & 0o777 == 0o600, image
    for folder in (bookworm.state, bookworm.state / "keys"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder


def test_files_land_through_the_image_s_links(bookworm: Baked) -> None:
    tree, base = bookworm.trees["master"], bookworm.base_tree
    assert base["/lib"]["target"] == "usr/lib" and base["/usr/lib/ssl/certs"]["target"] == "/etc/ssl/certs"
    ca = tree["/etc/ssl/certs/pibake-cluster-ca.pem"]
    assert (ca["type"], ca["mode"], ca["uid"], ca["sha256"]) == ("file", 0o644, 0, hashlib.sha256(CLUSTER_CA.encode()).hexdigest())
    assert tree["/lib"] == base["/lib"] and tree["/usr/lib/ssl/certs"] == base["/usr/lib/ssl/certs"]
    token = tree["/etc/app/token"]
    assert (token["mode"], token["uid"], token["gid"]) == (0o600, 1000, 1000)
    manifest = json.loads((bookworm.output / "manifest.json").read_text())
    shown = next(op for op in manifest["nodes"]["master"]["operations"] if op["path"] == "/etc/app/token")
    assert shown["summary"].startswith(f"<secret, {len(APP_TOKEN)} bytes, sha256 ") and shown["sha256"] == token["sha256"]


def test_adding_a_worker_later_and_rebuilding_one(bookworm: Baked) -> None:
    def stats() -> dict:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in bookworm.output.glob("*.img*")}

    def but(node: str, of: dict) -> dict:  # all but a node's image and block map
        return {k: v for k, v in of.items() if not k.startswith(f"{node}.img")}

    before = stats()
    result = run_pibake("build", "worker", "--first", "3", "--count", "1", "--image", str(bookworm.base), cwd=bookworm.workdir)
    assert result.code == 0, result.output
    after = stats()
    assert but("worker3", after) == before  # nothing else touched
    assert {"worker3.img", "worker3.img.bmap"} <= set(after)
    assert "worker3: not built before" in result.stderr
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bookworm.output, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4
    assert set(json.loads((bookworm.output / "manifest.json").read_text())["nodes"]) == {"master", "worker1", "worker2", "worker3"}

    # Building worker2 again with nothing changed: its image is checked, found unchanged, left
    # alone; its block map, cut short (as a crash could leave it), is written again.
    cut = bookworm.output / "worker2.img.bmap"
    cut.write_text(cut.read_text()[:700])
    result = run_pibake("build", "worker", "--first", "2", "--count", "1", "--image", str(bookworm.base), cwd=bookworm.workdir)
    assert result.code == 0, result.output
    assert "worker2: inputs and image unchanged, skipped" in result.stderr
    assert "worker2.img: writing its block map" in result.stderr
    assert "appliance" not in result.stderr
    assert result.stdout.splitlines()[1].split()[-1] == "unchanged"
    assert stats().keys() == after.keys()
    assert {k: v for k, v in stats().items() if k != "worker2.img.bmap"} == {k: v for k, v in after.items() if k != "worker2.img.bmap"}
    assert json.loads((bookworm.output / "manifest.json").read_text())["nodes"]["worker2"]["bmap"] == "worker2.img.bmap"
    after = stats()

    # A changed setting rebuilds worker2: a new image, the same host key.
    profile = bookworm.workdir / "profiles/cluster.yaml"
    (profile.parent / "motd").write_text("worker motd\n")
    profile.write_text(profile.read_text().replace("workers:\n", "workers:\n  files: [{source: motd, path: /etc/motd}]\n"))
    result = run_pibake("build", "worker", "--first", "2", "--count", "1", "--image", str(bookworm.base), cwd=bookworm.workdir)
    assert result.code == 0, result.output
    rebuilt = stats()
    assert re.search(r"worker2: baking it again: operation \d+ changed: write /etc/motd worker motd \(was symlink ",
                     result.stderr), result.stderr
    assert rebuilt["worker2.img"] != after["worker2.img"]
    assert rebuilt["worker2.img.bmap"] != after["worker2.img.bmap"]  # a fresh one
    assert but("worker2", rebuilt) == but("worker2", after)
    with Appliance([Drive(bookworm.output / "worker2.img", readonly=True), Drive(bookworm.output / "worker3.img", readonly=True)]) as a:
        a.mount(0, "/boot/firmware", readonly=True)
        assert a.read("/etc/ssh/pibake/ssh_host_ed25519_key.pub") == bookworm.files["worker2"]["/etc/ssh/pibake/ssh_host_ed25519_key.pub"]
        a.g.umount_all()
        a.mount(1, "/boot/firmware", readonly=True)
        assert a.read("/etc/hostname") == b"worker3\n"
        assert a.read("/etc/ssh/pibake/ssh_host_ed25519_key") == (bookworm.state / "keys/worker3_ssh_host_ed25519_key").read_bytes()
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bookworm.output, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4


def _poke(path: Path, offset_from_end: int) -> None:
    """Change one byte near the end of an image, where its root file system has free blocks; keep its mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size - offset_from_end)
        old = f.read(1)
        f.seek(st.st_size - offset_from_end)
        f.write(bytes([old[0] ^ 0x5A]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rebuild_confirms_what_it_went_on_with(tmp_path: Path, operator_key: Path) -> None:
    """A rebuild starts from what the last build recorded (the base's sha256, apt's answer, each
    image's digest) and checks all of it: whatever turns out otherwise is baked again, never kept."""
    base = make_image(tmp_path / "base.img", "bookworm")
    (tmp_path / "profiles").mkdir()
    write_profile(tmp_path / "profiles", master_and_one_worker(operator_key))
    output = tmp_path / "output"

    def build() -> Result:
        result = run_pibake("build", "cluster", "--image", str(base), "-v", cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert result.code == 0, result.output
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=output, capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.count(": OK") == 2, check.stdout
        return result

    def built(result: Result) -> dict[str, str]:
        return dict(re.findall(r"^(\S+)\s+output/\S+\.img .* (baked|unchanged)$", result.stdout, re.M))

    def stats() -> dict:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in output.glob("*.img")}

    build()
    # worker1's image is changed by hand; master's entry is from a manifest without blocks' digests.
    _poke(output / "worker1.img", 3 * 4096)
    manifest = json.loads((output / "manifest.json").read_text())
    del manifest["nodes"]["master"]["blocks_sha256"]
    (output / "manifest.json").write_text(json.dumps(manifest))
    result = build()
    assert "worker1: image changed since it was built; baking it again" in result.stderr
    assert "master.img: hashing it in full" in result.stderr
    assert built(result) == {"master": "unchanged", "worker1": "baked"}
    assert "blocks_sha256" in json.loads((output / "manifest.json").read_text())["nodes"]["worker1"]
    # What the plans read from the base was remembered by the first build, readable by this user only.
    assert "plans played through against the base, all of it known from earlier builds" in result.stderr
    reads = list((tmp_path / "cache/pibake/bases").glob("*.reads.json"))
    assert len(reads) == 1 and reads[0].stat().st_mode & 0o777 == 0o600

    # apt's answer as recorded is not what apt says now: the master planned with it is not kept.
    memo = next((tmp_path / "cache/pibake/apt").glob("*/resolved.json"))
    answers = json.loads(memo.read_text())
    memo.write_text(json.dumps({question: debs[:-1] for question, debs in answers.items()}))
    before = stats()
    result = build()
    assert "apt chose other packages than last time; planning again" in result.stderr
    assert result.stderr.count("libguestfs appliance up") == 1  # the master was baked, then thrown away
    assert built(result) == {"master": "unchanged", "worker1": "unchanged"} and stats() == before
    assert json.loads(memo.read_text()) == answers  # apt's own answer, recorded again

    # The base changed in place (its size and mtime kept): every node is baked from the new one.
    _poke(base, 5 * 4096)
    result = build()
    assert "the base image's content changed since the last build; planning again" in result.stderr
    assert built(result) == {"master": "baked", "worker1": "baked"}
    new_sha = hashlib.sha256(base.read_bytes()).hexdigest()
    assert {e["base_image"]["sha256"] for e in json.loads((output / "manifest.json").read_text())["nodes"].values()} == {new_sha}


# ------------------------------------------------------------ bullseye


def test_bullseye_uses_its_own_paths(bullseye: Baked) -> None:
    assert "release: bullseye" in bullseye.result.stderr
    dhcpcd = text(bullseye, "master", "/etc/dhcpcd.conf")
    assert dhcpcd.startswith("hostname\nclientid\n")  # the image's own settings stay
    assert dhcpcd.endswith("interface eth0\nstatic ip_address=192.168.5.1/24\nnogateway\n")
    assert text(bullseye, "worker1", "/etc/dhcpcd.conf") == "hostname\nclientid\npersistent\noption rapid_commit\nslaac private\n"
    wpa = text(bullseye, "master", "/etc/wpa_supplicant/wpa_supplicant.conf")
    psk = hashlib.pbkdf2_hmac("sha1", WIFI_PASSPHRASE.encode(), b"HomeNet", 4096, 32).hex()
    assert "country=GB\n" in wpa and f"ssid={b'HomeNet'.hex()}\n" in wpa and f"psk={psk}\n" in wpa
    assert entry(bullseye, "master", "/etc/wpa_supplicant/wpa_supplicant.conf")[1:] == ("0o600", 0, 0)
    assert text(bullseye, "master", "/boot/cmdline.txt").endswith(" cfg80211.ieee80211_regdom=GB\n")
    assert not any("NetworkManager" in p for p in bullseye.trees["master"])
    # default user pi: kept, given a login shell, no rename
    assert "pi:x:1000:1000:,,,:/home/pi:/bin/bash\n" in text(bullseye, "master", "/etc/passwd")
    assert "pi:*:19650:" in text(bullseye, "master", "/etc/shadow")
    assert text(bullseye, "master", "/etc/sudoers.d/010_pi-nopasswd") == "pi ALL=(ALL) NOPASSWD: ALL\n"
    assert entry(bullseye, "worker1", "/home/pi/.ssh/authorized_keys")[1:] == ("0o600", 1000, 1000)


def test_bullseye_nothing_else_changed(bullseye: Baked) -> None:
    for node in ("master", "worker1"):
        unexpected = changed_paths(bullseye, node) - allowed_changes(bullseye, node)
        assert not unexpected, f"{node}: {sorted(unexpected)}"


def test_plan_reads_the_release_from_the_image(bullseye: Baked) -> None:
    result = run_pibake("plan", "worker", "--image", str(bullseye.base), cwd=bullseye.workdir)
    assert result.code == 0, result.output
    assert "worker1 (worker, 192.168.5.101): release bullseye, because /etc/os-release: VERSION_CODENAME=bullseye" in result.stdout
    assert "/boot/firmware" not in result.stdout


# ------------------------------------------------------------ trixie


def test_kvm_that_hangs_falls_back_to_tcg_once(trixie: Baked) -> None:
    """Nested KVM can hang at launch: pibake gives up on it, says so, and does not wait for it again."""
    first, second = trixie.results
    assert "KVM launch hung (nothing from the appliance in 20 s); falling back to TCG" in first.stderr, first.stderr
    assert "using TCG (software emulation; KVM hung)" in first.stderr
    assert "KVM launch" not in second.stderr and "using TCG (software emulation; KVM hangs here)" in second.stderr
    assert "KVM hung at launch on this machine before" in second.stderr, second.stderr
    assert (trixie.workdir / "cache/pibake/kvm-hangs").read_text().split()[1] == str(trixie.workdir / "hv/qemu-system-x86_64")


def test_trixie_turns_cloud_init_off_and_keeps_its_resize(trixie: Baked) -> None:
    assert "release: trixie" in trixie.result.stderr and "warning" not in trixie.result.stderr
    for node in ("master", "worker1"):
        tree = trixie.trees[node]
        assert tree["/etc/cloud/cloud-init.disabled"]["type"] == "file"
        # pi-gen's Trixie pi has a nologin shell and no sudo rule: the profile's user gets both.
        assert "pi:x:1000:1000:,,,:/home/pi:/bin/bash\n" in text(trixie, node, "/etc/passwd")
        assert text(trixie, node, "/etc/sudoers.d/010_pi-nopasswd") == "pi ALL=(ALL) NOPASSWD: ALL\n"
        # The initramfs grows the root partition when ` resize` is on the command line.
        assert text(trixie, node, "/boot/firmware/cmdline.txt").rstrip("\n").endswith("rootwait resize")
        unexpected = changed_paths(trixie, node) - allowed_changes(trixie, node)
        assert not unexpected, f"{node}: {sorted(unexpected)}"
    manifest = json.loads((trixie.output / "manifest.json").read_text())
    assert "cloud-init" in manifest["nodes"]["master"]["release"]["first_boot"]
