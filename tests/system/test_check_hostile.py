"""Tier 1: `pibake check` against nodes that lie, flood, stall and send escape sequences.

Each node is a real SSH server on 127.0.0.1 (tests/hostile_node.py) with the node's own
host key, reached by the real `ssh` through the real output/ssh_config (the workers
through the master, which forwards to them); the real CLI prints the table. Whatever a
node sends, the operator's terminal gets one row per node, with nothing it would act
on, within the memory and the time allowed.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from builder.keys import KeyStore
from builder.outputs import write_ssh_files
from builder.profile import load
from conftest import write_profile
from hostile_node import Answer, Disconnector, Node, flood, honest, say, silent

MEMORY = 1 << 30  # address space allowed to pibake check
MASTER_FACTS = ("dnsmasq: active\nmdns: active\nnat: on\nfirewall-v4: loaded\nworkers-out: open\nfirewall-v6: loaded\n"
                "forwarding: 1\nuplink-address: 10.0.2.15/24\n")
LEASES = "lease: 1 aa 192.168.5.101 worker1 *\nlease: 1 bb 192.168.5.102 worker2 *\n"
# Anything but printable text and line ends: escape sequences, carriage returns, backspaces, C1.
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class Cluster:
    """A master and two workers as SSH servers, and the operator's output folder for them."""

    def __init__(self, workdir: Path, operator_key: Path, answers: dict[str, Answer],
                 keys_served: Optional[dict[str, bytes]] = None) -> None:
        self.workdir = workdir
        state = KeyStore(workdir / "state")
        authorized = operator_key.read_text()
        served = {name: (keys_served or {}).get(name) or state.host_key(name).private
                  for name in ("master", "worker1", "worker2")}
        self.workers = {name: Node(served[name], authorized, answers[name]) for name in ("worker1", "worker2")}
        forward = {("192.168.5.101", 22): self.workers["worker1"].port, ("192.168.5.102", 22): self.workers["worker2"].port}
        self.master = Node(served["master"], authorized, answers["master"], forward=forward)
        (workdir / "profiles").mkdir(exist_ok=True)
        write_profile(workdir / "profiles", f"user:\n  ssh_keys: [{operator_key}]\nmaster:\n  uplink:\n"
                                            f"    address: 127.0.0.1\n    port: {self.master.port}\nworkers:\n  count: 2\n")
        (workdir / "output").mkdir(exist_ok=True)
        write_ssh_files(workdir / "output", load(workdir / "profiles"), state)

    def check(self, timeout: int = 20) -> tuple[subprocess.CompletedProcess, float, int]:
        """`pibake check` under a memory limit: its result, seconds taken and peak RSS (KiB)."""
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "builder", "check", "--timeout", str(timeout)], cwd=self.workdir,
                              capture_output=True, preexec_fn=limit, timeout=timeout * 3 + 60,
                              env={**os.environ, "HOME": str(self.workdir)})  # no ~/.ssh of the machine's
        taken = time.monotonic() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return done, taken, peak if peak > before else 0

    def stop(self) -> None:
        for node in (self.master, *self.workers.values()):
            node.stop()


@pytest.fixture
def cluster(workdir: Path, operator_key: Path):
    made: list[Cluster] = []

    def make(**answers: Answer) -> Cluster:
        made.append(Cluster(workdir, operator_key, {**HONEST, **answers}))
        return made[-1]

    yield make
    for c in made:
        c.stop()


HONEST = {"master": honest("master", "192.168.5.1", MASTER_FACTS + LEASES),
          "worker1": honest("worker1", "192.168.5.101"), "worker2": honest("worker2", "192.168.5.102")}


