"""Tier 1: a plan played through a base tree resolves every path as the node will see it.

The base here is a table of what an image holds (the links every Debian root has, as
tests/rpios_image.py makes them, and a few more); the image tier writes through the
same links in real images.
"""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from builder.errors import BuildError, InputError, Place
from builder.operations import Delete, EditLines, Mkdir, Move, Op, Symlink, Write
from builder.plan import NodePlan
from builder.profile import Node
from builder.realize import realize
from builder.release import named
from table_base import ORIGIN, TableBase

def play(*ops: Op, renamed_to: tuple[str, Place] = ("", Place())):
    plan = NodePlan(Node("master", 0, "master", IPv4Address("192.168.5.1")), named("bookworm"), tuple(ops),
                    renamed_to=renamed_to)
    return realize(plan, TableBase())


@pytest.mark.parametrize("path, lands", [
    ("/lib/ssl/certs/cluster-ca.pem", "/etc/ssl/certs/cluster-ca.pem"),  # relative link, then an absolute one
    ("/usr/lib/ssl/certs/cluster-ca.pem", "/etc/ssl/certs/cluster-ca.pem"),
    ("/opt/up/motd", "/etc/motd"),
    ("/lib/pibake-test/new/x.conf", "/usr/lib/pibake-test/new/x.conf"),  # folders the image lacks
    ("/etc/motd", "/etc/motd"),
])
def test_a_file_lands_where_the_node_looks(path: str, lands: str) -> None:
    changes = play(Write(path, b"mine\n", 0o644, origin=ORIGIN))
    assert list(changes.root) == [lands] and changes.contents[lands] == b"mine\n"


@pytest.mark.parametrize("path, words", [
    ("/var/run/pibake.pid", "/var/run/pibake.pid leads to '/run/pibake.pid' is under /run"),
    ("/var/lock/x/y", "leads to '/run/lock/x/y' is under /run"),
    ("/etc/ssl", "cannot write /etc/ssl: it is a folder in the image"),
    ("/lib/ssl/certs", "cannot write /lib/ssl/certs: it is a folder in the image"),
    ("/etc/hostname/x", "cannot write /etc/hostname/x: /etc/hostname is not a folder in the image"),
    ("/opt/loop/x", "too many symbolic links"),
])
def test_a_destination_is_checked_where_it_resolves(path: str, words: str) -> None:
    with pytest.raises(BuildError) as e:
        play(Write(path, b"mine\n", origin=ORIGIN))
    assert words in str(e.value) and str(e.value).startswith(f"master: {ORIGIN}: "), str(e.value)


def test_a_file_that_resolves_to_one_pibake_writes_is_refused_either_way() -> None:
    ours = Write("/etc/ssh/sshd_config.d/pibake.conf", b"PasswordAuthentication no\n")
    mine = Write("/opt/ssh/sshd_config.d/pibake.conf", b"PasswordAuthentication yes\n", origin=ORIGIN, allow=("sshd",))
    with pytest.raises(BuildError) as e:
        play(ours, mine)
    assert str(e.value) == (f"master: {ORIGIN}: pibake writes /opt/ssh/sshd_config.d/pibake.conf (which is "
                               "/etc/ssh/sshd_config.d/pibake.conf in the image) itself: choose another path")
    for later in (Write(ours.path, b"x"), Mkdir(ours.path), Symlink(ours.path, "/dev/null"), Delete(ours.path)):
        with pytest.raises(BuildError) as e:
            play(Mkdir("/etc/ssh/sshd_config.d"), mine, later)
        assert str(e.value) == (f"master: {ORIGIN}: pibake writes /etc/ssh/sshd_config.d/pibake.conf itself: "
                                   "choose another path"), type(later)


def test_two_entries_that_resolve_to_one_file_are_refused() -> None:
    first = Write("/etc/ssl/certs/ca.pem", b"one\n", origin=ORIGIN)
    second = Write("/lib/ssl/certs/ca.pem", b"two\n", origin=Place(file="cluster.yaml", line=9, key="master.files[1]"))
    with pytest.raises(BuildError) as e:
        play(first, second)
    assert str(e.value) == f"master: cluster.yaml:9: master.files[1]: /etc/ssl/certs/ca.pem is written by {ORIGIN} too"


