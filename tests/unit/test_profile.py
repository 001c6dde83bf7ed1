"""Tier 1: profile loading and validation, through the library and the real CLI."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from builder.errors import BuildError, ProfileError
from builder.profile import load
from conftest import REPO, WIFI_PASSPHRASE, run_pibake, write_profile


def test_shipped_profile_reproduces_the_reference_cluster(operator_key: Path, tmp_path: Path, monkeypatch) -> None:
    # The shipped profile names ~/.ssh/id_ed25519.pub; give it a home that has one.
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh/id_ed25519.pub").write_text(operator_key.read_text())
    monkeypatch.setenv("HOME", str(tmp_path))
    profile = load(REPO / "profiles")
    master = profile.master
    assert profile.network == IPv4Network("192.168.5.0/24")
    assert profile.interface == "eth0"
    assert (master.node.hostname, master.node.address) == ("master", IPv4Address("192.168.5.1"))
    assert (master.dhcp_start, master.dhcp_end, master.lease) == (IPv4Address("192.168.5.2"), IPv4Address("192.168.5.64"), "24h")
    assert master.uplink == "wlan0" and master.nat is True
    assert master.packages == ("dnsmasq", "iptables", "tcpdump", "fabric")
    assert [(w.hostname, str(w.address)) for w in profile.workers.nodes] == [
        (f"worker{n}", f"192.168.5.{100 + n}") for n in range(1, 6)
    ]
    assert profile.user.name == "pi" and profile.user.sudo == "nopasswd"
    assert profile.user.ssh_keys == (operator_key.read_text().strip(),)


def test_shipped_profile_works_for_someone_with_no_ssh_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh at all
    profile = load(REPO / "profiles")
    assert profile.user.operator_key and profile.user.ssh_keys == ()


def test_an_empty_profile_gets_the_same_defaults(operator_key: Path, tmp_path: Path) -> None:
    path = write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\n")
    profile = load(path)
    assert [n.hostname for n in profile.nodes] == ["master", *(f"worker{n}" for n in range(1, 6))]
    assert profile.master.wifi is None


def test_every_problem_is_reported_at_once_with_file_and_line(tmp_path: Path) -> None:
    path = write_profile(tmp_path, """
        user:
          name: Root!
          ssh_keys: [/nonexistent/key.pub]
          colour: blue
        network:
          subnet: 192.168.5.0/24
        master:
          address: 10.0.0.1
          dhcp:
            start: 192.168.5.2
            end: 192.168.5.120
            lease: forever
          uplink:
            nat: "yes"
        workers:
          count: 2
          hostname: Worker_{n}
        extra: 1
        """)
    with pytest.raises(ProfileError) as raised:
        load(path)
    problems = raised.value.lines()
    text = "\n".join(problems)
    lines = [int(p[len(str(path)) + 1 :].split(":", 1)[0]) for p in problems]
    assert lines == sorted(lines)
    expected = {
        2: "'Root!' is not a valid user name",
        3: "cannot read SSH public key /nonexistent/key.pub",
        4: "unknown key 'user.colour'",
        8: "master address 10.0.0.1 is not a usable address of 192.168.5.0/24",
        10: "covers Worker_1's reserved address 192.168.5.101",
        12: "lease 'forever'",
        14: "master.uplink.nat must be true or false",
        17: "is not a valid hostname",
        18: "unknown key 'extra'",
    }
    for line, message in expected.items():
        assert any(p.startswith(f"{path}:{line}: ") and message in p for p in problems), f"line {line}: {message}\n{text}"


def test_dhcp_range_covering_the_master_and_duplicates_are_refused(operator_key: Path, tmp_path: Path) -> None:
    path = write_profile(tmp_path, f"""
        user:
          ssh_keys: [{operator_key}]
        master:
          hostname: node
          address: 192.168.5.10
        workers:
          nodes:
            - {{hostname: node, address: 192.168.5.200}}
            - {{hostname: other, address: 192.168.5.200}}
            - {{hostname: third, address: 192.168.6.1}}
        """)
    with pytest.raises(ProfileError) as raised:
        load(path)
    text = "\n".join(raised.value.lines())
    assert "covers the master's address 192.168.5.10" in text
    assert "hostname 'node' is used twice" in text
    assert "address 192.168.5.200 is given to both node and other" in text
    assert "third's address 192.168.6.1 is not a usable address" in text
    assert f"{path}:10:" in text  # the second node's line


def test_wifi_passphrase_comes_from_the_environment_or_a_file(operator_key: Path, tmp_path: Path, monkeypatch) -> None:
    body = f"user:\n  ssh_keys: [{operator_key}]\nmaster:\n  uplink:\n    wifi:\n      ssid: HomeNet\n      country: DE\n"
    path = write_profile(tmp_path, body)
    monkeypatch.delenv("PIBAKE_WIFI_PASSPHRASE", raising=False)
    with pytest.raises(ProfileError) as raised:
        load(path)
    assert f"{path}:6: no passphrase for Wi-Fi 'HomeNet': set the environment variable PIBAKE_WIFI_PASSPHRASE" in raised.value.lines()[0]
    monkeypatch.setenv("PIBAKE_WIFI_PASSPHRASE", WIFI_PASSPHRASE)
    assert load(path).master.wifi.country == "DE"
    secret = tmp_path / "wifi.secret"
    secret.write_text("file passphrase\n")
    path = write_profile(tmp_path, body + f"      passphrase_file: {secret}\n")
    assert load(path).master.wifi.passphrase == "file passphrase"


def test_wpa_psk_matches_the_ieee_802_11i_test_vector() -> None:
    from builder.profile import Wifi

    assert Wifi("IEEE", "GB", "password").psk == "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
    assert "password" not in repr(Wifi("IEEE", "GB", "password"))


def test_private_key_listed_as_public_key_is_explained(tmp_path: Path, operator_key: Path) -> None:
    private = operator_key.with_suffix("")
    path = write_profile(tmp_path, f"user:\n  ssh_keys: [{private}]\n")
    with pytest.raises(ProfileError) as raised:
        load(path)
    assert "is a private key: list the .pub file instead" in raised.value.lines()[0]


def test_workers_beyond_the_profile_are_refused_with_advice(operator_key: Path, tmp_path: Path) -> None:
    profile = load(write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 5\n"))
    assert [n.hostname for n in profile.select("worker", first=4, count=2)] == ["worker4", "worker5"]
    with pytest.raises(BuildError, match="worker7 is not in the profile: it defines 5 workers"):
        profile.select("worker", first=6, count=2)


def test_cli_reports_profile_errors_in_one_line_each_exit_2_no_traceback(workdir: Path) -> None:
    write_profile(workdir, "master:\n  address: 300.1.1.1\n  dhcp: [1, 2]\nworkers:\n  count: many\n")
    result = run_pibake("plan", "master", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 2
    assert "Traceback" not in result.output
    assert "cluster.yaml:2: master.address: '300.1.1.1' is not an IPv4 address" in result.stderr
    assert "cluster.yaml:3: master.dhcp must be a mapping" in result.stderr
    assert "cluster.yaml:5: workers.count must be an integer" in result.stderr
    assert not (workdir / "output").exists() and not (workdir / "state").exists()


def test_cli_reports_broken_yaml_with_its_line(workdir: Path) -> None:
    write_profile(workdir, "user:\n  name: pi\n   bad: indent\n")
    result = run_pibake("plan", "master", "--release", "bookworm", cwd=workdir, env={"PIBAKE_PROFILES": "cluster.yaml"})
    assert result.code == 2
    assert "cluster.yaml:3: not valid YAML" in result.stderr
    assert "Traceback" not in result.output


def test_cli_missing_profile_is_one_clear_line(workdir: Path) -> None:
    result = run_pibake("plan", "master", "--release", "bookworm", "--profiles", "nope.yaml", cwd=workdir)
    assert result.code == 2
    assert result.stderr.strip() == "pibake: error: cannot read profile nope.yaml: No such file or directory"


@pytest.mark.parametrize("written, expected", [
    ("0644", 0o644), ("644", 0o644), ('"0644"', 0o644), ("'644'", 0o644), ("0600", 0o600), ("0640", 0o640),
    ("0755", 0o755), ("0o640", 0o640), ("1777", 0o1777), ("0400", 0o400), ("420", 0o420),
])
def test_file_mode_means_what_was_written_quoted_or_not(operator_key: Path, tmp_path: Path, written: str,
                                                       expected: int) -> None:
    (tmp_path / "motd").write_text("hello\n")
    allow = "      allow: [world-writable]\n" if expected & 0o002 else ""  # refused otherwise: anyone could change it
    path = write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  files:\n"
                                   f"    - source: motd\n      path: /etc/motd\n      mode: {written}\n{allow}")
    assert load(path).workers.files[0].mode == expected


@pytest.mark.parametrize("written", ["0x1a4", "0888", "999", "12", "rw-r--r--", "true", "6.44", "[1]", "07777777", "-644"])
def test_file_mode_that_is_not_octal_is_refused_with_its_line(operator_key: Path, tmp_path: Path, written: str) -> None:
    (tmp_path / "motd").write_text("hello\n")
    path = write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  files:\n"
                                   f"    - source: motd\n      path: /etc/motd\n      mode: {written}\n")
    with pytest.raises(ProfileError) as raised:
        load(path)
    assert len(raised.value.lines()) == 1, raised.value.lines()
    assert raised.value.lines()[0].startswith(f"{path}:7: workers.files[0].mode: "), raised.value.lines()
    assert "octal" in raised.value.lines()[0]


def test_numbers_and_booleans_typed_where_text_is_meant_keep_their_text(operator_key: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    monkeypatch.setenv("PIBAKE_WIFI_PASSPHRASE", WIFI_PASSPHRASE)
    # YAML 1.1 reads NO as false, 0600 as 384 and 1:30 as 90: a setting that is text means what was typed.
    path = write_profile(tmp_path, f"""
        user:
          ssh_keys: [{operator_key}]
        master:
          dhcp:
            lease: 0600
          uplink:
            wifi: {{ssid: 1:30, country: NO}}
        workers:
          hostname: 0{{n}}
          nodes:
            - {{mac: 10:20:30:40:50:59}}
        """)
    profile = load(path)
    assert profile.master.lease == "0600"
    assert (profile.master.wifi.ssid, profile.master.wifi.country) == ("1:30", "NO")
    assert profile.workers.nodes[0].mac == "10:20:30:40:50:59"


def test_cli_plan_shows_an_unquoted_mode_as_written(operator_key: Path, workdir: Path) -> None:
    (workdir / "token").write_text("not much of a secret\n")
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 1\n  files:\n"
                           "    - {source: token, path: /etc/token, mode: 0600, owner: USER}\n")
    result = run_pibake("plan", "worker", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "/etc/token" in line)
    assert line.split()[2:4] == ["0600", "1000:1000"], line


def test_bad_apt_mirrors_in_the_environment_are_reported_with_the_profile_problems(workdir: Path) -> None:
    write_profile(workdir, "master:\n  address: 300.1.1.1\n")
    result = run_pibake("plan", "master", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir,
                        env={"PIBAKE_APT_MIRRORS": "http://deb.debian.org/debian=ftp://x not-a-pair"})
    assert result.code == 2 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[0] == f"pibake: the profile has {len(lines) - 1} problem(s):", result.stderr
    assert "  cluster.yaml:2: master.address: '300.1.1.1' is not an IPv4 address" in lines
    assert lines[-2:] == ["  PIBAKE_APT_MIRRORS: 'ftp://x' is not an http:// or https:// URL",
                          "  PIBAKE_APT_MIRRORS: 'not-a-pair' is not source-URL=mirror-URL"]


def test_the_readme_profile_table_is_the_settings_table() -> None:
    from builder.settings import settings_table

    readme = (REPO / "README.md").read_text()
    assert settings_table() in readme, "README's profile table differs from SETTINGS; put this in its place:\n" + settings_table()


def test_every_setting_is_read_and_every_key_read_is_a_setting(operator_key: Path, tmp_path: Path, monkeypatch) -> None:
    # A profile that sets every key but the exclusive ones is accepted whole: the table and the readers agree.
    from builder.settings import SETTINGS, Reader

    read: set[str] = set()
    value = Reader.value

    def recording(self, keypath, values):
        read.add(".".join("[]" if isinstance(k, int) else k for k in keypath).replace(".[]", "[]"))
        return value(self, keypath, values)

    monkeypatch.setattr(Reader, "value", recording)
    monkeypatch.setenv("PIBAKE_WIFI_PASSPHRASE", WIFI_PASSPHRASE)
    (tmp_path / "motd").write_text("hi\n")
    load(write_profile(tmp_path, f"""
        image: {{release: bookworm, os_list: "http://127.0.0.1:9/os.json", download_base: "http://127.0.0.1:9",
                 verify_signature: true}}
        apt: {{mirrors: {{"http://deb.debian.org/debian": "http://127.0.0.1:9/debian"}}}}
        user: {{name: alice, ssh_keys: [{operator_key}], sudo: nopasswd, password_hash: "$6$x$y"}}
        network: {{subnet: 10.1.0.0/24, interface: eth0}}
        master:
          hostname: head
          address: 10.1.0.1
          dhcp: {{start: 10.1.0.2, end: 10.1.0.9, lease: 1h}}
          uplink: {{interface: wlan0, nat: true, wifi: {{ssid: Home, country: DE, passphrase_env: PIBAKE_WIFI_PASSPHRASE}}}}
          packages: [dnsmasq, iptables]
          files: [{{source: motd, path: /etc/motd, mode: "0644", owner: root}}]
        workers:
          hostname: w{{n}}
          nodes: [{{hostname: w1, address: 10.1.0.50, mac: "dc:a6:32:01:02:03"}}]
          packages: [htop]
          files: [{{source: motd, path: /etc/motd, mode: "0644", owner: USER}}]
        """))
    assert {s.path for s in SETTINGS} == read


def test_the_readme_lists_every_environment_variable() -> None:
    import re

    from builder import environment

    readme = (REPO / "README.md").read_text()
    assert environment.table() in readme, "README's environment table differs; put this in its place:\n" + environment.table()
    read = set()
    for path in (REPO / "builder").glob("*.py"):
        read |= set(re.findall(r"\b((?:PIBAKE|XDG)_[A-Z_]+)\b", path.read_text()))
    assert read <= set(environment.VARIABLES), read - set(environment.VARIABLES)
    outside = [p.name for p in (REPO / "builder").glob("*.py")
               if p.name != "environment.py" and re.search(r"os\.environ|getenv", p.read_text())]
    assert outside == ["packages.py"], outside  # it hands apt the whole environment, and reads nothing of it


def test_a_setting_read_by_two_readers_is_reported_once(operator_key: Path, tmp_path: Path) -> None:
    path = write_profile(tmp_path, f'user:\n  ssh_keys: [{operator_key}]\nnetwork:\n  interface: "bad name!"\n')
    with pytest.raises(ProfileError) as raised:
        load(path)
    assert raised.value.lines() == [f"{path}:4: network.interface: 'bad name!' is not a valid interface name"]


def test_a_derived_default_comes_after_what_it_needs_and_is_checked() -> None:
    from builder.settings import SETTINGS

    seen: set[str] = set()
    for setting in SETTINGS:
        assert (setting.derive is None) == (not setting.needs), setting.path
        assert set(setting.needs) <= seen, (setting.path, set(setting.needs) - seen)
        seen.add(setting.path)


def test_derived_defaults_follow_what_they_are_made_from(operator_key: Path, tmp_path: Path) -> None:
    profile = load(write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\nnetwork:\n  subnet: 10.9.0.0/16\n"
                                           "master:\n  hostname: head\nworkers:\n  nodes: [{}, {hostname: w9}]\n"))
    assert profile.setting("master.address") == IPv4Address("10.9.0.1")
    assert (profile.master.dhcp_start, profile.master.dhcp_end) == (IPv4Address("10.9.0.2"), IPv4Address("10.9.0.64"))
    assert profile.setting("master.uplink.address") == "head.local"
    assert [(n.hostname, str(n.address)) for n in profile.workers.nodes] == [("worker1", "10.9.0.101"), ("w9", "10.9.0.102")]
    # A derived value is checked as what was typed is: worker2's name, made from the pattern, is taken.
    bad = write_profile(tmp_path, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  hostname: 'w{{n}}'\n"
                                  "  nodes: [{}, {}, {hostname: w2}]\n")
    with pytest.raises(ProfileError) as raised:
        load(bad)
    assert any("hostname 'w2' is used twice" in line for line in raised.value.lines()), raised.value.lines()