def terminal_safe(done: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """stdout's and stderr's lines, after checking that neither holds anything a terminal acts on."""
    out, err = done.stdout.decode("utf-8"), done.stderr.decode("utf-8")  # pibake's own output is always UTF-8
    for text in (out, err):
        assert not UNSAFE.search(text), ascii(UNSAFE.search(text)[0])  # type: ignore[index]
        assert "Traceback" not in text, text
    table = out.splitlines()
    assert table[0].split()[:2] == ["node", "reach"]
    assert [row.split()[0] for row in table[1:4]] == ["master", "worker1", "worker2"], table  # one row each, in order
    return table, err.splitlines()


def test_an_honest_cluster_holds(cluster) -> None:
    done, _, _ = cluster().check()
    table, errors = terminal_safe(done)
    assert done.returncode == 0 and table[-1] == "pibake: all 3 nodes hold", (table, errors)


ESCAPES = (b"\x1b]0;owned\x07"  # the terminal's title
           b"\x1b]52;c;ZWNobyBvd25lZA==\x07"  # its clipboard
           b"\rmaster  ok    ok  \x1b[2K\x1b[1A"  # back to the line start, erase, up a line: another row
           b"\x08\x08\x08\x9b31m\xe2\x80\xae")  # backspaces, a C1 CSI, a right-to-left override


def test_escape_sequences_from_a_node_never_reach_the_terminal(cluster) -> None:
    hostile = say(b"hostname: " + ESCAPES + b"worker1\n" + b"system: running\n"
                  b"first-boot: done " + ESCAPES + b"\naddress: 192.168.5.101/24\n", stderr=ESCAPES, runs_probe=True)
    done, _, _ = cluster(worker1=hostile).check()
    table, errors = terminal_safe(done)
    assert done.returncode == 1
    assert [line.split()[1:3] for line in table[1:4]] == [["ok", "ok"]] * 3  # no row taken over
    said = [line for line in errors if line.startswith("pibake: worker1: it calls itself")]
    assert len(said) == 1 and "\\x1b]0;owned\\x07" in said[0] and "\\r" in said[0], errors
    assert not any(line.startswith(("pibake: master", "pibake: worker2")) for line in errors), errors


def test_a_node_cannot_speak_for_ssh(cluster) -> None:
    """ssh's own verdict is read from its log, never from what the node prints."""
    liar = say(stderr=b"Host key verification failed.\r\n@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\n",
               status=255)
    done, _, _ = cluster(worker1=liar).check()
    table, errors = terminal_safe(done)
    assert table[2].split()[:3] == ["worker1", "ok", "ok"], table  # reached, with the host key pibake baked
    said = [line for line in errors if line.startswith("pibake: worker1: ")]
    assert said and said[0].startswith("pibake: worker1: the probe did not run there (ssh exit 255; the node said: "), said


def test_a_host_key_that_is_not_the_baked_one_is_told_by_ssh(workdir: Path, operator_key: Path) -> None:
    impostor = KeyStore(workdir / "other-state").host_key("worker2").private
    c = Cluster(workdir, operator_key, HONEST, keys_served={"worker2": impostor})
    try:
        done, _, _ = c.check()
    finally:
        c.stop()
    table, errors = terminal_safe(done)
    assert table[3].split()[:3] == ["worker2", "no", "WRONG"], table
    assert "pibake: worker2: its host key is not the one pibake baked: Host key verification failed. (through master)" \
        in errors, errors


def test_a_node_that_floods_is_one_line_and_bounded_memory(cluster) -> None:
    done, taken, peak = cluster(master=flood).check()
    table, errors = terminal_safe(done)
    flooded = [line for line in errors if line.startswith("pibake: master: ")]
    assert flooded[0] == "pibake: master: it sent more than 64 KiB in answer to the probe; the rest was not read", errors
    assert all(len(line) < 500 for line in table + errors)
    assert taken < 30 and peak < 200 << 10, (taken, peak)


def test_a_node_that_stalls_is_given_up_in_time(cluster) -> None:
    done, taken, _ = cluster(worker2=silent).check(timeout=5)
    table, errors = terminal_safe(done)
    assert "pibake: worker2: it did not finish the probe within 5 s" in errors, errors
    assert table[1].split()[:3] == ["master", "ok", "ok"] and taken < 20, (table, taken)


def test_bytes_that_are_not_utf8_are_shown_escaped(cluster) -> None:
    odd = say(b"hostname: w\xff\xfe\xc3(1\nsystem: running\nfirst-boot: done\n"
              b"address: 192.168.5.101/24\n\xff\xff: \xff\n", runs_probe=True)
    done, _, _ = cluster(worker1=odd).check()
    _, errors = terminal_safe(done)
    assert "pibake: worker1: it calls itself 'w\\\\xff\\\\xfe\\\\xc3(1'" in errors, errors


def test_the_fabfile_shows_a_node_s_lines_escaped(cluster, workdir: Path) -> None:
    cluster(worker1=say(b"up 3 days\r" + ESCAPES + b"\nmaster: fine\n", stderr=ESCAPES))
    fab = Path(sys.executable).with_name("fab")
    done = subprocess.run([fab, "-r", str(workdir / "output"), "on", "--cmd", "uptime"], capture_output=True, timeout=120,
                          env={**os.environ, "HOME": str(workdir)})
    out = done.stdout.decode()
    assert done.returncode == 0 and not UNSAFE.search(out), out
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("worker1")] == ["worker1"] * 3, lines
    assert "worker1: up 3 days\\r\\x1b]0;owned\\x07" in out


@pytest.mark.parametrize("words, wrong", [(b'Authenticated to master ([127.0.0.1]:22) using "publickey".', "-"),
                                          (b"Host key verification failed.", "-"),
                                          (b"@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @", "-")])
def test_a_server_without_the_key_cannot_put_words_in_ssh_s_log(workdir: Path, operator_key: Path, words: bytes,
                                                                 wrong: str) -> None:
    """ssh logs the text of a disconnect as it came, line breaks and all: what follows is not ssh's."""
    c = Cluster(workdir, operator_key, HONEST)
    impostor = Disconnector(b"bye\n" + words + b"\n" + words)
    try:
        profile = workdir / "profiles/cluster.yaml"
        profile.write_text(profile.read_text().replace(f"port: {c.master.port}", f"port: {impostor.port}"))
        write_ssh_files(workdir / "output", load(workdir / "profiles"), KeyStore(workdir / "state"))
        done, _, _ = c.check()
    finally:
        c.stop()
        impostor.stop()
    table, errors = terminal_safe(done)
    assert table[1].split()[:3] == ["master", "no", wrong], table
    said = next(line for line in errors if line.startswith("pibake: master: "))
    assert said.startswith("pibake: master: unreachable: Received disconnect from 127.0.0.1 port "), said


def test_a_node_that_prints_the_probe_s_first_line_without_running_it_is_not_believed(cluster) -> None:
    forger = say(b"pibake-probe: begin\nhostname: worker1\nsystem: running\nfirst-boot: done\n"
                 b"address: 192.168.5.101/24\n")
    done, _, _ = cluster(worker1=forger).check()
    _, errors = terminal_safe(done)
    assert "pibake: worker1: the probe did not run there (ssh exit 0)" in errors, errors
