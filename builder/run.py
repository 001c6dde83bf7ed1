"""Every external program pibake runs goes through here: logged, fed no terminal, checked.

Each command is logged at debug level as `$ command` (shlex.join, so it can be
pasted into a shell). A program that is missing, or that fails when it must not,
raises CommandError: the program, its exit status and the last lines it wrote
to stderr, which is what a user needs to act.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from contextlib import contextmanager
from typing import IO, Iterator, Mapping, Optional, Sequence

from builder.errors import BuildError

log = logging.getLogger(__name__)

# What the README's "system packages" section installs each program with.
PACKAGES = {"gpg": "gpg", "gpgv": "gpgv", "xz": "xz-utils", "gzip": "gzip", "apt-get": "apt", "dpkg-deb": "dpkg",
            "cp": "coreutils"}


class CommandError(BuildError):
    """An external program that is missing or failed."""

    def __init__(self, message: str, command: Sequence[str], returncode: Optional[int] = None, stderr: str = "") -> None:
        super().__init__(message)
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr


def tail(text: str, lines: int = 2) -> str:
    """The last non-empty lines of a program's output, joined on one line."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(kept[-lines:])


def _missing(command: Sequence[str]) -> CommandError:
    package = PACKAGES.get(command[0], command[0])
    return CommandError(f"{command[0]} is not installed: install the {package} package (see README)", command)


def run(command: Sequence[str], *, what: str = "", check: bool = True, input: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """Run `command` to completion with its output captured (bytes); stdin is closed unless `input` is given,
    so a program that would ask a question fails instead of waiting.
    `what` says what failed in the error ("cannot decompress x.img.xz"); by default, the program."""
    log.debug("$ %s", shlex.join(command))
    try:
        done = subprocess.run(list(command), input=input, stdin=subprocess.DEVNULL if input is None else None,
                              capture_output=True, env=env)
    except FileNotFoundError:
        raise _missing(command) from None
    if check and done.returncode != 0:
        raise failed(done, what)
    return done


def text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def failed(done: subprocess.CompletedProcess, what: str = "") -> CommandError:
    """The error for a program that ran and failed."""
    command = [str(a) for a in done.args]
    stderr = text(done.stderr) if isinstance(done.stderr, bytes) else (done.stderr or "")
    detail = tail(stderr) or f"exit status {done.returncode}"
    return CommandError(f"{what or command[0] + ' failed'}: {detail}", command, done.returncode, stderr)


@contextmanager
def stream(command: Sequence[str], *, what: str = "") -> Iterator[IO[bytes]]:
    """Run `command` with its stdout to read as it comes; raise if it fails by the end."""
    log.debug("$ %s", shlex.join(command))
    try:
        proc = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise _missing(command) from None
    assert proc.stdout is not None and proc.stderr is not None
    try:
        yield proc.stdout
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.stderr.close()
        returncode = proc.wait()
    if returncode != 0:
        raise failed(subprocess.CompletedProcess(command, returncode, b"", stderr), what)
