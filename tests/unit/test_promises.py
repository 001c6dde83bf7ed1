"""Tier 1: what a shared profile's `files:` may not put in an image without saying so.

Through the real CLI (`pibake plan`, which plans every node): each entry that would break
one of pibake's promises is refused in one line naming the entry and the promise, and
accepted only with `allow:`, after which the plan shows it whole. The same rules where a
path leads through the image's links are in tests/unit/test_realize.py; the image's own
accounts are checked in tests/image/test_bad_input.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import WIFI_PASSPHRASE, write_profile
from refusals import assert_refused, plan

# (destination, the promise that needs `allow:`), several of each kind
PATHS = [
    ("/etc/ssh/sshd_config.d/00-mine.conf", "sshd"),
    ("/etc/ssh/sshd_config", "sshd"),
    ("/etc/ssh/ssh_host_rsa_key.pub", "sshd"),
    ("/etc/default/ssh", "sshd"),
    ("/etc/pam.d/sshd", "sshd"),
    ("/etc/systemd/system/ssh.service.d/override.conf", "sshd"),
    ("/etc/systemd/system/ssh.socket", "sshd"),
    ("/root/.ssh/authorized_keys", "login-keys"),
    ("/home/pi/.ssh/authorized_keys2", "login-keys"),
    ("/var/lib/backup/.ssh/authorized_keys", "login-keys"),
    ("/home/pi/.ssh/config", "login-keys"),
    ("/boot/firmware/custom.toml", "boot-hooks"),
    ("/boot/firmware/USERCONF.TXT", "boot-hooks"),
    ("/boot/firmware/userconf", "boot-hooks"),
    ("/boot/firmware/ssh", "boot-hooks"),
    ("/boot/firmware/Ssh.txt", "boot-hooks"),
    ("/boot/firmware/firstrun.sh", "boot-hooks"),
    ("/boot/firmware/user-data", "boot-hooks"),
    ("/boot/firmware/network-config", "boot-hooks"),
    ("/boot/firmware/cmdline.txt", "boot-hooks"),
    ("/boot/firmware/cmdline.txt.", "boot-hooks"),  # FAT drops trailing dots: the same file
    ("/boot/firmware/ssh..", "boot-hooks"),
    ("/boot/firmware/config.txt", "boot-hooks"),  # cmdline= and kernel= there choose what boots
    ("/boot/firmware/autoboot.txt", "boot-hooks"),
    ("/usr/local/lib/systemd/system/ssh.service", "sshd"),  # outranks /lib's
    ("/etc/systemd/system/service.d/all.conf", "sshd"),  # a drop-in for every service
    ("/etc/sudoers.d/020_more", "sudo"),
    ("/etc/sudoers", "sudo"),
    ("/etc/systemd/system/multi-user.target.d/wants.conf", "units"),
    ("/usr/local/lib/systemd/system/multi-user.target.wants/x.service", "units"),
    ("/etc/systemd/system.control/x.service", "units"),
    ("/usr/lib/systemd/user/default.target.wants/x.service", "units"),
    ("/home/pi/.config/systemd/user/default.target.wants/x.service", "units"),
    ("/etc/systemd/system-generators/gen", "units"),
    ("/etc/rc.local", "units"),
    ("/etc/sysctl.d/99-forward.conf", "firewall"),
    ("/etc/sysctl.conf", "firewall"),
    ("/usr/lib/sysctl.d/50-mine.conf", "firewall"),
    ("/etc/nftables.conf", "firewall"),
    ("/etc/systemd/system/pibake-firewall.service.d/off.conf", "firewall"),
    ("/etc/pibake/nat.d/x", "firewall"),
    ("/etc/systemd/system/multi-user.target.wants/app.service", "units"),
    ("/etc/systemd/system/sockets.target.requires/app.socket", "units"),
    ("/usr/lib/systemd/system/sysinit.target.wants/x.service", "units"),
]


@pytest.fixture
def key(operator_key: Path) -> str:
    return str(operator_key)


def files_profile(workdir: Path, key: str, entry: str, role: str = "master", extra: str = "") -> None:
    (workdir / "mine").write_text("PasswordAuthentication yes\n# the rest\nPermitRootLogin yes\n")
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\n{extra}{role}:\n  files:\n    - {{source: mine, {entry}}}\n")


@pytest.mark.parametrize("path, promise", PATHS)
def test_an_entry_that_breaks_a_promise_is_refused_unless_allowed(workdir: Path, key: str, path: str, promise: str) -> None:
    files_profile(workdir, key, f"path: {path}")
    assert_refused(workdir, plan(workdir), "cluster.yaml:5: master.files[0]: ", f"{path} would break pibake's promise",
                   f"add `allow: [{promise}]` to the entry")
    assert plan(workdir).returncode == 2
    files_profile(workdir, key, f"path: {path}, allow: [{promise}]")
    result = plan(workdir)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if f" {path} " in line)
    assert line.endswith(f"(allows: {promise})") and f"from {workdir / 'mine'}: " in line, line
    # Shown whole, every line of it, under the entry.
    after = result.stdout.split(line + "\n", 1)[1].splitlines()[:3]
    assert after == ["      | PasswordAuthentication yes", "      | # the rest", "      | PermitRootLogin yes"], after


@pytest.mark.parametrize("mode, promise", [("4755", "setuid"), ("2755", "setuid"), ("6711", "setuid"),
                                           ("0666", "world-writable"), ("777", "world-writable"),
                                           ("1777", "world-writable"), ("0602", "world-writable")])
def test_setuid_and_world_writable_files_need_allow(workdir: Path, key: str, mode: str, promise: str) -> None:
    files_profile(workdir, key, f"path: /usr/local/bin/tool, mode: {mode}", role="workers")
    assert_refused(workdir, plan(workdir), "cluster.yaml:5: workers.files[0]: ", f"mode {int(mode, 8):04o} would break",
                   f"`allow: [{promise}]`")
    files_profile(workdir, key, f"path: /usr/local/bin/tool, mode: {mode}, allow: [{promise}]", role="workers")
    assert plan(workdir).returncode == 0


@pytest.mark.parametrize("entry, line, words", [
    ("path: /etc/x, allow: [everything]", 5, "'everything' is not one of sshd, login-keys"),
    ("path: /etc/x, owner: '4294967295:0'", 5, "each 0 to 4294967294"),
    ("path: /etc/x, owner: '0:4294967295'", 5, "each 0 to 4294967294"),
    ("path: /etc/x, owner: '99999999999999999999:1'", 5, "each 0 to 4294967294"),
    ("path: /etc/x, owner: '-1:0'", 5, "must be root, USER"),
    ("path: \"/etc/a\\0b\"", 5, "holds a control character ('\\x00'"),
    ("path: /etc/app.service, enable: true", 5, "enable is for a unit file in /etc/systemd/system"),
    ("path: /etc/systemd/system/app.conf, enable: true", 5, "enable is for a unit file"),
    ("path: /etc/systemd/system/sub/app.service, enable: true", 5, "enable is for a unit file"),
])
def test_entry_values_that_are_refused(workdir: Path, key: str, entry: str, line: int, words: str) -> None:
    files_profile(workdir, key, entry)
    assert_refused(workdir, plan(workdir), f"cluster.yaml:{line}: ", words)


def test_numeric_owners_up_to_the_largest_are_taken(workdir: Path, key: str) -> None:
    files_profile(workdir, key, "path: /etc/x, owner: '4294967294:4294967294'")
    result = plan(workdir)
    assert result.returncode == 0 and " 4294967294:4294967294 " in result.stdout, result.stderr


def test_a_nul_in_a_source_path_is_a_profile_error(workdir: Path, key: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nmaster:\n  files:\n    - {{source: \"mo\\0td\", path: /etc/motd}}\n"
                           "  uplink:\n    wifi:\n      ssid: home\n      passphrase_file: \"pass\\0word\"\n")
    result = plan(workdir)
    assert_refused(workdir, result, "cluster.yaml:5: ", "master.files[0].source", "control character")
    assert "cluster.yaml:9: master.uplink.wifi.passphrase_file" in result.stderr, result.stderr


@pytest.mark.parametrize("text", ["$HOME/motd", "${PIBAKE_WIFI_PASSPHRASE}", "files/$PIBAKE_WIFI_PASSPHRASE", "~/${X}y"])
def test_environment_variables_are_not_expanded_in_paths(workdir: Path, key: str, text: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nmaster:\n  files:\n    - {{source: '{text}', path: /etc/motd}}\n")
    result = plan(workdir)
    assert_refused(workdir, result, "cluster.yaml:5: ", "environment variables are not expanded")
    assert WIFI_PASSPHRASE not in result.stdout + result.stderr


def test_a_source_in_your_own_ssh_folder_is_refused(workdir: Path, key: str) -> None:
    home = workdir / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh/id_ed25519")], check=True)
    (home / ".ssh/config").write_text("Host *\n")
    (workdir / "deploy").symlink_to(home / ".ssh")  # reached through a link, as a shared folder can arrange
    for source, mode in (("~/.ssh/id_ed25519", "0600"), ("deploy/id_ed25519", "0600"), ("deploy/config", "0644"),
                         ("~/.ssh/id_ed25519.pub", "0644")):
        write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nmaster:\n  files:\n"
                               f"    - {{source: '{source}', path: /etc/app/key, mode: {mode}}}\n")
        result = plan(workdir, HOME=str(home))
        assert_refused(workdir, result, "cluster.yaml:5: master.files[0].source: ", "is in your ~/.ssh")
        assert "PRIVATE" not in result.stdout + result.stderr


def test_a_source_among_pibake_s_own_keys_is_refused(workdir: Path, key: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\n")
    assert plan(workdir).returncode == 0  # makes state/keys
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nworkers:\n  files:\n"
                           "    - {source: state/keys/cluster_id_ed25519, path: /etc/app/key, mode: '0600'}\n")
    result = plan(workdir)
    assert result.returncode == 2 and "one of the keys pibake keeps for the cluster" in result.stderr, result.stderr
    assert "cluster.yaml:5: workers.files[0]" in result.stderr and "PRIVATE" not in result.stdout


UNIT = "[Unit]\nDescription=app\n[Service]\nExecStart=/usr/local/bin/app\n[Install]\nWantedBy=multi-user.target\n"


def test_a_unit_is_enabled_only_when_asked(workdir: Path, key: str) -> None:
    (workdir / "app.service").write_text(UNIT + "RequiredBy=network-online.target\n")
    for enable, links in (("", []), (", enable: false", []),
                          (", enable: true", ["/etc/systemd/system/multi-user.target.wants/app.service",
                                              "/etc/systemd/system/network-online.target.requires/app.service"])):
        write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nworkers:\n  count: 1\n  files:\n"
                               f"    - {{source: app.service, path: /etc/systemd/system/app.service{enable}}}\n")
        result = plan(workdir)
        assert result.returncode == 0, result.stderr
        made = [line.split()[1] for line in result.stdout.splitlines() if line.split()[:1] == ["symlink"]
                and line.split()[1].endswith("/app.service")]
        assert made == links, (enable, made)  # worker1's plan


@pytest.mark.parametrize("install", ["WantedBy=../../../etc/cron.d/x", "WantedBy=multi-user.target/../../evil",
                                     "RequiredBy=/etc/passwd", "WantedBy=", "Also=x.service"])
def test_a_unit_to_enable_names_units_only(workdir: Path, key: str, install: str) -> None:
    (workdir / "app.service").write_text(f"[Service]\nExecStart=/bin/true\n[Install]\n{install}\n")
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nworkers:\n  files:\n"
                           "    - {source: app.service, path: /etc/systemd/system/app.service, enable: true}\n")
    result = plan(workdir)
    assert_refused(workdir, result, "cluster.yaml:5: workers.files[0]: ", "'app.service'")
    assert "/etc/cron.d" not in result.stdout


def test_the_plan_names_every_source_by_its_resolved_path(workdir: Path, key: str) -> None:
    (workdir / "real").mkdir()
    (workdir / "real/token").write_text("s3cr3t\n")
    (workdir / "real/motd").write_text("hello\n")
    (workdir / "link").symlink_to(workdir / "real")
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nworkers:\n  count: 1\n  files:\n"
                           "    - {source: link/token, path: /etc/app/token, mode: '0600'}\n"
                           "    - {source: link/motd, path: /etc/motd}\n")
    result = plan(workdir)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "/etc/app/token" in line or " /etc/motd " in line]
    assert len(lines) == 2 and all(f"from {os.path.realpath(workdir / 'real')}/" in line for line in lines), lines
    assert "s3cr3t" not in result.stdout


@pytest.mark.parametrize("body, line, words", [
    ("master:\n  hostname: =\n", 6, "master.hostname: '=' is not a valid hostname"),
    ("image:\n  release: 2025-02-30\n", 6, "image.release: '2025-02-30' is not an image spec"),
    ("master:\n  dhcp:\n    lease: !!float 1e400\n", 7, "tags"),
])
def test_values_yaml_cannot_make_are_profile_errors(workdir: Path, key: str, body: str, line: int, words: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nworkers:\n  count: 1\n{body}")
    assert_refused(workdir, plan(workdir), f"cluster.yaml:{line}: ", words)


def test_a_long_url_is_cut_after_its_login_is_hidden(workdir: Path, key: str) -> None:
    url = "https://bob:S3cr3tPassw0rd@mirror.lan/" + "a" * 5000
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nimage:\n  url: '{url}'\n")
    result = plan(workdir)
    assert_refused(workdir, result, "cluster.yaml:4: ", "longer than 4096 characters")
    assert "S3cr3t" not in result.stderr and "***@" in result.stderr, result.stderr


def test_a_pgp_private_key_is_a_secret(workdir: Path, key: str) -> None:
    (workdir / "signing.asc").write_text("-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQVYBGV\n-----END PGP PRIVATE KEY BLOCK-----\n")
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nmaster:\n  files:\n"
                           "    - {source: signing.asc, path: /etc/app/signing.asc}\n")
    assert_refused(workdir, plan(workdir), "cluster.yaml:5: ", "is a private key", "use 0600")


def test_no_sudo_means_out_of_the_sudo_group_too(workdir: Path, key: str) -> None:
    """Debian's sudoers lets the sudo group in with a password."""
    from builder.keys import KeyStore
    from builder.operations import EditLines
    from builder.plan import plan_node
    from builder.profile import load
    from builder.tree import Changes, Tree
    from builder.release import named
    from rpios_image import GROUP
    from table_base import CONTENT, TableBase

    for name, before, after in (("pi", "sudo:x:27:pi", "sudo:x:27:"), ("alice", "sudo:x:27:bob,pi,carol", "sudo:x:27:bob,carol"),
                                ("alice", "sudo:x:27:bob,pi", "sudo:x:27:bob")):
        profile = load(write_profile(workdir, f"user:\n  name: {name}\n  ssh_keys: [{key}]\n  sudo: none\n"
                                              "  password_hash: $6$salt$hash\n"))
        plan = plan_node(profile, profile.master.node, named("bookworm"), KeyStore(workdir / "state"))
        CONTENT["/etc/group"] = GROUP.replace("sudo:x:27:pi", before).encode()
        tree = Tree(TableBase(), "/boot/firmware")
        try:
            for op in plan.ops:
                if isinstance(op, EditLines) and op.path == "/etc/group":
                    op.play(tree, Changes())
        finally:
            CONTENT["/etc/group"] = GROUP.encode()
        sudo = [line for line in tree.text("/etc/group").split("\n") if line.startswith("sudo:")]
        assert sudo == [after], (name, before, sudo)
        assert not any(op.path.startswith("/etc/sudoers.d/010_") and type(op).__name__ == "Write" for op in plan.ops)
