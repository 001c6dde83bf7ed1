"""Tier 1: the files the operator's own tools read, written with hostile names in every place a
name can reach, and read back by those tools.

Folder names are generated (hypothesis): control characters, spaces, `%`, quotes, `${`,
`*`, commas, newlines, reached through symlinks as a shared profile folder can arrange.
Each build either refuses in one line or writes files that `ssh -G`, `ssh-keygen -F`,
`yaml.safe_load`, `ansible-inventory`, `json.load` and Python's compiler read back as
exactly what was meant, with no keyword, host or pattern the build did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from builder.errors import BuildError, InputError
from builder.keys import KeyStore
from builder.outputs import os_list, write_ssh_files
from builder.profile import load
from conftest import run_pibake, write_profile

# What output/ssh_config may change from ssh's own defaults, and nothing else (ssh turns
# UpdateHostKeys off by itself when UserKnownHostsFile names another file).
INTENDED = {"hostname", "hostkeyalias", "port", "user", "userknownhostsfile", "stricthostkeychecking",
            "passwordauthentication", "identityfile", "proxyjump", "updatehostkeys"}
HOSTS = ("master", "master-lan", "worker1", "worker2")
# A folder name: anything a file system holds but '/' and NUL.
NAMES = st.text(st.characters(exclude_characters="/\0", exclude_categories=("Cs",)), min_size=1, max_size=24).filter(
    lambda s: s not in (".", "..") and len(s.encode()) < 200)
HOSTILE = ["a\nProxyCommand touch pwned\n", "x\rHost *", "%d%h", "${HOME}", 'say "hi"', "two words", "*",
           "a,b", "$(touch x)", "`id`", "back\\slash", "#hash", "'single'", "tab\there", "ümlaut", "{{ lookup('pipe','id') }}"]
EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def ssh_g(config: Path, host: str) -> dict[str, list[str]]:
    """ssh's own reading of `config` for `host`: every keyword and its values."""
    done = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    found: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        found.setdefault(key, []).append(value)
    return found


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    return {host: ssh_g(Path("/dev/null"), host) for host in HOSTS}


