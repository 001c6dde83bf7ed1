"""A build from profile to flashable images, as a short script of steps.

Images are made in a staging folder inside the output folder (so the final
rename is atomic) and only renamed into place once complete, hashed and synced.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from builder import __version__
from builder.progress import bar

from builder import bmap, environment, epoch, image, image_write, packages
from builder.appliance import Appliance, Drive
from builder.cache import BaseImage, Layout
from builder.epoch import Epoch
from builder.errors import BuildError
from builder.keys import KeyStore
from builder.packages import AptInputs, Deb
from builder.facts import BaseFacts, BaseReads, remembered
from builder.outputs import BuiltImage, read_manifest, refresh_manifest, update_manifest, write_ssh_files
from builder.plan import NodePlan, check_plan, plan_node
from builder.realize import prepare
from builder.profile import Node, Profile
from builder.release import Release

log = logging.getLogger(__name__)
STAGING = ".staging"


@dataclass(frozen=True)
class Options:
    base: BaseImage
    output: Path
    state: Path
    cache: Layout
    force: bool = False
    epoch: Epoch | None = None  # set by build(), from the base and SOURCE_DATE_EPOCH


def plans_for(profile: Profile, nodes: tuple[Node, ...], release: Release, keys: KeyStore,
              debs: dict[tuple[str, ...], tuple[Deb, ...]] | None = None) -> list[NodePlan]:
    """Every node's plan; a profile the plan refuses is refused before any key is made."""
    check_plan(profile, nodes, release)
    return _checked_plans(profile, nodes, release, keys, debs)


def _checked_plans(profile: Profile, nodes: tuple[Node, ...], release: Release, keys: KeyStore,
                   debs: dict[tuple[str, ...], tuple[Deb, ...]] | None) -> list[NodePlan]:
    if profile.user.operator_key:
        made = not keys.operator_key_path.exists()
        keys.operator_key()
        log.info("no SSH key in the profile and none of ~/.ssh/id_{ed25519,ecdsa,rsa}.pub: %s the operator key %s, "
                 "which output/ssh_config names", "made" if made else "using", keys.operator_key_path)
    # Every node's host key exists before any plan is made: each node's
    # ssh_known_hosts lists the whole cluster.
    for node in profile.nodes:
        keys.host_key(node.hostname)
    debs = debs or {}
    return [plan_node(profile, node, release, keys, debs.get(profile.packages(node), ())) for node in nodes]


def stage_packages(profile: Profile, nodes: tuple[Node, ...], inputs: AptInputs, cache: Layout) -> dict[tuple[str, ...], tuple[Deb, ...]]:
    """Resolve and download, once per distinct package list, what first boot installs."""
    lists = sorted({profile.packages(n) for n in nodes if profile.packages(n)})
    staged = {}
    for names in lists:
        debs = tuple(packages.resolve(inputs, names, profile.apt_mirrors, cache.apt))
        size = sum(d.path.stat().st_size for d in debs)
        log.info("packages: %s -> %d .deb file(s), %.1f MiB, staged for first boot", " ".join(names), len(debs), size / 2**20)
        staged[names] = debs
    return staged


def inspect_release(base: Path, force: bool) -> Release:
    image.check_layout(base)
    with Appliance([Drive(base, readonly=True)]) as appliance:
        return appliance.release(0, force)


@contextmanager
def _staging(output: Path) -> Iterator[Path]:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the output folder {output}: {e.strerror}") from None
    # A lock on the folder itself: two builds into one output would share .staging.
    lock = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another pibake build is writing to {output}; wait for it to finish") from None
        staging = output / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed build; never a final file
        staging.mkdir(mode=0o700)  # the copies hold private keys from their bake on
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(lock)


@contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold Ctrl-C while images and manifest are swapped in, so they stay consistent."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# What baking may add to a sparse copy: journal blocks, metadata and the files
# written, which is a few MiB on a real image; kept generous.
ROOM_PER_IMAGE = 32 << 20


def _check_room(output: Path, images: int) -> None:
    free = shutil.disk_usage(output).free
    if free < images * ROOM_PER_IMAGE:
        raise BuildError(f"no space left on the output disk ({output}): {free >> 20} MiB free after copying, "
                         f"baking {images} image(s) needs about {images * ROOM_PER_IMAGE >> 20} MiB more")


