"""`pibake check`: log in to every node as the operator would and say whether it holds.

Every node is reached through output/ssh_config (the master by its uplink name, the
workers through it), with strict host key checking against output/known_hosts, so a
row that says `ok` is the whole path working: name, route, host key, login. What a
node reports comes from one probe script, and the verdicts from `verdicts()`; the boot
tests run `pibake check` itself rather than asking the nodes again.
"""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from builder.profile import Node, Profile

CONNECT_SECONDS = 15
PROBE = r"""
echo "hostname: $(hostname)"
echo "system: $(systemctl is-system-running 2>/dev/null)"
if [ -e /var/lib/pibake/firstboot.done ]; then
    echo "first-boot: done $(grep -o '[0-9]*s' /var/lib/pibake/firstboot.done 2>/dev/null | head -n 1)"
elif [ -e /etc/pibake/packages ]; then
    echo "first-boot: running"
else
    echo "first-boot: done"
fi
echo "address: $(ip -4 -o addr show dev {interface} scope global 2>/dev/null | awk '{{print $4}}' | head -n 1)"
"""
MASTER_PROBE = r"""
echo "dnsmasq: $(systemctl is-active dnsmasq 2>/dev/null)"
echo "mdns: $(systemctl is-active avahi-daemon 2>/dev/null)"
sudo -n /usr/local/sbin/pibake-nat status 2>/dev/null || echo "firewall-v4: unknown (sudo needs a password)"
echo "uplink-address: $(ip -4 -o addr show dev {uplink} scope global 2>/dev/null | awk '{{print $4}}' | head -n 1)"
sed 's/^/lease: /' /var/lib/misc/dnsmasq.leases 2>/dev/null || true
"""


@dataclass
class Report:
    node: Node
    reached: bool = False
    why: str = ""  # when not reached: ssh's last words
    facts: dict[str, str] = field(default_factory=dict)
    leases: list[str] = field(default_factory=list)  # the master's, "expiry mac address name id"


def probe(profile: Profile, node: Node, ssh_config: Path) -> Report:
    script = PROBE.format(interface=profile.interface)
    if node.role == "master":
        script += MASTER_PROBE.format(uplink=profile.master.uplink)
    try:
        done = subprocess.run(["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_SECONDS}",
                               node.hostname, "sh -s"], input=script, capture_output=True, text=True,
                              timeout=4 * CONNECT_SECONDS + 60)
    except subprocess.TimeoutExpired:
        return Report(node, why="no answer within the time allowed")
    except FileNotFoundError:
        return Report(node, why="ssh is not installed on this machine (openssh-client)")
    if done.returncode == 255:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        telling = [line for line in lines if re.search(r"^ssh: |Host key verification failed|Permission denied|"
                                                       r"REMOTE HOST IDENTIFICATION", line)]
        why = (telling or lines or [f"ssh failed ({done.returncode})"])[0]
        return Report(node, why=why + (f" (through {profile.master.node.hostname})" if node.role == "worker" else ""))
    report = Report(node, reached=True)
    for line in done.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        if key == "lease":
            report.leases.append(value)
        else:
            report.facts[key] = value.strip()
    return report


def probe_all(profile: Profile, nodes: tuple[Node, ...], ssh_config: Path) -> list[Report]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda n: probe(profile, n, ssh_config), nodes))


@dataclass(frozen=True)
class Row:
    node: str
    cells: dict[str, str]
    problems: tuple[str, ...]  # empty: the node holds


COLUMNS = ("node", "reach", "host key", "first boot", "address", "lease", "master")


def verdicts(profile: Profile, reports: list[Report]) -> list[Row]:
    """One row per node: what was found, and what is wrong with it."""
    master_report = next((r for r in reports if r.node.role == "master"), None)
    leases = {}
    for lease in master_report.leases if master_report else []:
        parts = lease.split()
        if len(parts) >= 4:
            leases[parts[3]] = parts[2]  # name -> address
    rows = []
    for report in reports:
        node = report.node
        cells = {c: "-" for c in COLUMNS}
        cells["node"] = node.hostname
        problems: list[str] = []
        if not report.reached:
            wrong_key = re.search(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED", report.why)
            cells["reach"] = "no"
            cells["host key"] = "WRONG" if wrong_key else "-"
            problems.append(("its host key is not the one pibake baked" if wrong_key else "unreachable") +
                            f": {report.why}")
            rows.append(Row(node.hostname, cells, tuple(problems)))
            continue
        facts = report.facts
        cells["reach"] = cells["host key"] = "ok"
        if facts.get("system") in ("initializing", "starting"):
            # What a node reports before start-up has finished is not yet what it will hold.
            problems.append(f"it is still starting up (systemctl is-system-running: {facts['system']}); try again shortly")
        if facts.get("hostname") != node.hostname:
            problems.append(f"it calls itself {facts.get('hostname')!r}")
        first = facts.get("first-boot", "?")
        cells["first boot"] = first
        if not first.startswith("done"):
            problems.append(f"first boot is {first}")
        address = facts.get("address", "").split("/")[0]
        cells["address"] = address or "none"
        if address != str(node.address):
            problems.append(f"its address is {address or 'none'}, not {node.address}")
        if node.role == "worker":
            leased = leases.get(node.hostname)
            cells["lease"] = "ok" if leased == str(node.address) else (leased or "none")
            if master_report and master_report.reached and leased != str(node.address):
                problems.append(f"the master has {'no lease' if leased is None else 'leased ' + leased} for it, "
                                f"not {node.address}")
        else:
            want = {"dnsmasq": "active", "mdns": "active", "firewall-v4": "loaded", "firewall-v6": "loaded",
                    "forwarding": "1"}
            for key, value in want.items():
                if facts.get(key) != value:
                    problems.append(f"{key} is {facts.get(key) or 'unknown'}, not {value}")
            cells["master"] = (f"dnsmasq {facts.get('dnsmasq', '?')}, mDNS {facts.get('mdns', '?')}, "
                               f"firewall v4 {facts.get('firewall-v4', '?')} v6 {facts.get('firewall-v6', '?')}, "
                               f"NAT {facts.get('nat', '?')} (workers' way out {facts.get('workers-out', '?')}), "
                               f"uplink {facts.get('uplink-address') or 'no address'}")
        rows.append(Row(node.hostname, cells, tuple(problems)))
    return rows
