"""HTTP downloads: streamed to disk, resumed with Range, retried with backoff.

Proxies come from the environment (requests reads HTTP(S)_PROXY and NO_PROXY).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from builder import __version__, urls
from builder.errors import BuildError
from builder.files import read_json, write_json
from builder.progress import bar

# requests is imported where it is used: importing it takes about 60 ms, and a
# build from an image file already at hand never goes online.
if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

# Small enough that a dropped connection loses little: requests discards the
# chunk it was reading when the connection breaks.
CHUNK = 64 << 10
ATTEMPTS = 6
TIMEOUT = (15, 60)  # connect, read (seconds)


class _Retry(Exception):
    """A failure worth another attempt: connection trouble, a timeout, a 5xx."""


def session() -> requests.Session:
    import requests

    s = requests.Session()
    s.headers["User-Agent"] = f"pibake/{__version__}"
    return s


def _get(http: requests.Session, url: str, **options: Any) -> requests.Response:
    """GET `url` with its credentials sent as Basic authentication, apart from the URL: requests
    never holds them in a URL, so none of its messages can quote them. UTF-8 and any other bytes
    go as they are given, percent-decoded."""
    from requests.auth import HTTPBasicAuth

    login = urls.credentials(url)
    return http.get(urls.strip_credentials(url), auth=HTTPBasicAuth(*login) if login else None, timeout=TIMEOUT,
                    **{"stream": True, **options})


def _backoff(attempt: int) -> float:
    return min(30.0, 0.5 * 2**attempt)


def get_text(http: requests.Session, url: str, missing_ok: bool = False) -> Optional[str]:
    data = get_bytes(http, url, missing_ok)
    return None if data is None else data.decode("utf-8", "replace")


def get_bytes(http: requests.Session, url: str, missing_ok: bool = False) -> Optional[bytes]:
    """A small file (OS list, sidecar, signature, key), with the same retries as a download."""
    import requests

    for attempt in range(ATTEMPTS):
        try:
            response = _get(http, url)
            if response.status_code == 404 and missing_ok:
                return None
            if response.status_code >= 500:
                raise _Retry(f"HTTP {response.status_code}")
            if response.status_code != 200:
                raise BuildError(f"cannot fetch {url}: HTTP {response.status_code} {response.reason}")
            return _bounded_body(response, url)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retry) as e:
            if attempt == ATTEMPTS - 1 or _unresolved(e):
                tried = f" (tried {attempt + 1} times)" if attempt else ""
                raise BuildError(f"cannot fetch {url}: {_reason(e)}{tried}; {OFFLINE}") from None
            log.info("fetching %s failed (%s); retrying", url, _reason(e))
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


# An OS list is about 100 KiB, a signature or a sidecar less: a server sending more is not
# serving one.
SMALL_LIMIT = 16 << 20


def _bounded_body(response: requests.Response, url: str) -> bytes:
    body = bytearray()
    for chunk in response.iter_content(1 << 16):
        body += chunk
        if len(body) > SMALL_LIMIT:
            response.close()
            raise BuildError(f"{url} sent more than {SMALL_LIMIT >> 20} MiB, far more than a list, a checksum or a "
                             "signature takes")
    return bytes(body)


def get_json(http: requests.Session, url: str) -> Any:
    text = get_text(http, url)
    try:
        return json.loads(text or "")
    except ValueError as e:
        raise BuildError(f"{url} is not valid JSON: {e}") from None
    except RecursionError:
        raise BuildError(f"{url} is not an OS list: its JSON is nested too deeply") from None


def download(http: requests.Session, url: str, part: Path, expected_size: Optional[int] = None) -> Path:
    """Download `url` into `part`, resuming what an earlier run left there.

    A sidecar `<part>.json` remembers the validator (ETag or Last-Modified) the
    partial bytes came with; `If-Range` makes the server send the whole file
    again when it changed, and a server that ignores Range does the same.
    """
    import requests

    meta_path = part.with_name(part.name + ".json")
    for attempt in range(ATTEMPTS):
        try:
            _attempt(http, url, part, meta_path, expected_size)
            meta_path.unlink(missing_ok=True)
            return part
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retry) as e:
            if attempt == ATTEMPTS - 1 or _unresolved(e):
                raise BuildError(f"cannot download {url}: {_reason(e)} (tried {attempt + 1} times; "
                                 f"run again to resume); {OFFLINE}") from None
            log.info("download of %s interrupted (%s); resuming", url, _reason(e))
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def _attempt(http: requests.Session, url: str, part: Path, meta_path: Path, expected_size: Optional[int]) -> None:
    meta = read_json(meta_path)
    recorded = urls.strip_credentials(url)  # the record is a file: no credentials in it
    have = part.stat().st_size if part.exists() and meta.get("url") == recorded else 0
    headers = {}
    if have and meta.get("validator"):
        headers = {"Range": f"bytes={have}-", "If-Range": meta["validator"]}
    with _get(http, url, headers=headers, stream=True) as response:
        if response.status_code >= 500:
            raise _Retry(f"HTTP {response.status_code}")
        if response.status_code == 416 and have:  # nothing left to send: the file was complete
            return
        if response.status_code not in (200, 206):
            raise BuildError(f"cannot download {url}: HTTP {response.status_code} {response.reason}")
        if response.status_code == 200:
            if have:
                log.info("server sent %s whole (no resume: Range ignored or file changed)", url)
            have = 0
        log.debug("GET %s %s -> %s", url, headers.get("Range", ""), response.status_code)
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        write_json(meta_path, {"url": recorded, "validator": validator}, 0o600, indent=None)
        total = _total(response, have) or expected_size
        with open(part, "r+b" if have else "wb") as f, bar(total=total, initial=have, unit="B", unit_scale=True,
                                                           unit_divisor=1024, desc=part.name.split(".")[0][:24]) as meter:
            f.seek(have)
            f.truncate()
            for chunk in response.iter_content(CHUNK):
                f.write(chunk)
                meter.update(len(chunk))
        size = part.stat().st_size
        if total is not None and size < total:
            raise _Retry(f"connection closed after {size} of {total} bytes")


def _total(response: requests.Response, have: int) -> Optional[int]:
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        return int(content_range.rsplit("/", 1)[1]) if "/" in content_range and not content_range.endswith("*") else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _reason(e: BaseException) -> str:
    """Why a request failed, in words: requests' own messages are long and name its internals."""
    import requests

    text = str(e)
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, requests.ConnectionError):
        if _unresolved(e):
            return "its host name could not be resolved (no network, or no DNS)"
        if "Connection refused" in text:
            return "the connection was refused"
        if "Network is unreachable" in text or "No route to host" in text:
            return "the network is unreachable"
        return "the connection failed"
    return text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__


def _unresolved(e: BaseException) -> bool:
    """A host name that did not resolve: not worth retrying, and the sign of no network at all."""
    text = str(e)
    return any(words in text for words in ("NameResolutionError", "Name or service not known",
                                           "Temporary failure in name resolution", "nodename nor servname"))


OFFLINE = "to build without the network, give a local image: --image FILE (make build IMAGE=FILE)"
