"""The `pibake` command line."""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from builder import __version__, environment, formats, progress, urls
from builder.build import Options, build, inspect_release, plans_for
from builder.errors import BuildError, InputError, ProfileError, Stopped
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

log = logging.getLogger("builder")

def _examples(*lines: str) -> str:
    """A command's --help epilog: its own examples, as typed."""
    return "\b\nExamples:\n" + "".join(f"  {line}\n" for line in lines)


EXAMPLES = {
    "pibake": _examples("pibake build cluster                 # the master and every worker, newest Raspberry Pi OS",
                        "pibake check                         # once the cards are in and the nodes are up",
                        "pibake COMMAND --help                # each command's own examples"),
    "build": _examples("pibake build master                          # newest Raspberry Pi OS Lite, fetched and verified",
                       "pibake build worker --count 5",
                       "pibake build worker --first 6 --count 2      # add worker6 and worker7",
                       "pibake build cluster --image bookworm        # or trixie, 2025-05-13, a URL, a local .img.xz"),
    "plan": _examples("pibake plan master --release bookworm        # without reading an image",
                      "pibake plan worker --first 3 --count 1       # worker3's operations, from the base image"),
    "check": _examples("pibake check                                 # every node, through output/ssh_config",
                       "pibake check --timeout 30 -o elsewhere/output"),
    "flash": _examples("pibake flash --list                          # the disks, and which can be flashed",
                       "sudo .venv/bin/pibake flash worker3 /dev/sdb # one card",
                       "sudo .venv/bin/pibake flash --all /dev/sdb /dev/sdc   # master, worker1, ... at once",
                       "sudo .venv/bin/pibake flash master /dev/sdb --backup latest   # restore its newest backup"),
    "backup": _examples("pibake backup master                         # live, over output/ssh_config; prints the path",
                        "pibake backup worker3 --keep 5               # and keep only the newest five",
                        "sudo .venv/bin/pibake backup master --device /dev/sdb   # its card, in a reader"),
    "diff": _examples("pibake diff master                           # live, over output/ssh_config",
                      "pibake diff worker3 --json",
                      "sudo .venv/bin/pibake diff master --device /dev/sdb   # its card, in a reader"),
    "verify": _examples("pibake verify master output/master.img        # the image is what the profile builds",
                        "sudo .venv/bin/pibake verify worker2 /dev/sdb   # a flashed card, not booted yet"),
    "fetch": _examples("pibake fetch                                 # what the profile's image section names",
                       "pibake fetch --image trixie@2025-11-24"),
    "images": _examples("pibake images                                # * marks what the profile resolves to",
                        "pibake images --image bookworm"),
    "cache": _examples("pibake cache list", "pibake cache clean"),
}


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXAMPLES["pibake"])
@click.version_option(__version__, prog_name="pibake")
def cli() -> None:
    """Bake flashable Raspberry Pi OS images for a small cluster.

    One master (DHCP server and NAT gateway over Wi-Fi) and N workers on a wired
    LAN. Each node's image carries its whole configuration: flash, boot, ssh in.
    """


@cli.command("build", epilog=EXAMPLES["build"])
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


@cli.command(epilog=EXAMPLES["plan"])
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


@cli.command(epilog=EXAMPLES["check"])
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


@cli.command("backup", epilog=EXAMPLES["backup"])
@click.argument("node_name", metavar="NODE")
@click.option("--keep", type=click.IntRange(min=1, max=10000), default=None,
              help="Then delete all but the newest N backups of the node.")
@click.option("--device", default=None, metavar="DEV",
              help="Read the node's card from a reader instead (offline, read-only).")
@click.option("--force", is_flag=True, help="With --device: allow a disk that is not removable.")
@click.option("--profiles", type=click.Path(path_type=Path), default=Path("profiles"), show_default=True,
              envvar="PIBAKE_PROFILES", help="Profile file, or folder holding cluster.yaml.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True,
              help="Where the build left ssh_config; backups go to its backups/NODE/ folder.")
