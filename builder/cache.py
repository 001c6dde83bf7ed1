"""The cache ($XDG_CACHE_HOME/pibake), and fetching base images into it, verified before use.

Layout (every path is named by `Layout`, and nowhere else):
  downloads/<sha256>.<ext>   verified downloads, named by their sha256 (+ .json: origin, signature)
  images/<sha256>.img        decompressed images, named by the compressed file's sha256
                             (+ .json: sha256, origin, and whether the signature was checked)
  partial/                   downloads in progress, resumable
  keys/                      keyrings of pinned signing keys
  locks/                     one lock file per entry being written
  bases/<sha256>.json        what a base image says about itself (facts.py), and
  bases/<sha256>.reads.json  what plans read from it (0600: it holds the base's own files)
  apt/<key>/                 apt's lists and .debs per set of sources (packages.py)
  resolved.json              what `latest` or a family last resolved to
  kvm-hangs                  hosts whose KVM launches hung (appliance.py)
Everything lands under a temporary name and is renamed once complete and verified;
a lock per entry keeps two pibake processes from writing the same one. A URL is
recorded (and named, in a lock's or a partial download's name) without its
credentials, in files only their owner reads; a URL read back gets them again from
the choice made this run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Iterator, Optional

from builder import catalog, environment, download, image, signature, urls
from builder.catalog import ImageSpec, Source
from builder.errors import BuildError, InputError
from builder.files import read_json, write_json

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)
RESOLVE_TTL = 24 * 3600  # how long `latest` or a family name is trusted without asking again
RECORD_MODE = 0o600  # cache records name where images came from: their owner's business only


@dataclass(frozen=True)
class Choice:
    """What the user asked for, from the profile and the command line."""

    spec: str = "latest"  # latest | family | date | family@date | URL | path
    sha256: Optional[str] = None  # for a URL
    source: Source = Source()
    verify_signature: bool = True
    refresh: bool = False


@dataclass(frozen=True)
class BaseImage:
    path: Path  # a raw .img, ready to copy
    sha256: Optional[str]  # of that .img, when already known
    origin: str


@dataclass(frozen=True)
class Layout:
    """Where each kind of thing lives in the cache (see the module's docstring)."""

    root: Path

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def partial(self) -> Path:
        return self.root / "partial"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def bases(self) -> Path:
        return self.root / "bases"

    @property
    def apt(self) -> Path:
        return self.root / "apt"

    @property
    def resolved(self) -> Path:
        return self.root / "resolved.json"

    @property
    def kvm_hangs(self) -> Path:
        return self.root / "kvm-hangs"

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the lock of one entry (a URL or a sha256); a second process waits for it."""
        path = self.root / "locks" / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # a second fetch of the same image waits, then finds it cached
            yield


def layout() -> Layout:
    return Layout(environment.cache_home() / "pibake")


def root() -> Path:
    return layout().root


# ---------------------------------------------------------------- resolving


def _resolve_key(choice: Choice) -> str:
    family, date = catalog.parse_spec(choice.spec)
    return f"{urls.strip_credentials(choice.source.os_list)}|{family or 'latest'}|{date or ''}"


def _recalled(remembered: dict, choice: Choice) -> ImageSpec:
    """A remembered resolution, its URL with the credentials of this run's download base."""
    image = remembered["image"]
    return ImageSpec(**{**image, "url": urls.restore_credentials(image["url"], choice.source.download_base)})


def offered(choice: Choice, http: requests.Session) -> list[ImageSpec]:
    """What the OS list offers now, newest first."""
    os_list = download.get_json(http, choice.source.os_list)
    return catalog.lite_images(os_list, choice.source, lambda url: download.get_json(http, url))


def pick(choice: Choice, images: list[ImageSpec], http: requests.Session) -> ImageSpec:
    """The image a release spec names among `images`, or in the server's archive."""
    family, date = catalog.parse_spec(choice.spec)
    found = catalog.choose(images, family, date)
    if found is None and date:
        found = catalog.archived(date, family, choice.source, lambda url: download.get_text(http, url, missing_ok=True))
    if found is None:
        raise BuildError(f"no Raspberry Pi OS Lite (64-bit) image matches '{choice.spec}' in {choice.source.os_list}"
                         + (f" (it offers {', '.join(f'{i.codename}@{i.release_date}' for i in images)})" if images else ""))
    return found


def resolve(choice: Choice, http: requests.Session) -> ImageSpec:
    """The remote image a spec names, from the OS list or the remembered answer."""
    if catalog.is_url(choice.spec):
        m = catalog.FILE_RE.search(choice.spec)
        # Named by the last part of its path, never by anything before it (a host, a login).
        name = urlsplit(urls.strip_credentials(choice.spec)).path.rsplit("/", 1)[-1]
        if not name:
            raise InputError(f"{urls.shown(choice.spec)} names no file: give the URL of the image itself")
        return ImageSpec(url=choice.spec, name=name, release_date=m[1] if m else "",
                         codename=m[2] if m else "", sha256=choice.sha256.lower() if choice.sha256 else None)
    _, date = catalog.parse_spec(choice.spec)
    remembered = read_json(layout().resolved).get(_resolve_key(choice))
    fresh = remembered and (date or time.time() - remembered.get("at", 0) < RESOLVE_TTL)
    if remembered and fresh and not choice.refresh:
        return _recalled(remembered, choice)
    try:
        images = offered(choice, http)
    except BuildError as e:
        if remembered:
            log.warning("cannot read the OS list (%s); using %s from the cache", e, remembered["image"]["name"])
            return _recalled(remembered, choice)
        raise
    return pick(choice, images, http)


def remember(choice: Choice, spec: ImageSpec) -> None:
    if catalog.is_url(choice.spec):
        return
    path = layout().resolved
    # Answers recorded with their credentials, by a pibake that did not strip them, go.
    data = {key: value for key, value in read_json(path).items() if not _holds_credentials([key, value])}
    data[_resolve_key(choice)] = {"at": time.time(), "image": {**asdict(spec), "url": urls.strip_credentials(spec.url)}}
    write_json(path, data, RECORD_MODE)


def _holds_credentials(record: object) -> bool:
    text = json.dumps(record)
    return urls.shown(text) != text


# ---------------------------------------------------------------- fetching


def obtain(choice: Choice) -> BaseImage:
    """A verified raw base image for `choice`, fetched and decompressed if needed."""
    if not catalog.is_url(choice.spec) and catalog.looks_like_file(choice.spec):
        return local(Path(choice.spec))
    http = download.session()
    spec = resolve(choice, http)
    with layout().locked(urls.strip_credentials(spec.url)):
        if spec.sha256 is None:
            spec = _with_sidecar_sha(http, spec)
        key = spec.sha256
        assert key is not None
        result = _cached_image(key, spec.extract_sha256, spec.url)
        if result is not None and choice.verify_signature and not _signature_checked(result.path.with_suffix(".json")):
            # Fetched once with --no-verify-signature: this run checks signatures.
            log.info("%s was cached without checking its signature; checking it now", spec.filename)
            result = _check_cached(http, spec, result)
        if result is None:
            result = _fetch(http, spec, choice)
    remember(choice, spec)
    return result


def _with_sidecar_sha(http: requests.Session, spec: ImageSpec) -> ImageSpec:
    sidecar = download.get_text(http, spec.url + ".sha256", missing_ok=True)
    if not sidecar or not catalog.SHA256_RE.match(sidecar.split()[0].lower()):
        raise BuildError(f"no sha256 for {spec.url}: neither the OS list, a pin (--sha256) nor a .sha256 beside it gives one")
    return ImageSpec(**{**asdict(spec), "sha256": sidecar.split()[0].lower()})


def _suffix(name: str) -> str:
    for suffix in (".img.xz", ".img.gz", ".zip", ".img"):
        if name.endswith(suffix):
            return suffix
    return ".img.xz"


def _cached_image(key: str, expected: Optional[str], origin: str) -> Optional[BaseImage]:
    """The decompressed image cached under `key`, re-hashed; None if absent or corrupted (then removed)."""
    path = layout().images / f"{key}.img"
    meta = read_json(path.with_suffix(".json"))
    if not path.exists() or not meta.get("sha256"):
        return None
    found = image.sha256_file(path, progress=True)
    if found != meta["sha256"] or (expected and found != expected):
        log.warning("cached image %s is corrupted (sha256 %s, expected %s); making it again", path, found, meta["sha256"])
        path.unlink()
        return None
    log.info("using cached %s", path)
    return BaseImage(path, found, origin)


def _signature_checked(meta: Path) -> bool:
    """Whether the entry this metadata describes had its signature checked (not skipped, not unknown)."""
    return read_json(meta).get("signature") not in (None, "skipped")


def _download_path(spec: ImageSpec) -> Path:
    """Where a verified download of `spec` is kept."""
    return layout().downloads / f"{spec.sha256}{_suffix(spec.filename)}"


def _check_cached(http: requests.Session, spec: ImageSpec, cached: BaseImage) -> Optional[BaseImage]:
    """Check the signature of a cached image's download, or None when that download is gone.

    A bad or missing signature raises; the entry stays for runs that skip the check."""
    assert spec.sha256 is not None
    compressed = _download_path(spec)
    if not compressed.exists() or image.sha256_file(compressed, progress=True) != spec.sha256:
        return None
    fingerprint = _check_signature(http, spec, compressed)
    meta = cached.path.with_suffix(".json")
    write_json(meta, {**read_json(meta), "signature": fingerprint}, RECORD_MODE)
    return cached


def _fetch(http: requests.Session, spec: ImageSpec, choice: Choice) -> BaseImage:
    assert spec.sha256 is not None
    downloads = layout().downloads
    downloads.mkdir(parents=True, exist_ok=True)
    compressed = _download_path(spec)
    meta_path = downloads / f"{spec.sha256}.json"
    if compressed.exists() and image.sha256_file(compressed, progress=True) != spec.sha256:
        log.warning("cached download %s is corrupted; fetching it again", compressed)
        compressed.unlink()
    if not compressed.exists():
        _download_verified(http, spec, choice, compressed)
    elif choice.verify_signature and not _signature_checked(meta_path):
        _check_signature(http, spec, compressed)
    return decompress_into_cache(compressed, spec.sha256, spec.extract_sha256, spec.url, spec.extract_size,
                                 read_json(meta_path).get("signature"))


def _download_verified(http: requests.Session, spec: ImageSpec, choice: Choice, target: Path) -> None:
    partial_dir = layout().partial
    partial_dir.mkdir(parents=True, exist_ok=True)
    part = partial_dir / f"{hashlib.sha256(urls.strip_credentials(spec.url).encode()).hexdigest()[:16]}-{spec.filename}.part"
    download.download(http, spec.url, part, spec.download_size)
    found = image.sha256_file(part, progress=True)
    if found != spec.sha256:
        part.unlink()
        raise BuildError(f"sha256 mismatch for {spec.url}: expected {spec.sha256}, found {found}; "
                         "the download was discarded")
    try:
        fingerprint = _check_signature(http, spec, part) if choice.verify_signature else "skipped"
    except BuildError:
        part.unlink()  # a file that fails its signature is not kept, even to resume
        raise
    if not choice.verify_signature:
        log.warning("NOT checking the OpenPGP signature of %s (--no-verify-signature)", spec.url)
    write_json(target.with_name(f"{spec.sha256}.json"), {"url": urls.strip_credentials(spec.url), "name": spec.name,
                                                          "release_date": spec.release_date, "signature": fingerprint},
               RECORD_MODE)
    os.replace(part, target)


def _check_signature(http: requests.Session, spec: ImageSpec, data: Path) -> str:
    signature_bytes = download.get_bytes(http, spec.url + ".sig", missing_ok=True)
    if signature_bytes is None:
        raise BuildError(f"{spec.url}.sig is missing: the image is unsigned or the mirror is incomplete; "
                         "--no-verify-signature skips the check (not recommended)")
    sig = data.with_name(data.name + ".sig")
    sig.write_bytes(signature_bytes)
    try:
        fingerprint = signature.verify(data, sig, signature.keyring(http, layout().keys), spec.url)
    finally:
        sig.unlink(missing_ok=True)
    log.info("signature of %s: good, by pinned key %s", spec.filename, fingerprint)
    meta_path = data.parent / f"{spec.sha256}.json"
    if meta_path.exists():
        write_json(meta_path, {**read_json(meta_path), "signature": fingerprint}, RECORD_MODE)
    return fingerprint


def decompress_into_cache(compressed: Path, key: str, expected: Optional[str], origin: str,
                          size: Optional[int] = None, signature: Optional[str] = None) -> BaseImage:
    """Decompress once into images/<key>.img, checking the result's sha256 when one is known.

    `signature`: the signing key's fingerprint, or "skipped"; None for a local file."""
    images = layout().images
    images.mkdir(parents=True, exist_ok=True)
    target = images / f"{key}.img"
    found = image.decompress(compressed, target, size)
    if expected and found != expected:
        target.unlink()
        raise BuildError(f"sha256 mismatch for the decompressed {origin}: expected {expected} (extract_sha256), "
                         f"found {found}")
    write_json(target.with_suffix(".json"), {"sha256": found, "origin": urls.strip_credentials(origin), "signature": signature},
               RECORD_MODE)
    return BaseImage(target, found, origin)


def local(path: Path) -> BaseImage:
    path = path.expanduser()
    if not path.exists():
        raise BuildError(f"image not found: {path}")
    if not path.is_file():
        raise BuildError(f"image is not a file: {path}")
    if not path.name.endswith((".xz", ".gz", ".zip")):
        return BaseImage(path, None, str(path))  # raw: used where it is
    key = image.sha256_file(path, progress=True)
    with layout().locked(key):
        return _cached_image(key, None, str(path)) or decompress_into_cache(path, key, None, str(path))


# ---------------------------------------------------------------- cache commands


def entries() -> list[tuple[Path, int, str]]:
    out = []
    for folder in ("downloads", "images", "partial"):
        for path in sorted((layout().root / folder).glob("*")):
            if path.suffix in (".json",) or path.name.startswith("."):
                continue
            meta = read_json(path.with_name(path.name.split(".")[0] + ".json"))
            label = meta.get("name") or meta.get("origin") or meta.get("url") or ""
            out.append((path, path.stat().st_size, label))
    return out


def clean() -> int:
    freed = sum(p.stat().st_size for p in root().rglob("*") if p.is_file()) if root().exists() else 0
    shutil.rmtree(root(), ignore_errors=True)
    return freed
