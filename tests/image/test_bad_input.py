"""Bad input ends in one clear line, a non-zero exit, and an untouched output folder."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from conftest import WIFI_PASSPHRASE, Result, run_pibake, write_profile
from refusals import PREVIOUS, assert_clean_failure
from rpios_image import make_image



@pytest.fixture
def project(workdir: Path, operator_key: Path) -> Path:
    """A project with a profile and the outputs of an earlier build that must survive."""
    (workdir / "profiles").mkdir()
    write_profile(workdir / "profiles", f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 2\n")
    output = workdir / "output"
    output.mkdir()
    for name, data in PREVIOUS.items():
        (output / name).write_bytes(data)
    return workdir




def test_missing_image(project: Path) -> None:
    result = run_pibake("build", "master", "--image", "nowhere/raspios.img", cwd=project)
    assert_clean_failure(result, project, "image not found: nowhere/raspios.img")


def test_not_a_disk_image(project: Path) -> None:
    (project / "notes.img").write_text("these are my notes, not a disk\n" * 100)
    result = run_pibake("build", "master", "--image", "notes.img", cwd=project)
    assert_clean_failure(result, project, "notes.img is not a disk image: it has no MBR partition table")


def test_disk_image_without_raspberry_pi_os_partitions(project: Path) -> None:
    image = project / "plain.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "--quiet", str(image)], input=b"label: dos\nstart=2048, type=83\n", check=True)
    result = run_pibake("build", "worker", "--image", str(image), cwd=project)
    assert_clean_failure(result, project, "does not have Raspberry Pi OS's partitions: expected a FAT boot partition 1 "
                                          "and a Linux root partition 2, found p1 type 0x83")


def test_a_second_build_into_the_same_output_is_refused(project: Path) -> None:
    image = make_image(project / "raspios.img")
    fd = os.open(project / "output", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running build holds
        result = run_pibake("build", "master", "--image", str(image), cwd=project)
    finally:
        os.close(fd)
    assert_clean_failure(result, project, "another pibake build is writing to output; wait for it to finish")


def test_truncated_image(project: Path) -> None:
    image = make_image(project / "cut.img")
    os.truncate(image, image.stat().st_size - (1 << 20))
    result = run_pibake("build", "master", "--image", str(image), cwd=project)
    assert_clean_failure(result, project, "cut.img is truncated: its root partition ends at byte")


def test_unreadable_compressed_image(project: Path) -> None:
    (project / "broken.img.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    result = run_pibake("build", "master", "--image", "broken.img.xz", cwd=project,
                        env={"XDG_CACHE_HOME": str(project / "cache")})
    assert_clean_failure(result, project, "cannot decompress broken.img.xz")
    assert not any((project / "cache").rglob("*.img"))


def test_xz_image_is_decompressed_once_into_the_cache(project: Path) -> None:
    image = make_image(project / "raspios.img")
    expected = hashlib.sha256(image.read_bytes()).hexdigest()
    subprocess.run(["xz", "-T0", "-0", str(image)], check=True)
    env = {"XDG_CACHE_HOME": str(project / "cache")}
    first = run_pibake("fetch", "--image", "raspios.img.xz", "-v", cwd=project, env=env)
    assert first.code == 0, first.output
    [cached] = (project / "cache/pibake/images").glob("*.img")
    assert cached.stat().st_size == 679477248 and first.stdout.split()[:3] == [str(cached), "sha256", expected]
    assert "$ xz --decompress" in first.stderr
    made = cached.stat()
    second = run_pibake("fetch", "--image", "raspios.img.xz", "-v", cwd=project, env=env)
    assert second.code == 0, second.output
    assert second.stdout == first.stdout and f"using cached {cached}" in second.stderr
    assert "$ xz" not in second.stderr
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    assert list((project / "cache/pibake/images").glob("*.img")) == [cached]


@pytest.mark.image
def test_not_raspberry_pi_os(project: Path) -> None:
    image = make_image(project / "ubuntu.img", rpios=False)
    result = run_pibake("build", "cluster", "--image", str(image), cwd=project)
    assert_clean_failure(result, project, "the image is not Raspberry Pi OS (Ubuntu 24.04 LTS; no /etc/rpi-issue); use --force")
    forced = run_pibake("build", "worker", "--count", "1", "--force", "--image", str(image), cwd=project)
    assert forced.code == 0, forced.output
    assert "release: noble (/etc/os-release: Ubuntu 24.04 LTS; forced, treated as trixie)" in forced.stderr
    assert (project / "output/worker1.img").is_file() and (project / "output/master.img").read_bytes() == PREVIOUS["master.img"]


@pytest.mark.image
def test_a_link_that_would_dangle_is_refused(project: Path) -> None:
    image = make_image(project / "base.img", without=("/lib/systemd/system/getty@.service",))
    result = run_pibake("build", "worker", "--count", "1", "--image", str(image), cwd=project)
    assert_clean_failure(result, project, "worker1: cannot link /etc/systemd/system/getty.target.wants/getty@tty1.service "
                                          "to /lib/systemd/system/getty@.service: it does not exist in the image")
    # A time zone the image has no file for.
    profile = project / "profiles/cluster.yaml"
    profile.write_text(profile.read_text() + "timezone: Mars/Olympus_Mons\n")
    result = run_pibake("build", "worker", "--count", "1", "--image", str(make_image(project / "tz.img")), cwd=project)
    assert_clean_failure(result, project, "worker1: cannot link /etc/localtime to /usr/share/zoneinfo/Mars/Olympus_Mons: "
                                          "it does not exist in the image")


@pytest.mark.image
def test_a_file_that_leads_where_the_node_would_not_see_it_is_refused(project: Path) -> None:
    image = make_image(project / "base.img")
    (project / "profiles/app.pid").write_text("1\n")
    profile = project / "profiles/cluster.yaml"
    profile.write_text(profile.read_text() + "master:\n  files:\n    - {source: app.pid, path: /var/lock/app/pid}\n")
    line = len(profile.read_text().splitlines())
    result = run_pibake("build", "master", "--image", str(image), cwd=project)
    assert_clean_failure(result, project, f"master: profiles/cluster.yaml:{line}: master.files[0]: /var/lock/app/pid leads to "
                                          "'/run/lock/app/pid' is under /run, which the node mounts afresh at boot")


@pytest.mark.image
def test_a_login_name_the_image_already_has_is_refused(project: Path) -> None:
    """Read from the image's own /etc/group at build: `sudo` is a group on every Raspberry Pi OS."""
    image = make_image(project / "base.img")
    profile = project / "profiles/cluster.yaml"
    profile.write_text(profile.read_text().replace("user:\n", "user:\n  name: sudo\n"))
    result = run_pibake("build", "worker", "--count", "1", "--image", str(image), cwd=project)
    assert_clean_failure(result, project, "profiles/cluster.yaml:2: user.name: 'sudo' is already a group in the image "
                                          "(/etc/group, id 27): choose another name for the login user")
    assert result.code == 2


