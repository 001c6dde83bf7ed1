"""Tier 1: what the operator's machine gets to reach the cluster from the home network.

output/ssh_config is read back with the real `ssh -G`, known_hosts with the real
`ssh-keygen -F`, and the inventory with a YAML parser; the operator key that pibake
makes when there is none is a real key pair in the state folder.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builder.build import plans_for
from builder.check import Report, verdicts
from builder.keys import KeyStore
from builder.outputs import write_ssh_files
from builder.profile import load
from builder.release import named
from conftest import run_pibake, write_profile
from qemu import free_port


def resolved(output: Path, host: str) -> dict[str, str]:
    """ssh's own reading of output/ssh_config for `host`."""
    text = subprocess.run(["ssh", "-G", "-F", str(output / "ssh_config"), host], capture_output=True, text=True,
                          check=True).stdout
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def outputs(workdir: Path, body: str, home: Path | None = None, monkeypatch=None) -> tuple[Path, KeyStore, list]:
    if home is not None:
        monkeypatch.setenv("HOME", str(home))
    profile = load(write_profile(workdir, body))
    keys = KeyStore(workdir / "state")
    plans = plans_for(profile, profile.nodes, named("bookworm"), keys)
    (workdir / "output").mkdir()
    write_ssh_files(workdir / "output", profile, keys)
    return workdir / "output", keys, plans


@pytest.mark.parametrize("uplink, expected", [(None, "master.local"), ("10.0.0.7", "10.0.0.7"),
                                               ("pi-master.home.arpa", "pi-master.home.arpa"), ("fd00::7", "fd00::7")])
def test_master_by_its_uplink_name_and_workers_through_it(workdir: Path, operator_key: Path, uplink: str | None,
                                                          expected: str) -> None:
    address = f"\n    address: '{uplink}'" if uplink else ""
    output, _, _ = outputs(workdir, f"user:\n  ssh_keys: [{operator_key}]\nmaster:\n  uplink:{address or ' {}'}\n"
                                    "workers:\n  count: 3\n")
    master = resolved(output, "master")
    assert (master["hostname"], master["hostkeyalias"], master.get("proxyjump")) == (expected, "master", None)
    lan = resolved(output, "master-lan")
    assert (lan["hostname"], lan["hostkeyalias"], lan.get("proxyjump")) == ("192.168.5.1", "master", None)
    for n in (1, 3):
        worker = resolved(output, f"worker{n}")
        assert (worker["hostname"], worker["hostkeyalias"], worker["proxyjump"]) == (f"192.168.5.10{n}", f"worker{n}",
                                                                                    "master")
        assert worker["stricthostkeychecking"] == "true" and worker["userknownhostsfile"] == str(output / "known_hosts")
        assert worker["passwordauthentication"] == "no" and worker["user"] == "pi"
        # The key the profile names, in a folder ssh would not look in by itself.
        assert worker["identityfile"] == str(operator_key.with_suffix(""))
    # Strict checking holds whichever name reaches the master, and for tools that ignore HostKeyAlias.
    for name in ("master", expected, "192.168.5.1", "worker2", "192.168.5.102"):
        found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(output / "known_hosts")], capture_output=True)
        assert found.returncode == 0, name
    inventory = yaml.safe_load((output / "inventory.yaml").read_text())["all"]
    assert inventory["vars"] == {"ansible_user": "pi", "ansible_ssh_common_args": f"-F {output / 'ssh_config'}"}
    assert list(inventory["children"]["cluster_master"]["hosts"]) == ["master"]
    assert list(inventory["children"]["cluster_workers"]["hosts"]) == ["worker1", "worker2", "worker3"]


def test_no_key_at_all_gets_an_operator_key(workdir: Path, monkeypatch) -> None:
    home = workdir / "home"
    home.mkdir()
    output, keys, plans = outputs(workdir, "workers:\n  count: 1\n", home, monkeypatch)
    private = keys.operator_key_path
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    public = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, check=True).stdout
    for plan in plans:
        authorized = next(op for op in plan.ops if op.path == "/home/pi/.ssh/authorized_keys").content.decode()
        assert public.split()[1] in authorized
    for host in ("master", "worker1"):
        assert resolved(output, host)["identityfile"] == str(private)