@click.option("-v", "--verbose", count=True, help="Say more.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors, and the backup's path.")
def backup_command(node_name: str, keep: Optional[int], device: Optional[str], force: bool, profiles: Path, output: Path,
                   verbose: int, quiet: bool) -> None:
    """Back a running node up into an image of its own card's layout.

    Its file systems are read as files over output/ssh_config (the workers through
    the master), with the services its profile's backup.stop names stopped while
    they are read; only what changed since the last backup is sent. The image is
    checked (every file against what the node sent, e2fsck, fsck.fat) before it is
    kept. The last line printed is its path. With --device, the card is read
    offline from a reader instead, read-only, with pibake flash's device rules.
    """
    from builder.backup import backup
    _setup_logging(verbose, quiet)
    profile = load(profiles)
    node = next((n for n in profile.nodes if n.hostname == node_name), None)
    if node is None:
        raise InputError(f"{node_name!r} is not a node of the profile ({', '.join(n.hostname for n in profile.nodes)})")
    result = backup(profile, node, output, keep, device=device, force=force)
    from builder import node_diff
    try:  # what changed since the bake, beside the backup
        node_diff.write_beside(result.path, node_diff.of_backup(output, node.hostname, result.path))
    except InputError as e:
        log.info("no diff beside the backup: %s", e)
    if not quiet:
        source = f"read from {device}" if device else f"{result.received / 1e6:.1f} MB received"
        _echo(f"pibake: {node.hostname}: {result.files} files, {source}"
              f"{' (changes since the last backup)' if result.incremental else ''}")
        for line in result.report:
            _echo(f"pibake: {node.hostname}: {line}")
    click.echo(str(result.path))


@cli.command("diff", epilog=EXAMPLES["diff"])
@click.argument("node_name", metavar="NODE")
@click.option("--device", default=None, metavar="DEV", help="Read the node's card from a reader instead (offline).")
@click.option("--force", is_flag=True, help="With --device: allow a disk that is not removable.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of the table.")
@click.option("--profiles", type=click.Path(path_type=Path), default=Path("profiles"), show_default=True,
              envvar="PIBAKE_PROFILES", help="Profile file, or folder holding cluster.yaml.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True,
              help="Where the build left the node's image and ssh_config.")
@click.option("-v", "--verbose", count=True, help="Say more.")
def diff_command(node_name: str, device: Optional[str], force: bool, as_json: bool, profiles: Path, output: Path,
                 verbose: int) -> None:
    """What changed on a node since pibake baked it: packages, and files under /etc,
    /home, /root, /usr/local, /opt, /srv and /var/lib (not logs, caches or what the
    system keeps changing). Secret files are named, never shown.
    """
    import json as json_module

    from builder import drift, node_diff
    _setup_logging(verbose, as_json)
    profile = load(profiles)
    node = next((n for n in profile.nodes if n.hostname == node_name), None)
    if node is None:
        raise InputError(f"{node_name!r} is not a node of the profile ({', '.join(n.hostname for n in profile.nodes)})")
    changes = node_diff.diff(profile, node, output, device, force)
    if as_json:
        # json.dumps escapes every control character a name holds (ensure_ascii): only its own line breaks are left
        click.echo(json_module.dumps(drift.as_json(changes), indent=1))
        return
    _echo_table(node_diff.table(changes))
    _echo(f"pibake: {node.hostname}: {len(changes) or 'no'} change{'s' if len(changes) != 1 else ''} since it was baked")


@cli.command("verify", epilog=EXAMPLES["verify"])
@click.argument("node_name", metavar="NODE")
@click.argument("target", metavar="PATH")
@click.option("--force", is_flag=True, help="For a disk: allow one that is not removable.")
@click.option("--profiles", type=click.Path(path_type=Path), default=Path("profiles"), show_default=True,
              envvar="PIBAKE_PROFILES", help="Profile file, or folder holding cluster.yaml.")
@click.option("--state", type=click.Path(path_type=Path), default=None, envvar="PIBAKE_STATE",
              help="Folder of generated keys (default: state/ beside the output folder).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True,
              help="Where the build left the node's manifest entry.")
@click.option("-v", "--verbose", count=True, help="Say more.")
def verify_command(node_name: str, target: str, force: bool, profiles: Path, state: Optional[Path], output: Path,
                   verbose: int) -> None:
    """Whether PATH (an image, or a card flashed and not booted since) holds exactly
    the node's image: the node is built again, in a scratch file, from the base image
    and time its manifest records, with the profile and keys. Exit 0 when it holds;
    otherwise the files that differ, and exit 1.
    """
    from builder import node_diff
    from builder.verify import verify
    _setup_logging(verbose, not verbose)  # the rebuild says nothing unless asked
    profile = load(profiles)
    node = next((n for n in profile.nodes if n.hostname == node_name), None)
    if node is None:
        raise InputError(f"{node_name!r} is not a node of the profile ({', '.join(n.hostname for n in profile.nodes)})")
    verdict = verify(profile, node, output, _state(state, output), target, force)
    if verdict.holds:
        which = (f"all {verdict.size} bytes" if verdict.whole else
                 f"every block its file systems use, {verdict.mapped} bytes, the rest is free space")
        _echo(f"pibake: {target} holds exactly {node.hostname}'s image (sha256 {verdict.sha256[:12]}): {which}")
        return
    if verdict.changes:
        _echo_table(node_diff.table(verdict.changes))
    what = (f"{len(verdict.changes)} {'files differ' if len(verdict.changes) != 1 else 'file differs'}" if verdict.changes
            else "its bytes differ, no file does (file system metadata: a card that was booted, or resized)")
    _error(f"pibake: {target} is not {node.hostname}'s image: {what}")
    raise SystemExit(1)


