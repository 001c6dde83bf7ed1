"""Tier 1: a plan played through a base tree resolves every path as the node will see it.

The base here is a table of what an image holds (the links every Debian root has, as
tests/rpios_image.py makes them, and a few more); the image tier writes through the
same links in real images.
"""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from builder.errors import BuildError
from builder.operations import Delete, Mkdir, Op, Symlink, Write
from builder.plan import NodePlan
from builder.profile import Node
from builder.realize import Stat, realize
from builder.release import named
from rpios_image import LINKS

FOLDERS = ("/etc", "/etc/ssh", "/etc/ssl", "/etc/ssl/certs", "/usr", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib/ssl",
           "/var", "/run", "/run/lock", "/opt", "/boot", "/boot/firmware")
BASE = {
    **{path: Stat("dir", 0o755) for path in FOLDERS},
    **{path: Stat("link", 0o777, target=target) for path, target in LINKS.items()},
    "/etc/hostname": Stat("file"),
    "/etc/ssh/sshd_config": Stat("file"),
    "/opt/ssh": Stat("link", 0o777, target="/etc/ssh"),  # absolute, into a folder pibake writes to
    "/opt/up": Stat("link", 0o777, target="../etc"),
    "/opt/loop": Stat("link", 0o777, target="/opt/loop"),
}
ORIGIN = "cluster.yaml:7: master.files[0]"


class TableBase:
    def lstat(self, path: str) -> Stat | None:
        return BASE.get(path)

    def read(self, path: str) -> bytes:
        return b"from the base\n"


def play(*ops: Op):
    plan = NodePlan(Node("master", 0, "master", IPv4Address("192.168.5.1")), named("bookworm"), tuple(ops))
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
    assert words in e.value.message and e.value.message.startswith(f"master: {ORIGIN}: "), e.value.message


def test_a_file_that_resolves_to_one_pibake_writes_is_refused_either_way() -> None:
    ours = Write("/etc/ssh/sshd_config.d/pibake.conf", b"PasswordAuthentication no\n")
    mine = Write("/opt/ssh/sshd_config.d/pibake.conf", b"PasswordAuthentication yes\n", origin=ORIGIN)
    with pytest.raises(BuildError) as e:
        play(ours, mine)
    assert e.value.message == (f"master: {ORIGIN}: pibake writes /opt/ssh/sshd_config.d/pibake.conf (which is "
                               "/etc/ssh/sshd_config.d/pibake.conf in the image) itself: choose another path")
    for later in (Write(ours.path, b"x"), Mkdir(ours.path), Symlink(ours.path, "/dev/null"), Delete(ours.path)):
        with pytest.raises(BuildError) as e:
            play(Mkdir("/etc/ssh/sshd_config.d"), mine, later)
        assert e.value.message == (f"master: {ORIGIN}: pibake writes /etc/ssh/sshd_config.d/pibake.conf itself: "
                                   "choose another path"), type(later)


def test_two_entries_that_resolve_to_one_file_are_refused() -> None:
    first = Write("/etc/ssl/certs/ca.pem", b"one\n", origin=ORIGIN)
    second = Write("/lib/ssl/certs/ca.pem", b"two\n", origin="cluster.yaml:9: master.files[1]")
    with pytest.raises(BuildError) as e:
        play(first, second)
    assert e.value.message == f"master: cluster.yaml:9: master.files[1]: /etc/ssl/certs/ca.pem is written by {ORIGIN} too"


def test_pibake_writes_through_links_too() -> None:
    changes = play(Write("/lib/systemd/system/x.service", b"[Unit]\n"),
                   Symlink("/lib/systemd/system/y.service", "/dev/null"))
    assert set(changes.root) == {"/usr/lib/systemd/system/x.service", "/usr/lib/systemd/system/y.service"}
