"""Tier 1: the master's firewall, loaded by its own script into a network namespace of the test's own.

The rules and pibake-nat come from a real plan; `unshare` gives the script a
network namespace (its own netfilter tables and ip_forward) and a mount namespace
in which /etc is a copy holding the master's files, so nothing on this machine
is touched. The traffic tests put a worker, the master and the home network in
three namespaces of their own, joined by veth pairs made inside them, and pass
TCP between them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from builder.keys import KeyStore
from builder.plan import plan_node
from builder.profile import load
from builder.release import named
from conftest import write_profile
from peer import Peer

SCRIPT = "/usr/local/sbin/pibake-nat"
MASTER_FILES = ("/etc/iptables/rules.v4", "/etc/iptables/rules.v6", "/etc/pibake/nat", SCRIPT)


def master_files(tmp_path: Path, operator_key: Path, extra: str = "") -> dict[str, bytes]:
    profile = load(write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\n{extra}"))
    plan = plan_node(profile, profile.master.node, named("bookworm"), KeyStore(tmp_path / "state"))
    return {op.path: op.content for op in plan.ops if op.path in MASTER_FILES}


def in_namespace(tmp_path: Path, files: dict[str, bytes], script: str, path: str = "/usr/sbin:/usr/bin:/sbin:/bin",
                 netns: str | None = None) -> str:
    """Run `script` (sh) with the master's files in a copy of /etc, in a new mount namespace and a new
    network namespace, or the named one `netns`."""
    etc = tmp_path / "etc"
    if not etc.exists():
        shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("ssl", "ssh", "shadow*", "gshadow*"))
    sbin = tmp_path / "sbin"
    sbin.mkdir(exist_ok=True)
    for path_in_image, content in files.items():
        target = sbin / "pibake-nat" if path_in_image == SCRIPT else etc / path_in_image.removeprefix("/etc/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(0o755 if path_in_image == SCRIPT else 0o644)
    inner = f"set -e; mount --make-rprivate /; mount --bind {etc} /etc; export PATH={path}; {script}"
    within = ["ip", "netns", "exec", netns, "unshare", "--mount"] if netns else ["unshare", "--net", "--mount"]
    done = subprocess.run([*within, "sh", "-c", inner.replace("pibake-nat", str(sbin / "pibake-nat"))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def status(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line and not line.startswith("pibake"))


def test_the_firewall_loads_then_forwarding_goes_on(tmp_path: Path, operator_key: Path) -> None:
    files = master_files(tmp_path, operator_key)
    out = in_namespace(tmp_path, files, "pibake-nat start; pibake-nat status; echo ===; iptables -S; iptables -t nat -S;"
                                        " echo ===; ip6tables -S")
    said, rules4, rules6 = out.split("===\n")
    assert "pibake-nat: firewall loaded (IPv4 and IPv6), forwarding on, workers' way out on" in said
    assert status(said) == {"nat": "on", "firewall-v4": "loaded", "workers-out": "open", "firewall-v6": "loaded",
                            "forwarding": "1"}
    for rule in ("-A INPUT ! -i eth0 -p udp -m multiport --dports 53,67 -j DROP",
                 "-A INPUT ! -i eth0 -p tcp -m tcp --dport 53 -j DROP",
                 "-A pibake-out -j ACCEPT",
                 "-A POSTROUTING -s 192.168.5.0/24 -o wlan0 -j MASQUERADE"):
        assert rule in rules4.splitlines(), rule
    # Both directions of the workers' flows go through pibake-out, and only they: FORWARD accepts nothing itself.
    assert [line for line in rules4.splitlines() if " FORWARD" in line] == [
        "-P FORWARD DROP",
        "-A FORWARD -s 192.168.5.0/24 -i eth0 -o wlan0 -j pibake-out",
        "-A FORWARD -d 192.168.5.0/24 -i wlan0 -o eth0 -m conntrack --ctstate RELATED,ESTABLISHED -j pibake-out",
        "-A FORWARD -j REJECT --reject-with icmp-admin-prohibited"]
    assert not any("22" in line for line in rules4.splitlines() if "DROP" in line or "REJECT" in line)  # SSH stays open
    assert "-P FORWARD DROP" in rules6 and "-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited" in rules6


def test_the_workers_way_out_switches_and_stays_switched(tmp_path: Path, operator_key: Path) -> None:
    files = master_files(tmp_path, operator_key)
    out = in_namespace(tmp_path, files, "pibake-nat start; pibake-nat off; pibake-nat status; echo ===;"
                                        " iptables -S pibake-out; echo ===;"
                                        # a reboot: the state file is what the next start reads
                                        " pibake-nat start; pibake-nat status; echo ===; pibake-nat on; pibake-nat status")
    off, chain, rebooted, on = out.split("===\n")
    assert status(off)["workers-out"] == "closed" and status(off)["nat"] == "off" and status(off)["forwarding"] == "1"
    assert chain.strip() == "-N pibake-out"
    assert status(rebooted)["workers-out"] == "closed" and "way out off" in rebooted
    assert status(on)["workers-out"] == "open" and status(on)["nat"] == "on"
    assert (tmp_path / "etc/pibake/nat").read_text().splitlines()[-1] == "on"


def test_nat_false_starts_with_the_way_out_closed(tmp_path: Path, operator_key: Path) -> None:
    files = master_files(tmp_path, operator_key, "master:\n  uplink:\n    nat: false\n")
    out = in_namespace(tmp_path, files, "pibake-nat start; pibake-nat status")
    # Forwarding is on; the filter keeps the workers in.
    assert status(out) == {"nat": "off", "firewall-v4": "loaded", "workers-out": "closed", "firewall-v6": "loaded",
                           "forwarding": "1"}


def test_without_iptables_forwarding_stays_off(tmp_path: Path, operator_key: Path) -> None:
    """The first boot, before iptables is installed."""
    files = master_files(tmp_path, operator_key)
    out = in_namespace(tmp_path, files, "echo 1 > /proc/sys/net/ipv4/ip_forward; pibake-nat start;"
                                        " cat /proc/sys/net/ipv4/ip_forward", path="/bin:/usr/bin")
    assert out.splitlines() == ["pibake-nat: iptables is not installed yet: forwarding stays off", "0"]


@pytest.mark.parametrize("broken", ["rules.v4", "rules.v6"])
def test_a_rule_that_does_not_load_leaves_forwarding_off(tmp_path: Path, operator_key: Path, broken: str) -> None:
    files = master_files(tmp_path, operator_key)
    files[f"/etc/iptables/{broken}"] = files[f"/etc/iptables/{broken}"].replace(b"-j REJECT", b"-j NO-SUCH-TARGET")
    out = in_namespace(tmp_path, files, "pibake-nat start || echo failed $?; cat /proc/sys/net/ipv4/ip_forward")
    assert out.splitlines()[-2].startswith("failed ") and out.splitlines()[-1] == "0", out  # iptables-restore says 2


@dataclass(frozen=True)
class Namespaces:
    """A worker on the master's LAN, the master, and the home network on the master's uplink."""

    worker: str
    master: str
    home: str


WORKER, MASTER_LAN, MASTER_UPLINK, HOME = "192.168.5.101", "192.168.5.1", "10.77.0.2", "10.77.0.1"
PORT = 8470  # the home network's service
SILENCE = 3.0  # seconds a line that must not arrive is waited for


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    """Worker eth0 -- eth0 master wlan0 -- eth0 home, as on the reference cluster; deleted afterwards."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    names = Namespaces(*(f"pibake-{role}-{tag}" for role in ("worker", "master", "home")))
    made: list[str] = []
    try:
        for name in (names.worker, names.master, names.home):
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        # Each pair is made inside the master's namespace with its peer end in the other's:
        # no interface exists in this machine's own namespace, even for a moment.
        ip("-n", names.master, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", names.worker)
        ip("-n", names.master, "link", "add", "wlan0", "type", "veth", "peer", "name", "eth0", "netns", names.home)
        for name, interface, address in ((names.worker, "eth0", WORKER), (names.master, "eth0", MASTER_LAN),
                                         (names.master, "wlan0", MASTER_UPLINK), (names.home, "eth0", HOME)):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", name, "link", "set", interface, "up")
        ip("-n", names.worker, "route", "add", "default", "via", MASTER_LAN)
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def peer(netns: str) -> closing[Peer]:
    return closing(Peer(["ip", "netns", "exec", netns]))


def test_off_cuts_the_connections_opened_while_it_was_on(tmp_path: Path, operator_key: Path,
                                                         namespaces: Namespaces) -> None:
    files = master_files(tmp_path, operator_key)
    nat = lambda command: in_namespace(tmp_path, files, f"pibake-nat {command}", netns=namespaces.master)  # noqa: E731
    nat("start")
    with peer(namespaces.home) as home, peer(namespaces.worker) as worker:
        home.ask(f"listen {HOME} {PORT}", "listening")
        assert worker.ask(f"connect {HOME} {PORT} 5", "connected", "failed") == "connected 1"
        assert home.next("accepted 1") == f"accepted 1 {MASTER_UPLINK}"  # masqueraded as the master's uplink
        worker.tell("send 1 hello-from-the-worker")
        assert home.next("recv 1") == "recv 1 hello-from-the-worker"
        home.tell("send 1 hello-from-home")
        assert worker.next("recv 1") == "recv 1 hello-from-home"

        nat("off")
        worker.ask("send 1 worker-after-off", "sent 1")
        home.ask("send 1 home-after-off", "sent 1")
        # The same connection, in either direction: nothing arrives.
        assert home.next("recv 1", timeout=SILENCE) is None
        assert worker.next("recv 1", timeout=SILENCE) is None
        # Nor does a new one get through: the master rejects it.
        assert worker.ask(f"connect {HOME} {PORT} {SILENCE}", "connected", "failed") == "failed No route to host"

        nat("on")
        assert worker.ask(f"connect {HOME} {PORT} 5", "connected", "failed") == "connected 2"
        assert home.next("accepted 2") == f"accepted 2 {MASTER_UPLINK}"
        worker.tell("send 2 out-again")
        assert home.next("recv 2") == "recv 2 out-again"
        home.tell("send 2 back-again")
        assert worker.next("recv 2") == "recv 2 back-again"


@pytest.mark.parametrize("way_out", ["on", "off"])
def test_the_uplink_side_reaches_the_masters_ssh_and_nothing_on_the_lan(tmp_path: Path, operator_key: Path,
                                                                         namespaces: Namespaces, way_out: str) -> None:
    files = master_files(tmp_path, operator_key)
    in_namespace(tmp_path, files, f"pibake-nat start; pibake-nat {way_out}", netns=namespaces.master)
    # A host on the home network that routes the cluster's LAN through the master.
    ip("-n", namespaces.home, "route", "add", "192.168.5.0/24", "via", MASTER_UPLINK)
    with peer(namespaces.master) as master, peer(namespaces.worker) as worker, peer(namespaces.home) as home:
        master.ask("listen 0.0.0.0 22", "listening")  # stand-ins for sshd and dnsmasq's DNS
        master.ask("listen 0.0.0.0 53", "listening")
        worker.ask(f"listen {WORKER} 22", "listening")
        connect = lambda who, host, port: who.ask(f"connect {host} {port} {SILENCE}", "connected", "failed")  # noqa: E731
        assert connect(home, MASTER_UPLINK, 22).startswith("connected")
        assert connect(home, MASTER_LAN, 22).startswith("connected")  # the master itself, by its LAN address
        assert connect(worker, MASTER_LAN, 22).startswith("connected")
        assert connect(home, WORKER, 22) == "failed No route to host"  # rejected, not forwarded
        assert connect(worker, MASTER_LAN, 53).startswith("connected")  # DNS on the LAN only
        assert connect(home, MASTER_UPLINK, 53) == "failed TimeoutError"
        assert worker.next("accepted", timeout=0) is None