@cli.command("flash", epilog=EXAMPLES["flash"])
@click.argument("args", nargs=-1, metavar="NODE DEVICE | --all DEVICE... | --list")
@click.option("--all", "all_nodes", is_flag=True, help="Flash the nodes in order (master first) onto the devices given.")
@click.option("--list", "list_disks", is_flag=True, help="List the disks, and whether each can be flashed.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before overwriting (for scripts).")
@click.option("--force", is_flag=True, help="Allow a disk that is not removable (not USB or an SD slot).")
@click.option("--backup", "restore", metavar="PATH|latest", default=None,
              help="Restore one of the node's backups (pibake backup) instead of its image.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("output"), show_default=True,
              help="Where the build left the images.")
@click.option("-v", "--verbose", count=True, help="Say more.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
def flash_command(args: tuple[str, ...], all_nodes: bool, list_disks: bool, yes: bool, force: bool,
                  restore: Optional[str], output: Path, verbose: int, quiet: bool) -> None:
    """Write node images to SD cards: only their used blocks, read back and checked.

    It refuses the disk holding /, any disk with a mounted or held file system, a
    disk smaller than the image, and one that is not removable unless --force. It
    shows what it will overwrite and asks first (--yes for scripts). A card that
    holds an earlier build gets only the blocks that differ. With --backup, a
    backup of the node goes onto the card, and its root file system then fills it.
    """
    from builder import devices, flash  # here: only this command needs them

    _setup_logging(verbose, quiet)
    if list_disks:
        if args or all_nodes:
            raise InputError("--list takes no node or device")
        root = devices.root_numbers()
        rows = [("device", "size", "transport", "removable", "model", "flash")]
        for disk in devices.disks(devices.lsblk()):
            why = devices.refusal(disk, None, False, root)
            rows.append((disk.path, f"{disk.size / 2**30:.1f} GiB", disk.transport or "-", "yes" if disk.removable else "no",
                         disk.model or "-", "yes" if why is None else f"no: {why}"))
        _echo_table(rows)
        return
    if (output / "manifest.json").exists() and not os.access(output / "manifest.json", os.R_OK):
        raise BuildError(f"cannot read {output / 'manifest.json'}: permission denied; run pibake flash with sudo")
    manifest = read_manifest(output)
    chosen = flash.pairs(manifest, args, all_nodes, lambda text: log.info("%s", text))
    screen = flash.Screen(say=_echo, warn=_error, ask=_ask if not yes else lambda question: True, bar=_card_bar)
    if flash.flash(output, manifest, chosen, force, yes, screen, devices.cache_roots(cache.root()), restore):
        raise SystemExit(1)  # each card that failed has said why


def _ask(question: str) -> Optional[bool]:
    """Yes or no at the terminal; None when interrupted. Without a terminal, no question is asked."""
    if not sys.stdin.isatty():
        raise InputError("flash overwrites whole disks and asks first: not on a terminal, pass --yes to go on")
    try:
        return click.confirm(question)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return None


def _card_bar(job: Any, position: int) -> Any:  # a flash.Job
    return progress.bar(total=job.bmap.mapped_bytes, unit="B", unit_scale=True, desc=f"{job.node} -> {job.device.path}",
                        position=position)


@cli.command(epilog=EXAMPLES["fetch"])
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


@cli.command(epilog=EXAMPLES["images"])
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


@cli.group("cache", epilog=EXAMPLES["cache"])
def cache_group() -> None:
    """Inspect or empty the image cache ($XDG_CACHE_HOME/pibake)."""


@cache_group.command("list", epilog=_examples("pibake cache list"))
def cache_list() -> None:
    """List cached downloads and decompressed images."""
    for path, size, label in cache.entries():
        _echo(f"{size / 2**20:9.1f} MiB  {path}  {label}")  # _echo hides credentials older pibakes' records kept


@cache_group.command("clean", epilog=_examples("pibake cache clean                           # every image, download and key"))
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
    """The one place an exit status is chosen: 2 for what the user gave, 130 for Ctrl-C, 1 for the rest."""
    if isinstance(error, Stopped) and error.interrupted:
        return 130
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
    except Stopped as e:  # as the user asked: no error, and what stopped has said what it left
        if e.message:
            _error(f"pibake: {e.message}")
        sys.exit(exit_status(e))
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

