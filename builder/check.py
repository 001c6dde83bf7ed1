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
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from builder import formats, run
from builder.profile import Node, Profile

CONNECT_SECONDS = 15
DEFAULT_TIMEOUT = 120  # seconds for one node: connecting (through the master, for a worker) and the probe
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
    why: str = ""  # when not reached: ssh's own last words; when reached, what went wrong with the probe
    facts: dict[str, str] = field(default_factory=dict)
    leases: list[str] = field(default_factory=list)  # the master's, "expiry mac address name id"
    wrong_key: bool = False  # ssh itself refused the node's host key


# What a node may say, and for how long: a node is not trusted to be brief or quick.
OUTPUT_LIMIT = 64 << 10
FACT_LIMIT = 200  # characters of one value kept
MAX_LEASES = 1024
# The lines of ssh's own log (never the node's words) that say why it did not get in.
TELLING = re.compile(r"^(ssh: .*|Host key verification failed\.|Permission denied .*|Received disconnect from .*|"
                     r".*Connection refused|"
                     r".*Connection timed out|.*No route to host|Could not resolve hostname .*|"
                     r"kex_exchange_identification: .*|.*Connection closed by .*)$")
WRONG_KEY = re.compile(r"^(Host key verification failed\.|@ +WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! +@)$")
# ssh logs this, at LogLevel VERBOSE, once the node's host key matched known_hosts and the login succeeded.
AUTHENTICATED = re.compile(r"^Authenticated to \S+ .* using \"[a-z-]+\"\.$", re.M)
MARK = "pibake-probe: begin"


def probe(profile: Profile, node: Node, ssh_config: Path, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Ask `node` through ssh_config. What ssh itself says goes to a log file of its own
    (-E), which no node can write to; what the node says comes on stdout and stderr,
    bounded in size and time, and is only ever its own row's facts."""
    # A mark no node can know before ssh has checked its host key and logged in: the
    # probe itself, sent only then, prints it.
    mark = f"{MARK} {secrets.token_hex(16)}"
    script = f"echo '{mark}'\n" + PROBE.format(interface=profile.interface)
    if node.role == "master":
        script += MASTER_PROBE.format(uplink=profile.master.uplink)
    through = f" (through {profile.master.node.hostname})" if node.role == "worker" else ""
    with tempfile.TemporaryDirectory(prefix="pibake-check-") as folder:
        log_file = Path(folder) / "ssh.log"
        # ssh runs in the output folder and is given `-F ssh_config`: when it goes through the
        # master it hands that path to a shell, which a relative name passes through unchanged.
        command = ["ssh", "-F", ssh_config.name, "-E", str(log_file), "-o", "LogLevel=VERBOSE", "-o", "BatchMode=yes",
                   "-o", f"ConnectTimeout={min(CONNECT_SECONDS, max(1, int(timeout)))}", node.hostname, "sh -s"]
        done = run.bounded(command, input=script.encode(), timeout=timeout, limit=OUTPUT_LIMIT,
                           cwd=str(ssh_config.parent))
        ssh_said = _own_words(_read_log(log_file))
    out = formats.decoded(done.stdout)
    ran = mark in out.split("\n")
    if not ran and not AUTHENTICATED.search(ssh_said):
        return _not_reached(node, done, ssh_said, through, timeout)
    report = Report(node, reached=True)
    if done.flooded:
        report.why = f"it sent more than {OUTPUT_LIMIT >> 10} KiB in answer to the probe; the rest was not read"
    elif done.timed_out:
        report.why = f"it did not finish the probe within {timeout:g} s"
    elif not ran:
        report.why = f"the probe did not run there (ssh exit {done.returncode}{_node_said(done.stderr)})"
    for line in out.split("\n"):  # lines end in \n only: a \r is part of a value, shown escaped
        key, sep, value = line.partition(": ")
        if not sep or len(key) > 40:
            continue
        if key == "lease":
            if len(report.leases) < MAX_LEASES:
                report.leases.append(value[:FACT_LIMIT])
        else:
            report.facts.setdefault(key, value.strip()[:FACT_LIMIT])
    return report


def _read_log(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return formats.decoded(f.read(OUTPUT_LIMIT)).replace("\r\n", "\n")  # ssh ends its lines in \r\n here
    except OSError:
        return ""


def _own_words(log: str) -> str:
    """ssh's log up to a disconnect the other side sent: ssh logs that message as it came,
    line breaks and all, so whatever follows it may be the node's words, not ssh's."""
    kept = []
    for line in log.split("\n"):
        kept.append(line)
        if re.match(r"(Received disconnect from|Disconnected from) ", line):
            break
    return "\n".join(kept)


def _node_said(stderr: bytes) -> str:
    lines = [line.strip() for line in formats.decoded(stderr).splitlines() if line.strip()]
    return f"; the node said: {lines[0][:FACT_LIMIT]!r}" if lines else ""


def _not_reached(node: Node, done: run.Bounded, ssh_said: str, through: str, timeout: float) -> Report:
    """Why ssh did not get in, from its own log; for a worker, the master hop's ssh (which
    ProxyJump starts without -E) writes its own reasons on stderr, before any worker speaks."""
    own = [line.strip() for line in ssh_said.splitlines() if TELLING.match(line.strip())]
    hop = [line.strip() for line in formats.decoded(done.stderr).splitlines() if TELLING.match(line.strip())]
    wrong = any(WRONG_KEY.match(line) for line in own)
    generic = not own or all(re.match(r"kex_exchange_identification|Connection closed by", line) for line in own)
    if through and generic and hop:
        why = hop[0] + through
    elif own:
        why = (next((line for line in own if WRONG_KEY.match(line)), own[0]) if wrong else own[0]) + through
    elif done.timed_out:
        why = f"no answer within {timeout:g} s{through}"
    else:
        why = f"ssh failed (exit {done.returncode}){through}"
    return Report(node, why=why[:2 * FACT_LIMIT], wrong_key=wrong)


def probe_all(profile: Profile, nodes: tuple[Node, ...], ssh_config: Path, timeout: float = DEFAULT_TIMEOUT) -> list[Report]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda n: probe(profile, n, ssh_config, timeout), nodes))


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
            cells["reach"] = "no"
            cells["host key"] = "WRONG" if report.wrong_key else "-"
            problems.append(("its host key is not the one pibake baked" if report.wrong_key else "unreachable") +
                            f": {report.why}")
            rows.append(Row(node.hostname, cells, tuple(problems)))
            continue
        facts = report.facts
        cells["reach"] = cells["host key"] = "ok"
        if report.why:
            problems.append(report.why)
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