def staged_before(profile: Profile, nodes: tuple[Node, ...], inputs: AptInputs, cache: Layout) -> dict[tuple[str, ...], tuple[Deb, ...]] | None:
    """stage_packages()'s last answer, if every part of it is still in the cache."""
    staged = {}
    for names in {profile.packages(n) for n in nodes if profile.packages(n)}:
        debs = packages.resolved_before(inputs, names, profile.apt_mirrors, cache.apt)
        if debs is None:
            return None
        staged[names] = tuple(debs)
    return staged


def _plans(profile: Profile, nodes: tuple[Node, ...], facts: BaseFacts, options: Options, keys: KeyStore,
           debs: dict[tuple[str, ...], tuple[Deb, ...]] | None = None) -> list[NodePlan]:
    release = facts.release(options.force)
    log.info("release: %s (%s)", release.codename, release.reason)
    if release.caveat:
        log.warning("warning: %s", release.caveat)
    check_plan(profile, nodes, release)  # before any key is made or package downloaded
    if debs is None:
        debs = stage_packages(profile, nodes, facts.apt, options.cache)
    return _checked_plans(profile, nodes, release, keys, debs)


class _ImageCheck:
    """Whether an image's content is still what its manifest entry recorded."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.prefix: tuple[int, hashlib._Hash] | None = None  # (root partition's offset, the base's sha256 state there)

    def __call__(self, path: Path, entry: dict) -> bool:
        if "blocks_sha256" in entry:
            # Reads only the image's data: the digest of its non-zero blocks.
            return image.hash_data(path)[1] == entry["blocks_sha256"]
        # An older manifest: hashed in full, from the base's state where its first part is the base's.
        log.debug("%s: hashing it in full", path.name)
        if self.prefix is None:  # once for all such images
            offset = {p.number: p.start for p in image.check_layout(self.base)}[2]
            self.prefix = (offset, image.sha256_with_prefixes(self.base, [offset], whole=False)[1][offset])
        same = image.same_prefix(path, self.base, self.prefix[0])
        return image.sha256_file(path, start=self.prefix if same else None) == entry.get("sha256")


def _guessed_sha(manifest: dict, base: Path) -> str | None:
    """The base's sha256 as an earlier build recorded it, if the file looks the same."""
    st = base.stat()
    for entry in manifest.values():
        recorded = entry.get("base_image") or {}
        if (recorded.get("path"), recorded.get("size"), recorded.get("mtime_ns")) == (str(base), st.st_size, st.st_mtime_ns):
            return recorded.get("sha256")
    return None


def _why_changed(plan: NodePlan, entry: dict, path: Path, sha: str) -> str:
    """Why a node is baked: what differs from the manifest's record of its last build, the first thing found."""
    if not entry:
        return "not built before"
    return "baking it again: " + _first_difference(plan, entry, path, sha)


def _first_difference(plan: NodePlan, entry: dict, path: Path, sha: str) -> str:
    if not path.is_file():
        return f"{path.name} is gone"
    if path.stat().st_size != entry.get("size"):
        return f"{path.name} changed size"
    before = (entry.get("base_image") or {}).get("sha256")
    if before != sha:
        return f"the base image is another one (sha256 {sha[:12]}, was {str(before)[:12]})"
    if entry.get("pibake") not in (None, __version__):
        return f"pibake {__version__} built it as pibake {entry['pibake']}"
    recorded = entry.get("operations", [])
    for index, op in enumerate(plan.ops):
        now = op.describe()
        if index >= len(recorded) or recorded[index] != now:
            was = recorded[index] if index < len(recorded) else None
            shown = f"{now['op']} {now['path']}" + (f" {now['summary']}" if "summary" in now else "")
            return f"operation {index + 1} changed: {shown}" + (f" (was {was['op']} {was['path']})" if was else " (new)")
    if len(recorded) > len(plan.ops):
        return f"operation {len(plan.ops) + 1} is gone: {recorded[len(plan.ops)]['op']} {recorded[len(plan.ops)]['path']}"
    return "a secret it holds changed (its content is not recorded)"


