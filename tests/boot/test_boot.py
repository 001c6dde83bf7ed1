"""Tier 3: bake a master and two workers, boot them in QEMU, and check the cluster over SSH.

Once for each release that is boot-tested: Bookworm, and Trixie, the newest,
whose first boot belongs to cloud-init unless pibake turns it off. The master
loses power once, while its first boot is installing packages; the cluster
must come up configured all the same, and a second boot must change nothing.

The base images are the Raspberry Pi OS-shaped arm64 fixtures that
tests/boot_fixture.py builds from Debian's packages (`make test` builds them
first). Its partial Debian mirror is served on 127.0.0.1, so the build
resolves and downloads the master's packages exactly as it would from
deb.debian.org, signatures included, and the guests themselves have no way out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boot_fixture import DISK_ID, fixture_dir
from builder import node_side
from conftest import run_pibake, write_profile
from mirror import Mirror
from qemu import Cluster, HomeNetwork, Ssh, boot_partition_offset, read_cmdline, wait_for

pytestmark = pytest.mark.boot

WORKERS = {"worker1": "192.168.5.101", "worker2": "192.168.5.102"}
NODES = [("master", None), *WORKERS.items()]
BOOT_MINUTES = 20  # three TCG guests on two cores, first boot with a package install
# Boots before the one that finishes pibake's first boot: Raspberry Pi OS's own
# first boot (Bookworm's firstboot init reboots once; Trixie's initramfs step does
# not), plus the one whose power is cut.
BOOTS_BEFORE = {"bookworm": 2, "trixie": 1}


@pytest.fixture(scope="module", params=sorted(BOOTS_BEFORE))
def release(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def fixture(release: str) -> Path:
    folder = fixture_dir(release)
    if not (folder / "done").exists():
        pytest.fail(f"the boot fixture is missing: run `python3 tests/boot_fixture.py {release}` (make test does) "
                    f"to build {folder}")
    return folder


@pytest.fixture(scope="module")
def debian_mirror(fixture: Path):
    mirror = Mirror(fixture / "mirror")
    yield mirror
    mirror.stop()


@pytest.fixture(scope="module")
def baked(fixture: Path, debian_mirror: Mirror, operator_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's project folder after `pibake build master` and `pibake build worker --count 2`."""
    work = tmp_path_factory.mktemp(f"boot-{fixture.name}")
    (work / "profiles").mkdir()
    # The tests stand on the master's uplink side, the stand-in home network, where its
    # DHCP server gives the master one address, pinned here as a user may pin theirs.
    write_profile(work / "profiles", f"""
        user:
          name: alice
          ssh_keys: [{operator_key}]
        master:
          uplink:
            interface: eth1
            address: {HomeNetwork.ADDRESS}
        workers:
          count: 2
        """)
    env = {"PIBAKE_APT_MIRRORS": f"http://deb.debian.org/debian={debian_mirror.base}/debian",
           "XDG_CACHE_HOME": str(work / "cache")}
    for args in (("build", "master"), ("build", "worker", "--count", "2")):
        result = run_pibake(*args, "--image", str(fixture / "rpios.img"), cwd=work, env=env)
        assert result.code == 0, result.output
    # The packages came from the loopback mirror, checked against the image's own keys.
    assert any(p.endswith("/InRelease") for p in debian_mirror.paths())
    assert any("/dnsmasq_" in p for p in debian_mirror.paths())
    return work


@pytest.fixture(scope="module")
def cluster(baked: Path, fixture: Path, operator_key: Path):
    output = baked / "output"
    with Cluster(baked) as running:
        # The master's card: output/master.img stays as baked (pibake diff compares with it).
        card = running.folder / MASTER_CARD
        subprocess.run(["cp", "--sparse=always", str(output / "master.img"), str(card)], check=True)
        as_a_larger_card(card)
        running.add("master", card, fixture / "vmlinuz", fixture / "initrd.img", uplink=True)
        # worker2's card as Raspberry Pi Imager 1.x leaves it when asked to customise it.
        as_imager_1_customises_it(output / f"{IMAGER_CUSTOMISED}.img")
        for name in WORKERS:
            running.add(name, output / f"{name}.img", fixture / "vmlinuz", fixture / "initrd.img")
        running.start()
        master = running.guests["master"]
        ssh = Ssh(operator_key.with_suffix(""), output / "known_hosts", "alice", running.home)
        try:
            # Pull the master's plug while dpkg is installing its packages: the
            # next boot must finish the job (checked in the first test).
            wait_for(lambda: "Setting up " in master.console.read_text(errors="replace"),
                     time.monotonic() + BOOT_MINUTES * 60, "dpkg to start configuring packages on first boot",
                     interval=0.5)
            master.power_cut()
            _wait_until_configured(running, ssh)
            yield running, ssh
        except BaseException:
            print(_diagnose(running, ssh))
            raise
        finally:
            ssh.close()


