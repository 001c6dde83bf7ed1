"""A node that answers ssh as a test tells it to: a real SSH server (paramiko) on 127.0.0.1.

It serves a node's host key, lets in the operator's key, and answers the `sh -s` that
`pibake check` sends with whatever the test's `answer` writes: the honest facts, or
escape sequences, a flood, silence, bytes that are not UTF-8, or ssh's own words on
stderr. A master also forwards the connections ssh's ProxyJump opens through it
(direct-tcpip) to the workers' servers, as the cluster's LAN would.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
from typing import Callable, Optional

import paramiko

Answer = Callable[[paramiko.Channel], None]


def the_mark(channel: paramiko.Channel) -> bytes:
    """The line the probe would print first, read from the script ssh sends (`echo '...'`),
    as a node that runs the probe prints it."""
    script = b""
    while b"\n" not in script and len(script) < 4096:
        data = channel.recv(4096)
        if not data:
            break
        script += data
    first = script.split(b"\n", 1)[0]
    return first.removeprefix(b"echo '").removesuffix(b"'") + b"\n"


def say(stdout: bytes = b"", stderr: bytes = b"", status: int = 0, runs_probe: bool = False) -> Answer:
    """An answer: `runs_probe`, the probe's first line as a node that ran it prints it, then `stdout`."""
    def answer(channel: paramiko.Channel) -> None:
        if runs_probe:
            channel.sendall(the_mark(channel))
        if stdout:
            channel.sendall(stdout)
        if stderr:
            channel.sendall_stderr(stderr)
        channel.send_exit_status(status)
    return answer


def honest(hostname: str, address: str, extra: str = "") -> Answer:
    return say(f"hostname: {hostname}\nsystem: running\nfirst-boot: done 12s\naddress: {address}/24\n{extra}".encode(),
               runs_probe=True)


def flood(channel: paramiko.Channel) -> None:
    chunk = b"hostname: " + b"A" * (1 << 16)
    for _ in range(1 << 15):  # 2 GiB, if anyone kept reading
        channel.sendall(chunk)


def silent(channel: paramiko.Channel) -> None:
    threading.Event().wait(120)


def serve(listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Each connection to `listener` handled in a thread of its own, until it is closed."""
    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


class _Interface(paramiko.ServerInterface):
    def __init__(self, node: "Node") -> None:
        self.node = node
        self.commands: dict[int, threading.Event] = {}
        self.destinations: dict[int, tuple[str, int]] = {}

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == self.node.user and key.get_base64() == self.node.authorized
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            self.commands[chanid] = threading.Event()
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple, destination: tuple) -> int:
        if tuple(destination) not in self.node.forward:
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        self.destinations[chanid] = tuple(destination)
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.commands[channel.get_id()].set()
        return True


class Node:
    def __init__(self, host_key: bytes, authorized: str, answer: Answer, user: str = "pi",
                 forward: Optional[dict[tuple[str, int], int]] = None) -> None:
        self.key = paramiko.Ed25519Key(file_obj=io.StringIO(host_key.decode()))
        self.authorized = authorized.split()[1]
        self.answer = answer
        self.user = user
        self.forward = forward or {}  # (address, port) asked for -> a port on 127.0.0.1
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.transports: list[paramiko.Transport] = []
        serve(self.listener, self._connection)

    def _connection(self, client: socket.socket) -> None:
        transport = paramiko.Transport(client)
        self.transports.append(transport)
        transport.add_server_key(self.key)
        interface = _Interface(self)
        try:
            transport.start_server(server=interface)
        except (paramiko.SSHException, EOFError, OSError):
            return
        while transport.is_active():
            channel = transport.accept(1)
            if channel is None:
                continue
            if channel.get_id() in interface.destinations:
                target = self.forward[interface.destinations[channel.get_id()]]
                threading.Thread(target=_pipe, args=(channel, target), daemon=True).start()
            else:
                threading.Thread(target=self._session, args=(channel, interface.commands[channel.get_id()]),
                                 daemon=True).start()

    def _session(self, channel: paramiko.Channel, asked: threading.Event) -> None:
        if not asked.wait(30):
            return
        try:
            self.answer(channel)
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the operator's side went away, as it should for a node that floods or stalls
        finally:
            with contextlib.suppress(Exception):  # the transport may be gone already
                channel.close()

    def stop(self) -> None:
        self.listener.close()
        for transport in self.transports:
            transport.close()


def _pipe(channel: paramiko.Channel, port: int) -> None:
    """One forwarded connection, to the server on `port`, both ways."""
    upstream = socket.create_connection(("127.0.0.1", port))

    def copy(read: Callable[[int], bytes], write: Callable[[bytes], None], done: Callable[[], None]) -> None:
        try:
            while data := read(1 << 15):
                write(data)
        except (OSError, EOFError, paramiko.SSHException):  # either side went away
            pass
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                done()

    threading.Thread(target=copy, args=(upstream.recv, channel.sendall, channel.close), daemon=True).start()
    copy(channel.recv, upstream.sendall, lambda: upstream.close())


class Disconnector:
    """Not a node at all: a server on 127.0.0.1 with no host key, which answers ssh's
    greeting with a disconnect carrying `text` (in clear, before any key exchange)."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        serve(self.listener, self._connection)

    def _connection(self, client: socket.socket) -> None:
        with client:
            client.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
            client.recv(256)  # ssh's own greeting
            payload = bytes([1]) + struct.pack(">I", 11) + _string(self.text) + _string(b"")  # SSH_MSG_DISCONNECT
            padding = 8 - (len(payload) + 5) % 8 + 8
            packet = struct.pack(">IB", len(payload) + padding + 1, padding) + payload + bytes(padding)
            client.sendall(packet)
            threading.Event().wait(1)

    def stop(self) -> None:
        self.listener.close()


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data