@pytest.mark.image
def test_root_file_system_too_full(project: Path) -> None:
    image = make_image(project / "full.img", full=True)
    result = run_pibake("build", "worker", "--count", "1", "--image", str(image), cwd=project)
    assert_clean_failure(result, project, "worker1: the image's root file system is too full:")


@contextmanager
def small_disk(project: Path, size: str) -> Iterator[Path]:
    """A project on a small tmpfs, with the earlier outputs on it."""
    small = project / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)], check=True)
    try:
        (small / "output").mkdir()
        for name, data in PREVIOUS.items():
            (small / "output" / name).write_bytes(data)
        yield small
    finally:
        subprocess.run(["umount", str(small)], check=True)


def build_on(small: Path, project: Path, image: Path, role: str = "cluster") -> Result:
    return run_pibake("build", role, "--image", str(image), "--output", str(small / "output"),
                      "--state", str(project / "state"), cwd=project)


def test_output_disk_fills_up_while_copying(project: Path) -> None:
    image = make_image(project / "big.img", full=True)  # about 110 MiB of data
    with small_disk(project, "150m") as small:
        assert_clean_failure(build_on(small, project, image), small, "no space left on the output disk")


def test_output_disk_without_room_to_bake(project: Path) -> None:
    image = make_image(project / "raspios.img")
    with small_disk(project, "16m") as small:
        assert_clean_failure(build_on(small, project, image), small,
                             "no space left on the output disk (" + str(small / "output") + "): ")


@pytest.mark.image
def test_output_disk_fills_up_while_baking(project: Path, operator_key: Path) -> None:
    image = make_image(project / "raspios.img")
    (project / "dataset.bin").write_bytes(os.urandom(48 << 20))
    write_profile(project / "profiles", f"""
        user:
          ssh_keys: [{operator_key}]
        workers:
          count: 1
          files: [{{source: ../dataset.bin, path: /srv/dataset.bin}}]
        """)
    # room for the copy and the room check, not for the 48 MiB file
    with small_disk(project, "40m") as small:
        result = build_on(small, project, image, role="worker")
        assert_clean_failure(result, small, "worker1: no space left on the output disk")


def _qemu_in_group(group: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.with_name("comm").read_text().strip()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and name.startswith("qemu-system"):
            return True
    return False


@pytest.mark.image
def test_ctrl_c_leaves_earlier_outputs_intact(project: Path) -> None:
    image = make_image(project / "raspios.img")
    env = {**os.environ, "PIBAKE_WIFI_PASSPHRASE": WIFI_PASSPHRASE}
    # A terminal's Ctrl-C reaches the whole process group, qemu included.
    proc = subprocess.Popen([sys.executable, "-m", "builder", "build", "cluster", "--image", str(image)], cwd=project,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Interrupted once the appliance's QEMU runs in pibake's process group: mid-launch,
    # after the copies were made in the staging folder.
    deadline = time.monotonic() + 120
    while not _qemu_in_group(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _qemu_in_group(proc.pid), "the appliance was never launched"
    assert len(list((project / "output/.staging").glob("*.img"))) == 3
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert stderr.rstrip().splitlines()[-1] == "pibake: interrupted; finished images and earlier outputs are untouched"
    assert "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in (project / "output").iterdir()} == PREVIOUS
