"""The `pibake` command line."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from builder import __version__, progress
from builder.build import Options, build, inspect_release, plans_for
from builder.errors import BuildError, ProfileError
from builder.image import prepare_base
from builder.keys import KeyStore
from builder.plan import NodePlan, describe
from builder.profile import Profile, load
from builder.release import named

log = logging.getLogger("builder")

EPILOG = """\b
Examples:
  pibake build master --image 2024-10-22-raspios-bookworm-arm64-lite.img.xz
  pibake build worker --count 5 --image raspios.img
  pibake build worker --first 6 --count 2 --image raspios.img   # add worker6, worker7
  pibake build cluster --image raspios.img
  pibake plan master --release bookworm
"""


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pibake: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    progress.quiet = quiet


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command takes, so they can be typed after the subcommand."""
    options = [
        click.argument("role", type=click.Choice(["master", "worker", "cluster"])),
        click.option("--count", type=click.IntRange(min=1), help="Number of workers (default: all in the profile)."),
        click.option("--first", type=click.IntRange(min=1), default=1, show_default=True, help="Number of the first worker."),
        click.option("--profiles", type=click.Path(path_type=Path), default=Path("profiles"), show_default=True,
                     envvar="PIBAKE_PROFILES", help="Profile file, or folder holding cluster.yaml."),
        click.option("--state", type=click.Path(path_type=Path), envvar="PIBAKE_STATE",
                     help="Where generated keys are kept (default: state/ beside the output folder)."),
        click.option("--force", is_flag=True, help="Bake an image pibake does not recognise as Raspberry Pi OS."),
        click.option("-v", "--verbose", count=True, help="Say more: every step and command."),
        click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load(profiles: Path, role: str, first: int, count: Optional[int]) -> tuple[Profile, tuple]:
    profile = load(profiles)
    if role != "worker" and (count is not None or first != 1):
        raise BuildError("--first and --count apply to 'pibake build worker' only", exit_code=2)
    return profile, profile.select(role, first, count)


def _state(state: Optional[Path], output: Path) -> Path:
    return state if state is not None else output.resolve().parent / "state"


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="pibake")
def cli() -> None:
    """Bake flashable Raspberry Pi OS images for a small cluster.

    One master (DHCP server and NAT gateway over Wi-Fi) and N workers on a wired
    LAN. Each node's image carries its whole configuration: flash, boot, ssh in.
    """


@cli.command("build", epilog=EPILOG)
@common_options
@click.option("--image", type=click.Path(path_type=Path), envvar="PIBAKE_IMAGE",
              help="Base Raspberry Pi OS image (.img or .img.xz).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True)
def build_command(role: str, count: Optional[int], first: int, profiles: Path, state: Optional[Path], force: bool,
                  verbose: int, quiet: bool, image: Optional[Path], output: Path) -> None:
    """Bake images for the master, some workers, or the whole cluster."""
    _setup_logging(verbose, quiet)
    profile, nodes = _load(profiles, role, first, count)
    if image is None:
        raise BuildError("no base image: pass --image PATH to a Raspberry Pi OS .img or .img.xz", exit_code=2)
    built = build(profile, nodes, Options(image, output, _state(state, output), force))
    if not quiet:
        _print_summary(built)


def _print_summary(built: list) -> None:
    rows = [("node", "image", "size", "sha256", "hostname", "address")]
    for b in built:
        node = b.plan.node
        label = "master" if node.role == "master" else f"worker{node.index}"
        rows.append((label, str(b.path), f"{b.size / 2**30:.2f} GiB", b.sha256[:12], node.hostname, str(node.address)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@cli.command(epilog=EPILOG)
@common_options
@click.option("--image", type=click.Path(path_type=Path), envvar="PIBAKE_IMAGE",
              help="Base image whose /etc/os-release chooses the release path.")
@click.option("--release", type=click.Choice(["bullseye", "bookworm", "trixie"]),
              help="Plan for this release without reading an image.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True,
              help="Only locates the state folder.")
def plan(role: str, count: Optional[int], first: int, profiles: Path, state: Optional[Path], force: bool,
         verbose: int, quiet: bool, image: Optional[Path], release: Optional[str], output: Path) -> None:
    """Print every file operation each node would get, touching no image.

    Secrets (private keys, Wi-Fi PSK, password hashes) are shown redacted.
    """
    _setup_logging(verbose, quiet)
    profile, nodes = _load(profiles, role, first, count)
    if release is not None:
        chosen = named(release)
    elif image is not None:
        chosen = inspect_release(prepare_base(image), force)
    else:
        raise BuildError("pass --image PATH (its /etc/os-release picks the release) or --release NAME", exit_code=2)
    for node_plan in plans_for(profile, nodes, chosen, KeyStore(_state(state, output))):
        _print_plan(node_plan)


def _print_plan(node_plan: NodePlan) -> None:
    node = node_plan.node
    click.echo(f"{node.hostname} ({node.role}, {node.address}): release {node_plan.release.codename}, "
               f"because {node_plan.release.reason}")
    for op in node_plan.ops:
        d = describe(op)
        attrs = f"{d.get('mode', ''):>4} {d.get('owner', ''):>9}" if "mode" in d else " " * 14
        click.echo(f"  {d['op']:<7} {d['path']:<58} {attrs}  {d.get('summary', '')}".rstrip())
    click.echo("")


INTERRUPTED = "pibake: interrupted; finished images and earlier outputs are untouched"
_interrupted = False


def _on_sigint(signum: int, frame: object) -> None:
    # Ctrl-C also reaches the appliance's qemu, whose death may surface as a
    # BuildError before Python sees KeyboardInterrupt: remember it was the user.
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        cli.main(standalone_mode=False)
    except ProfileError as e:
        click.echo(f"pibake: the profile has {len(e.problems)} problem(s):", err=True)
        for problem in e.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(e.exit_code)
    except BuildError as e:
        if _interrupted:
            click.echo(INTERRUPTED, err=True)
            sys.exit(130)
        click.echo(f"pibake: error: {e}", err=True)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        click.echo(f"pibake: error: {e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}", err=True)
        sys.exit(1)