MASTER_CARD = "master-card.img"
MASTER_CARD_GROWTH = 1 << 30


def as_a_larger_card(image: Path) -> None:
    """The master's image on a card 1 GiB larger, its root file system grown to fill it, as
    Raspberry Pi OS's first boot grows it on a Pi (the fixture's first boot leaves it as is)."""
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size + MASTER_CARD_GROWTH)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "-N", "2", str(image)], input=b", +\n", check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True).stdout)
    root = table["partitiontable"]["partitions"][1]
    # On a loop device of the partition alone: resize2fs sets a regular file's length to the
    # file system's, which, given an offset into the image, would cut the image's end off.
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(root["start"] * 512), "--sizelimit",
                           str(root["size"] * 512), str(image)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        assert loop.startswith("/dev/loop"), loop
        subprocess.run(["resize2fs", "-f", loop], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


IMAGER_CUSTOMISED = "worker2"
# What Imager 1.x's firstrun.sh does to a node (imager_custom set_hostname, userconf and
# the rest), reduced to what shows, and how it ends.
IMAGER_FIRSTRUN = """#!/bin/bash
set +e
echo imager-was-here > /etc/hostname
touch /var/lib/imager-firstrun-ran
rm -f /boot/firstrun.sh
sed -i 's| systemd.run.*||g' /boot/cmdline.txt
exit 0
"""


def as_imager_1_customises_it(image: Path) -> None:
    """firstrun.sh on the boot partition, and the parameters that run it on cmdline.txt."""
    fat = f"{image}@@{boot_partition_offset(image)}"
    script = image.with_name("firstrun.sh")
    script.write_text(IMAGER_FIRSTRUN)
    cmdline = image.with_name("cmdline.txt")
    cmdline.write_text(read_cmdline(image).rstrip("\n") + " systemd.run=/boot/firstrun.sh systemd.run_success_action=reboot"
                       " systemd.unit=kernel-command-line.target\n")
    for f in (script, cmdline):
        subprocess.run(["mcopy", "-o", "-i", fat, str(f), f"::/{f.name}"], check=True)
        f.unlink()


def _wait_until_configured(running: Cluster, ssh: Ssh) -> None:
    deadline = time.monotonic() + BOOT_MINUTES * 60
    ssh.wait("master", running.guests["master"], deadline)
    wait_for(lambda: ssh.run("master", "systemctl is-system-running --wait").stdout.strip() in ("running", "degraded"),
             deadline, "the master to finish booting")
    for name, address in WORKERS.items():
        ssh.wait(name, running.guests[name], deadline, address)


def _diagnose(running: Cluster, ssh: Ssh, nodes: list[str] | None = None) -> str:
    out = [running.report()]
    for name, address in NODES[: len(nodes) if nodes else None]:
        try:
            done = ssh.run(name, "journalctl -b --no-pager -n 40 -u pibake-firstboot; systemctl --failed --no-pager;"
                                 " cat /proc/cmdline", address, timeout=60)
            out.append(f"--- {name}: first-boot journal\n{done.stdout}{done.stderr}")
        except subprocess.TimeoutExpired:
            out.append(f"--- {name}: unreachable over SSH")
    return "\n".join(out)


def _check_master(ssh: Ssh) -> None:
    assert ssh.check("master", "hostname").strip() == "master"
    assert "inet 192.168.5.1/24" in ssh.check("master", "ip -4 -o addr show dev eth0")
    assert "-A POSTROUTING -s 192.168.5.0/24 -o eth1 -j MASQUERADE" in ssh.check("master", "sudo iptables -t nat -S POSTROUTING")
    # Both directions of the workers' flows go through pibake-out, and only they (test_firewall.py passes traffic).
    assert ssh.check("master", "sudo iptables -S FORWARD").splitlines() == [
        "-P FORWARD DROP",
        "-A FORWARD -s 192.168.5.0/24 -i eth0 -o eth1 -j pibake-out",
        "-A FORWARD -d 192.168.5.0/24 -i eth1 -o eth0 -m conntrack --ctstate RELATED,ESTABLISHED -j pibake-out",
        "-A FORWARD -j REJECT --reject-with icmp-admin-prohibited"]
    assert "-P FORWARD DROP" in ssh.check("master", "sudo ip6tables -S FORWARD")
    ssh.check("master", "tcpdump --version")
    ssh.check("master", "fab --version")
    for name in WORKERS:
        # By name, with the cluster key, against the cluster's known hosts.
        assert ssh.check("master", f"ssh -o BatchMode=yes -o StrictHostKeyChecking=yes {name} hostname").strip() == name
    # One command on every worker by name: the master's Fabric and its list of workers.
    ran = ssh.check("master", "fab -H \"$(grep -v '^#' /etc/pibake/workers | paste -sd,)\" -- hostname")
    assert sorted(ran.split()) == sorted(WORKERS), ran


def _check_from_the_uplink_side(baked: Path, home: HomeNetwork) -> None:
    """What the operator runs on the home network: `pibake check`, and ssh by name through output/ssh_config.

    pibake check holds what these tests would otherwise ask each node themselves: host
    key, first boot, address and lease as reserved, dnsmasq, mDNS, the firewall (v4 and
    v6), forwarding and NAT."""
    result = run_pibake("check", cwd=baked, within=tuple(home.argv()))
    assert result.code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.split() and line.split()[0] in
            ("master", *WORKERS)}
    assert set(rows) == {"master", *WORKERS}, result.stdout
    assert "firewall v4 loaded v6 loaded, NAT on (workers' way out open)" in rows["master"], result.stdout
    assert "mDNS active" in rows["master"] and "dnsmasq active" in rows["master"]
    for name, address in WORKERS.items():
        assert rows[name].split()[1:4] == ["ok", "ok", "done"] and f" {address} " in rows[name], result.stdout
        # The workers only through the master (ProxyJump), strict host key checking at both hops.
        done = subprocess.run([*home.argv(), "ssh", "-F", str(baked / "output/ssh_config"), "-o", "BatchMode=yes", name, "hostname"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == name, done.stderr
    # One command on every node from this machine: the generated fabfile, with Fabric.
    fab = Path(sys.executable).with_name("fab")
    ran = subprocess.run([*home.argv(), fab, "-r", str(baked / "output"), "on", "--cmd", "hostname"], capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0 and ran.stdout.splitlines() == [f"{n}: {n}" for n in ("master", *WORKERS)], \
        ran.stdout + ran.stderr


def _nat_status(ssh: Ssh) -> dict[str, str]:
    text = ssh.check("master", "sudo pibake-nat status")
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def _check_node(ssh: Ssh, name: str, address: str | None) -> None:
    assert ssh.check(name, "hostname", address).strip() == name
    wizard = ssh.run(name, "systemctl is-enabled userconfig.service; systemctl is-active userconfig.service;"
                           " test -e /run/userconf-wizard-pending && echo pending", address)
    assert "enabled" not in wizard.stdout.split() and "pending" not in wizard.stdout, wizard.stdout
    refused = subprocess.run(
        [*ssh.argv(name, address, multiplex=False), "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive",
         "true"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Permission denied (publickey)" in refused.stderr, refused.stderr


def _check_first_boot_ran(ssh: Ssh, name: str, address: str | None, release: str) -> None:
    """Raspberry Pi OS's own first boot ran (new disk id, its cmdline.txt step done) and undid nothing of pibake's."""
    cmdline = ssh.check(name, "cat /boot/firmware/cmdline.txt", address)
    assert f"root=PARTUUID={DISK_ID[2:]}-02" not in cmdline, cmdline  # the disk id is a new one
    assert "init=" not in cmdline and " resize" not in cmdline, cmdline
    ssh.check(name, "findmnt /boot/firmware", address)  # fstab followed the new disk id
    if release == "trixie":
        # cloud-init is installed and enabled in the image, and did nothing.
        ssh.check(name, "systemctl is-enabled cloud-init-local.service", address)
        status = ssh.run(name, "cloud-init status", address)
        assert "status: disabled" in status.stdout, status.stdout + status.stderr
        ssh.check(name, "test ! -e /var/lib/cloud/instance", address)
        # pi-gen's Trixie pi has a nologin shell and no sudo rule; the profile's alice has both.
        assert ssh.check(name, "getent passwd alice", address).rstrip().endswith(":/bin/bash")
        ssh.check(name, "sudo -n true", address)


def _state(ssh: Ssh, name: str, address: str | None) -> str:
    """What a later boot must not change: hostname, host keys, addresses, users."""
    return ssh.check(name, "hostname; cat /etc/hostname; ip -4 -o addr show scope global | awk '{print $2, $4}';"
                           " sha256sum /etc/ssh/ssh_host_*_key.pub /etc/ssh/pibake/*.pub; getent passwd 1000", address)


def test_cluster_configures_itself_on_first_boot(cluster, baked: Path, release: str) -> None:
    running, ssh = cluster
    _check_master(ssh)
    _check_from_the_uplink_side(baked, running.home)
    # What pibake wrote carries the one time its manifest records (the base's own, older
    # than the nodes' clocks): the checks here show nothing refused or waited for it.
    manifest = json.loads((baked / "output/manifest.json").read_text())["nodes"]
    for name, address in (("master", None), ("worker1", WORKERS["worker1"])):
        written = manifest[name]["epoch"]
        assert written["source"] == "base image", written
        stamps = ssh.check(name, "stat -c %Y /etc/systemd/system/pibake-firstboot.service; date +%s", address).split()
        assert int(stamps[0]) == written["seconds"] < int(stamps[1]), (name, stamps, written)
    for name, address in NODES:
        _check_node(ssh, name, address)
        _check_first_boot_ran(ssh, name, address, release)
        assert address is None or f"inet {address}/24" in ssh.check(name, "ip -4 -o addr show dev eth0", address)
    # Imager 1.x's firstrun.sh was removed, not run, and said so.
    imager = WORKERS[IMAGER_CUSTOMISED]
    ssh.check(IMAGER_CUSTOMISED, "test -s /var/lib/pibake/imager-firstrun-skipped && ! test -e /var/lib/imager-firstrun-ran"
                                 " && ! test -e /boot/firmware/firstrun.sh && ! grep -q systemd.run /boot/firmware/cmdline.txt",
              imager)
    assert running.guests[IMAGER_CUSTOMISED].boots >= BOOTS_BEFORE[release] + 1
    assert "pibake: Raspberry Pi Imager's firstrun.sh was not run" in \
        running.guests[IMAGER_CUSTOMISED].console.read_text(errors="replace")
    # The boot after the power cut finished what dpkg had started, offline: no
    # network at first boot, the install used only what was staged.
    master = running.guests["master"]
    assert master.boots >= BOOTS_BEFORE[release] + 1
    console = master.console.read_text(errors="replace")  # every boot's; the journal keeps this boot's only
    assert "installing" in console and "Get:" not in console
    log = ssh.check("master", "journalctl -b --no-pager -u pibake-firstboot")
    assert "first boot done" in log and "Get:" not in log, log
    ssh.check("master", "test -e /var/lib/pibake/firstboot.done && ! test -e /var/cache/pibake/debs")
    assert ssh.check("master", "dpkg --audit; dpkg-query -W -f='${db:Status-Abbrev}${Package}\\n' "
                               "dnsmasq iptables tcpdump fabric").split() == \
        ["ii", "dnsmasq", "ii", "fabric", "ii", "iptables", "ii", "tcpdump"]  # dpkg-query sorts
    assert ssh.check("master", "systemctl is-active dnsmasq pibake-firewall").split() == ["active", "active"]
    # No forwarding before the firewall: on the first boot iptables came with the
    # packages, so the firewall's unit found none and left forwarding off until then.
    stayed_off = console.find("iptables is not installed yet: forwarding stays off")
    assert 0 <= stayed_off < console.find("firewall loaded (IPv4 and IPv6), forwarding on"), console[-3000:]


def _connect_from_home(home: HomeNetwork, host: str, port: int) -> str:
    """A TCP connection from the home network: "open", or why not."""
    code = (f"import socket\ntry:\n    socket.create_connection(({host!r}, {port}), timeout=15).close()\n    print('open')\n"
            "except OSError as e:\n    print(e.strerror or type(e).__name__)")
    return subprocess.run([*home.argv(), sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_nothing_from_the_home_network_reaches_the_lan(cluster) -> None:
    running, ssh = cluster
    home = running.home
    # A host on the home network that routes the cluster's LAN through the master.
    subprocess.run([*home.argv(), "ip", "route", "replace", "192.168.5.0/24", "via", home.ADDRESS], check=True)
    try:
        assert _connect_from_home(home, home.ADDRESS, 22) == "open"  # the master's SSH, on its uplink
        assert _connect_from_home(home, "192.168.5.1", 22) == "open"  # the master itself, by its LAN address
        for address in WORKERS.values():
            assert _connect_from_home(home, address, 22) == "No route to host"  # rejected, not forwarded
    finally:
        subprocess.run([*home.argv(), "ip", "route", "del", "192.168.5.0/24"], check=True)


def test_workers_way_out_switches_at_run_time(cluster) -> None:
    running, ssh = cluster
    home = running.home
    # A service on the home network; it writes down whom each connection came from.
    seen = running.folder / "home-service.log"
    server = subprocess.Popen([*home.argv(), sys.executable, "-c",
                               "import socket, sys\n"
                               f"s = socket.create_server(({home.HOST!r}, 8470))\n"
                               "while True:\n    c, peer = s.accept()\n    print(peer[0], flush=True)\n    c.close()\n"],
                              stdout=open(seen, "w"), stderr=subprocess.DEVNULL)
    reach = f"timeout 20 bash -c 'exec 3<>/dev/tcp/{home.HOST}/8470' && echo open || echo closed"
    try:
        wait_for(lambda: _connect_from_home(home, home.HOST, 8470) == "open", time.monotonic() + 60, "the home service")
        assert ssh.check("worker1", reach, WORKERS["worker1"]).strip() == "open"
        assert seen.read_text().split()[-1] == home.ADDRESS  # masqueraded as the master's uplink address
        ssh.check("master", "sudo pibake-nat off")
        assert _nat_status(ssh)["workers-out"] == "closed"
        for name, address in WORKERS.items():
            assert ssh.check(name, reach, address).strip() == "closed"
            assert ssh.check(name, "hostname", address).strip() == name  # SSH through the master still works
        ssh.check("master", "sudo pibake-nat on")
        assert _nat_status(ssh) == {"nat": "on", "firewall-v4": "loaded", "workers-out": "open", "firewall-v6": "loaded",
                                    "forwarding": "1"}
        assert ssh.check("worker2", reach, WORKERS["worker2"]).strip() == "open"
    finally:
        server.kill()
        server.wait()


# What the master holds that no profile does: a file, a hard link to it, a file with an
# extended attribute and one with a file capability (cap_net_raw+ep, as setcap writes it).
CAPABILITY = "0100000200200000000000000000000000000000"
KEEP = ("sudo mkdir -p /srv/keep && echo kept | sudo tee /srv/keep/file >/dev/null && sudo ln -f /srv/keep/file /srv/keep/hard"
        " && sudo cp /bin/true /srv/keep/tool && sudo python3 -c \"import os; os.setxattr('/srv/keep/file', 'user.pibake', b'x');"
        f" os.setxattr('/srv/keep/tool', 'security.capability', bytes.fromhex('{CAPABILITY}'))\"")
KEPT = ("cat /srv/keep/file; stat -c %h /srv/keep/file; [ $(stat -c %i /srv/keep/file) = $(stat -c %i /srv/keep/hard) ]"
        " && echo one inode; python3 -c \"import os;"
        " print(os.getxattr('/srv/keep/file', 'user.pibake'), os.getxattr('/srv/keep/tool', 'security.capability').hex())\"")


def test_second_boot_changes_nothing_and_the_master_comes_back_from_its_backup(cluster, baked: Path, release: str,
                                                                              tmp_path: Path) -> None:
    """Every node boots a second time. The workers as they are; the master first with its
    uplink's NIC not there at all (its firewall loads all the same), and then, on Bookworm,
    from its backup: taken live from the home network beforehand, restored onto a smaller
    card once its own card has "died". (On Trixie the master powers on again with its own
    card: the backup's code is the same, and one restore boot is enough for the budget.)
    Nothing a second boot must keep has changed; the restored master is itself."""
    running, ssh = cluster
    master = running.guests["master"]
    before = {name: _state(ssh, name, address) for name, address in NODES}
    backed_up = _back_up_the_master(running, ssh, baked) if release == "bookworm" else None

    boots = {name: guest.boots for name, guest in running.guests.items()}
    master.uplink_plugged = False
    for name, address in reversed(NODES):  # workers first: they are reached through the master
        ssh.run(name, "sudo systemctl --no-block reboot", address, timeout=60)
    deadline = time.monotonic() + BOOT_MINUTES * 60

    def loaded_this_boot() -> bool:
        text = master.console.read_text(errors="replace")
        this_boot = text.rsplit(f"=== boot {boots['master'] + 1}:", 1)[-1] if master.boots > boots["master"] else ""
        return "firewall loaded (IPv4 and IPv6), forwarding on" in this_boot

    wait_for(loaded_this_boot, deadline, "the master's firewall to load with no uplink")
    assert "-netdev user" not in master.console.read_text(errors="replace").rsplit("=== boot ", 1)[-1].splitlines()[0]
    for name in WORKERS:
        wait_for(lambda name=name: running.guests[name].boots > boots[name], deadline, f"{name} to reboot")
    master.uplink_plugged = True
    if backed_up is not None:
        _restore_the_master(running, baked, backed_up, tmp_path)
    else:
        master.power_cut()
        wait_for(lambda: master.boots > boots["master"] + 1, deadline, "the master to power on again")
    _wait_until_configured(running, ssh)

    for name, address in NODES:
        assert _state(ssh, name, address) == before[name], name
        _check_node(ssh, name, address)
        _check_first_boot_ran(ssh, name, address, release)
    _check_from_the_uplink_side(baked, running.home)
    assert ssh.check("master", "systemctl show -p ConditionResult --value pibake-firstboot").strip() == "no"
    # The firewall is loaded before any interface comes up.
    times = ssh.check("master", "systemctl show -p ActiveEnterTimestampMonotonic --value pibake-firewall network-pre.target;"
                                " systemctl show -p ExecMainStartTimestampMonotonic --value NetworkManager").split()
    firewall, network_pre, network_manager = (int(t) for t in times)
    assert 0 < firewall <= network_pre < network_manager, times
    if release == "bookworm":
        assert ssh.check("master", "systemctl is-enabled regenerate_ssh_host_keys.service || true").strip() == "disabled"
    if backed_up is not None:
        # As itself: the same host keys (checked above, and by pibake check against known_hosts),
        # its files, link, attribute and capability, its leases; its root file system fills the card.
        assert ssh.check("master", KEPT) == backed_up["kept"]
        assert ssh.check("master", "sha256sum /srv/keep/ten") == backed_up["ten"]
        leases = ssh.check("master", "cat /var/lib/misc/dnsmasq.leases")
        assert all(name in leases for name in WORKERS), leases
        # ext4's blocks reach the card's end (less than one block short).
        start, disk, blocks, block = (int(n) for n in ssh.check("master", ROOT_EXTENT).split())
        assert 0 <= disk * 512 - (start * 512 + blocks * block) < block, (start, disk, blocks, block)
    _check_master(ssh)  # the workers reach it, and it them


# The root partition's start and the disk's size (sectors), and ext4's block count and size.
ROOT_EXTENT = ("p=$(findmnt -no SOURCE /); n=${p##*/}; d=$(basename \"$(readlink -f /sys/class/block/$n/..)\");"
               " echo $(cat /sys/class/block/$n/start) $(cat /sys/class/block/$d/size)"
               " $(sudo dumpe2fs -h $p 2>/dev/null | sed -n 's/^Block count: *//p; s/^Block size: *//p')")


def _back_up_the_master(running: Cluster, ssh: Ssh, baked: Path) -> dict:
    """On the live master, what no profile holds; two backups from the home network, and the diff."""
    home = running.home
    ssh.check("master", KEEP)
    kept = ssh.check("master", KEPT)
    assert kept.splitlines()[:3] == ["kept", "2", "one inode"], kept
    leases = ssh.check("master", "cat /var/lib/misc/dnsmasq.leases")
    assert all(name in leases for name in WORKERS), leases

    # The services a backup stops come back by the node's own doing when the operator's
    # connection drops: backup's hold, over output/ssh_config, its ssh killed.
    hold = subprocess.Popen([*home.argv(), "ssh", "-F", "ssh_config", "-o", "BatchMode=yes", "master",
                             node_side.command(node_side.HOLD, "dnsmasq")], cwd=baked / "output", stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert hold.stdout is not None
        assert hold.stdout.readline().decode().split() == ["stopped:", "dnsmasq"]
        assert ssh.run("master", "systemctl is-active dnsmasq").stdout.strip() == "inactive"
    finally:
        hold.kill()
        hold.wait()
    wait_for(lambda: ssh.run("master", "systemctl is-active dnsmasq").stdout.strip() == "active", time.monotonic() + 120,
             "the master to start dnsmasq again once the connection holding it stopped dropped")

    # From the home network, over output/ssh_config, with the master running.
    started = time.monotonic()
    first = run_pibake("backup", "master", cwd=baked, within=tuple(home.argv()), timeout=1800)
    assert first.code == 0, first.output
    print(f"first backup of the master: {time.monotonic() - started:.0f} s\n{first.stdout}")
    path = baked / first.stdout.splitlines()[-1]  # as the output folder was given: output/
    assert path.parent == baked / "output/backups/master" and path.is_file(), first.stdout
    assert ssh.check("master", "systemctl is-active dnsmasq").strip() == "active"  # stopped for the copy only

    # What changed since the bake: what this test did, and nothing pibake or its first boot wrote.
    diff = run_pibake("diff", "master", "--json", cwd=baked, within=tuple(home.argv()), timeout=1800)
    assert diff.code == 0, diff.output
    changed = sorted((c["what"], c["how"], c["name"]) for c in json.loads(diff.stdout))
    print(f"pibake diff master: {changed}")
    assert changed == [("file", "added", p) for p in ("/srv/keep", "/srv/keep/file", "/srv/keep/hard", "/srv/keep/tool")]

    ssh.check("master", "sudo head -c 10000000 /dev/urandom | sudo tee /srv/keep/ten >/dev/null")
    ten = ssh.check("master", "sha256sum /srv/keep/ten")
    started = time.monotonic()
    second = run_pibake("backup", "master", "--keep", "2", cwd=baked, within=tuple(home.argv()), timeout=1800)
    assert second.code == 0, second.output
    print(f"second backup of the master: {time.monotonic() - started:.0f} s\n{second.stdout}")
    figure = re.search(r"([0-9.]+) MB received \(changes since the last backup\)", second.stdout)
    assert figure, second.stdout
    print(f"second backup of the master after a 10 MB change: {figure[1]} MB received")
    assert float(figure[1]) <= 10 + 10, second.stdout
    size = (baked / second.stdout.splitlines()[-1]).stat().st_size
    return {"kept": kept, "ten": ten, "size": size}


def _restore_the_master(running: Cluster, baked: Path, backed_up: dict, tmp_path: Path) -> None:
    """The master's card dies; its newest backup goes onto a smaller card that holds its data, which it boots from."""
    from flash_devices import Loops

    master = running.guests["master"]
    master.stop()
    original = (running.folder / MASTER_CARD).stat().st_size
    assert backed_up["size"] < original - MASTER_CARD_GROWTH // 2, (backed_up["size"], original)
    loops = Loops(tmp_path)
    try:
        card = loops.make((backed_up["size"] + original) // 2 // (1 << 20) * (1 << 20))
        restored = run_pibake("flash", "master", card.device, "--backup", "latest", "--yes", "--force", cwd=baked)
        assert restored.code == 0 and "grew the root file system to fill the card" in restored.stdout, restored.output
    finally:
        loops.close()
    master.new_card(card.backing)
