"""Tier 2: the same base, profile and keys give byte-identical images, and pibake verify says so.

Per release (Bookworm and Trixie), two builds of one cluster in two folders: the second one at another clock
time (faketime, years later), in another time zone, from a deeper folder, building the
workers first and then the master instead of the whole cluster at once. Then a rebuild
after a change that is taken back, SOURCE_DATE_EPOCH, and pibake verify on an image, on
a card it was flashed to, and on a copy with one file edited through libguestfs.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import random
import shutil
import stat
from pathlib import Path

import pytest

from builder.appliance import Appliance, Drive
from conftest import run_pibake, write_profile
from rpios_image import make_image

pytestmark = pytest.mark.image

NODES = ("master", "worker1", "worker2")
SAME = ("SHA256SUMS", "known_hosts", *(f"{n}.img.bmap" for n in NODES))
NAMING_THE_FOLDER = ("ssh_config", "os_list.json")  # they name the output folder; nothing else may differ
LATER = "@2031-06-01 12:00:00"  # faketime's: start the clock there, and let it run


def profile(operator_key: Path, extra: str = "") -> str:
    """Two workers, the login user renamed (its home moves), and a file whose path holds
    what debugfs's parser treats specially."""
    return f"""
        user: {{name: alice, ssh_keys: [{operator_key}]}}
        master: {{uplink: {{wifi: {{ssid: HomeNet}}}}}}
        workers:
          count: 2
          files: [{{source: note, path: '/opt/a "quoted" name; #1/it''s here.txt'}}]
        {extra}
        """


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(workdir: Path, base: Path, commands: list[list[str]], env: dict | None = None, within: tuple[str, ...] = ()) -> None:
    for command in commands:
        result = run_pibake("build", *command, "--image", str(base), cwd=workdir, env=env, within=within)
        assert result.code == 0, result.output


def outputs(output: Path) -> dict[str, str]:
    """Every output that must be the same, by content (the output folder's path taken out)."""
    found = {f"{n}.img": sha256(output / f"{n}.img") for n in NODES}
    found.update({name: sha256(output / name) for name in SAME})
    for name in NAMING_THE_FOLDER:
        text = (output / name).read_text()
        assert str(output.resolve()) in text  # what it must name
        found[name] = hashlib.sha256(text.replace(str(output.resolve()), "OUTPUT").encode()).hexdigest()
    manifest = json.loads((output / "manifest.json").read_text())["nodes"]
    found.update({f"manifest {n} {key}": manifest[n][key] for n in NODES for key in ("sha256", "blocks_sha256", "inputs")})
    return found


def times(image: Path, paths: list[str], boot_dir: str) -> dict[str, tuple[int, int, int]]:
    """(atime, mtime, ctime) of each path in the image, as libguestfs stats them."""
    with Appliance([Drive(image, readonly=True)]) as a:
        a.mount(0, boot_dir, readonly=True)
        found = {}
        for path in paths:
            st = a.g.lstatns(path)
            found[path] = (st["st_atime_sec"], st["st_mtime_sec"], st["st_ctime_sec"])
        a.g.umount_all()
    return found


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def two_builds(request, tmp_path_factory, operator_key: Path) -> dict:
    codename = request.param
    tmp = tmp_path_factory.mktemp(f"repro-{codename}")
    base = make_image(tmp / f"{codename}.img", codename)
    first, second = tmp / "first", tmp / "elsewhere" / "second-build"
    for workdir in (first, second):
        (workdir / "profiles").mkdir(parents=True)
        (workdir / "profiles/note").write_text("a note\n")
        write_profile(workdir / "profiles", profile(operator_key))
    build(first, base, [["cluster"]], env={"TZ": "UTC"})
    shutil.copytree(first / "state", second / "state")  # the same keys
    build(second, base, [["worker", "--count", "2"], ["master"]], env={"TZ": "Pacific/Chatham"},
          within=("faketime", "-m", "-f", LATER))
    return {"codename": codename, "base": base, "first": first, "second": second,
            "boot_dir": "/boot/firmware", "key": operator_key}


def test_two_builds_at_other_times_in_other_folders_give_the_same_bytes(two_builds: dict) -> None:
    first, second = outputs(two_builds["first"] / "output"), outputs(two_builds["second"] / "output")
    assert first == second, {k: (v, second[k]) for k, v in first.items() if second[k] != v}
    # and the images are not all the same: one node's is not another's
    assert len({first[f"{n}.img"] for n in NODES}) == len(NODES)


