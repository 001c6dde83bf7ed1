"""The `pibake` command line."""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import click

from builder import __version__, environment, formats, progress, urls
from builder.build import Options, build, inspect_release, plans_for
from builder.errors import BuildError, InputError, ProfileError
from builder.keys import KeyStore
from builder.outputs import check_operator_files, read_manifest
from builder.plan import NodePlan, describe
from builder import cache
from builder.cache import Choice, obtain
from builder.catalog import Source, is_url, looks_like_file
from builder.check import COLUMNS, DEFAULT_TIMEOUT, probe_all, verdicts
from builder.download import session
from builder.profile import ImageSettings, Profile, load, load_image_settings
from builder.release import NAMES, named

if TYPE_CHECKING:
    from builder.flash import Batch  # imported where it runs: only pibake flash needs it

log = logging.getLogger("builder")

EPILOG = """\b
Examples:
  pibake build master                          # newest Raspberry Pi OS Lite, fetched and verified
  pibake build worker --count 5
  pibake build worker --first 6 --count 2      # add worker6 and worker7
  pibake build cluster --image bookworm        # or trixie, 2025-05-13, a URL, a local .img.xz
  pibake plan master --release bookworm
  pibake images                                # what the OS list offers
"""


def _safe(text: str) -> str:
    """What pibake prints: the credentials in its URLs hidden, and nothing a terminal acts on
    (a node's, a server's or a file's text may hold escape sequences)."""
    return formats.shown(urls.shown(text))


class _Shown(logging.Formatter):
    """Every log line as _safe() shows it."""

    def format(self, record: logging.LogRecord) -> str:
        return _safe(super().format(record))


def _echo(text: str = "") -> None:
    click.echo(_safe(text))


def _error(text: str) -> None:
    """An error line for the user."""
    click.echo(_safe(text), err=True)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Shown("pibake: %(message)s"))
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


def image_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--image", "image_spec", envvar="PIBAKE_IMAGE", metavar="SPEC",
                     help=f"Base image: latest, {'|'.join(NAMES)}, a date (2025-05-13), family@date, "
                          "a URL, or a local .img/.img.xz/.zip (default: the profile's image section, else latest)."),
        click.option("--sha256", help="Expected sha256 of the file at an --image URL."),
        click.option("--no-verify-signature", is_flag=True, help="Skip the OpenPGP signature check (not recommended)."),
        click.option("--refresh", is_flag=True, help="Ask the OS list again even if a recent answer is cached."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _choice(settings: ImageSettings, image_spec: Optional[str], sha256: Optional[str], no_verify: bool, refresh: bool) -> Choice:
    spec = image_spec or settings.spec
    problem = urls.problem(spec) if image_spec and is_url(image_spec) else None
    if problem:
        raise InputError(f"--image: {problem}")
    environment.check_urls()
    return Choice(spec=spec, sha256=(sha256 or (settings.sha256 if not image_spec else None)),
                  source=Source.from_settings(settings.download_base, settings.os_list),
                  verify_signature=settings.verify_signature and not no_verify, refresh=refresh)


def _load(profiles: Path, role: str, first: int, count: Optional[int]) -> tuple[Profile, tuple]:
    profile = load(profiles)
    if role != "worker" and (count is not None or first != 1):
        raise InputError("--first and --count apply to 'pibake build worker' only")
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
@image_options
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True)
def build_command(role: str, count: Optional[int], first: int, profiles: Path, state: Optional[Path], force: bool,
                  verbose: int, quiet: bool, image_spec: Optional[str], sha256: Optional[str], no_verify_signature: bool,
                  refresh: bool, output: Path) -> None:
    """Bake images for the master, some workers, or the whole cluster.

    The base image is fetched, verified and cached first when needed.
    """
    _setup_logging(verbose, quiet)
    profile, nodes = _load(profiles, role, first, count)
    check_operator_files(output, profile, KeyStore(_state(state, output)))  # before anything is fetched or baked
    base = obtain(_choice(profile.image, image_spec, sha256, no_verify_signature, refresh))
    built = build(profile, nodes, Options(base, output, _state(state, output), cache.layout(), force))
    if not quiet:
        _print_summary(built)


def _print_summary(built: list) -> None:
    rows = [("node", "image", "size", "sha256", "hostname", "address", "build")]
    for b in built:
        node = b.plan.node
        label = "master" if node.role == "master" else f"worker{node.index}"
        rows.append((label, str(b.path), f"{b.size / 2**30:.2f} GiB", b.sha256[:12], node.hostname, str(node.address),
                     "unchanged" if b.skipped else "baked"))
    _echo_table(rows)


