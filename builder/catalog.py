"""Which Raspberry Pi OS image to use: Raspberry Pi Imager's OS list and pins.

An image is chosen by a spec: `latest` (the default), a release family
(`bookworm`), a release date (`2025-05-13`), both (`bookworm@2025-05-13`), an
exact URL (with its sha256), or a local file.
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urljoin, urlsplit

from builder import environment, release, urls
from builder.errors import BuildError, InputError

log = logging.getLogger(__name__)

OFFICIAL_BASE = "https://downloads.raspberrypi.com"
OS_LIST_NAME = "os_list_imagingutility_v4.json"
FAMILIES = release.NAMES
# <date>-raspios-<codename>-arm64-lite.img.xz, as every Lite arm64 release is named
FILE_RE = re.compile(r"(\d{4}-\d{2}-\d{2})-raspios-([a-z]+)-arm64-lite\.(img\.xz|zip|img\.gz|img)$")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ImageSpec:
    """A remote image: where it is and what it must hash to."""

    url: str
    name: str
    release_date: str
    codename: str
    sha256: Optional[str] = None  # of the downloaded (compressed) file
    extract_sha256: Optional[str] = None  # of the decompressed .img
    extract_size: Optional[int] = None
    download_size: Optional[int] = None

    @property
    def filename(self) -> str:
        """The last part of the URL's path: never its host or a login."""
        return urlsplit(urls.strip_credentials(self.url)).path.rsplit("/", 1)[-1] or "image"


@dataclass(frozen=True)
class Source:
    """Where the catalog lives; overridable for local mirrors."""

    download_base: str = OFFICIAL_BASE
    os_list_url: Optional[str] = None

    @classmethod
    def from_settings(cls, download_base: Optional[str], os_list_url: Optional[str]) -> "Source":
        base = (environment.download_base() or download_base or OFFICIAL_BASE).rstrip("/")
        return cls(base, environment.os_list() or os_list_url)

    @property
    def os_list(self) -> str:
        return self.os_list_url or f"{self.download_base}/{OS_LIST_NAME}"

    def mirror(self, url: str) -> str:
        """Point an official download URL at the configured mirror."""
        if self.download_base != OFFICIAL_BASE and url.startswith(OFFICIAL_BASE + "/"):
            return self.download_base + url[len(OFFICIAL_BASE):]
        return url


def parse_spec(text: str) -> tuple[Optional[str], Optional[str]]:
    """`latest`, `bookworm`, `2025-05-13`, `bookworm@2025-05-13` -> (family or None, date or None)."""
    family, _, date = text.partition("@")
    if DATE_RE.match(family) and not date:
        family, date = "latest", family
    if family not in ("latest", *FAMILIES) or (date and not _is_date(date)):
        raise InputError(f"'{text}' is not an image spec: use latest, {', '.join(FAMILIES)}, a date like 2025-05-13, "
                         "family@date, a URL or a file path")
    return None if family == "latest" else family, date or None


def _is_date(text: str) -> bool:
    """YYYY-MM-DD, and a day the calendar has."""
    try:
        return bool(DATE_RE.match(text)) and datetime.date.fromisoformat(text[:10]) is not None
    except ValueError:
        return False


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def looks_like_file(text: str) -> bool:
    return "/" in text or text.endswith((".img", ".xz", ".zip", ".gz")) or Path(text).exists()


# Imager's own list nests categories two or three deep.
MAX_NESTING = 8


def _leaves(items: list[Any], fetch_json: Callable[[str], Any], fetched: Optional[set[str]] = None,
            depth: int = 0) -> list[dict[str, Any]]:
    """The entries that name an image, under categories inline or fetched (`subitems_url`):
    each list fetched once, nested at most MAX_NESTING deep, whatever the server says."""
    fetched = set() if fetched is None else fetched
    out: list[dict[str, Any]] = []
    if depth > MAX_NESTING:
        return out
    for item in items:
        if not isinstance(item, dict):
            continue
        sub_url = item.get("subitems_url")
        if isinstance(item.get("subitems"), list):
            out.extend(_leaves(item["subitems"], fetch_json, fetched, depth + 1))
        elif isinstance(sub_url, str) and "raspios" in sub_url and sub_url not in fetched:
            fetched.add(sub_url)
            if urls.problem(sub_url):
                log.warning("the OS list names a list at %s, which is not a URL: skipped", sub_url[:200])
                continue
            sub = fetch_json(sub_url)
            out.extend(_leaves(sub.get("os_list", []) if isinstance(sub, dict) else [], fetch_json, fetched, depth + 1))
        elif isinstance(item.get("url"), str):
            out.append(item)
    return out


def lite_images(os_list: Any, source: Source, fetch_json: Callable[[str], Any]) -> list[ImageSpec]:
    """Every Raspberry Pi OS Lite (64-bit) the OS list offers, newest first."""
    if not isinstance(os_list, dict) or not isinstance(os_list.get("os_list"), list):
        raise BuildError(f"the OS list at {source.os_list} is malformed: no 'os_list' array")
    images = []
    for leaf in _leaves(os_list["os_list"], fetch_json):
        m = FILE_RE.search(leaf["url"])
        if not m:
            continue
        if urls.problem(leaf["url"]):
            log.warning("the OS list offers an image at %s, which is not a URL: skipped", leaf["url"][:200])
            continue
        try:
            images.append(ImageSpec(
                url=source.mirror(leaf["url"]), name=str(leaf.get("name", m[0]))[:200], release_date=m[1], codename=m[2],
                sha256=_sha(leaf.get("image_download_sha256")), extract_sha256=_sha(leaf.get("extract_sha256")),
                extract_size=_int(leaf.get("extract_size")), download_size=_int(leaf.get("image_download_size")),
            ))
        except (TypeError, ValueError, OverflowError) as e:
            raise BuildError(f"the OS list at {source.os_list} is malformed: entry {str(leaf.get('name'))[:80]!r}: "
                             f"{str(e)[:200]}") from None
    return sorted(images, key=lambda i: i.release_date, reverse=True)


def _sha(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not SHA256_RE.match(value.lower()):
        raise ValueError(f"{value!r} is not a sha256")
    return value.lower()


def _int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def choose(images: list[ImageSpec], family: Optional[str], date: Optional[str]) -> Optional[ImageSpec]:
    for image in images:
        if (family is None or image.codename == family) and (date is None or image.release_date == date):
            return image
    return None


def archived(date: str, family: Optional[str], source: Source, fetch_text: Callable[[str], Optional[str]]) -> Optional[ImageSpec]:
    """A release no longer in the OS list, found in the download server's folder listings.

    The folder is named by a date that can be a day after the file's own date.
    """
    for folder in ("raspios_lite_arm64", "raspios_oldstable_lite_arm64"):
        index_url = f"{source.download_base}/{folder}/images/"
        index = fetch_text(index_url)
        if index is None:
            continue
        for sub in sorted(set(re.findall(rf'href="({folder}-(\d{{4}}-\d{{2}}-\d{{2}})/)"', index))):
            if sub[1] < date:
                continue
            listing = fetch_text(urljoin(index_url, sub[0]))
            for name in re.findall(r'href="([^"/]+)"', listing or ""):
                m = FILE_RE.search(name)
                if m and m[1] == date and (family is None or m[2] == family) and m[3] == "img.xz":
                    url = urljoin(urljoin(index_url, sub[0]), name)
                    return ImageSpec(url=url, name=name, release_date=date, codename=m[2])
    return None
