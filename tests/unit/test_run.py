"""Tier 1: external programs run one way: logged as `$ command`, failures explained in one line."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from builder import run
from builder.errors import BuildError
from builder.packages import _installed_size


def test_a_command_is_logged_at_debug_as_it_can_be_pasted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="builder.run"):
        done = run.run(["printf", "%s", "two words"])
    assert done.stdout == b"two words"
    assert [r.getMessage() for r in caplog.records] == ["$ printf %s 'two words'"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_a_failure_names_the_step_and_ends_with_the_programs_own_words() -> None:
    with pytest.raises(run.CommandError) as raised:
        run.run(["sh", "-c", "echo noise; echo first >&2; echo second >&2; echo last >&2; exit 3"], what="cannot frob x")
    assert str(raised.value) == "cannot frob x: second; last"
    assert raised.value.returncode == 3 and isinstance(raised.value, BuildError)
    silent = run.run(["sh", "-c", "exit 4"], check=False)
    assert silent.returncode == 4
    with pytest.raises(run.CommandError, match=r"^sh failed: exit status 4$"):
        run.run(["sh", "-c", "exit 4"])


def test_a_missing_program_says_which_package_brings_it() -> None:
    with pytest.raises(run.CommandError, match=r"^pibake-no-such-tool is not installed: install the pibake-no-such-tool "
                                               r"package \(see README\)$"):
        run.run(["pibake-no-such-tool"])


def test_a_program_never_waits_on_a_terminal() -> None:
    # stdin is closed: `read` gets end of file at once instead of blocking.
    assert run.run(["sh", "-c", "read line; echo $?"]).stdout.strip() == b"1"


def test_a_stream_that_fails_at_the_end_raises_after_its_output() -> None:
    with pytest.raises(run.CommandError, match="cannot decompress x: broken"):
        with run.stream(["sh", "-c", "echo data; echo broken >&2; exit 1"], what="cannot decompress x") as out:
            assert out.read() == b"data\n"


def _deb(folder: Path, control: str) -> Path:
    root = folder / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(control)
    (root / "usr/share/doc").mkdir(parents=True)
    (root / "usr/share/doc/readme").write_bytes(b"x" * 5000)
    deb = folder / "pkg.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


CONTROL = "Package: pkg\nVersion: 1.0\nArchitecture: arm64\nMaintainer: t <t@example.invalid>\nDescription: t\n"


def test_installed_size_is_read_or_fails_loudly(tmp_path: Path) -> None:
    sized = _deb(tmp_path / "a", CONTROL + "Installed-Size: 123\n")
    assert _installed_size(sized) == 123 * 1024
    unsized = _deb(tmp_path / "b", CONTROL)
    assert _installed_size(unsized) == 4 * unsized.stat().st_size
    broken = tmp_path / "broken.deb"
    broken.write_bytes(b"!<arch>\nnot really a package")
    with pytest.raises(BuildError, match=r"^cannot read the installed size of broken.deb: dpkg-deb"):
        _installed_size(broken)
    odd = _deb(tmp_path / "c", CONTROL + "Installed-Size: lots\n")
    with pytest.raises(BuildError, match="Installed-Size is 'lots'"):
        _installed_size(odd)