def build(profile: Profile, nodes: tuple[Node, ...], options: Options) -> list[BuiltImage]:
    base = options.base.path
    root = {p.number: p.start for p in image.check_layout(base)}[2]
    epoch.check_clean(base, root)
    written = options.epoch or epoch.of(base, root)  # given: pibake verify's, as the manifest records it
    options = replace(options, epoch=written)
    log.info("time written into the images: %d (%s, from the %s)", written.seconds,
             datetime.datetime.fromtimestamp(written.seconds, datetime.timezone.utc).isoformat(), written.source)
    keys = KeyStore(options.state)
    manifest = read_manifest(options.output).get("nodes", {})
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Hashed beside the copies, or, in a rebuild, beside planning and launching
        # (a fetched base's is known).
        base_sha = pool.submit(lambda: options.base.sha256 or image.sha256_file(base))
        if not manifest:
            built = _bake(profile, nodes, None, base_sha, options, keys)
            assert built is not None  # nothing to refuse in a first build
            return built
        # A rebuild first goes on with the sha256 recorded for a base that looks unchanged
        # and with apt's last answer, and keeps nothing unless both are confirmed.
        guess = options.base.sha256 or _guessed_sha(manifest, base)
        if guess is not None:
            first = _rebuild(profile, nodes, manifest, guess, base_sha, options, keys, guessing=True)
            if first.refused is None:
                return first.built
            log.info("%s; planning again", first.refused)
        # Nothing was kept: the manifest is as it was.
        return _rebuild(profile, nodes, manifest, base_sha.result(), base_sha, options, keys, guessing=False).built


@dataclass(frozen=True)
class _Rebuilt:
    built: list[BuiltImage]
    refused: str | None = None  # why nothing was kept: what the rebuild went on with was not so


def _rebuild(profile: Profile, nodes: tuple[Node, ...], entries: dict, sha: str, base_sha: Future, options: Options,
             keys: KeyStore, guessing: bool) -> _Rebuilt:
    """Bake the nodes whose inputs or image changed since the last build, taking the base's sha256 to be `sha`.

    `guessing`: `sha` is the one recorded for this base, and the packages staged last
    time are planned with; both are confirmed while the changed nodes are baked,
    before anything is kept."""
    # The base's facts from an earlier build tell which nodes changed before
    # anything is copied or launched.
    facts = remembered(options.cache.bases, sha)
    if facts is None:
        if base_sha.result() != sha:
            return _Rebuilt([], "the base image's content changed since the last build")
        return _Rebuilt(_bake(profile, nodes, None, base_sha, options, keys) or [])  # refuses nothing
    debs = staged_before(profile, nodes, facts.apt, options.cache) if guessing else None
    plans = _plans(profile, nodes, facts, options, keys, debs)
    assert options.epoch is not None
    candidates, changed = _sort_out(plans, entries, options.output, sha, options.epoch.seconds)
    with ThreadPoolExecutor(max_workers=1) as checker:
        # Meanwhile: apt again, and each maybe-unchanged image checked (one thread: the
        # check's state is computed once).
        resolved = checker.submit(stage_packages, profile, nodes, facts.apt, options.cache) if debs is not None else None
        check = _ImageCheck(options.base.path)
        checks = [checker.submit(check, path, entry) for _, path, entry in candidates]

        def refusal() -> str | None:
            if base_sha.result() != sha:
                return "the base image's content changed since the last build"
            if resolved is not None and resolved.result() != debs:
                return "apt chose other packages than last time"
            return None

        if changed:
            built = _bake(profile, _nodes(changed), changed, sha, options, keys, refusal)
            if built is None:
                return _Rebuilt([], refusal())
        else:
            built = []
            if refusal() is not None:
                return _Rebuilt([], refusal())
        still = [check.result() for check in checks]
    skipped, again = [], []
    for (plan, path, entry), unchanged in zip(candidates, still):
        if unchanged:
            log.info("%s: inputs and image unchanged, skipped", plan.node.hostname)
            skipped.append(BuiltImage(plan, path, entry["sha256"], path.stat().st_size, skipped=True))
        else:  # changed since it was built (by hand, say): baked now, in a round of its own
            log.info("%s: image changed since it was built; baking it again", plan.node.hostname)
            again.append(plan)
    if again:
        built += _bake(profile, _nodes(again), again, sha, options, keys) or []  # refuses nothing
    # An unchanged image keeps its block map; one without a sound one gets it.
    missing = [s for s in skipped if not _block_map_ok(s.path)]
    for image_left in missing:
        log.info("%s: writing its block map", image_left.path.name)
        bmap.write(image_left.path, sync=True)
    if not built:
        log.info("every image is up to date; nothing to bake")
    if missing or not built:
        with _no_interrupt():
            # What is made from the manifest, written again: a block map written now is
            # named, an Imager list an older pibake did not write is there.
            refresh_manifest(options.output)
            if not built:
                write_ssh_files(options.output, profile, keys)
    by_name = {b.plan.node.hostname: b for b in [*built, *skipped]}
    return _Rebuilt([by_name[n.hostname] for n in profile.nodes if n.hostname in by_name])


