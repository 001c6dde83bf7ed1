"""Boot baked images with qemu-system-aarch64 (TCG) on one virtual LAN, and reach them over SSH.

A Raspberry Pi's firmware reads cmdline.txt from the boot partition at every
boot, and Raspberry Pi OS's first boot edits it and reboots. QEMU's -append is
fixed for the life of the process, so each guest runs under a supervisor: QEMU
runs with -no-reboot, and when the guest reboots, QEMU ends and is started again
with the cmdline.txt now on the image.

Network safety: the LAN between guests is a QEMU multicast socket bound to
127.0.0.1. The master's uplink is a tap device in a network namespace of the
test's own (HomeNetwork), which stands in for the home network: it has a DHCP
server, the test's SSH client and whatever else the tests put there, and no link
to anything else, so the guests reach nothing but each other and that namespace.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shlex
import struct
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boot_partition_offset(image: Path) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True, text=True).stdout)
    return table["partitiontable"]["partitions"][0]["start"] * 512


def read_cmdline(image: Path) -> str:
    """cmdline.txt as the firmware would read it now."""
    out = subprocess.run(["mtype", "-i", f"{image}@@{boot_partition_offset(image)}", "::/cmdline.txt"],
                         check=True, capture_output=True, text=True).stdout
    return out.strip()


def kernel_args(cmdline: str) -> str:
    """A Pi's cmdline.txt, for QEMU's virt machine: its UART, Pi-style NIC names, boot messages shown."""
    args = [a for a in cmdline.split() if not a.startswith("console=") and a != "quiet"]
    return " ".join(args + ["console=ttyAMA0,115200", "net.ifnames=0"])


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


class HomeNetwork:
    """The master's uplink side: a network namespace holding the other end of a tap device.

    The tap is opened once, here, and handed to every QEMU the master's supervisor
    starts (a reboot is a new QEMU), then moved into the namespace, where dnsmasq
    gives the master ADDRESS by DHCP with this side as its router. Commands run
    there with `argv()`.
    """

    HOST = "10.77.0.1"  # this side
    ADDRESS = "10.77.0.2"  # what the master's uplink gets

    def __init__(self, folder: Path) -> None:
        self.name = f"pibake-home-{os.getpid()}-{random.randint(0, 1 << 16)}"
        self.tap = f"pbk{random.randint(0, 1 << 24):x}"
        self.folder = folder
        self.fd = -1
        self.dhcp: subprocess.Popen | None = None
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", self.tap.encode(), IFF_TAP | IFF_NO_PI))
            os.set_inheritable(self.fd, True)
            for command in (["ip", "link", "set", self.tap, "netns", self.name],
                            [*self.argv(), "ip", "addr", "add", f"{self.HOST}/24", "dev", self.tap],
                            [*self.argv(), "ip", "link", "set", self.tap, "up"],
                            [*self.argv(), "ip", "link", "set", "lo", "up"]):
                subprocess.run(command, check=True)
            self.dhcp = subprocess.Popen(
                [*self.argv(), "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--user=root",
                 f"--interface={self.tap}", "--bind-interfaces", f"--dhcp-range={self.ADDRESS},{self.ADDRESS},1h",
                 f"--dhcp-option=option:router,{self.HOST}", f"--dhcp-leasefile={folder / 'home-dhcp.leases'}",
                 "--pid-file=", "--log-dhcp", f"--log-facility={folder / 'home-dhcp.log'}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except BaseException:
            self.close()
            raise

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        if self.dhcp and self.dhcp.poll() is None:
            self.dhcp.terminate()
            self.dhcp.wait(timeout=20)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


@dataclass
class Guest:
    name: str
    image: Path
    kernel: Path
    initrd: Path
    folder: Path
    lan: str  # multicast group:port
    mac: str
    home: HomeNetwork | None = None  # the network the guest's uplink NIC joins (the master's)
    uplink_plugged: bool = True  # False: the next boot has no uplink NIC at all
    memory: str = "768"
    boots: int = 0
    _process: subprocess.Popen | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _power_cut: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def console(self) -> Path:
        return self.folder / f"{self.name}.console.log"

    def command(self) -> list[str]:
        netdevs = ["-netdev", f"socket,id=lan,mcast={self.lan},localaddr=127.0.0.1",
                   "-device", f"virtio-net-pci,netdev=lan,mac={self.mac},romfile="]
        if self.home and self.uplink_plugged:
            netdevs += ["-netdev", f"tap,id=uplink,fd={self.home.fd}", "-device", "virtio-net-pci,netdev=uplink,romfile="]
        return ["qemu-system-aarch64", "-M", "virt", "-accel", "tcg", "-cpu", "cortex-a72", "-smp", "1",
                "-m", self.memory, "-nodefaults", "-display", "none", "-no-reboot",
                "-serial", "stdio",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", kernel_args(read_cmdline(self.image)),
                "-drive", f"file={self.image},format=raw,if=none,id=disk,cache=unsafe",
                "-device", "virtio-blk-pci,drive=disk", *netdevs]

    def start(self) -> None:
        self.console.write_text("")
        self._thread = threading.Thread(target=self._supervise, name=f"qemu-{self.name}", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.is_set():
            command = self.command()
            with open(self.console, "ab") as console:
                console.write(f"\n=== boot {self.boots + 1}: {shlex.join(command)}\n".encode())
                console.flush()
                self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                                 pass_fds=(self.home.fd,) if self.home else ())
                self.boots += 1
                code = self._process.wait()
            if self._power_cut.is_set():
                self._power_cut.clear()
                continue
            if code != 0 and not self._stop.is_set():
                with open(self.console, "ab") as console:
                    console.write(f"\n=== qemu exited with status {code}\n".encode())
                return

    def power_cut(self) -> None:
        """Pull the plug (SIGKILL, nothing flushed), then power on again as a Pi would."""
        self._power_cut.set()
        with open(self.console, "ab") as console:
            console.write(b"\n=== power cut\n")
        if self._process:
            self._process.kill()

    def stop(self) -> None:
        self._stop.set()
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._thread:
            self._thread.join(timeout=30)

    def new_card(self, image: Path) -> None:
        """Power on again with another card in: the guest must have been stopped."""
        assert not self.running
        self.image = image
        self._stop.clear()
        self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tail(self, lines: int = 60) -> str:
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Cluster:
    """Guests on one LAN; stops every QEMU it started, whatever happens."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lan = f"230.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}:{free_port()}"
        self.guests: dict[str, Guest] = {}
        self.home = HomeNetwork(folder)

    def add(self, name: str, image: Path, kernel: Path, initrd: Path, uplink: bool = False) -> Guest:
        """`uplink`: give the guest an uplink NIC on the home network."""
        mac = "52:54:00:%02x:%02x:%02x" % (0x50, len(self.guests), random.randint(0, 255))
        guest = Guest(name, image, kernel, initrd, self.folder, self.lan, mac, self.home if uplink else None)
        self.guests[name] = guest
        return guest

    def start(self) -> None:
        for guest in self.guests.values():
            guest.start()

    def stop(self) -> None:
        for guest in self.guests.values():
            guest.stop()
        self.home.close()

    def report(self) -> str:
        return "\n".join(f"--- {g.name}: last lines of the serial console ({g.console})\n{g.tail()}" for g in self.guests.values())

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Ssh:
    """ssh to the master through its forward, and on to workers through the master, host keys checked.

    Connections are multiplexed: each node's first login stays open for the
    next commands, which saves a key exchange with an emulated CPU per command.
    A connection that dies with its guest (reboot, power cut) is made anew.
    """

    identity: Path
    known_hosts: Path
    user: str
    home: HomeNetwork  # where the ssh client stands: the master's uplink side
    master: str = "master"
    control: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pibake-ssh-")))

    def options(self, alias: str, multiplex: bool = True) -> list[str]:
        shared = ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control}/%C", "-o", "ControlPersist=300"]
        return ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlias={alias}", "-o", "IdentitiesOnly=yes",
                "-o", f"IdentityFile={self.identity}", "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR",
                "-o", "UpdateHostKeys=no", "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3",
                *(shared if multiplex else ["-o", "ControlMaster=no", "-o", "ControlPath=none"])]

    def argv(self, node: str, address: str | None = None, multiplex: bool = True) -> list[str]:
        """The ssh command line for `node`; multiplex=False for a login of its own (an authentication check)."""
        if node == self.master:
            return [*self.home.argv(), "ssh", *self.options(node, multiplex), f"{self.user}@{self.home.ADDRESS}"]
        jump = shlex.join(["ssh", *self.options(self.master), "-W", f"{address}:22", f"{self.user}@{self.home.ADDRESS}"])
        # ssh expands % in a ProxyCommand: the inner ControlPath's %C must reach the inner ssh as it is.
        jump = jump.replace("%", "%%")
        return [*self.home.argv(), "ssh", *self.options(node, multiplex), "-o", f"ProxyCommand={jump}", f"{self.user}@{address}"]

    def close(self) -> None:
        """End every shared connection."""
        for socket_path in self.control.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "unused"], capture_output=True,
                           timeout=30)
        shutil.rmtree(self.control, ignore_errors=True)

    def run(self, node: str, command: str, address: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.argv(node, address), command], capture_output=True, text=True, timeout=timeout)

    def check(self, node: str, command: str, address: str | None = None, timeout: int = 120) -> str:
        done = self.run(node, command, address, timeout)
        if done.returncode != 0:
            raise AssertionError(f"{node}: `{command}` failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def wait(self, node: str, guest: Guest, deadline: float, address: str | None = None) -> None:
        """Wait until `node` answers over SSH; fail early if its QEMU is gone."""
        last = ""
        while time.monotonic() < deadline:
            if not guest.running:
                raise AssertionError(f"{guest.name}: QEMU stopped")
            try:
                done = self.run(node, "true", address, timeout=60)
            except subprocess.TimeoutExpired:
                continue
            if done.returncode == 0:
                return
            last = done.stderr.strip()
            if "Host key verification failed" in last or "REMOTE HOST IDENTIFICATION HAS CHANGED" in last:
                raise AssertionError(f"{node}: {last}")
            time.sleep(5)
        raise AssertionError(f"{node}: no SSH login before the deadline (last error: {last or 'none'})")


def wait_for(predicate, deadline: float, what: str, interval: float = 5) -> None:
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return
        except (AssertionError, subprocess.TimeoutExpired) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")
