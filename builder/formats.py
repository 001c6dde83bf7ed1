"""How a value is written where another program reads it, and how text is shown.

Each format other tools parse has its own rule here, applied to the final value as it
is written: ssh_config (OpenSSH's quoting and its `%` tokens), known_hosts host names,
and a path that ssh hands to a shell. A value a format cannot hold is refused with
one line rather than written approximately. `shown()` is the one rule for text pibake
did not write (a node's answers, a server's names, a file's content) on its way to
the operator's terminal: every character that is not printable is escaped.
"""

from __future__ import annotations

import ipaddress
import re

from builder.errors import InputError

# C0 and C1 controls, DEL, and Unicode's line and paragraph separators: none belongs on
# one line of a generated file.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shown(text: str, limit: int | None = None) -> str:
    """`text` safe to print: every character a terminal would act on (escape sequences,
    carriage returns, backspaces, bidirectional overrides, other controls) written as
    its escape, and cut at `limit` characters."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def decoded(data: bytes) -> str:
    """Bytes from elsewhere as text, whatever they hold: what is not UTF-8 becomes \\xNN."""
    return data.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- ssh_config


def _quote_ssh(value: str) -> str:
    # OpenSSH splits a line into words as argv_split() does: double quotes group a word,
    # and inside them a backslash escapes '"' and '\'.
    if value and not re.search(r"[\s\"'\\#=]", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ssh_config_path(path: str, what: str) -> str:
    """A file name as an ssh_config argument (IdentityFile, UserKnownHostsFile): quoted,
    with `%` doubled, since ssh expands `%` tokens in both. ssh also expands `${NAME}`
    there, with no escape, and no quoting holds a line break: such a path is refused."""
    problem = _line_problem(path)
    if problem is None and "${" in path:
        problem = "holds '${', which ssh would read as an environment variable"
    if problem is None and not path.startswith("/"):
        problem = "is not an absolute path"
    if problem:
        raise InputError(f"cannot name {what} {shown(path, 200)} in output/ssh_config: it {problem}; "
                         "move or rename it")
    return _quote_ssh(path.replace("%", "%%"))


def _line_problem(text: str) -> str | None:
    control = CONTROL_RE.search(text)
    if control:
        return f"holds a control character ({ascii(control[0])})"
    return None


# ---------------------------------------------------------------- known_hosts

_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.?")


def known_hosts_name(name: str, port: int = 22) -> str:
    """A host as a known_hosts pattern: a DNS name or an IP address, in `[host]:port`
    form for another port. known_hosts reads `*`, `?`, `!`, `,` and whitespace as
    pattern syntax and a leading `|` or `@` as a hashed name or a marker, and an IPv6
    zone id (`%eth0`) is never part of the name ssh looks up: none of them is written."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if (address is None and not _NAME_RE.fullmatch(name)) or "%" in name:
        raise InputError(f"{shown(name, 200)} cannot be a host name in output/known_hosts: "
                         "only a DNS name or an IP address without a zone id")
    return name if port == 22 else f"[{name}]:{port}"


# ---------------------------------------------------------------- a shell

# What every shell takes as part of a word, and ssh's ProxyJump leaves alone: ssh builds
# the command that reaches a worker through the master as text, for /bin/sh, with the
# `-F` path it was given unquoted (OpenSSH 9.2), and expands `%` tokens in it.
_SHELL_SAFE = re.compile(r"[\w@+=:,./-]*")


def shell_safe_path(path: str, what: str) -> str:
    """A path that ssh passes through a shell as it is: letters, digits and `_@+=:,./-`."""
    if not _SHELL_SAFE.fullmatch(path):
        bad = next(c for c in path if not _SHELL_SAFE.fullmatch(c))
        raise InputError(f"{what} {shown(path, 200)} holds {ascii(bad)}: ssh hands the path of output/ssh_config to a "
                         "shell when it goes through the master (ProxyJump), so it may hold only letters, digits and "
                         "_ @ + = : , . / -; choose another folder (--output)")
    return path
