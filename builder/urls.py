"""The one rule every URL pibake is given meets, and how URLs are shown.

A URL ends up on a line of an apt source or in a request: it must be http(s), name
a host, and hold only the characters RFC 3986 allows in a path and query, so that
nothing in it (a space, a bracket, a newline) can add an option or a line where it
lands. Credentials in a URL are allowed and never shown: every message that quotes a
URL goes through shown(). Nor are they written down: every file that records a URL
records it through strip_credentials(), and code that reads such a URL back takes
the credentials from what the user gave this run (restore_credentials()).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional
from urllib.parse import unquote_to_bytes, urlsplit

MAX_LENGTH = 2048
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
# unreserved, sub-delims, ':' and '@' (RFC 3986 pchar), '/', and '%' followed by two hex digits
_PATH_RE = re.compile(r"([A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*")
_QUERY_RE = re.compile(r"([A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*")
_USERINFO_RE = re.compile(r"([A-Za-z0-9._~!$&'()*+,;=:-]|%[0-9A-Fa-f]{2})*")
_CREDENTIALS = re.compile(r"(?<=://)[^/?#\s]*@")
# A URL's user name and password: up to the last '@' of its authority, as requests reads it.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")


def is_host_name(name: str) -> bool:
    """A DNS name: dot-separated labels of letters, digits and inner '-', at most 253 characters."""
    return bool(_HOST_RE.fullmatch(name)) and len(name) <= 253


def shown(text: str) -> str:
    """Text with the credentials of every URL in it replaced by ***."""
    return _CREDENTIALS.sub("***@", text)


def strip_credentials(url: str) -> str:
    """`url` with no user name or password: how a URL is written to a file, and requested."""
    return _USERINFO.sub(r"\1", url, count=1)


def credentials(url: str) -> Optional[tuple[bytes, bytes]]:
    """The user name and password in `url`, percent-decoded, or None when it has none."""
    found = _USERINFO.match(url)
    if found is None:
        return None
    user, _, password = found[2].partition(":")
    return unquote_to_bytes(user), unquote_to_bytes(password)


def restore_credentials(url: str, base: str) -> str:
    """A URL read back from a file, with the credentials of `base` when it lies under `base`."""
    bare = strip_credentials(base).rstrip("/")
    if url == bare or url.startswith(bare + "/"):
        return base.rstrip("/") + url[len(bare):]
    return url


def _short(url: str) -> str:
    url = shown(url)
    return f"'{url}'" if len(url) <= 80 else f"'{url[:77]}...'"


def problem(url: str) -> Optional[str]:
    """What is wrong with `url`, or None for an http(s) URL that is safe wherever it lands."""
    if len(url) > MAX_LENGTH:
        return f"{_short(url)} is longer than {MAX_LENGTH} characters"
    bad = re.search(r"[^\x21-\x7e]", url)
    if bad:
        return f"{_short(url)} is not a URL: it holds {ascii(bad[0])} (spaces and control characters are not allowed)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"{_short(url)} is not a URL ({e})"
    if parts.scheme.lower() not in ("http", "https") or not url.lower().startswith(f"{parts.scheme.lower()}://"):
        return f"{_short(url)} is not an http:// or https:// URL"
    userinfo, _, host = parts.netloc.rpartition("@")
    host = re.sub(r":[0-9]*$", "", host) if not host.endswith("]") else host
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{_short(url)} has no valid host: {host} is not an IPv6 address"
    elif not is_host_name(host):
        return f"{_short(url)} has no valid host name"
    if port == 0:
        return f"{_short(url)} has port 0"
    if not _USERINFO_RE.fullmatch(userinfo):
        return f"{_short(url)} has characters its user name or password may not hold"
    if parts.fragment or "#" in url:
        return f"{_short(url)} has a fragment (#...), which means nothing to a download"
    if not _PATH_RE.fullmatch(parts.path):
        return f"{_short(url)} has characters a URL's path may not hold (brackets, quotes, '\\' or a lone '%')"
    if not _QUERY_RE.fullmatch(parts.query):
        return f"{_short(url)} has characters a URL's query may not hold"
    return None
