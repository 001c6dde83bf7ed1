"""A build from profile to flashable images, as a short script of steps.

Images are made in a staging folder inside the output folder (so the final
rename is atomic) and only renamed into place once complete, hashed and synced.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.progress import bar

from builder import image
from builder.appliance import Appliance, Drive
from builder.cache import BaseImage
from builder.errors import BuildError
from builder.keys import KeyStore
from builder.outputs import BuiltImage, update_manifest, write_ssh_files
from builder.plan import NodePlan, plan_node
from builder.profile import Node, Profile
from builder.release import Release

log = logging.getLogger(__name__)
STAGING = ".staging"


@dataclass(frozen=True)
class Options:
    base: BaseImage
    output: Path
    state: Path
    force: bool = False


def plans_for(profile: Profile, nodes: tuple[Node, ...], release: Release, keys: KeyStore) -> list[NodePlan]:
    # Every node's host key exists before any plan is made: each node's
    # ssh_known_hosts lists the whole cluster.
    for node in profile.nodes:
        keys.host_key(node.hostname)
    return [plan_node(profile, node, release, keys) for node in nodes]


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
        staging.mkdir()
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


def build(profile: Profile, nodes: tuple[Node, ...], options: Options) -> list[BuiltImage]:
    base = options.base.path
    image.check_layout(base)
    keys = KeyStore(options.state)
    with ThreadPoolExecutor(max_workers=2) as pool, _staging(options.output) as staging:
        known = options.base.sha256
        base_sha = pool.submit(lambda: known or image.sha256_file(base))
        staged = [staging / f"{node.hostname}.img" for node in nodes]
        for node, path in bar(list(zip(nodes, staged)), desc="copy", unit="image"):
            log.debug("%s: copying %s", node.hostname, base.name)
            image.copy_image(base, path)
        _check_room(options.output, len(staged))
        with Appliance([Drive(p) for p in staged]) as appliance:
            release = appliance.release(0, options.force)
            log.info("release: %s (%s)", release.codename, release.reason)
            if release.caveat:
                log.warning("warning: %s", release.caveat)
            plans = plans_for(profile, nodes, release, keys)
            for index, plan in enumerate(bar(plans, desc="bake", unit="image")):
                log.debug("%s: applying %d operations", plan.node.hostname, len(plan.ops))
                appliance.apply(index, plan)
        for path in staged:
            image.fsync(path)
        hashes = list(pool.map(image.sha256_file, staged))
        built = [BuiltImage(plan, options.output / path.name, sha, path.stat().st_size)
                 for plan, path, sha in zip(plans, staged, hashes)]
        with _no_interrupt():
            for path, result in zip(staged, built):
                path.replace(result.path)
            update_manifest(options.output, base, base_sha.result(), built)
            write_ssh_files(options.output, profile, keys)
    return built