def test_no_key_through_the_cli_says_so_in_one_line(workdir: Path) -> None:
    home = workdir / "home"
    home.mkdir()
    write_profile(workdir, "workers:\n  count: 1\n")
    result = run_pibake("plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir,
                        env={"HOME": str(home)})
    assert result.code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "operator key" in line]
    assert len(said) == 1 and str(workdir / "state/keys/operator_id_ed25519") in said[0], result.stderr
    again = run_pibake("plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir,
                       env={"HOME": str(home)})
    assert "using the operator key" in again.stderr, again.stderr


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_ssh_s_usual_keys_are_found_before_one_is_made(workdir: Path, monkeypatch, kind: str) -> None:
    home = workdir / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(home / f".ssh/id_{kind}")], check=True)
    output, keys, plans = outputs(workdir, "workers:\n  count: 1\n", home, monkeypatch)
    assert not keys.operator_key_path.exists()
    assert resolved(output, "worker1")["identityfile"] == str(home / f".ssh/id_{kind}")
    authorized = next(op for op in plans[0].ops if op.path == "/home/pi/.ssh/authorized_keys").content.decode()
    assert (home / f".ssh/id_{kind}.pub").read_text().split()[1] in authorized


def test_a_key_file_named_and_missing_is_still_an_error(workdir: Path) -> None:
    write_profile(workdir, "user:\n  ssh_keys: [~/.ssh/id_ed25519.pub]\n")
    result = run_pibake("plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir,
                        env={"HOME": str(workdir)})
    assert result.code == 2 and "cluster.yaml:2: cannot read SSH public key" in result.stderr, result.stderr
    assert not (workdir / "state").exists()


def test_a_port_forward_to_the_master(workdir: Path, operator_key: Path) -> None:
    output, _, _ = outputs(workdir, f"user:\n  ssh_keys: [{operator_key}]\n"
                                    "master:\n  uplink:\n    address: router.home.arpa\n    port: 2222\n")
    assert (resolved(output, "master")["hostname"], resolved(output, "master")["port"]) == ("router.home.arpa", "2222")
    assert resolved(output, "master-lan")["port"] == "22" and resolved(output, "worker1")["port"] == "22"
    # The form known_hosts uses for another port, for tools that ignore HostKeyAlias (Fabric's paramiko).
    found = subprocess.run(["ssh-keygen", "-F", "[router.home.arpa]:2222", "-f", str(output / "known_hosts")])
    assert found.returncode == 0