# One release is enough for what follows: the time and verify do not depend on it (and
# the image tier's time counts toward CI's).
@pytest.mark.parametrize("two_builds", ["bookworm"], indirect=True)
def test_the_time_written_is_the_bases_own_or_source_date_epoch(two_builds: dict, tmp_path: Path) -> None:
    from builder import epoch, image
    base, boot_dir = two_builds["base"], two_builds["boot_dir"]
    root = {p.number: p.start for p in image.check_layout(base)}[2]
    own = epoch.of(base, root).seconds
    written = ["/etc/hostname", "/etc/pibake", "/etc/ssh/pibake/ssh_host_ed25519_key", f"{boot_dir}/cmdline.txt"]
    made = times(two_builds["second"] / "output/master.img", written, boot_dir)
    for path, (atime, mtime, ctime) in made.items():
        assert mtime == own, (path, mtime, own)
        if not path.startswith(boot_dir):  # FAT keeps an access date only, and no change time
            assert atime == ctime == own, (path, atime, ctime, own)
    # SOURCE_DATE_EPOCH: a moment drawn at random, in range
    chosen = random.randrange(epoch.EARLIEST + 86400, epoch.LATEST - 86400) // 2 * 2  # FAT counts in 2 s steps
    workdir = tmp_path / "sde"
    shutil.copytree(two_builds["first"] / "profiles", workdir / "profiles")
    shutil.copytree(two_builds["first"] / "state", workdir / "state")
    build(workdir, base, [["master"]], env={"SOURCE_DATE_EPOCH": str(chosen)})
    made = times(workdir / "output/master.img", written, boot_dir)
    assert {m for _, m, _ in made.values()} == {chosen}, (chosen, made)
    manifest = json.loads((workdir / "output/manifest.json").read_text())["nodes"]["master"]
    assert manifest["epoch"] == {"seconds": chosen, "source": "SOURCE_DATE_EPOCH"}
    # a bad one is refused before anything is made
    for bad in ("yesterday", "-5", str(epoch.LATEST + 1), "12 34", "１２３４５６７８９"):
        result = run_pibake("build", "master", "--image", str(base), cwd=workdir, env={"SOURCE_DATE_EPOCH": bad})
        assert result.code == 2 and "SOURCE_DATE_EPOCH must be a whole number of seconds" in result.stderr, result.output
        assert "Traceback" not in result.output


def test_a_rebuild_after_a_change_taken_back_gives_the_first_bytes_again(two_builds: dict) -> None:
    second, base = two_builds["second"], two_builds["base"]
    before = outputs(second / "output")
    write_profile(second / "profiles", profile(two_builds["key"], "network: {subnet: 192.168.7.0/24}"))
    build(second, base, [["cluster"]], within=("faketime", "-m", "-f", "@2029-02-03 04:05:06"))
    changed = outputs(second / "output")
    assert changed["master.img"] != before["master.img"]
    write_profile(second / "profiles", profile(two_builds["key"]))
    build(second, base, [["cluster"]])
    assert outputs(second / "output") == before


@pytest.mark.parametrize("two_builds", ["bookworm"], indirect=True)
def test_verify_holds_on_the_image_and_on_its_card_and_names_the_file_edited_in_a_copy(two_builds: dict, tmp_path: Path,
                                                                                      loops) -> None:
    first = two_builds["first"]
    output = first / "output"
    held = run_pibake("verify", "master", str(output / "master.img"), cwd=first)
    assert held.code == 0, held.output
    size = (output / "master.img").stat().st_size
    assert held.stdout.count("\n") == 1 and "holds exactly master's image" in held.stdout, held.output
    assert f"all {size} bytes" in held.stdout, held.output
    # flashed onto a card (a loop device), read back from it
    card = loops.make((output / "worker1.img").stat().st_size + (64 << 20))
    flashed = run_pibake("flash", "worker1", card.device, "--yes", "--force", cwd=first)
    assert flashed.code == 0, flashed.output
    on_card = run_pibake("verify", "worker1", card.device, "--force", cwd=first)
    assert on_card.code == 0 and "holds exactly worker1's image" in on_card.stdout, on_card.output
    assert "every block its file systems use" in on_card.stdout, on_card.output  # the rest is the card's
    # one file of the image, drawn at random, edited through libguestfs in a copy
    copy = tmp_path / "edited.img"
    shutil.copyfile(output / "worker2.img", copy)
    with Appliance([Drive(copy)]) as a:
        _, root = a.partitions(0)
        a.g.mount(root, "/")
        found = (posixpath.normpath(f"/etc/{p}") for p in a.g.find("/etc"))
        files = sorted(p for p in found if stat.S_ISREG(a.g.lstatns(p)["st_mode"]))
        edited = random.choice(files)
        a.g.write_append(edited, b"# edited by hand\n")
        a.g.umount_all()
    said = run_pibake("verify", "worker2", str(copy), cwd=first)
    assert said.code == 1, said.output
    assert edited in said.stdout, (edited, said.output)
    assert said.stdout.count("changed") == 1, said.output
    assert "is not worker2's image: 1 file differs" in said.stderr, said.output
    # a node the manifest does not record, and a path that is not there
    for args in (["worker9", str(copy)], ["worker2", str(tmp_path / "missing.img")]):
        wrong = run_pibake("verify", *args, cwd=first)
        assert wrong.code == 2 and "Traceback" not in wrong.output and wrong.stderr.count("\n") == 1, wrong.output
