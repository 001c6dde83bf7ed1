"""Tier 1: hostile and careless profiles, through the real CLI.

Each case must end in a non-zero exit and error lines that say where (file:line when
the problem is in the profile), with no traceback, and nothing written to output/ or
the state folder. The CLI runs in this process, but for what could exhaust memory (a
bomb, a device, a huge file): that runs as its own process under a memory limit, so
that it fails the test rather than the machine.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from conftest import write_profile
from refusals import assert_refused, plan, run_limited

# Every kind of control character a value can smuggle into a generated file, as YAML
# double-quoted escapes.
CONTROLS = [r"\n", r"\r", r"\t", r"\0", r"\x1b", r"\x7f", r"\x85", r"\u2028", r"\u2029", r"\x0b", r"\x0c"]


@pytest.fixture
def key(operator_key: Path) -> str:
    return str(operator_key)


def test_a_normal_profile_plans_within_the_limit(workdir: Path, key: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\n")
    result = plan(workdir, limited=True)
    assert result.returncode == 0, result.stderr


# Where a string lands in a generated file, with the YAML that puts a control character there.
FIELDS = {
    "user.name": "user:\n  name: \"bob{c}\"\n  ssh_keys: [{key}]\n",
    "user.password_hash": "user:\n  password_hash: \"$6$salt$hash{c}\"\n  ssh_keys: [{key}]\n",
    "master.hostname": "user:\n  ssh_keys: [{key}]\nmaster:\n  hostname: \"head{c}x\"\n",
    "workers.hostname": "user:\n  ssh_keys: [{key}]\nworkers:\n  hostname: \"w{{n}}{c}\"\n",
    "workers.nodes[0].hostname": "user:\n  ssh_keys: [{key}]\nworkers:\n  nodes:\n    - {{hostname: \"{c}w1\"}}\n",
    "workers.nodes[0].mac": "user:\n  ssh_keys: [{key}]\nworkers:\n  nodes:\n    - {{mac: \"dc:a6:32:01:02:03{c}\"}}\n",
    "master.uplink.interface": "user:\n  ssh_keys: [{key}]\nmaster:\n  uplink:\n    interface: \"wlan{c}0\"\n",
    "master.uplink.wifi.ssid": "user:\n  ssh_keys: [{key}]\nmaster:\n  uplink:\n    wifi:\n      ssid: \"Home{c}Net\"\n",
    "master.packages[1]": "user:\n  ssh_keys: [{key}]\nmaster:\n  packages: [dnsmasq, \"vim{c}\", iptables]\n",
    "timezone": "user:\n  ssh_keys: [{key}]\ntimezone: \"Europe/Berlin{c}\"\n",
    "master.dhcp.lease": "user:\n  ssh_keys: [{key}]\nmaster:\n  dhcp:\n    lease: \"24h{c}\"\n",
}


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("control", CONTROLS)
def test_control_characters_never_reach_a_generated_file(workdir: Path, key: str, field: str, control: str) -> None:
    write_profile(workdir, FIELDS[field].format(c=control, key=key))
    result = plan(workdir)
    line = next(n for n, text in enumerate((workdir / "cluster.yaml").read_text().splitlines(), 1) if control in text)
    assert_refused(workdir, result, f"cluster.yaml:{line}: ")


@pytest.mark.parametrize("body, line, words", [
    ("a: &x [1, 2]\nb: *x\n", 1, ["anchors and aliases"]),
    ("user: &u\n  name: *u\n", 1, ["anchors and aliases"]),
    ("user:\n  name: !!python/name:os.system x\n", 2, ["tags"]),
    ("user:\n  name: !custom x\n", 2, ["tags"]),
    ("workers:\n  count: !!int 3\n", 2, ["tags"]),
    ("x: " + "[" * 2000 + "]" * 2000 + "\n", 1, ["nested more than"]),
    ("x: " + "[" * 100_000 + "\n", 1, ["nested more than"]),
    ("x:\n" + "".join(" " * (2 * i) + f"k{i}:\n" for i in range(1, 60)), 33, ["nested more than"]),
    ("user: [1, 2\n", 2, ["not valid YAML"]),
])
def test_yaml_that_a_profile_never_needs_is_refused(workdir: Path, body: str, line: int, words: list[str]) -> None:
    write_profile(workdir, body)
    assert_refused(workdir, plan(workdir, limited=True), f"cluster.yaml:{line}: ", *words)


def test_an_alias_bomb_is_refused_at_once(workdir: Path) -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        previous = chr(ord("a") + level - 1)
        levels.append(f"{chr(ord('a') + level)}: &{chr(ord('a') + level)} [" + ", ".join([f"*{previous}"] * 9) + "]")
    write_profile(workdir, "\n".join(levels) + "\n")
    assert_refused(workdir, plan(workdir, limited=True), "cluster.yaml:1: ", "anchors and aliases")


def test_text_that_is_not_utf8_is_refused_with_its_line(workdir: Path) -> None:
    (workdir / "cluster.yaml").write_bytes(b"user:\n  name: bob\n  # caf\xe9\n")
    assert_refused(workdir, plan(workdir), "cluster.yaml:3: ", "not UTF-8")


@pytest.mark.parametrize("what", ["profile", "ssh key", "passphrase", "files source"])
@pytest.mark.parametrize("kind", ["device", "fifo", "huge", "folder"])
def test_only_regular_files_of_sensible_size_are_read(workdir: Path, key: str, what: str, kind: str) -> None:
    target = workdir / f"{kind}-file"
    if kind == "device":
        target = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "huge":
        with open(target, "wb") as f:
            f.truncate(200 << 20)  # sparse: no disk, and larger than any limit
    else:
        target.mkdir()
    body = {
        "profile": None,
        "ssh key": f"user:\n  ssh_keys: [{target}]\n",
        "passphrase": f"user:\n  ssh_keys: [{key}]\nmaster:\n  uplink:\n    wifi:\n      ssid: Home\n"
                      f"      passphrase_file: {target}\n",
        "files source": f"user:\n  ssh_keys: [{key}]\nworkers:\n  files:\n    - {{source: {target}, path: /etc/x}}\n",
    }[what]
    if body is None:
        result = run_limited(workdir, "plan", "cluster", "--release", "bookworm", "--profiles", str(target))
        assert_refused(workdir, result, f"cannot read profile {target}")  # a folder: its cluster.yaml
    else:
        write_profile(workdir, body)
        line = len(body.splitlines())
        assert_refused(workdir, plan(workdir, limited=True), f"cluster.yaml:{line}: ", "cannot read", str(target))


def test_a_long_value_is_quoted_short(workdir: Path, key: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nmaster:\n  hostname: {'x' * 500_000}\n")
    assert_refused(workdir, plan(workdir, limited=True), "cluster.yaml:4: ", "master.hostname")


@pytest.mark.parametrize("body, line, words", [
    ("network:\n  subnet: 0.0.0.0/0\n", 2, ["not a private LAN range"]),
    ("network:\n  subnet: 127.0.0.0/24\n", 2, ["not a private LAN range"]),
    ("network:\n  subnet: 8.8.8.0/24\n", 2, ["not a private LAN range"]),
    ("master:\n  uplink:\n    interface: eth0\n", 3, ["the uplink must be another interface"]),
    ("master:\n  dhcp:\n    lease: 0\n", 3, ["lease '0'"]),
    ("master:\n  dhcp:\n    lease: false\n", 3, ["lease 'false'"]),
    ("workers:\n  files:\n    - {source: cluster.yaml, path: /etc/x, mode: 0}\n", 3, ["octal file mode"]),
    ("workers:\n  count: 100\n  first_address: 192.168.5.120\n  hostname: " + "w" * 61 + "{n}\n", 4,
     ["is not a valid hostname", "worker 100"]),
    ("workers:\n  nodes:\n" + "    - {}\n" * 251, 2, ["at most 250"]),
])
def test_values_accepted_silently_wrong_before_are_refused(workdir: Path, key: str, body: str, line: int,
                                                          words: list[str]) -> None:
    write_profile(workdir, f"{body}user:\n  ssh_keys: [{key}]\n")
    assert_refused(workdir, plan(workdir), f"cluster.yaml:{line}: ", *words)


# A `files:` destination is a clean absolute path to a file the node will see.
@pytest.mark.parametrize("path, words", [
    ('"/etc/shadow\\0.x"', ["control character"]),
    ("/etc//hostname", ["not a clean path"]),
    ("/./etc/shadow", ["not a clean path"]),
    ("/etc/ssh/../shadow", ["not a clean path"]),
    ("/etc/motd.d/", ["ends in '/'"]),
    ("/", ["absolute path to a file"]),
    ("etc/motd", ["absolute path to a file"]),
    ("~/motd", ["absolute path to a file"]),
    ("/run/pibake.pid", ["under /run", "never be seen"]),
    ("/proc/sys/net/ipv4/ip_forward", ["under /proc"]),
    ("/dev/sda", ["under /dev"]),
    ("/tmp/token", ["under /tmp"]),
    ("/etc/" + "n" * 256, ["longer than 255 bytes"]),
])
def test_files_destinations_must_be_clean_file_paths(workdir: Path, key: str, path: str, words: list[str]) -> None:
    (workdir / "motd").write_text("hello\n")
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nworkers:\n  files:\n    - source: motd\n      path: {path}\n")
    assert_refused(workdir, plan(workdir), "cluster.yaml:6: ", *words)


@pytest.mark.parametrize("role, path, ours", [
    ("master", "/etc/hostname", "write /etc/hostname"),
    ("workers", "/etc/ssh/pibake/ssh_host_ed25519_key", "write /etc/ssh/pibake/ssh_host_ed25519_key"),
    ("master", "/etc/shadow", "edit /etc/shadow"),
    ("workers", "/home/pi/.ssh/authorized_keys", "write /home/pi/.ssh/authorized_keys"),
    ("master", "/etc/pibake/packages", "write /etc/pibake/packages"),
])
def test_files_never_replace_what_pibake_writes(workdir: Path, key: str, role: str, path: str, ours: str) -> None:
    (workdir / "mine").write_text("mine\n")
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\n{role}:\n  files:\n    - {{source: mine, path: {path}}}\n")
    assert_refused(workdir, plan(workdir), "cluster.yaml:5: ", f"{role}.files[0]", f"pibake writes {path} itself ({ours})")


PRIVATE_KEYS = [
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n",
    "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
    "# a comment first\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----\n",
    "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n",
]


@pytest.mark.parametrize("content", PRIVATE_KEYS)
@pytest.mark.parametrize("mode", ["0644", "0604", "755"])
def test_a_private_key_never_goes_where_everyone_reads_it(workdir: Path, key: str, content: str, mode: str) -> None:
    (workdir / "deploy_key").write_text(content)
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nmaster:\n  files:\n"
                           f"    - {{source: deploy_key, path: /root/.ssh/id_deploy, mode: {mode}}}\n")
    assert_refused(workdir, plan(workdir), "cluster.yaml:5: ", "master.files[0]", "is a private key", "use 0600")


@pytest.mark.parametrize("content, mode", [("token: s3cr3t-9f8e7d\n", "0600"), ("token: s3cr3t-9f8e7d\n", "0640"),
                                           ("token: s3cr3t-9f8e7d\n", "0400"), (PRIVATE_KEYS[0], "0600")])
def test_files_that_are_not_for_everyone_show_only_size_and_sha256(workdir: Path, key: str, content: str,
                                                                 mode: str) -> None:
    (workdir / "token").write_text(content)
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\nworkers:\n  files:\n"
                           f"    - {{source: token, path: /etc/app/token, mode: {mode}}}\n")
    result = plan(workdir)
    assert result.returncode == 0, result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr and "PRIVATE" not in result.stdout + result.stderr
    shown = [line for line in result.stdout.splitlines() if "/etc/app/token" in line]
    digest = hashlib.sha256(content.encode()).hexdigest()
    assert len(shown) == 5  # workers.count's default
    assert all(line.endswith(f"<secret, {len(content)} bytes, sha256 {digest[:16]}, redacted>") for line in shown), shown


# Every URL meets one rule; the credentials in one are never shown.
BAD_URLS = [
    ("http://mirror.lan/debian [trusted=yes]", "spaces and control characters"),
    ("http://mirror.lan/debian]", "may not hold"),
    ("http://mirror.lan/de\"bian", "may not hold"),
    ("http://mirror.lan/%zz", "may not hold"),
    ("ftp://mirror.lan/debian", "not an http:// or https:// URL"),
    ("file:///srv/debian", "not an http:// or https:// URL"),
    ("http:/mirror.lan/debian", "not an http:// or https:// URL"),
    ("http:///debian", "no valid host name"),
    ("http://-mirror/debian", "no valid host name"),
    ("http://[fe80::zz]/debian", "is not a URL"),
    ("http://mirror.lan:99999/debian", "is not a URL"),
    ("http://mirror.lan/debian#main", "fragment"),
]


@pytest.mark.parametrize("url, words", BAD_URLS)
@pytest.mark.parametrize("where", ["mirror", "source", "image.url", "image.download_base"])
def test_urls_are_checked_as_urls(workdir: Path, key: str, url: str, words: str, where: str) -> None:
    body = {
        "mirror": f"apt:\n  mirrors:\n    http://deb.debian.org/debian: '{url}'\n",
        "source": f"apt:\n  mirrors:\n    '{url}': http://mirror.lan/debian\n",
        "image.url": f"image:\n  url: '{url}'\n",
        "image.download_base": f"image:\n  download_base: '{url}'\n",
    }[where]
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\n{body}")
    assert_refused(workdir, plan(workdir), "cluster.yaml:5: " if where in ("mirror", "source") else "cluster.yaml:4: ",
                   words)


@pytest.mark.parametrize("url, words", BAD_URLS[:6])
def test_mirror_urls_from_the_environment_are_checked_too(workdir: Path, key: str, url: str, words: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\n")
    result = plan(workdir, PIBAKE_APT_MIRRORS=f"http://deb.debian.org/debian={url.split()[0]}x{url[len(url.split()[0]):]}"
                  if " " in url else f"http://deb.debian.org/debian={url}")
    assert_refused(workdir, result, "PIBAKE_APT_MIRRORS: ")


@pytest.mark.parametrize("url", ["http://alice:S3cretPw@mirror lan/debian", "https://token-9z8y7x@mirror.lan/de]bian",
                                 "http://bob:Pw%40x@[fe80::zz]/debian", "ftp://carol:hunter2@mirror.lan/"])
def test_credentials_in_a_bad_url_are_never_echoed(workdir: Path, key: str, url: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{key}]\napt:\n  mirrors:\n    http://deb.debian.org/debian: '{url}'\n")
    for result in (plan(workdir), plan(workdir, PIBAKE_APT_MIRRORS=f"http://deb.debian.org/debian={url.replace(' ', '')}")):
        assert result.returncode != 0
        secret = url.split("//")[1].split("@")[0]
        assert secret not in result.stderr and secret.split(":")[-1] not in result.stderr, result.stderr
        assert "***@" in result.stderr, result.stderr


@pytest.mark.parametrize("url, words", BAD_URLS[:4] + [("http://carol:hunter2@mirror lan/x", "not a URL")])
@pytest.mark.parametrize("where", ["PIBAKE_DOWNLOAD_BASE", "PIBAKE_OS_LIST", "PIBAKE_SIGNING_KEY_URL", "--image"])
def test_urls_from_the_environment_and_the_command_line_meet_the_same_rule(workdir: Path, url: str, words: str,
                                                                         where: str) -> None:
    result = run_limited(workdir, "fetch", *(["--image", url] if where == "--image" else []),
                         env={} if where == "--image" else {where: url})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"pibake: error: {where}: ") and words in result.stderr, result.stderr
    assert "hunter2" not in result.stderr and len(result.stderr.splitlines()) == 1