def test_the_fabfile_runs_through_ssh_config_and_refuses_other_keys(workdir: Path, operator_key: Path) -> None:
    """The boot tests run it against a cluster; here Fabric loads it, and meets a master that is down."""
    port = free_port()
    output, _, _ = outputs(workdir, f"user:\n  ssh_keys: [{operator_key}]\nmaster:\n  uplink:\n"
                                    f"    address: 127.0.0.1\n    port: {port}\nworkers:\n  count: 2\n")
    fab = Path(sys.executable).with_name("fab")
    listed = subprocess.run([fab, "-r", str(output), "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "on " in listed.stdout, listed.stdout + listed.stderr
    down = subprocess.run([fab, "-r", str(output), "on", "--cmd", "true"], capture_output=True, text=True, timeout=60)
    assert down.returncode != 0 and "Traceback" not in down.stderr, down.stderr
    assert down.stdout.splitlines() == [f"{host}: cannot run it there: [Errno None] Unable to connect to port {port} on "
                                        "127.0.0.1" for host in ("master", "worker1", "worker2")], down.stdout
    assert down.stderr.strip() == "failed on master, worker1, worker2"
    namespace: dict = {"__file__": str(output / "fabfile.py")}
    exec(compile((output / "fabfile.py").read_text(), "fabfile.py", "exec"), namespace)
    assert (namespace["MASTER"], namespace["WORKERS"]) == ("master", ["worker1", "worker2"])
    connection = namespace["connect"]("worker2")
    assert (connection.host, connection.port, connection.user) == ("192.168.5.102", 22, "pi")
    assert (connection.gateway.host, connection.gateway.port) == ("127.0.0.1", port)
    for hop in (connection, connection.gateway):
        assert type(hop.client._policy).__name__ == "RejectPolicy"


@pytest.mark.parametrize("body, words", [
    ("master:\n  uplink:\n    address: 'master.local; ProxyCommand x'\n", "is not an IP address or a DNS name"),
    ("master:\n  uplink:\n    address: '-oProxyCommand=x'\n", "is not an IP address or a DNS name"),
    ("master:\n  uplink:\n    address: 'a..b'\n", "is not an IP address or a DNS name"),
    ("workers:\n  nodes:\n    - {hostname: master-lan}\n", "the master's LAN alias in ssh_config"),
    ("master:\n  uplink:\n    port: 70000\n", "must be a TCP port, 1 to 65535, not 70000"),
    ("master:\n  uplink:\n    port: 0\n", "must be a TCP port"),
    ("master:\n  uplink:\n    port: '22 -oProxyCommand=x'\n", "must be an integer"),
])
def test_names_for_ssh_config_are_checked(workdir: Path, operator_key: Path, body: str, words: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\n{body}")
    result = run_pibake("plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 2 and words in result.stderr and "cluster.yaml:" in result.stderr, result.stderr


def test_check_says_why_a_node_is_down(workdir: Path, operator_key: Path) -> None:
    """Every node unreachable: the master's uplink address answers nothing (a closed port on loopback)."""
    port = free_port()
    (workdir / "profiles").mkdir()
    write_profile(workdir / "profiles", f"user:\n  ssh_keys: [{operator_key}]\nmaster:\n  uplink:\n"
                                        f"    address: 127.0.0.1\n    port: {port}\nworkers:\n  count: 2\n")
    profile = load(workdir / "profiles")
    (workdir / "output").mkdir()
    write_ssh_files(workdir / "output", profile, KeyStore(workdir / "state"))
    result = run_pibake("check", cwd=workdir)
    assert result.code == 1, result.output
    table = result.stdout.splitlines()
    assert table[0].split() == ["node", "reach", "host", "key", "first", "boot", "address", "lease", "master"]
    assert [line.split()[:2] for line in table[1:]] == [["master", "no"], ["worker1", "no"], ["worker2", "no"]]
    reasons = [line for line in result.stderr.splitlines() if line.startswith("pibake: ")]
    assert len(reasons) == 3 and all("unreachable: " in line and "Connection refused" in line for line in reasons), reasons


def test_check_before_any_build(workdir: Path, operator_key: Path) -> None:
    (workdir / "profiles").mkdir()
    write_profile(workdir / "profiles", f"user:\n  ssh_keys: [{operator_key}]\n")
    result = run_pibake("check", cwd=workdir)
    assert result.code == 2 and result.stderr.strip() == (
        "pibake: error: output/ssh_config does not exist: build the cluster first (pibake build cluster)")


def _report(profile, node, **facts) -> Report:
    return Report(node, True, "", {"hostname": node.hostname, "first-boot": "done 130s",
                                   "address": f"{node.address}/24", **facts})


MASTER_FACTS = {"dnsmasq": "active", "mdns": "active", "nat": "on", "firewall-v4": "loaded", "workers-out": "open",
                "firewall-v6": "loaded", "forwarding": "1", "uplink-address": "10.0.2.15/24"}


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"master": {"firewall-v6": "not loaded"}}, "master: firewall-v6 is not loaded, not loaded"),
    ({"master": {"forwarding": "0"}}, "master: forwarding is 0, not 1"),
    ({"master": {"dnsmasq": "failed"}}, "master: dnsmasq is failed, not active"),
    ({"worker1": {"first-boot": "running"}}, "worker1: first boot is running"),
    ({"worker2": {"address": "192.168.5.7/24"}}, "worker2: its address is 192.168.5.7, not 192.168.5.102"),
    ({"worker2": {"hostname": "raspberrypi"}}, "worker2: it calls itself 'raspberrypi'"),
    ({"worker1": {"system": "starting"}}, "worker1: it is still starting up (systemctl is-system-running: starting); "
                                          "try again shortly"),
    ({"worker1": {"system": "degraded"}}, None),
    ({"lease": "1 aa 192.168.5.9 worker1 *"}, "worker1: the master has leased 192.168.5.9 for it, not 192.168.5.101"),
])
def test_check_verdicts(workdir: Path, operator_key: Path, change: dict, problem: str | None) -> None:
    profile = load(write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 2\n"))
    master, worker1, worker2 = profile.nodes
    reports = [_report(profile, master, **{**MASTER_FACTS, **change.get("master", {})}),
               _report(profile, worker1, **change.get("worker1", {})),
               _report(profile, worker2, **change.get("worker2", {}))]
    reports[0].leases = [change.get("lease", "1 aa 192.168.5.101 worker1 *"), "1 bb 192.168.5.102 worker2 *"]
    found = [f"{row.node}: {p}" for row in verdicts(profile, reports) for p in row.problems]
    assert found == ([problem] if problem else []), found
