"""A TCP peer driven line by line, for tests that pass traffic between network namespaces.

Run as a script (in a namespace: `ip netns exec NS python peer.py`), it reads commands
on stdin and reports events on stdout, one line each:

  listen HOST PORT            -> listening HOST PORT; then accepted ID PEER-ADDRESS per connection
  connect HOST PORT SECONDS   -> connected ID, or failed WHY
  send ID TEXT                -> sent ID
  (any connection)            -> recv ID LINE for each line it receives, closed ID at its end

`Peer` runs it and reads its answers, so a test can hold one connection open across
a change of firewall rules and see which of its lines still arrive.
"""

from __future__ import annotations

import itertools
import queue
import socket
import subprocess
import sys
import threading
from typing import Optional, Sequence

_said = threading.Lock()


def _say(line: str) -> None:
    with _said:
        print(line, flush=True)


def _receive(number: int, conn: socket.socket) -> None:
    try:
        for line in conn.makefile("r", encoding="utf-8"):
            _say(f"recv {number} {line.rstrip()}")
    except OSError:
        pass
    _say(f"closed {number}")


def _keep(conns: dict[int, socket.socket], numbers: itertools.count, conn: socket.socket) -> int:
    number = next(numbers)
    conns[number] = conn
    threading.Thread(target=_receive, args=(number, conn), daemon=True).start()
    return number


def _accept(server: socket.socket, conns: dict[int, socket.socket], numbers: itertools.count) -> None:
    while True:
        conn, address = server.accept()
        _say(f"accepted {_keep(conns, numbers, conn)} {address[0]}")


def serve() -> None:
    """The script: commands on stdin, events on stdout."""
    conns: dict[int, socket.socket] = {}
    numbers = itertools.count(1)
    for command in sys.stdin:
        verb, _, rest = command.strip().partition(" ")
        args = rest.split(" ", 2 if verb == "connect" else 1)
        if verb == "listen":
            server = socket.create_server((args[0], int(args[1])))
            threading.Thread(target=_accept, args=(server, conns, numbers), daemon=True).start()
            _say(f"listening {args[0]} {args[1]}")
        elif verb == "connect":
            try:
                conn = socket.create_connection((args[0], int(args[1])), timeout=float(args[2]))
            except OSError as e:
                _say(f"failed {e.strerror or type(e).__name__}")
                continue
            conn.settimeout(None)
            _say(f"connected {_keep(conns, numbers, conn)}")
        elif verb == "send":
            conns[int(args[0])].sendall(f"{args[1]}\n".encode())
            _say(f"sent {args[0]}")


class Peer:
    """This script run by `within` (`ip netns exec NS`): tell it commands, read what it says."""

    def __init__(self, within: Sequence[str]) -> None:
        self.proc = subprocess.Popen([*within, sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.heard: queue.Queue[str] = queue.Queue()
        self.kept: list[str] = []  # lines heard but not asked for yet
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.heard.put(line.rstrip("\n"))

    def tell(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def next(self, *starts: str, timeout: float = 10.0) -> Optional[str]:
        """The first line not asked for yet that is one of `starts` or begins with one and a space; None after `timeout`."""
        def wanted(line: str) -> bool:
            return any(line == s or line.startswith(s + " ") for s in starts)
        for line in self.kept:
            if wanted(line):
                self.kept.remove(line)
                return line
        while True:
            try:
                line = self.heard.get(timeout=timeout)
            except queue.Empty:
                return None
            if wanted(line):
                return line
            self.kept.append(line)

    def ask(self, command: str, *answers: str, timeout: float = 10.0) -> str:
        """Tell `command`, and return its answer: the next line that begins with one of `answers`."""
        self.tell(command)
        line = self.next(*answers, timeout=timeout)
        assert line is not None, f"no answer to {command!r} within {timeout} s; stderr: {self.stderr()}"
        return line

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


if __name__ == "__main__":
    serve()
