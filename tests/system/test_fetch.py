"""Fetching images from a real HTTP server on 127.0.0.1: verify, resume, retry, cache.

The mirror serves an OS list, .img.xz images with .sha256 and .sig sidecars made
with an OpenPGP key the tests generate and pin, and a second, unpinned key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import Result, assert_said_nowhere, run_pibake, secrets_of, write_profile
from mirror import Mirror
from signer import Signer, make_signer
from rpios_image import make_image

OFFICIAL = "https://downloads.raspberrypi.com"
BOOKWORM = "raspios_lite_arm64/images/raspios_lite_arm64-2025-05-14/2025-05-13-raspios-bookworm-arm64-lite.img.xz"
TRIXIE = "raspios_lite_arm64/images/raspios_lite_arm64-2025-11-24/2025-11-24-raspios-trixie-arm64-lite.img.xz"
OLD = "raspios_oldstable_lite_arm64/images/raspios_oldstable_lite_arm64-2024-10-23/2024-10-22-raspios-bullseye-arm64-lite.img.xz"


@dataclass
class Published:
    root: Path
    signer: Signer
    stranger: Signer
    hashes: dict[str, tuple[str, str, int]]  # path -> (sha256 of .xz, extract_sha256, extract_size)


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """The files of a Raspberry Pi OS download server, built once per session."""
    top = tmp_path_factory.mktemp("mirror")
    root = top / "www"
    signer = make_signer(top / "gpg-pinned", "pibake test signer")
    stranger = make_signer(top / "gpg-stranger", "someone else")
    hashes = {}
    for path, codename in ((BOOKWORM, "bookworm"), (TRIXIE, "trixie"), (OLD, "bullseye")):
        target = root / path
        target.parent.mkdir(parents=True)
        raw = make_image(top / f"{codename}.img", codename)
        extract_sha = hashlib.sha256(raw.read_bytes()).hexdigest()
        size = raw.stat().st_size
        subprocess.run(["xz", "-0", "-T0", "-c", str(raw)], stdout=open(target, "wb"), check=True)
        raw.unlink()
        sha = hashlib.sha256(target.read_bytes()).hexdigest()
        target.with_name(target.name + ".sha256").write_text(f"{sha}  {target.name}\n")
        signer.sign(target, target.with_name(target.name + ".sig"))
        hashes[path] = (sha, extract_sha, size)
    (root / "keys").mkdir()
    (root / "keys/signing.asc").write_bytes(signer.public())

    def leaf(path: str, name: str) -> dict:
        sha, extract_sha, size = hashes[path]
        return {"name": name, "description": "A port of Debian with no desktop environment", "icon": "x.png",
                "url": f"{OFFICIAL}/{path}", "extract_size": size, "extract_sha256": extract_sha,
                "image_download_size": (root / path).stat().st_size, "release_date": path.split("/")[-1][:10],
                "init_format": "systemd", "devices": ["pi4-64bit"]}

    os_list = {"imager": {"latest_version": "2.0.0"}, "os_list": [
        {"name": "Raspberry Pi OS (64-bit)", "url": f"{OFFICIAL}/raspios_arm64/x.img.xz", "release_date": "2025-11-24"},
        {"name": "Raspberry Pi OS (other)", "subitems": [
            leaf(TRIXIE, "Raspberry Pi OS Lite (64-bit)"),
            leaf(BOOKWORM, "Raspberry Pi OS (Legacy, 64-bit) Lite"),
            {"name": "Ubuntu", "url": "https://cdimage.ubuntu.com/x.img.xz", "release_date": "2025-10-01"},
        ]},
    ]}
    (root / "os_list_imagingutility_v4.json").write_text(json.dumps(os_list))
    return Published(root, signer, stranger, hashes)


@pytest.fixture
def mirror(published: Published, tmp_path: Path):
    """A fresh copy of the published files, served on loopback for one test."""
    root = tmp_path / "www"
    shutil.copytree(published.root, root)
    server = Mirror(root)
    yield server
    server.stop()


def fetch_env(mirror: Mirror, published: Published, cache: Path, **extra: str) -> dict[str, str]:
    return {"PIBAKE_DOWNLOAD_BASE": mirror.base, "PIBAKE_SIGNING_KEY_URL": f"{mirror.base}/keys/signing.asc",
            "PIBAKE_SIGNING_KEYS": published.signer.fingerprint, "XDG_CACHE_HOME": str(cache), **extra}


def fetch(workdir: Path, env: dict[str, str], *args: str) -> Result:
    return run_pibake("fetch", *args, cwd=workdir, env=env)


def cached_images(cache: Path) -> list[Path]:
    return sorted((cache / "pibake/images").glob("*.img")) if (cache / "pibake/images").exists() else []


def assert_fails(result: Result, message: str, cache: Path, download_kept: bool = False) -> None:
    assert result.code != 0, result.output
    assert "Traceback" not in result.output
    assert result.stderr.rstrip().splitlines()[-1].startswith("pibake: error: ")
    assert message in result.stderr.rstrip().splitlines()[-1], result.stderr
    assert cached_images(cache) == []
    downloads = cache / "pibake/downloads"
    kept = [p for p in downloads.iterdir() if not p.name.endswith(".json")] if downloads.exists() else []
    assert len(kept) == (1 if download_kept else 0)


def test_happy_path_then_cached_with_no_request(mirror: Mirror, published: Published, workdir: Path) -> None:
    cache = workdir / "cache"
    env = fetch_env(mirror, published, cache)
    result = fetch(workdir, env)
    assert result.code == 0, result.output
    sha, extract_sha, size = published.hashes[TRIXIE]
    image = cache / f"pibake/images/{sha}.img"
    assert result.stdout.strip() == f"{image}  sha256 {extract_sha}  from {mirror.base}/{TRIXIE}"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == extract_sha and image.stat().st_size == size
    assert (cache / f"pibake/downloads/{sha}.img.xz").is_file()
    assert f"signature of {TRIXIE.rsplit('/', 1)[1]}: good, by pinned key {published.signer.fingerprint}" in result.stderr
    assert mirror.paths() == ["/os_list_imagingutility_v4.json", f"/{TRIXIE}.sha256", f"/{TRIXIE}",
                              f"/{TRIXIE}.sig", "/keys/signing.asc"]
    again = fetch(workdir, env)
    assert again.code == 0 and again.stdout == result.stdout
    assert len(mirror.requests) == 5  # the second run asked nothing


def test_family_and_date_pins_and_archived_releases(mirror: Mirror, published: Published, workdir: Path) -> None:
    env = fetch_env(mirror, published, workdir / "cache")
    for spec, path in (("bookworm", BOOKWORM), ("2025-05-13", BOOKWORM), ("bullseye@2024-10-22", OLD)):
        result = fetch(workdir, env, "--image", spec)
        assert result.code == 0, result.output
        assert result.stdout.strip().endswith(f"from {mirror.base}/{path}")
    missing = fetch(workdir, env, "--image", "trixie@2020-01-01")
    assert missing.code == 1 and "no Raspberry Pi OS Lite (64-bit) image matches 'trixie@2020-01-01'" in missing.stderr


def test_images_lists_the_os_list_and_marks_the_choice(mirror: Mirror, published: Published, workdir: Path) -> None:
    env = fetch_env(mirror, published, workdir / "cache")
    result = run_pibake("images", "--image", "bookworm", cwd=workdir, env=env)
    assert result.code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("  2025-11-24  trixie") and "Raspberry Pi OS Lite (64-bit)" in lines[0]
    assert lines[1].startswith("* 2025-05-13  bookworm") and lines[1].endswith(f"{mirror.base}/{BOOKWORM}")


def test_url_pinned_with_its_sha256(mirror: Mirror, published: Published, workdir: Path) -> None:
    env = fetch_env(mirror, published, workdir / "cache")
    sha = published.hashes[BOOKWORM][0]
    result = fetch(workdir, env, "--image", f"{mirror.base}/{BOOKWORM}", "--sha256", sha)
    assert result.code == 0, result.output
    assert f"/{BOOKWORM}.sha256" not in mirror.paths() and "/os_list_imagingutility_v4.json" not in mirror.paths()
    wrong = fetch(workdir, fetch_env(mirror, published, workdir / "cache2"), "--image", f"{mirror.base}/{BOOKWORM}",
                  "--sha256", "0" * 64)
    assert_fails(wrong, f"sha256 mismatch for {mirror.base}/{BOOKWORM}: expected {'0' * 64}, found {sha}", workdir / "cache2")


def test_wrong_sha256_sidecar(mirror: Mirror, published: Published, workdir: Path) -> None:
    sidecar = mirror.root / f"{TRIXIE}.sha256"
    sidecar.write_text("ab" * 32 + "  x.img.xz\n")
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert_fails(result, f"sha256 mismatch for {mirror.base}/{TRIXIE}: expected {'ab' * 32}, found {published.hashes[TRIXIE][0]}",
                 workdir / "cache")


def test_wrong_extract_sha256(mirror: Mirror, published: Published, workdir: Path) -> None:
    os_list = mirror.root / "os_list_imagingutility_v4.json"
    os_list.write_text(os_list.read_text().replace(published.hashes[TRIXIE][1], "cd" * 32))
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert_fails(result, f"sha256 mismatch for the decompressed {mirror.base}/{TRIXIE}: expected {'cd' * 32} "
                         f"(extract_sha256), found {published.hashes[TRIXIE][1]}", workdir / "cache",
                 download_kept=True)  # the download itself passed its sha256 and signature


def test_bad_signature(mirror: Mirror, published: Published, workdir: Path) -> None:
    published.signer.sign(mirror.root / BOOKWORM, mirror.root / f"{TRIXIE}.sig")  # a signature of another file
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert_fails(result, f"BAD signature on {mirror.base}/{TRIXIE}", workdir / "cache")
    assert not any((workdir / "cache/pibake/partial").glob("*.part"))


def test_good_signature_by_an_unpinned_key(mirror: Mirror, published: Published, workdir: Path) -> None:
    published.stranger.sign(mirror.root / TRIXIE, mirror.root / f"{TRIXIE}.sig")
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert_fails(result, "which is not a pinned Raspberry Pi signing key", workdir / "cache")


def test_published_key_that_does_not_match_the_pin_is_refused(mirror: Mirror, published: Published, workdir: Path) -> None:
    (mirror.root / "keys/signing.asc").write_bytes(published.stranger.public())
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert_fails(result, f"no pinned signing key could be fetched from {mirror.base}/keys/signing.asc", workdir / "cache")


def test_missing_signature_and_the_explicit_skip(mirror: Mirror, published: Published, workdir: Path) -> None:
    (mirror.root / f"{TRIXIE}.sig").unlink()
    env = fetch_env(mirror, published, workdir / "cache")
    result = fetch(workdir, env)
    assert_fails(result, f"{mirror.base}/{TRIXIE}.sig is missing: the image is unsigned or the mirror is incomplete; "
                         "--no-verify-signature skips the check", workdir / "cache")
    skipped = fetch(workdir, env, "--no-verify-signature")
    assert skipped.code == 0, skipped.output
    assert f"NOT checking the OpenPGP signature of {mirror.base}/{TRIXIE}" in skipped.stderr
    [image] = cached_images(workdir / "cache")
    kept = image.stat()
    # A later run that checks signatures does not trust the unchecked entry: with no
    # signature to check it refuses, and leaves the entry for runs that skip the check.
    refused = fetch(workdir, env)
    assert refused.code == 1 and "Traceback" not in refused.output
    assert refused.stderr.rstrip().splitlines()[-1].startswith(f"pibake: error: {mirror.base}/{TRIXIE}.sig is missing")
    assert image.stat().st_mtime_ns == kept.st_mtime_ns
    # A bad signature is refused too.
    (mirror.root / f"{TRIXIE}.sig").write_bytes((published.root / f"{BOOKWORM}.sig").read_bytes())
    bad = fetch(workdir, env)
    assert bad.code == 1 and f"BAD signature on {mirror.base}/{TRIXIE}" in bad.stderr.rstrip().splitlines()[-1]
    # With the real signature back, the cached entry is checked, not fetched again, and then trusted.
    (mirror.root / f"{TRIXIE}.sig").write_bytes((published.root / f"{TRIXIE}.sig").read_bytes())
    requests_before = len(mirror.paths())
    checked = fetch(workdir, env)
    assert checked.code == 0 and "good, by pinned key" in checked.stderr, checked.output
    assert f"/{TRIXIE}" not in mirror.paths()[requests_before:]
    assert checked.stdout.split()[0] == str(image) and image.stat().st_mtime_ns == kept.st_mtime_ns
    requests_before = len(mirror.paths())
    again = fetch(workdir, env)
    assert again.code == 0 and "good, by pinned key" not in again.stderr
    assert not [p for p in mirror.paths()[requests_before:] if p.endswith(".sig")]


def test_unchecked_entry_without_its_download_is_fetched_and_checked(mirror: Mirror, published: Published,
                                                                     workdir: Path) -> None:
    env = fetch_env(mirror, published, workdir / "cache")
    skipped = fetch(workdir, env, "--no-verify-signature")
    assert skipped.code == 0, skipped.output
    sha = published.hashes[TRIXIE][0]
    (workdir / f"cache/pibake/downloads/{sha}.img.xz").unlink()
    (mirror.root / f"{TRIXIE}.sig").write_bytes((published.root / f"{BOOKWORM}.sig").read_bytes())
    refused = fetch(workdir, env)
    assert refused.code == 1 and f"BAD signature on {mirror.base}/{TRIXIE}" in refused.stderr, refused.output
    (mirror.root / f"{TRIXIE}.sig").write_bytes((published.root / f"{TRIXIE}.sig").read_bytes())
    checked = fetch(workdir, env)
    assert checked.code == 0 and "good, by pinned key" in checked.stderr, checked.output
    assert mirror.paths().count(f"/{TRIXIE}") == 3


def test_dropped_connection_resumes_with_range(mirror: Mirror, published: Published, workdir: Path) -> None:
    mirror.faults.drop_after[f"/{TRIXIE}"] = 100_000
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert result.code == 0, result.output
    gets = [rng for path, rng in mirror.requests if path == f"/{TRIXIE}"]
    assert len(gets) == 2 and gets[0] == "" and gets[1].startswith("bytes=") and gets[1].endswith("-")
    assert 0 < int(gets[1][6:-1]) <= 100_000  # what reached the disk before the drop is kept
    assert "resuming" in result.stderr
    assert result.stdout.split()[2] == published.hashes[TRIXIE][1]


def test_server_that_ignores_range_restarts_cleanly(mirror: Mirror, published: Published, workdir: Path) -> None:
    mirror.faults.drop_after[f"/{TRIXIE}"] = 100_000
    mirror.faults.ignore_range.add(f"/{TRIXIE}")
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert result.code == 0, result.output
    gets = [rng for path, rng in mirror.requests if path == f"/{TRIXIE}"]
    assert len(gets) == 2 and gets[0] == "" and gets[1].startswith("bytes=")
    assert "server sent" in result.stderr and "whole" in result.stderr
    assert result.stdout.split()[2] == published.hashes[TRIXIE][1]


def test_server_error_then_success(mirror: Mirror, published: Published, workdir: Path) -> None:
    mirror.faults.status[f"/{TRIXIE}"] = [500, 503]
    mirror.faults.status["/os_list_imagingutility_v4.json"] = [502]
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert result.code == 0, result.output
    assert mirror.paths().count(f"/{TRIXIE}") == 3 and mirror.paths().count("/os_list_imagingutility_v4.json") == 2


def test_image_not_found(mirror: Mirror, published: Published, workdir: Path) -> None:
    (mirror.root / TRIXIE).unlink()
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert_fails(result, f"cannot download {mirror.base}/{TRIXIE}: HTTP 404", workdir / "cache")
    assert mirror.paths().count(f"/{TRIXIE}") == 1  # a 404 is not retried


def test_malformed_os_list(mirror: Mirror, published: Published, workdir: Path) -> None:
    (mirror.root / "os_list_imagingutility_v4.json").write_text('{"imager": {}, "oslist": []}')
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert_fails(result, f"the OS list at {mirror.base}/os_list_imagingutility_v4.json is malformed: no 'os_list' array",
                 workdir / "cache")
    (mirror.root / "os_list_imagingutility_v4.json").write_text("<html>not json")
    assert_fails(fetch(workdir, fetch_env(mirror, published, workdir / "cache")), "is not valid JSON", workdir / "cache")


@pytest.mark.parametrize("case", ["deep", "huge number", "loop", "too long", "escapes in a name and a URL"])
def test_a_hostile_os_list_is_one_line_and_bounded(mirror: Mirror, published: Published, workdir: Path, case: str) -> None:
    listing = mirror.root / "os_list_imagingutility_v4.json"
    good = json.loads(listing.read_text())
    if case == "deep":
        listing.write_text("[" * 200_000 + "]" * 200_000)
    elif case == "huge number":
        good["os_list"][1]["subitems"][0]["extract_size"] = 1e400  # json.dumps writes Infinity; a server, 1e400
        listing.write_text(json.dumps(good).replace("Infinity", "1e400"))
    elif case == "loop":  # a category whose list is itself
        listing.write_text(json.dumps({"os_list": [{"name": "raspios", "subitems_url":
                                                    f"{mirror.base}/os_list_imagingutility_v4.json?raspios"}]}))
    elif case == "too long":
        listing.write_text('{"os_list": [' + '"x",' * (6 << 20) + '"x"]}')
    else:
        entry = dict(good["os_list"][1]["subitems"][0])
        named = {**entry, "name": "Lite \x1b]0;owned\x07\x1b[2J"}
        entry["url"] = entry["url"].rsplit("/", 1)[0] + "/\x1b[2J" + entry["url"].rsplit("/", 1)[1]
        good["os_list"][1]["subitems"][:1] = [entry, named]
        listing.write_text(json.dumps(good))
    result = run_pibake("images", cwd=workdir, env=fetch_env(mirror, published, workdir / "cache"))
    assert "Traceback" not in result.output and not any(c in result.output for c in "\x1b\x07"), result.output
    if case == "escapes in a name and a URL":
        assert result.code == 0 and "which is not a URL: skipped" in result.stderr, result.output
        assert "\\x1b[2J" in result.stderr  # shown, escaped
        return
    assert result.code != 0 and len(result.stderr.strip().splitlines()) == 1, result.output
    said = {"deep": "nested too deeply", "huge number": "is malformed: entry", "loop": "no Raspberry Pi OS Lite",
            "too long": "sent more than 16 MiB"}[case]
    assert said in result.stderr, result.stderr
    if case == "loop":
        assert mirror.paths().count("/os_list_imagingutility_v4.json") == 2  # the list, and its one self-reference


def test_with_no_network_it_says_so_at_once_and_how_to_go_on(workdir: Path) -> None:
    """In a network namespace with no interface at all: the official server's name cannot
    resolve, and nothing leaves this machine."""
    started = time.monotonic()
    result = run_pibake("fetch", cwd=workdir, env={"PIBAKE_DOWNLOAD_BASE": None, "XDG_CACHE_HOME": str(workdir / "cache")},
                        within=("unshare", "--net"))
    taken = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0] == ("pibake: error: cannot fetch https://downloads.raspberrypi.com/os_list_imagingutility_v4.json: "
                        "its host name could not be resolved (no network, or no DNS); to build without the network, "
                        "give a local image: --image FILE (make build IMAGE=FILE)"), lines
    assert taken < 15, taken  # no retries for a name that does not resolve


def test_an_image_url_that_names_no_file_is_refused_without_its_login(workdir: Path) -> None:
    for url in ("http://bob:s3cretPW@127.0.0.1:9", "http://bob:s3cretPW@127.0.0.1:9/"):
        result = run_pibake("fetch", "--image", url, "--sha256", "0" * 64, cwd=workdir)
        assert result.code == 2 and "names no file" in result.stderr and "s3cretPW" not in result.output, result.output


def test_two_concurrent_fetches_of_one_image(mirror: Mirror, published: Published, workdir: Path) -> None:
    env = {**os.environ, **fetch_env(mirror, published, workdir / "cache"), "PIBAKE_DOWNLOAD_BASE": mirror.base}
    procs = [subprocess.Popen([sys.executable, "-m", "builder", "fetch"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert mirror.paths().count(f"/{TRIXIE}") == 1  # the second waited, then found it cached
    assert len(cached_images(workdir / "cache")) == 1


def test_corrupted_cache_entry_is_fetched_again(mirror: Mirror, published: Published, workdir: Path) -> None:
    env = fetch_env(mirror, published, workdir / "cache")
    assert fetch(workdir, env).code == 0
    sha = published.hashes[TRIXIE][0]
    image = workdir / f"cache/pibake/images/{sha}.img"
    with open(image, "r+b") as f:
        f.seek(5000)
        f.write(b"bit rot")
    download = workdir / f"cache/pibake/downloads/{sha}.img.xz"
    download.write_bytes(download.read_bytes()[:-10] + b"0123456789")
    result = fetch(workdir, env)
    assert result.code == 0, result.output
    assert "is corrupted" in result.stderr
    assert hashlib.sha256(image.read_bytes()).hexdigest() == published.hashes[TRIXIE][1]
    assert mirror.paths().count(f"/{TRIXIE}") == 2


def test_cache_list_and_clean(mirror: Mirror, published: Published, workdir: Path) -> None:
    env = fetch_env(mirror, published, workdir / "cache")
    assert fetch(workdir, env).code == 0
    listing = run_pibake("cache", "list", cwd=workdir, env=env)
    assert listing.code == 0 and listing.stdout.count(" MiB  ") == 2 and "2025-11-24-raspios-trixie" in listing.stdout
    cleaned = run_pibake("cache", "clean", cwd=workdir, env=env)
    assert cleaned.code == 0 and cleaned.stdout.startswith("removed ")
    assert not (workdir / "cache/pibake").exists()


def test_profile_image_section(mirror: Mirror, published: Published, workdir: Path) -> None:
    (workdir / "profiles").mkdir()
    write_profile(workdir / "profiles", "image:\n  release: bookworm\n  verify_signature: false\n")
    result = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert result.code == 0, result.output
    assert result.stdout.strip().endswith(f"/{BOOKWORM}") and "NOT checking the OpenPGP signature" in result.stderr
    write_profile(workdir / "profiles", "image:\n  release: jessie\n  file: x.img\n")
    bad = fetch(workdir, fetch_env(mirror, published, workdir / "cache"))
    assert bad.code == 2
    assert "cluster.yaml:2: image.release: 'jessie' is not an image spec" in bad.stderr
    assert "cluster.yaml:3: image.release and image.file both choose the image: keep one" in bad.stderr


@pytest.mark.image
def test_build_fetches_then_works_offline(mirror: Mirror, published: Published, workdir: Path, operator_key: Path) -> None:
    (workdir / "profiles").mkdir()
    write_profile(workdir / "profiles", f"user:\n  ssh_keys: [{operator_key}]\nworkers:\n  count: 1\n")
    env = fetch_env(mirror, published, workdir / "cache")
    assert fetch(workdir, env, "--image", "bookworm").code == 0
    mirror.stop()  # no network from here on
    offline = {**env, "PIBAKE_DOWNLOAD_BASE": "http://127.0.0.1:9"}
    offline["PIBAKE_OS_LIST"] = f"{mirror.base}/os_list_imagingutility_v4.json"
    result = run_pibake("build", "worker", "--image", "bookworm", cwd=workdir, env=offline)
    assert result.code == 0, result.output
    manifest = json.loads((workdir / "output/manifest.json").read_text())
    assert manifest["nodes"]["worker1"]["base_image"]["sha256"] == published.hashes[BOOKWORM][1]


def test_local_gz_and_zip_images_are_decompressed_and_cached(workdir: Path) -> None:
    raw = make_image(workdir / "2025-05-13-raspios-bookworm-arm64-lite.img")
    expected = hashlib.sha256(raw.read_bytes()).hexdigest()
    subprocess.run(["gzip", "-1", "-k", str(raw)], check=True)
    with zipfile.ZipFile(workdir / "image.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.write(raw, raw.name)
    env = {"XDG_CACHE_HOME": str(workdir / "cache")}
    for name in (raw.name + ".gz", "image.zip"):
        result = fetch(workdir, env, "--image", name)
        assert result.code == 0, result.output
        path, _, sha = result.stdout.split()[:3]
        assert sha == expected and hashlib.sha256(Path(path).read_bytes()).hexdigest() == expected
    broken = workdir / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    assert_fails(fetch(workdir, {"XDG_CACHE_HOME": str(workdir / "cache2")}, "--image", "broken.zip"),
                 "cannot decompress broken.zip", workdir / "cache2")


# (user, password, where the URLs are given) as they stand in a URL: percent-encoded where a URL needs it.
LOGINS = [("pbk-reader", "Zq7-open-sesame", "environment"),
          ("pbk%40reader", "p%40ss:w0rd-Zq7", "profile"),  # '@' in both, ':' in the password
          ("pbk.reader", "%2F%3F%23%25-Zq7;&=+$!*'(),~", "environment"),  # '/', '?', '#', '%' and sub-delims
          ("pbk-l%C3%A9ser", "%E2%82%AC-Zq7-%C3%BC", "profile")]  # UTF-8


@pytest.mark.parametrize(("user", "password", "given"), LOGINS)
def test_credentials_in_urls_are_used_and_never_written_or_shown(published: Published, workdir: Path, user: str,
                                                                  password: str, given: str) -> None:
    root = workdir / "www"
    shutil.copytree(published.root, root)
    server = Mirror(root, login=(unquote(user), unquote(password)))
    try:
        base = server.base.replace("://", f"://{user}:{password}@")
        shown = server.base.replace("://", "://***@")
        cache = workdir / "cache"
        env = {**fetch_env(server, published, cache), "PIBAKE_SIGNING_KEY_URL": f"{base}/keys/signing.asc"}
        if given == "profile":
            (workdir / "profiles").mkdir()
            write_profile(workdir / "profiles", f"image:\n  download_base: {base}\n")
            env["PIBAKE_DOWNLOAD_BASE"] = None  # type: ignore[assignment]  # None unsets
        else:
            env["PIBAKE_DOWNLOAD_BASE"] = base
        results = [fetch(workdir, env, "-v"), fetch(workdir, env, "-vv", "--image", "bookworm")]
        for result in results:
            assert result.code == 0, result.output
        assert results[0].stdout.rstrip().endswith(f"from {shown}/{TRIXIE}")
        # What `bookworm` resolved to is remembered without the credentials; with its image gone
        # from the cache, it is fetched again with the credentials given now.
        for folder in ("images", "downloads"):
            shutil.rmtree(cache / "pibake" / folder)
        asked = server.paths().count("/os_list_imagingutility_v4.json")
        results.append(fetch(workdir, env, "-v", "--image", "bookworm"))
        assert results[-1].code == 0, results[-1].output
        assert server.paths().count("/os_list_imagingutility_v4.json") == asked and server.paths()[-2:] == [
            f"/{BOOKWORM}", f"/{BOOKWORM}.sig"]
        results += [run_pibake(*command, cwd=workdir, env=env) for command in (("images", "--image", "bookworm"),
                                                                               ("cache", "list"))]
        assert all(r.code == 0 for r in results[-2:]) and f"{shown}/{BOOKWORM}" in results[-2].stdout
        assert results[-1].stdout.count(" MiB  ") == 2  # the bookworm download and image
        # An exact URL, cut short and then gone: its partial download stays, with its record.
        server.faults.drop_after[f"/{OLD}"] = 100_000
        server.faults.status[f"/{OLD}"] = [None, 404]
        results.append(fetch(workdir, env, "-vv", "--image", f"{base}/{OLD}"))
        assert results[-1].code == 1 and results[-1].stderr.rstrip().splitlines()[-1] == \
            f"pibake: error: cannot download {shown}/{OLD}: HTTP 404 Not Found"
        assert len(list((cache / "pibake/partial").glob("*.part.json"))) == 1
        # A wrong password is refused by the server, and the error says so without it.
        wrong = base.replace(f":{password}@", f":{password}-wrong@")
        results.append(fetch(workdir, {**env, "PIBAKE_OS_LIST": f"{wrong}/os_list_imagingutility_v4.json"}, "-v", "--image", "trixie"))
        assert results[-1].stderr.rstrip().splitlines()[-1] == \
            f"pibake: error: cannot fetch {shown}/os_list_imagingutility_v4.json: HTTP 401 Unauthorized"
        assert server.refused == ["/os_list_imagingutility_v4.json"]
    finally:
        server.stop()
    assert not any("Traceback" in r.output for r in results)
    assert assert_said_nowhere(secrets_of(user, password), results, [cache]) > 12
    records = [p for p in cache.rglob("*") if p.suffix == ".json"]
    assert len(records) >= 4
    for record in records:  # they name where images came from
        assert record.stat().st_mode & 0o777 == 0o600, record