def _sort_out(plans: list[NodePlan], entries: dict, output: Path, sha: str,
              epoch: int) -> tuple[list[tuple[NodePlan, Path, dict]], list[NodePlan]]:
    """The plans whose image may be unchanged (same inputs, image there; its content still to be
    checked), with their image and manifest entry, and the plans that must be baked."""
    candidates, changed = [], []
    for plan in plans:
        entry = entries.get(plan.node.hostname, {})
        path = output / entry.get("image", f"{plan.node.hostname}.img")
        if entry.get("inputs") == plan.fingerprint(sha, epoch) and path.is_file() and path.stat().st_size == entry.get("size"):
            candidates.append((plan, path, entry))
        else:
            log.info("%s: %s", plan.node.hostname, _why_changed(plan, entry, path, sha))
            changed.append(plan)
    return candidates, changed


@contextmanager
def _copied_and_launched(base: Path, nodes: tuple[Node, ...], staged: list[Path], output: Path) -> Iterator[Appliance]:
    """Copy the base once per node, and launch the appliance with every copy attached.

    Without KVM the launch takes tens of seconds, and so does copying a real image
    several times over, so when copies are slow the two overlap. The copies not yet
    made are created at their full size first, as holes (QEMU takes a disk's size
    when it opens it), attached, and filled in by another thread without changing
    their size; once they are complete the appliance re-reads their partition
    tables, which also drops anything it read from them before they were. The
    appliance stays in this thread: libguestfs keeps its error handling per thread.
    """
    copies = bar(total=len(staged), desc="copy", unit="image")
    # A copy slower than this (seconds) is a real copy, not a reflink or a small sparse
    # image: the appliance is then launched while the rest are made.
    slow = environment.slow_copy()
    late: list[int] = []
    for index, (node, path) in enumerate(zip(nodes, staged)):
        log.debug("%s: copying %s", node.hostname, base.name)
        start = time.monotonic()
        image.copy_image(base, path)
        copies.update()
        if index + 1 < len(staged) and time.monotonic() - start > slow:
            late = list(range(index + 1, len(staged)))
            break
    if not late:
        copies.close()
        _check_room(output, len(staged))
        with Appliance([Drive(p) for p in staged]) as appliance:
            yield appliance
        return
    for index in late:
        with open(staged[index], "wb") as holes:
            holes.truncate(base.stat().st_size)
    log.debug("copies are slow: launching the appliance while %d more are made", len(late))

    def copy_late() -> None:
        for index in late:
            log.debug("%s: copying %s", nodes[index].hostname, base.name)
            image.copy_into(base, staged[index])
            copies.update()
        copies.close()

    with ThreadPoolExecutor(max_workers=1) as copier:
        copying = copier.submit(copy_late)
        try:
            appliance = Appliance([Drive(p) for p in staged])
        except BaseException:
            copying.exception()  # the launch's failure is the one to report, once the copies have stopped
            raise
        try:
            copying.result()
            _check_room(output, len(staged))
            appliance.reread(late)
            yield appliance
        finally:
            appliance.close()


def _finish(path: Path, offset: int, state: "hashlib._Hash", pool: ThreadPoolExecutor) -> tuple[str, str]:
    """Hash a baked image and write its block map (side by side), while the disk writes it."""
    synced = pool.submit(image.fsync, path)  # the disk writes while the page cache is read
    with ThreadPoolExecutor(max_workers=1) as mapper:
        mapped = mapper.submit(bmap.write, path)
        sha, blocks = image.hash_data(path, (offset, state))
        mapped.result()
    # Not synced on its own: one that a crash left unfinished fails its own checksum, and
    # the next build writes it again (see _block_map_ok).
    synced.result()
    assert sha is not None
    return sha, blocks