def assert_only_intended(config: Path, defaults: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
    read = {}
    for host in HOSTS:
        found = ssh_g(config, host)
        changed = {key for key in found.keys() | defaults[host].keys() if found.get(key) != defaults[host].get(key)}
        assert changed <= INTENDED, (host, changed - INTENDED)
        for key in ("proxycommand", "localcommand", "remotecommand", "knownhostscommand"):
            assert found.get(key, ["none"]) == ["none"], (host, key, found.get(key))
        assert found.get("permitlocalcommand") == ["no"]
        read[host] = found
    return read


def refused_in_one_line(error: BuildError, *words: str) -> None:
    text = str(error)
    assert "\n" not in text and isinstance(error, InputError) and all(w in text for w in words), text
    assert all(c.isprintable() for c in text), text


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state folder and a key pair, made once for every generated case."""
    folder = tmp_path_factory.mktemp("shared")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "id_ed25519")], check=True)
    return folder


def fresh(tmp_path: Path, name: str) -> Path:
    case = tmp_path / f"case-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    return case


def linked_folder(tmp_path: Path, name: str, link: str) -> tuple[Path, Path]:
    """A case folder holding a folder named `name`, and a tidy link to it: what a shared
    profile folder can arrange."""
    case = fresh(tmp_path, name)
    real = case / name
    real.mkdir()
    (case / link).symlink_to(real)
    return case, real


@given(name=NAMES)
@EXAMPLES
@example(name=HOSTILE[0])
@example(name="%d%h")
@example(name="${HOME}")
@example(name='say "hi" \\ back')
def test_a_key_reached_through_a_hostile_folder_name(tmp_path: Path, shared: Path, defaults: dict, name: str) -> None:
    case, real = linked_folder(tmp_path, name, "keys")
    for half in ("id_ed25519", "id_ed25519.pub"):
        shutil.copy(shared / half, real / half)
    profile = load(write_profile(case, "user:\n  ssh_keys: [keys/id_ed25519.pub]\nworkers:\n  count: 2\n"))
    (case / "output").mkdir()
    try:
        write_ssh_files(case / "output", profile, KeyStore(shared / "state"))
    except BuildError as e:
        refused_in_one_line(e, "output/ssh_config")
        assert any(not c.isprintable() for c in name) or "${" in name, name
        return
    read = assert_only_intended(case / "output/ssh_config", defaults)
    for host in HOSTS:
        # ssh -G shows IdentityFile before its `%` tokens are expanded, as ssh_config holds it.
        assert [v.replace("%%", "%") for v in read[host]["identityfile"]] == [str(real / "id_ed25519")], host


@given(name=NAMES)
@EXAMPLES
@example(name=HOSTILE[0])
@example(name="two words")
@example(name="{{ lookup('pipe','id') }}")
@example(name="ümlaut@x+y=z:1,2")
def test_an_output_folder_with_a_hostile_name(tmp_path: Path, shared: Path, defaults: dict, name: str) -> None:
    case, real = linked_folder(tmp_path, name, "out")
    profile = load(write_profile(case, f"user:\n  ssh_keys: [{shared / 'id_ed25519.pub'}]\nworkers:\n  count: 2\n"))
    try:
        write_ssh_files(case / "out", profile, KeyStore(shared / "state"))
    except BuildError as e:
        refused_in_one_line(e, "the output folder", "ProxyJump")
        assert not list(real.iterdir()), "refused, yet something was written"
        return
    read = assert_only_intended(real / "ssh_config", defaults)
    for host in HOSTS:
        assert read[host]["userknownhostsfile"] == [str(real / "known_hosts")]
    # Ansible splits ansible_ssh_common_args as a shell would; ssh then gives the path to /bin/sh.
    variables = yaml.safe_load((real / "inventory.yaml").read_text())["all"]["vars"]
    assert shlex.split(variables["ansible_ssh_common_args"]) == ["-F", str(real / "ssh_config")]
    # As ssh's ProxyJump runs it: the path unquoted in a command line for /bin/sh.
    words = subprocess.run(["/bin/sh", "-c", f"printf '%s\\n' {real / 'ssh_config'}"], capture_output=True, text=True)
    assert words.stdout.splitlines() == [str(real / "ssh_config")], words
    py_compile.compile(str(real / "fabfile.py"), cfile=str(case / "fabfile.pyc"), doraise=True)
    (real / "master.img").write_bytes(b"")
    entry = {"role": "master", "hostname": "master", "address": "192.168.5.1", "image": "master.img", "size": 0,
             "sha256": "0" * 64}
    listed = json.loads(json.dumps(os_list(case / "out", {"nodes": {"master": entry}})))
    url = urllib.parse.urlsplit(listed["os_list"][0]["url"])
    assert (url.scheme, urllib.parse.unquote(url.path)) == ("file", str(real / "master.img"))


def test_the_attack_that_ran_a_command_is_refused_through_the_cli(workdir: Path, operator_key: Path) -> None:
    """A key folder whose name holds a newline and a ProxyCommand, reached through a link."""
    real = workdir / "share" / "x\nProxyCommand touch pwned\nHost *"
    real.mkdir(parents=True)
    for half in (operator_key.with_suffix(""), operator_key):
        shutil.copy(half, real / half.name)
    (workdir / "keys").symlink_to(real)
    write_profile(workdir, "user:\n  ssh_keys: [keys/id_ed25519.pub]\n")
    result = run_pibake("build", "master", "--image", str(workdir / "none.img"), "--profiles", "cluster.yaml",
                        cwd=workdir)
    assert result.code == 2 and "Traceback" not in result.stderr and "output/ssh_config" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "\\n" in result.stderr
    assert not (workdir / "output").exists() and not (workdir / "pwned").exists()


@pytest.mark.parametrize("address", ["fe80::1%x,* ssh-ed25519 AAAA", "fe80::1%eth0", "fe80::1%25wlan0", "fd00::1%1"])
def test_an_uplink_address_with_a_zone_id_is_refused(workdir: Path, operator_key: Path, address: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nmaster:\n  uplink:\n    address: '{address}'\n")
    result = run_pibake("plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 2 and "cluster.yaml:5: master.uplink.address:" in result.stderr, result.stderr
    assert "zone id" in result.stderr and not (workdir / "state").exists()


@pytest.mark.parametrize("name", ["all", "ungrouped", "localhost"])
def test_names_with_a_meaning_of_their_own_are_refused(workdir: Path, operator_key: Path, name: str) -> None:
    write_profile(workdir, f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  nodes:\n    - {{hostname: {name}}}\n")
    result = run_pibake("plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml", cwd=workdir)
    assert result.code == 2 and "cluster.yaml:5:" in result.stderr and "cannot name a node" in result.stderr


UPLINKS = st.one_of(st.sampled_from(["master.local", "pi.home.arpa", "10.0.0.7", "fd00::7", "2001:db8::1",
                                     "router.example.", "192.168.1.250"]),
                    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)
                    .filter(lambda s: not s.endswith("-") and "-." not in s))
OTHERS = st.text(st.characters(codec="ascii", exclude_characters="\0\n\r"), min_size=1, max_size=30)


@given(uplink=UPLINKS, port=st.sampled_from([22, 2222, 65535]), other=OTHERS)
@EXAMPLES
@example(uplink="master.local", port=22, other="*")
@example(uplink="fd00::7", port=2222, other="[fd00::7]:22")
def test_each_name_in_known_hosts_matches_its_own_key_and_nothing_else(tmp_path: Path, shared: Path, uplink: str,
                                                                      port: int, other: str) -> None:
    case = fresh(tmp_path, f"{uplink}{port}")
    profile = load(write_profile(case, f"user:\n  ssh_keys: [{shared / 'id_ed25519.pub'}]\nmaster:\n  uplink:\n"
                                       f"    address: '{uplink}'\n    port: {port}\nworkers:\n  count: 2\n"))
    keys = KeyStore(shared / "state")
    (case / "output").mkdir()
    write_ssh_files(case / "output", profile, keys)
    known = case / "output/known_hosts"
    reached_as = uplink if port == 22 else f"[{uplink}]:{port}"
    names = {"master": ["master", "192.168.5.1", reached_as], "worker1": ["worker1", "192.168.5.101"],
             "worker2": ["worker2", "192.168.5.102"]}
    for node, aliases in names.items():
        key = keys.host_key(node).public.split()[1]
        for alias in aliases:
            found = subprocess.run(["ssh-keygen", "-F", alias, "-f", str(known)], capture_output=True, text=True)
            lines = [line for line in found.stdout.splitlines() if not line.startswith("#")]
            assert found.returncode == 0 and len(lines) == 1 and lines[0].split()[2] == key, (alias, found.stdout)
    if other not in {alias for aliases in names.values() for alias in aliases}:
        found = subprocess.run(["ssh-keygen", "-F", other, "-f", str(known)], capture_output=True, text=True)
        assert found.returncode != 0 and not found.stdout.strip(), (other, found.stdout)


def test_ansible_reads_the_inventory_without_a_warning(tmp_path: Path, shared: Path) -> None:
    folder = tmp_path / "ümlaut@x+y=z:1,2"
    folder.mkdir()
    profile = load(write_profile(tmp_path, f"user:\n  ssh_keys: [{shared / 'id_ed25519.pub'}]\nworkers:\n  count: 3\n"))
    write_ssh_files(folder, profile, KeyStore(shared / "state"))
    ansible = Path(sys.executable).with_name("ansible-inventory")
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_HOME": str(tmp_path / "ansible"),
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "true", "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run([ansible, "-i", str(folder / "inventory.yaml"), "--list"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    listed = json.loads(done.stdout)
    assert listed["cluster_master"]["hosts"] == ["master"]
    assert listed["cluster_workers"]["hosts"] == ["worker1", "worker2", "worker3"]
    for host in ("master", "worker1", "worker2", "worker3"):
        assert shlex.split(listed["_meta"]["hostvars"][host]["ansible_ssh_common_args"]) == ["-F", str(folder / "ssh_config")]
