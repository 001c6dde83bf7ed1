"""Shared test helpers: the real CLI in a subprocess, profiles, operator keys."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

import apt_repo
from mirror import Mirror

REPO = Path(__file__).resolve().parent.parent
WIFI_PASSPHRASE = "correct horse battery staple"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    args: tuple[str, ...] = ()

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_pibake(*args: str, cwd: Path, env: dict[str, str | None] | None = None, timeout: int = 900,
               within: tuple[str, ...] = ()) -> Result:
    """Run the real `pibake` command line, as a user would; `within`: a command that runs it (`ip netns exec NS`)."""
    # Nothing may leave loopback: unless a test serves its own mirror, downloads
    # go to a closed local port (the discard port) and fail at once.
    full_env = {**os.environ, "PIBAKE_WIFI_PASSPHRASE": WIFI_PASSPHRASE,
                "PIBAKE_DOWNLOAD_BASE": "http://127.0.0.1:9", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None unsets
    full_env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.Popen([*within, sys.executable, "-m", "builder", *args], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGABRT makes the faulthandler print every thread's stack: where it hung.
        proc.send_signal(signal.SIGABRT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"pibake {' '.join(args)} still running after {timeout} s\n{stdout}{stderr}", pytrace=False)
    return Result(proc.returncode, stdout, stderr, args)


def secrets_of(user: str, password: str) -> list[str]:
    """Every form a URL's login (percent-encoded, as it stands in the URL) could take in a file or a message."""
    decoded = f"{unquote(user)}:{unquote(password)}"
    return sorted({user, unquote(user), password, unquote(password), base64.b64encode(decoded.encode()).decode()})


def assert_said_nowhere(secrets: list[str], results: list[Result], folders: list[Path]) -> int:
    """None of `secrets` in any output of `results` or in any file under `folders`; returns how many places were read."""
    places = {f"pibake {' '.join(r.args)} ({stream})": getattr(r, stream).encode()
              for r in results for stream in ("stdout", "stderr")}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                places[str(path)] = path.read_bytes()
    for secret in secrets:
        for name, content in places.items():
            assert secret.encode() not in content, f"{secret!r} is in {name}"
    return len(places)


def pibake_here(*args: str, cwd: Path, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """The real command line (builder.cli.main), run in this process: for the many profile
    and plan cases, where starting Python for each would be most of their time. Its exit
    status, stdout and stderr, as run_pibake gives them."""
    from builder import cli

    full_env = {"PIBAKE_WIFI_PASSPHRASE": WIFI_PASSPHRASE, "PIBAKE_DOWNLOAD_BASE": "http://127.0.0.1:9", **(env or {})}
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    out, err = io.StringIO(), io.StringIO()
    code: int = 0
    try:
        for name, value in full_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        os.chdir(cwd)
        sys.argv = ["pibake", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        signal.signal(signal.SIGINT, signal.default_int_handler)  # main() sets its own
    return subprocess.CompletedProcess(["pibake", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session", autouse=True)
def apt_archive():
    """The test images' apt source, deb.debian.org, answered by a signed stand-in archive on loopback."""
    server = Mirror(apt_repo.shared())
    old = os.environ.get("PIBAKE_APT_MIRRORS")
    os.environ["PIBAKE_APT_MIRRORS"] = f"http://deb.debian.org/debian={server.base}/debian"
    yield server
    server.stop()
    if old is None:
        del os.environ["PIBAKE_APT_MIRRORS"]
    else:
        os.environ["PIBAKE_APT_MIRRORS"] = old


@pytest.fixture(scope="session")
def operator_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An operator's SSH key pair, made with the real ssh-keygen; returns the .pub path."""
    folder = tmp_path_factory.mktemp("operator")
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator@laptop", "-f", str(key)], check=True)
    return key.with_name("id_ed25519.pub")


@pytest.fixture
def loops(tmp_path: Path):
    """Loop devices over sparse files the test made (flash_devices.Loops), detached when it ends."""
    from flash_devices import Loops
    made = Loops(tmp_path)
    yield made
    made.close()


def write_profile(folder: Path, body: str, name: str = "cluster.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A user's project folder: cwd for the CLI, output/ and state/ land here."""
    return tmp_path