def _block_map_ok(path: Path) -> bool:
    """Whether the image's block map is there, whole (its own checksum holds), and of its size."""
    if not bmap.path_for(path).is_file():
        return False
    try:
        return bmap.read(bmap.path_for(path)).image_size == path.stat().st_size
    except BuildError:
        return False


def _nodes(plans: list[NodePlan]) -> tuple[Node, ...]:
    return tuple(plan.node for plan in plans)


def _bake(profile: Profile, nodes: tuple[Node, ...], plans: list[NodePlan] | None, base_sha: Future | str,
          options: Options, keys: KeyStore, refusal: Callable[[], str | None] = lambda: None) -> list[BuiltImage] | None:
    """Bake `nodes` from copies of the base, whose sha256 is `base_sha` (known, or being hashed).

    Once they are baked, `refusal` may still say why they must not be kept: then
    nothing is, and the result is None."""

    def base_sha256() -> str:
        return base_sha if isinstance(base_sha, str) else base_sha.result()

    base = options.base.path
    layout = {p.number: p.start for p in image.check_layout(base)}
    # The syncer outlives the pool: hashing tasks wait for its fsyncs.
    with _staging(options.output) as staging, ThreadPoolExecutor(max_workers=1) as syncer, \
            ThreadPoolExecutor(max_workers=2) as pool:
        # A node's image differs from the base only from its boot partition on, or
        # from its root partition on when the boot partition is left alone: its
        # hash resumes from the base's at that offset.
        prefixes = pool.submit(image.sha256_with_prefixes, base, [layout[1], layout[2]], False)
        staged = [staging / f"{node.hostname}.img" for node in nodes]
        with _copied_and_launched(base, nodes, staged, options.output) as appliance:
            if plans is None:  # a rebuild planned from the remembered facts already
                # The base was hashed while the copies were made and the appliance came up.
                facts = remembered(options.cache.bases, base_sha256())
                if facts is None:
                    facts = appliance.facts(0)
                    facts.save(options.cache.bases, base_sha256())
                plans = _plans(profile, nodes, facts, options, keys)
            reads = BaseReads.remembered(options.cache.bases, base_sha256())
            with appliance.base(plans[0].release.boot_dir, reads) as base_files:
                changes = prepare(plans, base_files)
            log.debug("plans played through against the base%s", "" if reads.learned else ", all of it known from earlier builds")
        # Written on the host, two at a time; each image is synced and hashed as soon as it is written.
        assert options.epoch is not None
        seconds, offsets = options.epoch.seconds, (layout[1], layout[2])
        with bar(total=len(plans), desc="bake", unit="image") as meter, ThreadPoolExecutor(max_workers=2) as writers:

            def bake_one(index: int) -> tuple[str, str]:
                plan = plans[index]
                image_write.write(staged[index], offsets, plan.release.boot_dir, changes[index], seconds, plan.node.hostname)
                offset = layout[1] if changes[index].touches_boot else layout[2]
                hashed = _finish(staged[index], offset, prefixes.result()[1][offset], syncer)
                meter.update()
                return hashed

            hashes = list(writers.map(bake_one, range(len(plans))))
            log.debug("every image written and hashed")
        built = [BuiltImage(plan, options.output / path.name, sha, path.stat().st_size, blocks_sha256=blocks)
                 for plan, path, (sha, blocks) in zip(plans, staged, hashes)]
        if refusal() is not None:
            return None
        if reads.learned:  # saved once the base is known to be the one `base_sha` names
            reads.save(options.cache.bases, base_sha256())
        with _no_interrupt():
            for path, result in zip(staged, built):
                # An image holds host private keys (the master's, the cluster key and the
                # Wi-Fi PSK too): readable by its owner only.
                os.chmod(path, 0o600)
                path.replace(result.path)
                bmap.path_for(path).replace(bmap.path_for(result.path))
            update_manifest(options.output, base, base_sha256(), built, options.epoch)
            write_ssh_files(options.output, profile, keys)
    return built
