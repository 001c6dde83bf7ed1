"""Tier 2: first-boot packages are resolved by apt against the image, downloaded, and staged in it.

The test images say they come from deb.debian.org and trust the stand-in
archive's key (tests/apt_repo.py); PIBAKE_APT_MIRRORS points the build at that
archive on loopback, as a user points it at a local mirror.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

import apt_repo
from builder.appliance import Appliance, Drive
from conftest import Result, assert_said_nowhere, run_pibake, secrets_of, write_profile
from mirror import Mirror
from rpios_image import make_image
from refusals import PREVIOUS, assert_clean_failure

pytestmark = pytest.mark.image


@pytest.fixture
def project(workdir: Path, operator_key: Path) -> Path:
    (workdir / "profiles").mkdir()
    write_profile(workdir / "profiles", f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 1\n")
    make_image(workdir / "base.img")
    output = workdir / "output"
    output.mkdir()
    for name, data in PREVIOUS.items():
        (output / name).write_bytes(data)
    return workdir


def _packages(project: Path, packages: str) -> None:
    text = (project / "profiles/cluster.yaml").read_text()
    (project / "profiles/cluster.yaml").write_text(text + f"master:\n  packages: [{packages}]\n")


def test_missing_packages_and_their_dependencies_are_staged(project: Path, apt_archive: Mirror) -> None:
    result = run_pibake("build", "cluster", "--image", "base.img", cwd=project)
    assert result.code == 0, result.output
    assert "packages: dnsmasq iptables tcpdump fabric avahi-daemon -> 9 .deb file(s)" in result.stderr
    with Appliance([Drive(project / "output/master.img", readonly=True),
                    Drive(project / "output/worker1.img", readonly=True)]) as a:
        a.mount(0, "/boot/firmware", readonly=True)
        staged = sorted(a.g.ls("/var/cache/pibake/debs"))
        listed = a.read("/etc/pibake/packages").decode().split()
        a.g.umount_all()
        a.mount(1, "/boot/firmware", readonly=True)
        worker_has_debs = a.g.exists("/var/cache/pibake/debs")
        a.g.umount_all()
    # Everything installing them needs, and nothing the image already has (libc6, python3).
    assert staged == [f"{n}_1.0-1_arm64.deb" for n in ("avahi-daemon", "dnsmasq-base", "dnsmasq", "fabric", "iptables",
                                                       "libavahi-core7", "libpcap0.8",
                                                       "python3-fabric", "tcpdump")]
    assert listed == ["dnsmasq", "iptables", "tcpdump", "fabric", "avahi-daemon"]  # mDNS: pibake adds it
    assert not worker_has_debs
    assert "/debian/dists/bookworm/InRelease" in apt_archive.paths()
    # A second build takes the lists and .debs from the cache: no package is downloaded again.
    before = len([p for p in apt_archive.paths() if p.endswith(".deb")])
    result = run_pibake("build", "master", "--image", "base.img", cwd=project)
    assert result.code == 0, result.output
    assert len([p for p in apt_archive.paths() if p.endswith(".deb")]) == before


def test_unknown_package(project: Path) -> None:
    _packages(project, "dnsmasq, iptables, no-such-package")
    result = run_pibake("build", "master", "--image", "base.img", cwd=project)
    assert_clean_failure(result, project, "package no-such-package not found in the image's apt sources "
                                          "(http://deb.debian.org/debian via http://127.0.0.1:")


def _build_from_an_impostor(project: Path, image: str, tmp_path_factory) -> Result:
    """Build the master with its packages from an archive signed by a key the image does not trust."""
    impostor = Mirror(apt_repo.build(tmp_path_factory.mktemp("impostor")))
    try:
        return run_pibake("build", "master", "--image", image, cwd=project,
                          env={"PIBAKE_APT_MIRRORS": f"http://deb.debian.org/debian={impostor.base}/debian"})
    finally:
        impostor.stop()


def test_archive_signed_by_a_key_the_image_does_not_trust(project: Path, tmp_path_factory) -> None:
    result = _build_from_an_impostor(project, "base.img", tmp_path_factory)
    assert_clean_failure(result, project, "apt could not read the image's package sources")
    assert "is not signed" in result.stderr or "NO_PUBKEY" in result.stderr, result.stderr


def test_sources_the_image_marks_trusted_are_checked_all_the_same(project: Path, tmp_path_factory) -> None:
    # One-line and deb822, as an image (or a careless mirror entry) might say them.
    make_image(project / "trusting.img", extra={
        "/etc/apt/sources.list": "deb [arch=arm64 trusted=yes] http://deb.debian.org/debian bookworm main\n",
        "/etc/apt/sources.list.d/extra.sources": "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n"
                                                 "Components: main\nAllow-Insecure: yes\nTrusted: yes\n"})
    result = _build_from_an_impostor(project, "trusting.img", tmp_path_factory)
    assert_clean_failure(result, project, "apt could not read the image's package sources")
    for ignored in ("/etc/apt/sources.list: ignoring 'trusted=yes'", "extra.sources: ignoring 'Trusted: yes'",
                    "extra.sources: ignoring 'Allow-Insecure: yes'"):
        assert ignored in result.stderr, result.stderr


def test_package_archive_unreachable(project: Path) -> None:
    # Credentials in a mirror URL reach apt, and never the screen.
    result = run_pibake("build", "master", "--image", "base.img", "-vv", cwd=project,
                        env={"PIBAKE_APT_MIRRORS": "http://deb.debian.org/debian=http://mirror-user:hunter2-pw@127.0.0.1:9/debian"})
    assert_clean_failure(result, project, "package dnsmasq, iptables, tcpdump, fabric, avahi-daemon not found")
    assert "***@127.0.0.1:9" in result.stderr
    assert "hunter2" not in result.output and "mirror-user" not in result.output


@pytest.mark.parametrize(("user", "password", "given"), [("apt-reader", "p%40ss:w0rd-Zq7", "environment"),
                                                       ("apt%40reader", "%E2%82%AC;Zq7=%25", "profile")])
def test_a_mirror_with_credentials(project: Path, user: str, password: str, given: str) -> None:
    """apt authenticates with them, and they are in no file the build leaves and in none of its output."""
    server = Mirror(apt_repo.shared(), login=(unquote(user), unquote(password)))
    try:
        mirror = server.base.replace("://", f"://{user}:{password}@") + "/debian"
        env: dict[str, str | None] = {"XDG_CACHE_HOME": str(project / "cache"),
                                      "PIBAKE_APT_MIRRORS": f"http://deb.debian.org/debian={mirror}"}
        if given == "profile":
            text = (project / "profiles/cluster.yaml").read_text()
            (project / "profiles/cluster.yaml").write_text(text + f"apt:\n  mirrors:\n    http://deb.debian.org/debian: {mirror}\n")
            env["PIBAKE_APT_MIRRORS"] = None
        built = run_pibake("build", "master", "--image", "base.img", "-vv", cwd=project, env=env)
        assert built.code == 0, built.output
        assert "9 .deb file(s)" in built.stderr and "/debian/pool/main/dnsmasq_1.0-1_arm64.deb" in server.paths()
        # One a space in its password: apt's auth.conf cannot hold it, and the build says so.
        spaced = mirror.replace(f":{password}@", f":{password}%20x@")
        refused = run_pibake("build", "master", "--image", "base.img", "-v", cwd=project,
                             env={**env, "PIBAKE_APT_MIRRORS": f"http://deb.debian.org/debian={spaced}"})
        assert refused.code == 2 and refused.stderr.rstrip().splitlines()[-1] == (
            f"pibake: error: the credentials of apt mirror {server.base.replace('://', '://***@')}/debian hold a space or "
            "a control character, which apt cannot take (its auth.conf separates words with spaces)")
    finally:
        server.stop()
    assert not list((project / "cache").rglob("auth.conf"))  # there only while apt ran
    assert assert_said_nowhere(secrets_of(user, password), [built, refused],
                               [project / "cache", project / "output", project / "state"]) > 30
    sources = list((project / "cache/pibake/apt").rglob("sources.list"))
    assert sources and all(p.stat().st_mode & 0o777 == 0o600 for p in sources)
    assert f"{server.base}/debian bookworm" in sources[0].read_text()


def test_no_room_for_the_packages_once_installed(project: Path) -> None:
    _packages(project, "dnsmasq, iptables, huge-package")
    result = run_pibake("build", "master", "--image", "base.img", cwd=project)
    assert_clean_failure(result, project, "master: the image's root file system is too full")
    assert "first boot" in result.stderr


def test_apt_mirrors_in_the_profile(project: Path, apt_archive: Mirror) -> None:
    text = (project / "profiles/cluster.yaml").read_text()
    (project / "profiles/cluster.yaml").write_text(
        text + f"apt:\n  mirrors:\n    http://deb.debian.org/debian: {apt_archive.base}/debian\n")
    result = run_pibake("build", "master", "--image", "base.img", cwd=project, env={"PIBAKE_APT_MIRRORS": None})
    assert result.code == 0, result.output
    assert "9 .deb file(s)" in result.stderr