def _echo_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows of cells (the first one the header) in aligned columns."""
    rows = [[_safe(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        _echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@cli.command(epilog=EPILOG)
@common_options
@image_options
@click.option("--release", type=click.Choice(NAMES),
              help="Plan for this release without reading an image.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True,
              help="Only locates the state folder.")
def plan(role: str, count: Optional[int], first: int, profiles: Path, state: Optional[Path], force: bool,
         verbose: int, quiet: bool, image_spec: Optional[str], sha256: Optional[str], no_verify_signature: bool,
         refresh: bool, release: Optional[str], output: Path) -> None:
    """Print every file operation each node would get, touching no image.

    The release path comes from the base image's /etc/os-release (fetched if
    needed), or from --release. Secrets are shown redacted.
    """
    _setup_logging(verbose, quiet)
    profile, nodes = _load(profiles, role, first, count)
    if release is not None:
        chosen = named(release)
    else:
        base = obtain(_choice(profile.image, image_spec, sha256, no_verify_signature, refresh))
        chosen = inspect_release(base.path, force)
    if chosen.caveat:
        log.warning("warning: %s", chosen.caveat)
    for node_plan in plans_for(profile, nodes, chosen, KeyStore(_state(state, output))):
        _print_plan(node_plan)


@cli.command(epilog=EPILOG)
@click.option("--profiles", type=click.Path(path_type=Path), default=Path("profiles"), show_default=True,
              envvar="PIBAKE_PROFILES", help="Profile file, or folder holding cluster.yaml.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True,
              help="Where the build left ssh_config and known_hosts.")
@click.option("--timeout", type=click.IntRange(min=1, max=3600), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds to wait for each node (a worker through the master).")
@click.option("-v", "--verbose", count=True, help="Say more.")
def check(profiles: Path, output: Path, timeout: int, verbose: int) -> None:
    """Log in to every node through output/ssh_config and say whether it holds.

    One row per node: reached, host key as baked, first boot done (and how long it
    took), address and DHCP lease as reserved, and on the master dnsmasq, mDNS, the
    firewall (IPv4 and IPv6), NAT and the uplink's address. Exit 0 only if every
    node holds.
    """
    _setup_logging(verbose, False)
    profile = load(profiles)
    ssh_config = output / "ssh_config"
    if not ssh_config.is_file():
        raise InputError(f"{ssh_config} does not exist: build the cluster first (pibake build cluster)")
    rows = verdicts(profile, probe_all(profile, profile.nodes, ssh_config, timeout))
    _echo_table([COLUMNS, *([row.cells[c] for c in COLUMNS] for row in rows)])
    wrong = [(row.node, problem) for row in rows for problem in row.problems]
    for node, problem in wrong:
        _error(f"pibake: {node}: {problem}")
    if wrong:
        raise SystemExit(1)
    _echo(f"pibake: all {len(rows)} nodes hold")


@cli.command("flash")
@click.argument("args", nargs=-1, metavar="NODE DEVICE | --all DEVICE... | --list")
@click.option("--all", "all_nodes", is_flag=True, help="Flash the nodes in order (master first) onto the devices given.")
@click.option("--list", "list_disks", is_flag=True, help="List the disks, and whether each can be flashed.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before overwriting (for scripts).")
@click.option("--force", is_flag=True, help="Allow a disk that is not removable (not USB or an SD slot).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True,
              help="Where the build left the images.")
@click.option("-v", "--verbose", count=True, help="Say more.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
def flash_command(args: tuple[str, ...], all_nodes: bool, list_disks: bool, yes: bool, force: bool, output: Path,
                  verbose: int, quiet: bool) -> None:
    """Write node images to SD cards: only their used blocks, read back and checked.

    \b
      pibake flash --list                      # the disks, and which can be flashed
      pibake flash worker3 /dev/sdb            # one card
      pibake flash --all /dev/sdb /dev/sdc     # master, worker1, ... onto these, at once

    It refuses the disk holding /, any disk with a mounted or held file system, a
    disk smaller than the image, and one that is not removable unless --force. It
    shows what it will overwrite and asks first (--yes for scripts). A card that
    holds an earlier build gets only the blocks that differ.
    """
    from builder import flash  # here: only this command needs it

    _setup_logging(verbose, quiet)
    if list_disks:
        if args or all_nodes:
            raise InputError("--list takes no node or device")
        root = flash.root_numbers()
        rows = [("device", "size", "transport", "removable", "model", "flash")]
        for disk in flash.disks(flash.lsblk()):
            why = flash.refusal(disk, None, False, root)
            rows.append((disk.path, f"{disk.size / 2**30:.1f} GiB", disk.transport or "-", "yes" if disk.removable else "no",
                         disk.model or "-", "yes" if why is None else f"no: {why}"))
        _echo_table(rows)
        return
    if (output / "manifest.json").exists() and not os.access(output / "manifest.json", os.R_OK):
        raise BuildError(f"cannot read {output / 'manifest.json'}: permission denied; run pibake flash with sudo")
    manifest = read_manifest(output)
    if all_nodes:
        nodes = [e["hostname"] for e in flash.nodes_in_order(manifest)]
        if not args:
            raise InputError("--all needs the devices to write, one per node in order: " + " ".join(nodes))
        if len(args) > len(nodes):
            raise InputError(f"{len(args)} devices for {len(nodes)} node(s) ({' '.join(nodes)})")
        pairs = list(zip(nodes, args))
        if len(args) < len(nodes):
            log.info("flashing %s; not this time: %s", " ".join(nodes[: len(args)]), " ".join(nodes[len(args):]))
    else:
        if len(args) != 2:
            raise InputError("give a node and a device (pibake flash worker3 /dev/sdb), --all and devices, or --list")
        pairs = [(args[0], args[1])]
    with flash.prepare(output, manifest, pairs, force, flash.cache_roots(cache.root())) as batch:
        _flash(batch, yes)


def _flash(batch: Batch, yes: bool) -> None:
    """Ask, check every device again, write them all; each device is held open since it was checked."""
    from builder import flash

    jobs = batch.jobs
    for job in jobs:
        on_it = ", ".join(job.device.contents) or "no partitions"
        _echo(f"{job.node} ({job.image.name}, {job.bmap.mapped_bytes / 2**30:.2f} GiB to write of "
                   f"{job.bmap.image_size / 2**30:.2f}) -> {job.device.describe()}; on it now: {on_it}")
    if not yes:
        if not sys.stdin.isatty():
            raise InputError("flash overwrites whole disks and asks first: not on a terminal, pass --yes to go on")
        try:
            go = click.confirm(f"Overwrite {'this disk' if len(jobs) == 1 else f'these {len(jobs)} disks'}? "
                               "Everything on it is lost")
        except (click.exceptions.Abort, KeyboardInterrupt):
            go = None
        if not go:
            _error("pibake: not flashed: nothing was written")
            raise SystemExit(130 if go is None else 1)
    batch.recheck()  # what was shown and agreed to is what is written
    bars = [progress.bar(total=job.bmap.mapped_bytes, unit="B", unit_scale=True, desc=f"{job.node} -> {job.device.path}",
                         position=i) for i, job in enumerate(jobs)]
    stop = threading.Event()
    try:
        outcomes = flash.write_cards(jobs, stop, [b.update for b in bars])
    except KeyboardInterrupt:
        for b in bars:
            b.close()
        for job in jobs:
            _error(f"pibake: {flash.explain(job, flash.Interrupted())}")
        raise SystemExit(130) from None
    for b in bars:
        b.close()
    failed = 0
    for job, outcome in zip(jobs, outcomes):
        if isinstance(outcome, flash.Result):
            _echo(f"pibake: {_flashed(outcome)}")
        else:
            failed += 1
            _error(f"pibake: {flash.explain(job, outcome)}")
    if failed:
        raise SystemExit(1)


def _flashed(result: Any) -> str:  # a flash.Result
    job = result.job
    held = result.previous or {}
    if result.mode == "changed":
        what = (f"it held {held.get('node', '?')} ({str(held.get('image_sha256', '?'))[:12]}): wrote the "
                f"{result.written / 2**20:.1f} MiB that differed, of {result.compared / 2**30:.2f} GiB compared")
    else:
        what = f"wrote {result.written / 2**30:.2f} GiB"
    return (f"{job.node} on {job.device.path}: {what}; read back {result.verified / 2**20:.1f} MiB and verified; "
            "the card can be removed")


@cli.command()
@image_options
@click.option("--profiles", type=click.Path(path_type=Path), default=Path("profiles"), show_default=True,
              envvar="PIBAKE_PROFILES", help="Profile file, or folder holding cluster.yaml (its image section).")
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
def fetch(image_spec: Optional[str], sha256: Optional[str], no_verify_signature: bool, refresh: bool, profiles: Path,
          verbose: int, quiet: bool) -> None:
    """Download, verify, decompress and cache the base image; print its path."""
    _setup_logging(verbose, quiet)
    base = obtain(_choice(load_image_settings(profiles), image_spec, sha256, no_verify_signature, refresh))
    _echo(f"{base.path}  sha256 {base.sha256 or '(local file, not hashed)'}  from {base.origin}")


@cli.command()
@click.option("--image", "image_spec", envvar="PIBAKE_IMAGE", metavar="SPEC", help="Mark the image this spec resolves to.")
@click.option("--profiles", type=click.Path(path_type=Path), default=Path("profiles"), show_default=True,
              envvar="PIBAKE_PROFILES")
def images(image_spec: Optional[str], profiles: Path) -> None:
    """List the Raspberry Pi OS Lite (64-bit) images the OS list offers."""
    _setup_logging(0, False)
    choice = _choice(load_image_settings(profiles), image_spec, None, False, True)
    http = session()
    offered = cache.offered(choice, http)
    chosen = None if is_url(choice.spec) or looks_like_file(choice.spec) else cache.pick(choice, offered, http)
    for spec in offered:
        mark = "*" if chosen is not None and spec.url == chosen.url else " "
        size = f"{spec.download_size / 2**20:.0f} MiB" if spec.download_size else "?"
        _echo(f"{mark} {spec.release_date}  {spec.codename:<9} {size:>9}  {spec.name}  {urls.shown(spec.url)}")
    if chosen is not None and all(spec.url != chosen.url for spec in offered):
        _echo(f"* {chosen.release_date}  {chosen.codename:<9} {'':>9}  (archived)  {urls.shown(chosen.url)}")


@cli.group("cache")
def cache_group() -> None:
    """Inspect or empty the image cache ($XDG_CACHE_HOME/pibake)."""


@cache_group.command("list")
def cache_list() -> None:
    """List cached downloads and decompressed images."""
    for path, size, label in cache.entries():
        _echo(f"{size / 2**20:9.1f} MiB  {path}  {label}")  # _echo hides credentials older pibakes' records kept


@cache_group.command("clean")
def cache_clean() -> None:
    """Remove every cached image, download and key."""
    _echo(f"removed {cache.clean() / 2**20:.1f} MiB from {cache.root()}")


def _print_plan(node_plan: NodePlan) -> None:
    node = node_plan.node
    _echo(f"{node.hostname} ({node.role}, {node.address}): release {node_plan.release.codename}, "
               f"because {node_plan.release.reason}; first boot: {node_plan.release.first_boot}")
    for op in node_plan.ops:
        d = describe(op)
        attrs = f"{d.get('mode', ''):>4} {d.get('owner', ''):>9}" if "mode" in d else " " * 14
        source = f"from {d['source']}: " if "source" in d else ""
        allows = f" (allows: {d['allows']})" if "allows" in d else ""
        _echo(f"  {d['op']:<7} {d['path']:<58} {attrs}  {source}{d.get('summary', '')}{allows}".rstrip())
        for line in d["content"].rstrip("\n").split("\n") if "content" in d else ():  # an entry allowed to break a promise
            _echo(f"      | {line}")
    _echo("")


INTERRUPTED = "pibake: interrupted; finished images and earlier outputs are untouched"
_interrupted = False


def _on_sigint(signum: int, frame: object) -> None:
    # Ctrl-C also reaches the appliance's qemu, whose death may surface as a
    # BuildError before Python sees KeyboardInterrupt: remember it was the user.
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def exit_status(error: BuildError) -> int:
    """The one place an exit status is chosen: 2 for what the user gave, 1 for the rest."""
    return 2 if isinstance(error, InputError) else 1


def main() -> None:
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        cli.main(standalone_mode=False)
        # ru_maxrss is in KiB on Linux; this process only, not xz or qemu
        log.debug("peak RSS: %.1f MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    except ProfileError as e:
        _error(f"pibake: the profile has {len(e.problems)} problem(s):")
        for line in e.lines():
            _error(f"  {line}")
        sys.exit(2)
    except BuildError as e:
        if _interrupted:
            click.echo(INTERRUPTED, err=True)
            sys.exit(130)
        _error(f"pibake: error: {e}")
        sys.exit(exit_status(e))
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        _error(f"pibake: error: {e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}")
        sys.exit(1)

