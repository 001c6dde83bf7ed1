"""How a refusal is checked: a non-zero exit, one line per problem that says where, no
traceback, and nothing written or changed; the CLI run in this process, or as its own
process under a memory limit for what could exhaust memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from conftest import WIFI_PASSPHRASE, Result, pibake_here

MEMORY = 1 << 30  # address space allowed to pibake in these tests
def run_limited(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    full_env = {**os.environ, "PIBAKE_WIFI_PASSPHRASE": WIFI_PASSPHRASE, "PIBAKE_DOWNLOAD_BASE": "http://127.0.0.1:9",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=workdir, env=full_env, preexec_fn=limit,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def assert_refused(workdir: Path, result: subprocess.CompletedProcess, where: str, *words: str) -> None:
    assert result.returncode not in (0, None) and result.returncode > 0, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, result.stderr[-3000:]
    problems = [line.strip() for line in result.stderr.splitlines()[1:]] if "problem(s):" in result.stderr else \
        [line.removeprefix("pibake: error: ") for line in result.stderr.splitlines()]
    found = [p for p in problems if p.startswith(where) and all(w in p for w in words)]
    assert found, result.stderr[-3000:]
    assert all(len(line) < 400 for line in result.stderr.splitlines()), "an error line echoes too much"
    assert not (workdir / "output").exists() and not (workdir / "state").exists()


def plan(workdir: Path, limited: bool = False, **env: str) -> subprocess.CompletedProcess:
    """`pibake plan cluster` on workdir's profile: in this process, or `limited`, as its own
    process under the memory limit (for what could exhaust memory)."""
    args = ("plan", "cluster", "--release", "bookworm", "--profiles", "cluster.yaml")
    return run_limited(workdir, *args, env=env) if limited else pibake_here(*args, cwd=workdir, env=env)


# An earlier build's outputs, which a failed build must leave as they were.
PREVIOUS = {"master.img": b"the master image from last week", "manifest.json": b'{"nodes": {}}\n', "SHA256SUMS": b""}


def assert_clean_failure(result: Result, project: Path, message: str) -> None:
    assert result.code not in (0, None), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("pibake: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    output = project / "output"
    assert {p.name: p.read_bytes() for p in output.iterdir()} == PREVIOUS
