"""`make bench`, bake section: `pibake build cluster` against the copy floor and one appliance per image.

For N nodes, alternating within each run:
  floor   N copies of the base, as pibake makes them (cp --reflink=auto --sparse=always);
  naive   the same plans applied with one libguestfs appliance per image (what running
          virt-customize once per node costs): copy, launch, apply, close, hash; one
          apt resolution, as pibake does;
  pibake  `pibake build cluster` into an empty output folder.
All three write the same images with the same files, pibake and naive also hash them
(SHA256SUMS), and all run with the same warm caches (base image in the page cache,
apt lists and .debs in the bench's cache folder).

Then the rebuilds: in the N = 50 cluster, one worker's settings change (its MAC is
added to its DHCP reservation, or taken out again, which changes the master's dnsmasq
configuration); `pibake build cluster` again bakes what changed and checks every
other image's content against its recorded digest.

Bases: "realistic" is the size of Bookworm Lite (2.75 GB, 1.9 GB of data); "small"
is the tests' 648 MiB image with a few MB of data.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import apt_repo  # noqa: E402
from mirror import Mirror  # noqa: E402
from rpios_image import LAYOUTS, MIB, SECTOR, make_image  # noqa: E402

from builder import cache, image  # noqa: E402
from builder.appliance import Appliance, Drive  # noqa: E402
from builder.build import plans_for, stage_packages  # noqa: E402
from builder.keys import KeyStore  # noqa: E402
from builder.profile import load  # noqa: E402
from builder.realize import prepare  # noqa: E402
from builder.tree import Changes  # noqa: E402

REAL_SIZE = 2_751_463_424  # Bookworm Lite 2025-11-24
REAL_DATA = 1_900_000_000
FIXTURE_VERSION = "2"  # 2: the images carry Debian's root links, the archive avahi-daemon
CASES = (("realistic", 6), ("small", 50))


def base_image(work: Path, kind: str) -> Path:
    path = work / f"bake-fixture-{FIXTURE_VERSION}" / f"{kind}.img"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"making the {kind} base image (once) ...", flush=True)
    tmp = path.with_suffix(".tmp")
    if kind == "realistic":
        layout = LAYOUTS["bookworm"]
        root_size = REAL_SIZE - (layout.boot_start + layout.boot_sectors) * SECTOR
        make_image(tmp, "bookworm", root_size=root_size // MIB * MIB, data_bytes=REAL_DATA)
    else:
        make_image(tmp, "bookworm")
    tmp.rename(path)
    return path


def profile_text(key: Path, nodes: int, mac_for: str | None = None) -> str:
    workers = "".join(
        f"    - {{hostname: worker{i}, address: 192.168.5.{100 + i}"
        + (', mac: "dc:a6:32:00:00:07"' if f"worker{i}" == mac_for else "") + "}\n"
        for i in range(1, nodes))
    return f"user:\n  ssh_keys: [{key}]\nworkers:\n  nodes:\n{workers}"


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        # The base images trust this archive's key, so both are kept together.
        os.environ["PIBAKE_TEST_APT_ARCHIVE"] = str(work / f"bake-fixture-{FIXTURE_VERSION}" / "apt-archive")
        self.scratch = work / "scratch"
        self.key = work / "operator" / "id_ed25519"
        if not self.key.exists():
            self.key.parent.mkdir(parents=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.archive = Mirror(apt_repo.shared())
        self.env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"),
                    "PIBAKE_APT_MIRRORS": f"http://deb.debian.org/debian={self.archive.base}/debian"}

    def project(self, nodes: int, mac_for: str | None = None) -> Path:
        project = self.scratch / "project"
        (project / "profiles").mkdir(parents=True, exist_ok=True)
        (project / "profiles/cluster.yaml").write_text(profile_text(self.key.with_suffix(".pub"), nodes, mac_for))
        return project

    def clean(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)

    def warm(self, base: Path) -> None:
        """One appliance launch before anything is timed: what pibake learns about the
        machine on its first launch (that KVM hangs here, say) is known to every run."""
        os.environ.update(self.env)
        with Appliance([Drive(base, readonly=True)]):
            pass

    def floor(self, base: Path, nodes: int) -> float:
        self.clean()
        start = time.monotonic()
        for i in range(nodes):
            subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(base), str(self.scratch / f"{i}.img")], check=True)
        subprocess.run(["sync"], check=True)
        return time.monotonic() - start

    def naive(self, base: Path, nodes: int) -> float:
        self.clean()
        project = self.project(nodes)
        os.environ.update(self.env)  # the same apt cache and archive as pibake's
        start = time.monotonic()
        profile = load(project / "profiles/cluster.yaml")
        keys = KeyStore(project / "state")
        plans = None
        for index, node in enumerate(profile.nodes):
            path = self.scratch / f"{node.hostname}.img"
            image.copy_image(base, path)
            with Appliance([Drive(path)]) as appliance:
                if plans is None:
                    facts = appliance.facts(0)
                    debs = stage_packages(profile, profile.nodes, facts.apt, cache.layout())
                    plans = plans_for(profile, profile.nodes, facts.release(), keys, debs)
                # What one virt-customize run per node does: read what it edits, then write.
                plan = plans[index]
                with appliance.base(plan.release.boot_dir) as base_files:
                    changes = prepare([plan], base_files)
                write_in_appliance(appliance, plan.release.boot_dir, changes[0])
            image.fsync(path)
            image.sha256_file(path)
        return time.monotonic() - start

    def pibake(self, base: Path, nodes: int, fresh: bool = True, mac_for: str | None = None) -> dict:
        if fresh:
            self.clean()
        project = self.project(nodes, mac_for)
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "builder", "build", "cluster", "--image", str(base), "-v"],
                              cwd=project, env=self.env, capture_output=True, text=True)
        seconds = time.monotonic() - start
        if done.returncode != 0:
            raise SystemExit(f"pibake build failed:\n{done.stderr}")
        launch = re.search(r"appliance up in ([\d.]+) s using (\w+)", done.stderr)
        rss = re.search(r"peak RSS: ([\d.]+) MiB", done.stderr)
        return {"seconds": seconds, "launch_seconds": float(launch[1]) if launch else 0.0,
                "accelerator": launch[2] if launch else "none",
                "peak_rss_mib": float(rss[1]), "skipped": done.stderr.count("unchanged, skipped"),
                "baked": len(re.findall(r"^\S+\s+output/\S+\.img .* baked$", done.stdout, re.M))}

    def close(self) -> None:
        self.archive.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


def run_case(bench: Bench, kind: str, nodes: int, runs: int, naive_runs: int) -> dict:
    base = base_image(bench.work, kind)
    bench.warm(base)
    floors, naives, pibakes = [], [], []
    for i in range(runs):
        floors.append(bench.floor(base, nodes))
        if i < naive_runs:
            naives.append(bench.naive(base, nodes))
        pibakes.append(bench.pibake(base, nodes))
        print(f"  {kind} N={nodes} run {i + 1}/{runs}: floor {floors[-1]:.1f} s"
              + (f", naive {naives[-1]:.1f} s" if i < naive_runs else "")
              + f", pibake {pibakes[-1]['seconds']:.1f} s (launch {pibakes[-1]['launch_seconds']:.1f} s), "
              f"peak RSS {pibakes[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    floor = statistics.median(floors)
    naive = statistics.median(naives)
    pib = statistics.median(p["seconds"] for p in pibakes)
    launch = statistics.median(p["launch_seconds"] for p in pibakes)
    return {
        "base": kind, "nodes": nodes, "base_bytes": base.stat().st_size, "base_allocated_bytes": base.stat().st_blocks * 512,
        "floor_seconds": floors, "naive_seconds": naives, "pibake": pibakes,
        "floor_median": floor, "naive_median": naive, "pibake_median": pib, "launch_median": launch,
        "accelerator": pibakes[-1]["accelerator"],
        "pibake_over_floor": pib / floor, "pibake_minus_floor": pib - floor, "naive_over_pibake": naive / pib,
        "allowed_over_floor": launch + nodes, "peak_rss_mib": max(p["peak_rss_mib"] for p in pibakes),
    }


def run_rebuild(bench: Bench, nodes: int, runs: int) -> dict:
    """Rebuilds of the N-node cluster: one worker's MAC is added, removed, added, ...

    Each change rebuilds the master (its DHCP reservations) and checks the other
    images; allowed is one copy, one launch and the 1 s per node baked that the first
    target allows."""
    base = base_image(bench.work, "small")
    one_copy = bench.floor(base, 1)
    bench.pibake(base, nodes)  # the cluster as it was
    unchanged = bench.pibake(base, nodes, fresh=False)  # nothing changed: every image checked, none baked
    rebuilds = [bench.pibake(base, nodes, fresh=False, mac_for="worker7" if i % 2 == 0 else None) for i in range(runs)]
    for r in rebuilds:
        r["allowed_seconds"] = one_copy + r["launch_seconds"] + r["baked"]
        print(f"  rebuild N={nodes}: {r['seconds']:.1f} s, {r['baked']} baked, {r['skipped']} unchanged, "
              f"launch {r['launch_seconds']:.1f} s, allowed {r['allowed_seconds']:.1f} s", flush=True)
    return {"nodes": nodes, "one_copy_seconds": one_copy, "nothing_changed": unchanged, "rebuilds": rebuilds,
            "rebuild_median": statistics.median(r["seconds"] for r in rebuilds),
            "allowed_median": statistics.median(r["allowed_seconds"] for r in rebuilds),
            "over_allowed_max": max(r["seconds"] - r["allowed_seconds"] for r in rebuilds)}


def write_in_appliance(appliance: Appliance, boot_dir: str, changes: Changes) -> None:
    """One node's changes written through the appliance, as virt-customize writes: the guest's
    kernel mounts the copy, and tar unpacks the root file system's files into it."""
    g = appliance.g
    boot, root = appliance.partitions(0, check=False)
    g.mount_vfs("", "ext4", root, "/")
    if changes.touches_boot:
        g.mount_vfs("", "vfat", boot, boot_dir)
    for old, new in changes.moves:
        g.mv(old, new)
    for path in changes.deletes:
        g.rm_f(path)
    with tempfile.NamedTemporaryFile(suffix=".tar") as archive:
        with tarfile.open(fileobj=archive, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted(changes.root, key=lambda p: p.split("/")):
                st = changes.root[path]
                info = tarfile.TarInfo(path.lstrip("/"))
                info.mode, (info.uid, info.gid), info.mtime = st.mode, st.owner, time.time()
                data = changes.contents.get(path)
                info.type = {"dir": tarfile.DIRTYPE, "link": tarfile.SYMTYPE}.get(st.kind, tarfile.REGTYPE)
                info.linkname, info.size = st.target, len(data or b"")
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        archive.flush()
        g.tar_in(archive.name, "/")
    for path in changes.boot_mkdirs:
        g.mkdir_p(path)
    for path in changes.boot_deletes:
        g.rm_f(path)
    for path, content in changes.boot_writes.items():
        g.write(path, content)
    g.umount_all()
