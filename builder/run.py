"""Every external program pibake runs goes through here: logged, fed no terminal, checked.

Each command is logged at debug level as `$ command` (shlex.join, so it can be
pasted into a shell). A program that is missing, or that fails when it must not,
raises CommandError: the program, its exit status and the last lines it wrote
to stderr, which is what a user needs to act.
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Iterator, Mapping, Optional, Sequence

from builder.errors import BuildError

log = logging.getLogger(__name__)

# What the README's "system packages" section installs each program with.
PACKAGES = {"gpg": "gpg", "gpgv": "gpgv", "xz": "xz-utils", "gzip": "gzip", "apt-get": "apt", "dpkg-deb": "dpkg",
            "cp": "coreutils", "ssh": "openssh-client"}


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



@dataclass
class Bounded:
    """What a program said within its bounds: `flooded` when it said more than allowed,
    `timed_out` when it was still running at the deadline; either way it was killed
    (and `returncode` is None)."""

    returncode: Optional[int]
    stdout: bytes
    stderr: bytes
    flooded: bool = False
    timed_out: bool = False


def bounded(command: Sequence[str], *, input: bytes, timeout: float, limit: int, cwd: Optional[str] = None) -> Bounded:
    """Run `command` (and whatever it starts) for at most `timeout` seconds, keeping at most
    `limit` bytes of each of its outputs: for a program whose output comes from elsewhere
    (ssh to a node), which may flood or stall."""
    log.debug("$ %s", shlex.join(command))
    try:
        proc = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, start_new_session=True)  # its own group: killed with whatever it started
    except FileNotFoundError:
        raise _missing(command) from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    kept = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    pending = memoryview(input)
    flooded = timed_out = False
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        if pending:
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while selector.get_map() and not flooded and not timed_out:
            events = selector.select(max(0.0, deadline - time.monotonic()))
            timed_out = not events and time.monotonic() >= deadline
            for key, _ in events:
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending[:1 << 16]):]
                    except BrokenPipeError:  # it stopped reading: what it said so far still counts
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                kept[key.fd] += chunk
                flooded = flooded or len(kept[key.fd]) > limit
    if flooded or timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    returncode = proc.wait()
    for stream_ in (proc.stdin, proc.stdout, proc.stderr):
        stream_.close()
    if flooded or timed_out:
        return Bounded(None, bytes(out[:limit]), bytes(err[:limit]), flooded, timed_out)
    return Bounded(returncode, bytes(out), bytes(err))