def test_pibake_writes_through_links_too() -> None:
    changes = play(Write("/lib/systemd/system/x.service", b"[Unit]\n"),
                   Symlink("/lib/systemd/system/y.service", "/dev/null"))
    assert set(changes.root) == {"/usr/lib/systemd/system/x.service", "/usr/lib/systemd/system/y.service"}


@pytest.mark.parametrize("path, lands, promise", [
    ("/opt/ssh/sshd_config.d/00-mine.conf", "/etc/ssh/sshd_config.d/00-mine.conf", "sshd"),
    ("/opt/fw/custom.toml", "/boot/firmware/custom.toml", "boot-hooks"),
    ("/opt/fw/FirstRun.sh", "/boot/firmware/FirstRun.sh", "boot-hooks"),
    ("/opt/conf/99-forward.conf", "/etc/sysctl.d/99-forward.conf", "firewall"),
    ("/opt/up/ssh/sshd_config", "/etc/ssh/sshd_config", "sshd"),
])
def test_a_promise_is_kept_where_a_path_leads(path: str, lands: str, promise: str) -> None:
    with pytest.raises(BuildError) as e:
        play(Write(path, b"PermitRootLogin yes\n", origin=ORIGIN))
    assert str(e.value) == (f"master: {ORIGIN}: {path} (which is {lands} in the image) would break pibake's promise "
                               f"of {str(e.value).split('promise of ', 1)[1].split(';')[0]}; if that is meant, add "
                               f"`allow: [{promise}]` to the entry") and isinstance(e.value, InputError), str(e.value)
    assert list(play(Write(path, b"x\n", origin=ORIGIN, allow=(promise,))).root or [lands]) == [lands]


@pytest.mark.parametrize("mode, owner, secret", [(0o600, (0, 0), True), (0o640, (0, 0), True),
                                                 (0o644, (1000, 1000), False), (0o644, (0, 0), True)])
def test_nothing_secret_or_owned_goes_on_the_boot_partition(mode: int, owner: tuple[int, int], secret: bool) -> None:
    for path in ("/boot/firmware/token", "/opt/fw/token"):
        with pytest.raises(BuildError) as e:
            play(Write(path, b"key\n", mode, owner, secret, ORIGIN))
        assert "is on the boot partition, whose FAT file system keeps no owners or modes" in str(e.value)
    changes = play(Write("/boot/firmware/notes.txt", b"hello\n", 0o644, origin=ORIGIN))
    assert changes.boot_writes == {"/boot/firmware/notes.txt": b"hello\n"}


@pytest.mark.parametrize("path", ["/home/pi/notes.txt", "/home/pi/.config/app/x.conf"])
def test_a_file_under_the_home_the_rename_moves_away_is_refused(path: str) -> None:
    with pytest.raises(BuildError) as e:
        play(Move("/home/pi", "/home/bob"), Write(path, b"x\n", origin=ORIGIN))
    assert str(e.value) == (f"master: {ORIGIN}: {path} is under /home/pi, which pibake renames to /home/bob "
                               f"(user.name): write /home/bob{path[len('/home/pi'):]}")
    play(Move("/home/pi", "/home/bob"), Write("/home/bob" + path[len("/home/pi"):], b"x\n", origin=ORIGIN))


def rename(name: str) -> list[Op]:
    return [EditLines("/etc/passwd", r"^pi:([^:]*):1000:1000:([^:]*):[^:]*:[^:]*$", rf"{name}:\1:1000:1000:\2:/home/{name}:/bin/bash"),
            EditLines("/etc/group", r"^pi:", f"{name}:")]


@pytest.mark.parametrize("name, words", [("daemon", "is already an account in the image (/etc/passwd, id 1)"),
                                         ("sshd", "is already an account in the image (/etc/passwd, id 106)"),
                                         ("sudo", "is already a group in the image (/etc/group, id 27)"),
                                         ("netdev", "is already a group in the image (/etc/group, id 108)")])
def test_a_login_name_the_image_already_has_is_refused(name: str, words: str) -> None:
    with pytest.raises(BuildError) as e:
        play(*rename(name), renamed_to=(name, Place(file="cluster.yaml", line=3, key="user.name")))
    assert str(e.value) == f"cluster.yaml:3: user.name: '{name}' {words}: choose another name for the login user"
    assert isinstance(e.value, InputError)
    play(*rename("bob"), renamed_to=("bob", Place(file="cluster.yaml", line=3, key="user.name")))
