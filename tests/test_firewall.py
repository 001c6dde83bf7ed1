"""Tier 1: the master's firewall, loaded by its own script into a network namespace of the test's own.

The rules and pibake-nat come from a real plan; `unshare` gives the script a
network namespace (its own netfilter tables and ip_forward) and a mount namespace
in which /etc is a copy holding the master's files, so nothing on this machine
is touched.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from builder.keys import KeyStore
from builder.plan import plan_node
from builder.profile import load
from builder.release import named
from conftest import write_profile

SCRIPT = "/usr/local/sbin/pibake-nat"
MASTER_FILES = ("/etc/iptables/rules.v4", "/etc/iptables/rules.v6", "/etc/pibake/nat", SCRIPT)


def master_files(tmp_path: Path, operator_key: Path, extra: str = "") -> dict[str, bytes]:
    profile = load(write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\n{extra}"))
    plan = plan_node(profile, profile.master.node, named("bookworm"), KeyStore(tmp_path / "state"))
    return {op.path: op.content for op in plan.ops if op.path in MASTER_FILES}


def in_namespace(tmp_path: Path, files: dict[str, bytes], script: str, path: str = "/usr/sbin:/usr/bin:/sbin:/bin") -> str:
    """Run `script` (sh) with the master's files in a copy of /etc, in new network and mount namespaces."""
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
    done = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", inner.replace("pibake-nat", str(sbin / "pibake-nat"))],
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
    for rule in ("-P FORWARD DROP",
                 "-A INPUT ! -i eth0 -p udp -m multiport --dports 53,67 -j DROP",
                 "-A INPUT ! -i eth0 -p tcp -m tcp --dport 53 -j DROP",
                 "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                 "-A FORWARD -s 192.168.5.0/24 -i eth0 -o wlan0 -j pibake-out",
                 "-A FORWARD -j REJECT --reject-with icmp-admin-prohibited",
                 "-A pibake-out -j ACCEPT",
                 "-A POSTROUTING -s 192.168.5.0/24 -o wlan0 -j MASQUERADE"):
        assert rule in rules4.splitlines(), rule
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
